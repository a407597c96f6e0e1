"""Shared pieces of the tests: targets, a model with awkward sizes, training loops."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map

import adam_triton

#: triton is installed and new enough for the kernel (>= 3.6).
TRITON = adam_triton._backends.triton_importable()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and TRITON


def _interpreter_fma_rounds_once() -> bool:
    """Triton's interpreter computed ``tl.fma`` as a product and then a sum, rounding twice,
    before 3.9 (seen in 3.6 and 3.8; compiled kernels round once on every version)."""
    if not INTERPRETER:
        return False
    import triton

    return adam_triton._backends.triton_version(triton) >= (3, 9)


INTERPRETER_FMA_ROUNDS_ONCE = _interpreter_fma_rounds_once()
FP32_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Target:
    device: str
    backend: str

    def __str__(self) -> str:
        return f"{self.device}-{self.backend}"


# Sizes that straddle everything the layout and kernel care about: a single element, the
# 16-element alignment, a tile (1024 fp32 elements) +- 1, and several chunks.
ODD_SHAPES = [(1,), (17,), (1023,), (1025,), (7, 13), (3, 5, 11), (2, 1031)]


class OddModel(nn.Module):
    """Parameters of awkward sizes, each getting a different, nonlinear gradient."""

    def __init__(self, shapes=ODD_SHAPES, seed: int = 0, dtype=torch.float32):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype) * 0.5) for shape in shapes
        )
        for index, shape in enumerate(shapes):
            self.register_buffer(f"mix{index}", torch.randn(shape, generator=generator, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros(())
        for index, weight in enumerate(self.weights):
            mix = getattr(self, f"mix{index}")
            loss = loss + ((weight * mix).sum() * x[index % x.numel()] - 1.0) ** 2 / weight.numel()
            loss = loss + (weight.sin() * mix).mean() * x[(index + 1) % x.numel()]
        return loss


def paired(make_model, device, dtype=torch.float32):
    """Two identical models on ``device``: one for adam_triton, one for torch. ``dtype=None``
    keeps each parameter's own dtype (a model that mixes real and complex ones)."""
    ours = make_model()
    if dtype is not None and not dtype.is_complex and any(p.is_complex() for p in ours.parameters()):
        # Module.to(dtype) casts complex parameters too, silently dropping their imaginary
        # parts: the test would no longer have the complex parameter it was written for.
        raise ValueError(f"paired(dtype={dtype}) would make the model's complex parameters real; pass dtype=None")
    ours = ours.to(device=device, dtype=dtype) if dtype else ours.to(device)
    reference = copy.deepcopy(ours)
    return ours, reference


def optimizers(ours_model, reference_model, cls_name: str, backend: str, params_fn=None, **kwargs):
    params_fn = params_fn or (lambda model: model.parameters())
    ours = getattr(adam_triton, cls_name)(params_fn(ours_model), backend=backend, **kwargs)
    reference = getattr(torch.optim, cls_name)(params_fn(reference_model), **kwargs)
    return ours, reference


def train(model, optimizer, steps: int, seed: int = 1, set_to_none: bool = True, scheduler=None):
    """A real loop: fresh random data, zero_grad, loss.backward(), step."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    losses = []
    for _ in range(steps):
        x = torch.randn(8, generator=generator).to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)
        optimizer.zero_grad(set_to_none=set_to_none)
        loss = model(x)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def assert_close_params(ours_model, reference_model, rtol=2e-5, atol=2e-6):
    for (name, a), b in zip(ours_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def assert_close_state(ours_opt, reference_opt, ours_model, reference_model, rtol=2e-5, atol=2e-6):
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        ours_state, reference_state = ours_opt.state.get(a, {}), reference_opt.state.get(b, {})
        assert set(ours_state) == set(reference_state)
        for key in reference_state:
            expected = reference_state[key]
            actual = ours_state[key]
            if key == "step":
                assert float(actual) == float(expected)
                continue
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


class Wrapped(torch.Tensor):
    """A ``__torch_dispatch__`` wrapper that keeps its values in a tensor of its own, as
    torchao's quantized tensors do: its own storage holds nothing."""

    @staticmethod
    def __new__(cls, values):
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, values.shape, strides=values.stride(), dtype=values.dtype, device=values.device
        )
        wrapper.values = values
        return wrapper

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.values if isinstance(x, Wrapped) else x
        rewrap = lambda x: Wrapped(x) if type(x) is torch.Tensor else x
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(rewrap, out)
