"""One fused Adam/AdamW step on flat tensors the caller owns.

For code that already keeps its parameters, gradients and moments in flat buffers
(Megatron- or FSDP-style) and wants the update without the optimizer class.
"""

from __future__ import annotations

import numbers
from itertools import pairwise

import numpy as np
import torch

from . import _backends
from ._layout import CHUNK_COLUMNS, chunk_elements_for, dispatches_to_python, is_inference_tensor
from ._tables import HyperTable, upload

__all__ = ["adam"]

# Chunk tables by (size, device), never freed: the call may come on any stream, and a freed
# table's memory could be handed out while a launch that reads it is still queued. Callers
# of this entry point keep flat buffers, of few sizes; a table is 40 bytes per chunk.
_chunk_tables: dict[tuple, torch.Tensor] = {}
_zero_shift: dict[torch.device, torch.Tensor] = {}


def _single_segment_chunks(numel: int, device: torch.device) -> torch.Tensor:
    key = (numel, device)
    table = _chunk_tables.get(key)
    if table is None:
        size = chunk_elements_for(numel, device)
        starts = np.arange(0, max(numel, 1), size, dtype=np.int64)
        rows = np.zeros((len(starts), CHUNK_COLUMNS), dtype=np.int64)
        rows[:, 0] = starts
        rows[:, 1] = np.minimum(starts + size, numel)
        rows[:, 4] = np.arange(len(starts))
        table = upload(rows, device)
        _chunk_tables[key] = table
    return table


def _check_plain(**tensors):
    for name, tensor in tensors.items():
        if tensor is not None and dispatches_to_python(tensor):
            raise TypeError(
                f"{name} is a {type(tensor).__name__}, a tensor subclass with __torch_dispatch__, whose values the "
                "Triton kernel cannot reach: pass the plain tensor that holds them (a DTensor's to_local()), "
                "or use backend=\"torch\", which calls torch's fused kernel through the subclass"
            )


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what both backends update


