"""Host launcher for the chunked Adam kernel: checks its inputs, picks the variant, launches.

The launcher knows the kernel's layout contract (see ``_adam_kernel``) but nothing about
optimizers, parameter groups or checkpoints.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import triton.language as tl

from . import _adam_kernel
from ._adam_kernel import _adam_chunk_kernel

__all__ = [
    "NO_GRADIENT",
    "SEGMENT_ALIGNMENT_BYTES",
    "adam_chunked_update",
    "block_size",
    "is_interpreted",
]

#: Segments should start on this many bytes so that accesses are whole 16-byte vectors.
#: Correctness does not depend on it: triton specialises each launch on the pointers'
#: actual alignment, and a misaligned buffer only loses vectorisation.
SEGMENT_ALIGNMENT_BYTES = 128

#: Shift that marks a segment without a gradient: it is neither updated nor counted.
NO_GRADIENT: int = _adam_kernel.NO_GRADIENT.value
_ACCESS_BYTES = 16  # one vector load per thread
_UNROLL = 2  # vectors per thread per tile
#: Warps per program, for every launch.
NUM_WARPS = 4
#: Contract a * b + c into FMAs, as triton 3.6 to 3.9 do by default (3.10 turns the default
#: off): the kernel compiles, and rounds, the same whichever triton runs it.
ENABLE_FP_FUSION = True
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_interpreted() -> bool:
    """True when this process imported triton with ``TRITON_INTERPRET=1`` (kernels run on CPU)."""
    return type(_adam_chunk_kernel).__name__ == "InterpretedFunction"


def block_size(dtype: torch.dtype) -> int:
    """Elements one program handles per tile: 16-byte accesses for every storage dtype."""
    elements_per_access = _ACCESS_BYTES // dtype.itemsize
    return NUM_WARPS * 32 * elements_per_access * _UNROLL


def tile_constants(dtype: torch.dtype) -> dict[str, int]:
    """The compile-time tile every launch for storage ``dtype`` specialises the kernel on:
    ``BLOCK`` elements per program and tile, ``VEC`` elements per 16-byte access."""
    return {"BLOCK": block_size(dtype), "VEC": _ACCESS_BYTES // dtype.itemsize}


def _fail(message: str) -> None:
    raise ValueError(f"adam_chunked_update: {message}")


def _check(param, grad_base, exp_avg, exp_avg_sq, max_exp_avg_sq, grad_shifts, chunks, steps, hyper,
           amsgrad, bump_steps, param_copy, grad_scale, found_inf, stochastic_rounding_seed, param_shifts):
    named = {"param": param, "grad_base": grad_base, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
             "grad_shifts": grad_shifts, "chunks": chunks, "steps": steps, "hyper": hyper}
    optional = {"max_exp_avg_sq": max_exp_avg_sq, "param_copy": param_copy, "param_shifts": param_shifts,
                "grad_scale": grad_scale, "found_inf": found_inf}
    named.update((name, value) for name, value in optional.items() if value is not None)
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            _fail(f"{name} must be a tensor, got {type(value).__name__}")
    if param.dtype not in _SUPPORTED:
        _fail(f"param dtype {param.dtype} is not one of {_SUPPORTED}")
    if param_copy is not None:
        if param.dtype != torch.float32:
            _fail(f"with param_copy, param holds the float32 master weights; got {param.dtype}")
        if param_copy.device != param.device:
            _fail(f"param_copy is on {param_copy.device}, param on {param.device}")
        if param_copy.dtype not in _SUPPORTED:
            _fail(f"param_copy dtype {param_copy.dtype} is not one of {_SUPPORTED}")
    model_dtype = param.dtype if param_copy is None else param_copy.dtype
    if grad_base.dtype != model_dtype:
        _fail(f"grad_base dtype {grad_base.dtype} differs from the parameters' dtype {model_dtype}")
    if grad_base.device != param.device:
        _fail(f"grad_base is on {grad_base.device}, param on {param.device}")
    if not grad_base.is_contiguous():
        # Only its first element's address is used: strides would be silently ignored.
        _fail("grad_base must be contiguous: gradients are addressed from its first element, as one flat array")
    buffers = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    # With parameter shifts the model's parameters may live anywhere: their buffer is then
    # only the base the shifts count from.
    model_buffer = "param" if param_copy is None else "param_copy"
    if param_shifts is None or model_buffer != "param":
        buffers["param"] = param
    if amsgrad:
        if max_exp_avg_sq is None:
            _fail("amsgrad=True needs max_exp_avg_sq")
        buffers["max_exp_avg_sq"] = max_exp_avg_sq
    if param_copy is not None and param_shifts is None:
        buffers["param_copy"] = param_copy
    for name, buffer in buffers.items():
        if buffer.device != param.device:
            _fail(f"{name} is on {buffer.device}, param on {param.device}")
        if buffer.numel() != exp_avg.numel() or not buffer.is_contiguous():
            _fail(f"{name} must be contiguous with {exp_avg.numel()} elements like exp_avg")
        if buffer.dtype not in _SUPPORTED:
            _fail(f"{name} dtype {buffer.dtype} is not one of {_SUPPORTED}")
    if stochastic_rounding_seed is not None:
        rounded = [exp_avg, exp_avg_sq] + ([param] if param_copy is None else [])
        rounded += [max_exp_avg_sq] if amsgrad else []
        if all(buffer.dtype != torch.bfloat16 for buffer in rounded):
            _fail(
                "stochastic rounding rounds bfloat16 values: param (without param_copy) or the moments "
                "must be bfloat16"
            )
        if not isinstance(stochastic_rounding_seed, int) or not 0 <= stochastic_rounding_seed < 2**63:
            _fail(f"stochastic_rounding_seed must be an int in [0, 2**63), got {stochastic_rounding_seed!r}")
    tables = {
        "grad_shifts": (grad_shifts, torch.int64, 1),
        "param_shifts": (grad_shifts if param_shifts is None else param_shifts, torch.int64, 1),
        "chunks": (chunks, torch.int64, 2),
        "steps": (steps, torch.float32, None),
        "hyper": (hyper, torch.float64, 2),
    }
    if grad_scale is not None:
        tables["grad_scale"] = (grad_scale, torch.float32, None)
    if found_inf is not None:
        tables["found_inf"] = (found_inf, torch.float32, None)
    for name, (table, dtype, ndim) in tables.items():
        if table.device != param.device:
            _fail(f"{name} is on {table.device}, param on {param.device}")
        if table.dtype != dtype or not table.is_contiguous():
            _fail(f"{name} must be a contiguous {dtype} tensor, got {table.dtype}")
        if ndim is not None and table.dim() != ndim:
            _fail(f"{name} must have {ndim} dimensions, got {table.dim()}")
    for name, scalar in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if scalar is not None and scalar.numel() != 1:
            _fail(f"{name} must hold one value")
    if chunks.shape[1:] != (5,) or hyper.shape[1:] != (5,):
        _fail("chunks must be [n, 5] (start, end, segment, hyper row, step counter) and hyper [rows, 5]")
    if not bump_steps and steps.numel() != 1:
        _fail("with bump_steps=False, steps must hold the one shared step count")
    if chunks.shape[0] and (hyper.shape[0] == 0 or steps.numel() == 0 or grad_shifts.numel() == 0):
        _fail("hyper, steps and grad_shifts must each hold at least one row for the chunks to index")
    # The step counts too (read by programs that write the buffers, and written back with
    # bump_steps). The unscaled gradients are stored back where the shifts point, not over
    # grad_base, which is only the base they count from.
    _check_disjoint({**buffers, "steps": steps})
    if chunks.device.type == "cpu":
        _check_table_values(chunks, exp_avg.numel(), grad_shifts, param_shifts, steps, hyper, bump_steps,
                            tile_constants(model_dtype)["VEC"])


def _check_disjoint(written: dict) -> None:
    """The tensors a launch writes, each its own memory: the programs read and write them
    in parallel, so one that shares memory with another would give racing results."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name) for name, t in written.items() if t.numel()
    )
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            _fail(f"{name} and {other} share memory; each tensor the kernel writes must have memory of its own")


