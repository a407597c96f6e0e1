"""Constructor checks, in torch.optim.Adam's order and with its messages, plus our own."""

from __future__ import annotations

import numbers

import numpy as np
import torch

BACKENDS = ("auto", "triton", "torch")


def check_hyperparameters(lr, betas, eps, weight_decay, *, foreach, capturable) -> tuple:
    """Raise as torch.optim.Adam would for bad hyperparameters; return betas as scalars.

    The checks, their order, exception types and messages follow torch 2.13's Adam, so code
    that catches torch's errors keeps working.
    """
    if isinstance(lr, torch.Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    both_floats = isinstance(betas[0], float) and isinstance(betas[1], float)
    both_tensors = isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor)
    if not (both_floats or both_tensors):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if not capturable and foreach:
                raise ValueError(
                    f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True"
                )
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")
    return tuple(_to_scalar(beta) for beta in betas)


def _to_scalar(value):
    # As torch: a 1-element tensor of any shape becomes a 0-dim tensor.
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        return value.squeeze()
    return value


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_implementation_flags(*, foreach, fused, differentiable, torch_class: str) -> None:
    """Raise for flag combinations torch rejects (it checks them after the parameters, so
    the optimizer checks them there too), and for differentiable mode, pointing to
    ``torch.optim.<torch_class>``."""
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable:
        raise RuntimeError(
            "adam_triton does not support differentiable=True: its update runs in a fused kernel "
            f"outside autograd. Use torch.optim.{torch_class}(differentiable=True) to differentiate "
            "through the optimizer step."
        )


def check_precision_options(master_weights, state_dtype, stochastic_rounding, stochastic_rounding_seed) -> None:
    """Raise for precision options that cannot work, whatever the parameters are."""
    floating = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if state_dtype is not None and state_dtype not in floating:
        raise ValueError(f"state_dtype must be one of {floating} or None, got {state_dtype!r}")
    # (A config file's "False" is a true string: flags are booleans, not anything truthy.)
    for name, flag in (("master_weights", master_weights), ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    seed = stochastic_rounding_seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**62:
        raise ValueError(f"stochastic_rounding_seed must be an int in [0, 2**62), got {seed!r}")