def _check(param, grad, exp_avg, exp_avg_sq, step, max_exp_avg_sq, amsgrad):
    tensors = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sq")
        tensors["max_exp_avg_sq"] = max_exp_avg_sq
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise ValueError(f"{name} must be a dense tensor, got layout {tensor.layout}")
        if tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device: it holds no values")
        if tensor.device != param.device or tensor.shape != param.shape:
            raise ValueError(f"{name} must have param's shape {tuple(param.shape)} and device {param.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    if grad.dtype != param.dtype:
        raise ValueError(f"grad dtype {grad.dtype} differs from param dtype {param.dtype}")
    if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.dtype != torch.float32:
        raise ValueError("step must be a one-element float32 tensor (as torch's state['step'])")
    if step.device != param.device:
        raise ValueError(f"step must be on {param.device}")
    written = {name: t for name, t in tensors.items() if name != "grad"}
    written["step"] = step
    for name, tensor in written.items():
        if tensor.is_neg():
            # Its memory holds the negated values, and the update writes memory: the result
            # would be neither negated nor not. (A gradient, only read, is resolved instead.)
            raise ValueError(
                f"{name} is a view with a pending negation (torch._neg_view): it is updated in place, "
                "so it must hold its own values; pass tensor.resolve_neg()"
            )
    # A count below zero makes the bias correction divide by zero (torch's functional adam
    # raises). Read only on the CPU: on a GPU, reading it would wait for the device.
    if step.device.type == "cpu" and float(step) < 0:
        raise ValueError(f"step counts the completed steps: it must be >= 0, got {float(step)}")
    if not torch.is_inference_mode_enabled():
        for name, tensor in written.items():
            if is_inference_tensor(tensor):
                # RuntimeError, as torch raises for the in-place update it would attempt
                raise RuntimeError(
                    f"{name} is an inference tensor (made under torch.inference_mode()): it cannot be "
                    "updated in place outside inference mode"
                )
    _check_no_aliasing({**tensors, "step": step})


def _check_no_aliasing(tensors: dict) -> None:
    """Each tensor is read or written as a whole, in one pass: two that share memory (the
    gradient passed as exp_avg, overlapping slices of one buffer) would give numbers that
    depend on the order of that pass."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name) for name, t in tensors.items() if t.numel()
    )
    for (_, end, name), (start, _, other) in pairwise(spans):
        if start < end:
            raise ValueError(f"{name} and {other} share memory; each must have memory of its own")


def _check_hyperparameters(**values) -> None:
    # Both backends read each as one real number; anything else must fail before the step counts.
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            one_number = value.numel() == 1 and not value.is_complex() and value.device.type != "meta"
        else:
            one_number = isinstance(value, numbers.Real)
        if not one_number:
            raise ValueError(f"{name} must be a number or a one-element tensor, got {value!r}")


@torch.no_grad()
def adam(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None = None,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    backend: str = "auto",
) -> None:
    """Apply one Adam step (AdamW with ``decoupled_weight_decay=True``) in place.

    ``param``, ``grad``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``amsgrad``)
    are contiguous tensors of one shape on one device; ``step`` is the completed-step count
    (a one-element float32 tensor on that device, like ``state["step"]``) and is incremented.
    The math is that of :class:`adam_triton.Adam`. With ``backend="triton"`` or ``"auto"`` on
    CUDA this is one kernel launch plus the increment of ``step``, and the upload of a small
    table of the hyperparameters (from pinned memory, asynchronous; so the call cannot be
    captured in a CUDA graph, where the optimizer's step can); with ``"torch"`` it is
    torch's fused kernel (``torch._fused_adam_`` / ``torch._fused_adamw_``), on float32
    (float64) copies when the tensors' dtypes differ. Flags may be any truthy value. Bad
    input (another shape, device or dtype, tensors that share memory, an inference tensor
    outside inference mode, a written tensor with a pending negation, a sparse or meta
    tensor, a negative ``step`` on the CPU; for the Triton kernel, a tensor subclass with
    ``__torch_dispatch__``) raises before anything is written, ``step`` included.
    """
    amsgrad, maximize, decoupled_weight_decay = bool(amsgrad), bool(maximize), bool(decoupled_weight_decay)
    _check(param, grad, exp_avg, exp_avg_sq, step, max_exp_avg_sq, amsgrad)
    grad = grad.resolve_conj().resolve_neg()  # a lazy view's bytes are not its values (a copy, if it is one)
    _check_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    implementation = _backends.resolve_backend(backend, param.device)
    if implementation == "triton":
        _check_plain(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, max_exp_avg_sq=max_exp_avg_sq)
    # One group's row, device-held values copied on the device, as the optimizer's own table.
    # A table of its own per call: one shared between calls would be rewritten under a kernel
    # still reading it on another stream, or under a CUDA graph that captured its address.
    table = HyperTable()
    table.refresh([{"lr": lr, "betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay}])
    if implementation == "torch":
        fused = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
        stored = [param, grad, exp_avg, exp_avg_sq] + ([max_exp_avg_sq] if amsgrad else [])
        # torch's kernel wants one dtype: moments of another dtype than the parameter (as
        # the Triton kernel takes them) are computed on copies in the compute dtype.
        compute = torch.float64 if param.dtype == torch.float64 else torch.float32
        mixed = len({t.dtype for t in stored}) > 1
        working = [t.to(compute) for t in stored] if mixed else stored
        # torch's kernel takes numbers, or lr as a float32 tensor on the device (read there).
        lr, beta1, beta2, eps, weight_decay = table.row(0, param.device)
        beta1, beta2, eps, weight_decay = map(float, (beta1, beta2, eps, weight_decay))
        step += 1  # torch's kernel reads the count of the step it takes
        try:
            fused(
                [working[0]], [working[1]], [working[2]], [working[3]], working[4:], [step.view(())],
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
            )
        except Exception:
            step -= 1  # its checks run before it writes anything
            raise
        if mixed:
            for target, result in zip(stored, working):
                if target is not grad:
                    target.copy_(result)
        return
    hyper = table.on(param.device)
    if param.device not in _zero_shift:
        _zero_shift[param.device] = upload(np.zeros(1, dtype=np.int64), param.device)
    _backends.kernels().adam_chunked_update(
        param.view(-1),
        grad.view(-1),
        exp_avg.view(-1),
        exp_avg_sq.view(-1),
        max_exp_avg_sq.view(-1) if amsgrad else None,
        _zero_shift[param.device],
        _single_segment_chunks(param.numel(), param.device),
        step.view(1),
        hyper,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        bump_steps=False,
        param_shifts=_zero_shift[param.device],
    )
    step += 1