def _check_table_values(chunks, numel, grad_shifts, param_shifts, steps, hyper, bump_steps, vec) -> None:
    """The tables' values, where reading them waits for no device (CPU tensors, under the
    interpreter): an index out of range reads or writes outside the tensors. On a GPU they
    are the caller's contract. (Shifts may address any memory: only their alignment is
    checked.)"""
    rows = chunks.numpy()
    start, end, segment, hyper_row, counter = rows.T
    if ((start < 0) | (start > end) | (end > numel)).any():
        _fail(f"chunk rows must have 0 <= start <= end <= {numel} (the buffers' elements)")
    if (start % 16).any():
        _fail("chunk starts must be multiples of 16 elements")
    segments = grad_shifts.numel() if param_shifts is None else min(grad_shifts.numel(), param_shifts.numel())
    if ((segment < 0) | (segment >= segments)).any():
        _fail(f"chunk segments must index grad_shifts and param_shifts (0 to {segments - 1})")
    if ((hyper_row < 0) | (hyper_row >= hyper.shape[0])).any():
        _fail(f"chunk hyper rows must index hyper (0 to {hyper.shape[0] - 1})")
    if bump_steps:
        if ((counter < 0) | (counter >= steps.numel())).any():
            _fail(f"chunk counters must index steps (0 to {steps.numel() - 1})")
        if len(set(counter.tolist())) != len(counter):
            _fail("with bump_steps, no two chunks may share a step counter")
    shifts = [grad_shifts.numpy()] + ([] if param_shifts is None else [param_shifts.numpy()])
    shifts[0] = shifts[0][shifts[0] != NO_GRADIENT]
    if any((table % vec).any() for table in shifts):
        _fail(f"grad and param shifts must be multiples of {vec} elements (16 bytes)")


