"""The two implementations of one step over a flat buffer, and the choice between them.

* ``triton``: the fused kernel in ``adam_triton.kernels``, one launch per buffer (per kernel
  variant present in it), reading gradients in place through the shift table.
* ``torch``: pure PyTorch. torch's own fused Adam kernel (``torch._fused_adam_`` /
  ``torch._fused_adamw_``) over views of the same flat buffers: one call per parameter
  group per buffer, on a single flat span when the gradients are in the buffer's gradient
  buffer, else on the list of segment views. Same math, same state.
"""

from __future__ import annotations

import operator
import os
from itertools import compress

import numpy as np
import torch

from ._gradients import GradientPlan
from ._layout import FlatBuffer
from ._tables import HyperTable, upload
from ._validation import BACKENDS

_INTERPRET_HINT = (
    "set TRITON_INTERPRET=1 in the environment before triton is first imported "
    "(to run the Triton kernel on CPU tensors through Triton's interpreter), "
    'or use backend="torch" / backend="auto" for CPU parameters'
)


def kernels():
    """``adam_triton.kernels``, imported (with triton) on first use."""
    import adam_triton.kernels as module

    return module


def triton_importable() -> bool:
    try:
        kernels()
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: torch.device) -> str:
    """The implementation that will update a buffer on ``device``; raise if none can."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    # requested == "triton"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f'backend="triton" got parameters on the CPU: {_INTERPRET_HINT}.')
        if not kernels().is_interpreted():
            raise RuntimeError(
                'backend="triton" got parameters on the CPU, but triton was imported before '
                f"TRITON_INTERPRET=1 was set, so its kernels cannot run on the CPU: {_INTERPRET_HINT}."
            )
        return "triton"
    if device.type != "cuda":
        raise RuntimeError(f'backend="triton" supports CUDA (and ROCm) devices, not {device.type}.')
    try:
        kernels()
    except ImportError as error:
        raise RuntimeError(f'backend="triton" needs the triton package: {error}') from error
    return "triton"


def update_triton(buffer: FlatBuffer, plan: GradientPlan, hyper: HyperTable) -> None:
    if plan.shifts_changed or buffer.shifts_on_device is None:
        buffer.shifts_on_device = upload(plan.shifts, buffer.device)
    hyper_table = hyper.on(buffer.device)
    launch = kernels().adam_chunked_update
    for (amsgrad, maximize, decoupled), first, end in buffer.chunk_ranges:
        launch(
            buffer.param,
            buffer.param,
            buffer.exp_avg,
            buffer.exp_avg_sq,
            buffer.max_exp_avg_sq,
            buffer.shifts_on_device,
            buffer.chunks_on_device[first:end],
            buffer.steps,
            hyper_table,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled,
        )


def _pick(items: list, indices: np.ndarray) -> list:
    if len(indices) == 1:
        return [items[int(indices[0])]]
    return list(operator.itemgetter(*indices.tolist())(items))


def _fused_arguments(group: dict, device: torch.device) -> dict:
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.device != device:
        lr = float(lr)
    return {
        "lr": lr,
        "beta1": float(beta1),
        "beta2": float(beta2),
        "weight_decay": float(group["weight_decay"]),
        "eps": float(group["eps"]),
        "amsgrad": bool(group["amsgrad"]),
        "maximize": bool(group["maximize"]),
    }


@torch.no_grad()
def update_torch(buffer: FlatBuffer, plan: GradientPlan, groups: list[dict]) -> None:
    on_cpu = buffer.device.type == "cpu"
    counts = buffer.steps.numpy() if on_cpu else None
    for group_index, first, last in buffer.group_ranges:
        has_grad = plan.has_grad[first : last + 1]
        if not has_grad.any():
            continue
        group = groups[group_index]
        amsgrad = bool(group["amsgrad"])
        if amsgrad:
            buffer.ensure_max_exp_avg_sq()
        fused = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        # torch's fused kernel expects the step count of this update: counted before it runs.
        leaders = buffer.leaders[first : last + 1]
        flat = (
            on_cpu
            and has_grad.all()
            and plan.in_grad_buffer[first : last + 1].all()
            and (counts[leaders] == counts[leaders[0]]).all()
        )
        if flat:
            step = buffer.steps[int(leaders[0]) : int(leaders[0]) + 1].view(())
            _count_segments(buffer, np.arange(first, last + 1))
            fused(
                [buffer.segment_slice(buffer.param, first, last)],
                [buffer.segment_slice(buffer.grad, first, last)],
                [buffer.segment_slice(buffer.exp_avg, first, last)],
                [buffer.segment_slice(buffer.exp_avg_sq, first, last)],
                [buffer.segment_slice(buffer.max_exp_avg_sq, first, last)] if amsgrad else [],
                [step],
                **_fused_arguments(group, buffer.device),
            )
            continue
        segments = first + np.flatnonzero(has_grad)
        _count_segments(buffer, segments)
        grads = _pick(plan.grads, segments)
        if buffer.has_complex:
            grads = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
        fused(
            _pick(buffer.real_views("param"), segments),
            grads,
            _pick(buffer.real_views("exp_avg"), segments),
            _pick(buffer.real_views("exp_avg_sq"), segments),
            _pick(buffer.real_views("max_exp_avg_sq"), segments) if amsgrad else [],
            _pick(buffer.step_views, segments),
            **_fused_arguments(group, buffer.device),
        )


def _count_segments(buffer: FlatBuffer, segments: np.ndarray) -> None:
    """Add one to the counters of every chunk of ``segments``."""
    chunks = np.flatnonzero(np.isin(buffer.chunk_segment, segments))
    if buffer.device.type == "cpu":
        buffer.steps.numpy()[chunks] += 1.0
    else:
        torch._foreach_add_(_pick(buffer.chunk_step_views, chunks), 1.0)
    buffer.steps_version = buffer.steps._version