def adam_chunked_update(
    param: torch.Tensor,
    grad_base: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    grad_shifts: torch.Tensor,
    chunks: torch.Tensor,
    steps: torch.Tensor,
    hyper: torch.Tensor,
    *,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    bump_steps: bool = True,
    param_copy: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    stochastic_rounding_seed: int | None = None,
    param_shifts: torch.Tensor | None = None,
) -> None:
    """Apply one Adam (or AdamW) step, in place, to every chunk listed in ``chunks``.

    One launch, one program per chunk. Per element, with the chunk's hyperparameter row
    ``(lr, beta1, beta2, eps, weight_decay)`` and ``t`` its step count plus one::

        g = grad / grad_scale                              (with grad_scale; g is stored back)
        g = -g if maximize
        decoupled:  p = p * (1 - lr * weight_decay)       else:  g = g + weight_decay * p
                    (either skipped when weight_decay == 0, as torch skips it)
        m = lerp(m, g, 1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        amsgrad:    v_max = max(v_max, v); v_hat = v_max  else:  v_hat = v
        p = p - lr / (1 - beta1**t) * m / (sqrt(v_hat) / sqrt(1 - beta2**t) + eps)

    Elements are loaded, computed in float32 (float64 for float64 params), and stored in
    each buffer's own dtype. Scalars are formed in float64 and rounded once.

    Args:
        param, exp_avg, exp_avg_sq, max_exp_avg_sq: contiguous buffers sharing one element
            index (ideally on ``SEGMENT_ALIGNMENT_BYTES`` boundaries, for vector accesses).
            ``max_exp_avg_sq`` is only read with ``amsgrad``. The moments may have another
            dtype than ``param``.
        grad_base: a contiguous tensor of the gradients' dtype (the model parameters' dtype); gradients
            are addressed from its first element (see ``grad_shifts``).
        grad_shifts: ``int64[segments]``. The gradient of flat element ``i`` of segment ``s``
            is element ``i + grad_shifts[s]`` counted from ``grad_base``; every shift must be
            a multiple of ``16 // itemsize`` (the kernel tells the compiler so, to vectorise).
            ``NO_GRADIENT`` skips the segment (no update, no count).
        chunks: ``int64[n, 5]`` rows ``(start, end, segment, hyper_row, counter)``; starts
            are multiples of 16 elements and chunks never straddle segments.
        steps: ``float32`` completed-step counters. With ``bump_steps`` each chunk reads
            ``steps[counter]`` and, if it is updated, writes it back incremented; no two
            chunks may share a counter. Otherwise ``steps`` is a single counter that is read
            only (the caller increments it).
        hyper: ``float64[rows, 5]`` rows ``(lr, beta1, beta2, eps, weight_decay)``.
        amsgrad, maximize, decoupled_weight_decay: compile-time variants of the kernel.
        param_copy: master weights. ``param`` is then the float32 master; the update is also
            written, rounded to nearest, into ``param_copy`` (the model's fp16/bf16 values).
        grad_scale: one float32 value gradients are divided by (GradScaler's scale); the
            unscaled gradients are written back.
        found_inf: one float32 value; if it is not 0 nothing at all is updated or counted.
        stochastic_rounding_seed: round whichever of ``param`` (not ``param_copy``, which
            gets the master to nearest) and the moments are bfloat16 up or down at random,
            in proportion to the distance. The random bits come from Philox keyed by this
            seed and each chunk's step count: an independent stream for ``param``,
            ``exp_avg`` and ``exp_avg_sq``, whose bits ``max_exp_avg_sq`` shares so that it
            never rounds below ``exp_avg_sq``.
        param_shifts: optional ``int64[segments]`` for model parameters that live outside
            their flat buffer (``param``, or ``param_copy`` with master weights, is then only
            the base): flat element ``i`` of segment ``s`` is element ``i + param_shifts[s]``
            counted from it; 0 for a segment in the buffer. Multiples of ``16 // itemsize``.

    Raises ``ValueError`` before launching for tensors of the wrong kind, size or device,
    for tensors the launch writes that share memory, and, where the tables are CPU tensors
    (the interpreter), for chunk rows that index past the buffers or tables, shared step
    counters and misaligned shifts. On a GPU the tables' values are the caller's contract:
    reading them would wait for the device.
    """
    _check(param, grad_base, exp_avg, exp_avg_sq, max_exp_avg_sq, grad_shifts, chunks, steps, hyper,
           amsgrad, bump_steps, param_copy, grad_scale, found_inf, stochastic_rounding_seed, param_shifts)
    n_chunks = chunks.shape[0]
    if n_chunks == 0:
        return
    compute_dtype = tl.float64 if param.dtype == torch.float64 else tl.float32
    model_dtype = param.dtype if param_copy is None else param_copy.dtype
    # Triton launches on the current device's current stream: tensors on another GPU (model
    # parallelism without set_device) would get the wrong device and an unordered stream.
    with torch.cuda.device(param.device) if param.device.type == "cuda" else contextlib.nullcontext():
        _adam_chunk_kernel[(n_chunks,)](
            param,
            param if param_copy is None else param_copy,
            grad_base,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq if amsgrad else exp_avg_sq,
            grad_shifts,
            torch.zeros_like(grad_shifts) if param_shifts is None else param_shifts,
            chunks,
            steps,
            hyper,
            steps if grad_scale is None else grad_scale,
            steps if found_inf is None else found_inf,
            0 if stochastic_rounding_seed is None else stochastic_rounding_seed,
            **tile_constants(model_dtype),
            AMSGRAD=amsgrad,
            MAXIMIZE=maximize,
            DECOUPLED_WEIGHT_DECAY=decoupled_weight_decay,
            BUMP_STEPS=bump_steps,
            COMPUTE_DTYPE=compute_dtype,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            WRITE_PARAM_COPY=param_copy is not None,
            STOCHASTIC_ROUNDING=stochastic_rounding_seed is not None,
            num_warps=NUM_WARPS,
            enable_fp_fusion=ENABLE_FP_FUSION,
        )
