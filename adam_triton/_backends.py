"""The two implementations of one step over a flat buffer, and the choice between them.

* ``triton``: the fused kernel in ``adam_triton.kernels``, one launch per buffer (per kernel
  variant present in it), reading gradients in place through the shift table.
* ``torch``: pure PyTorch over views of the same flat buffers: torch's own fused Adam
  kernel (``torch._fused_adam_`` / ``torch._fused_adamw_``), one call per parameter group
  per buffer, on a single flat span when the gradients are in the buffer's gradient buffer,
  else on the list of segment views (on one thread for lists of many small tensors).
  Master weights, a separate state dtype or stochastic rounding
  (which torch's kernel cannot do) run it on float32 (float64) working copies, whose
  results are then rounded back (stochastically, for stochastic rounding).
"""

from __future__ import annotations

import operator
import os
import re
import warnings
from itertools import compress

import numpy as np
import torch

from ._grad_mode import no_grad
from ._gradients import GradientPlan
from ._layout import FlatBuffer, segments_in_groups
from ._one_thread import run_on_one_thread
from ._tables import HyperTable, refuse_upload_while_capturing, upload
from ._validation import BACKENDS

__all__ = ["kernels", "refuse_upload_while_capturing", "resolve_backend", "update_torch", "update_triton"]

_INTERPRET_HINT = (
    "set TRITON_INTERPRET=1 in the environment before triton is first imported "
    "(to run the Triton kernel on CPU tensors through Triton's interpreter), "
    'or use backend="torch" / backend="auto" for CPU parameters'
)
_GOLDEN = 0x9E3779B9  # spreads step counts over the random key, as the kernel does


def kernels():
    """``adam_triton.kernels``, imported (with triton) on first use."""
    import adam_triton.kernels as module

    return module


#: The oldest triton the kernel is built and tested for.
MIN_TRITON = (3, 6)


def triton_version(triton) -> tuple[int, ...]:
    """(major, minor) of an imported triton module ("3.9.0+git1a2b" gives (3, 9))."""
    return tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])


def triton_unusable() -> str | None:
    """Why the Triton kernel cannot run in this process, or None if it can."""
    try:
        import triton
    except ImportError as error:
        return f"the triton package cannot be imported ({error})"
    if triton_version(triton) < MIN_TRITON:
        return f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest adam-triton supports"
    return None


def triton_importable() -> bool:
    return triton_unusable() is None


def _warn_falling_back(reason: str) -> None:
    warnings.warn(  # (the warnings registry shows it once per process, unless filters say otherwise)
        f"adam-triton: {reason}, so CUDA parameters are updated by the pure-PyTorch backend "
        "(torch's fused kernel over the flat buffers: the same numbers, without the single launch). "
        "Upgrade torch (a CUDA build brings the triton it was built with: torch 2.11's is 3.6), or pass "
        'backend="torch" to choose this deliberately.',
        RuntimeWarning,
        stacklevel=2,
    )


def resolve_backend(requested: str, device: torch.device) -> str:
    """The implementation that will update a buffer on ``device``; raise if none can."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if device.type != "cuda":
            return "torch"
        reason = triton_unusable()
        if reason is not None:
            _warn_falling_back(reason)
            return "torch"
        return "triton"
    # requested == "triton"
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f'backend="triton" supports CUDA (and ROCm) devices, not {device.type}.')
    # Without a usable triton, no environment variable helps: say that first.
    reason = triton_unusable()
    if reason is not None:
        raise RuntimeError(f'backend="triton" needs triton >= 3.6: {reason}.')
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f'backend="triton" got parameters on the CPU: {_INTERPRET_HINT}.')
    if device.type == "cpu" and not kernels().is_interpreted():
        raise RuntimeError(
            'backend="triton" got parameters on the CPU, but adam_triton\'s kernels were loaded before '
            f"TRITON_INTERPRET=1 was set, so they cannot run on the CPU: {_INTERPRET_HINT}."
        )
    return "triton"


# -- triton -----------------------------------------------------------------------------------
def update_triton(buffer: FlatBuffer, plan: GradientPlan, hyper: HyperTable, grad_scale=None, found_inf=None) -> None:
    # Fresh gradients often land where the last step's were (the caching allocator): the
    # table is uploaded only when some gradient moved.
    uploaded = buffer.uploaded_shifts
    if uploaded is None or (plan.shifts is not uploaded and plan.shifts.tobytes() != uploaded.tobytes()):
        refuse_upload_while_capturing(buffer.device, "the gradient tensors")
        buffer.shifts_on_device = upload(plan.shifts, buffer.device)
        buffer.uploaded_shifts = plan.shifts
    if buffer.param_shifts_on_device is None:
        refuse_upload_while_capturing(buffer.device, "the parameters' places")
        buffer.param_shifts_on_device = upload(buffer.param_shifts, buffer.device)
    hyper_table = hyper.on(buffer.device)
    buffer.stage_in()
    precision = buffer.precision
    launch = kernels().adam_chunked_update
    for (amsgrad, maximize, decoupled), first, end in buffer.chunk_ranges:
        launch(
            buffer.updated,
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
            param_copy=buffer.param if precision.master_weights else None,
            grad_scale=grad_scale,
            found_inf=found_inf,
            stochastic_rounding_seed=precision.seed if precision.stochastic_rounding else None,
            param_shifts=buffer.param_shifts_on_device,
        )
    buffer.stage_out()


@torch.no_grad()
def return_unscaled_gradients(buffer: FlatBuffer, plan: GradientPlan) -> None:
    """Gradients read through a staging copy get their unscaled values back too."""
    for segment in plan.staged:
        plan.raw[segment].copy_(plan.grads[segment])


# -- torch ------------------------------------------------------------------------------------
def _pick(items: list, indices: list[int]) -> list:
    if len(indices) == 1:  # (a group of one tensor: the common case with a group per tensor)
        return [items[indices[0]]]
    return list(operator.itemgetter(*indices)(items)) if indices else []


def _step_views(buffer: FlatBuffer, segments: list[int]) -> list:
    return _pick(buffer.step_views, segments)


def _count(buffer: FlatBuffer, segments: np.ndarray) -> None:
    """Add one to the step counters of ``segments``. This backend reads only each
    parameter's own counter (its first chunk's row, which ``optimizer.state[p]["step"]``
    views); the rows of further chunks are the Triton kernel's, and a buffer changes
    backend only through a rebuild, which sets every row from the parameter's count."""
    if buffer.device.type == "cpu":
        # (A numpy view of the table is made anew each time: share_memory_() moves its memory.)
        every = len(segments) == len(buffer.leaders)  # (then they are all of them: the usual step)
        buffer.steps.numpy()[buffer.leaders if every else buffer.leaders[segments]] += 1.0
    else:
        torch._foreach_add_(_step_views(buffer, segments.tolist()), 1.0)
    buffer.steps_version = buffer.steps._version


@no_grad
def update_torch(
    buffer: FlatBuffer, plan: GradientPlan, groups: list[dict], hyper: HyperTable, grad_scale=None, found_inf=None
) -> None:
    if found_inf is not None and found_inf.device.type == "cpu":
        if float(found_inf) != 0.0:
            return  # GradScaler skipped this step: nothing is updated or counted
        found_inf = None
    # Parameters left in place that the kernel cannot take where they are (not dense, laid
    # out otherwise than their segment, or all of them for working copies) go through `param`.
    buffer.stage_in()
    if needs_working_copies(buffer.dtype, buffer.precision):
        working = _WorkingCopies(buffer, plan)
        _update_fused(buffer, plan, groups, hyper, grad_scale, found_inf, working)
        working.write_back(grad_scale is not None)
    else:
        _update_fused(buffer, plan, groups, hyper, grad_scale, found_inf, _Direct(buffer, plan))
    buffer.stage_out()


def needs_working_copies(dtype: torch.dtype, precision) -> bool:
    """Precisions torch's fused kernel cannot do alone: it wants one dtype for everything."""
    return precision.master_weights or precision.stochastic_rounding or precision.state_dtype != dtype


class _Direct:
    """The buffer's own tensors, for torch's fused kernel."""

    def __init__(self, buffer: FlatBuffer, plan: GradientPlan):
        self.buffer, self.plan = buffer, plan

    def __getattr__(self, name: str):
        # param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq: the buffer's, as they are now
        # (the gradient and AMSGrad buffers are created on demand).
        return getattr(self.buffer, name)

    def segments(self, name: str, segments: list[int]) -> list:
        if name == "grad":
            return _real_gradients(self.buffer, self.plan, segments)
        return _pick(self.buffer.real_views(name), segments)

    def span(self, name: str, first: int, last: int) -> torch.Tensor:
        # A buffer's tensors are made once (the gradient and AMSGrad ones on first use), so
        # their spans are made once too. (The gradient buffer may be let go and made again:
        # ``release_grad`` drops its spans and views.)
        key = (name, first, last)
        span = self.buffer.span_cache.get(key)
        if span is None:
            span = self.buffer.span_cache[key] = self.buffer.segment_slice(getattr(self.buffer, name), first, last)
        return span


class _WorkingCopies:
    """Working copies in the compute dtype, for precisions torch's fused kernel cannot do
    itself (master weights, another state dtype, stochastic rounding): the kernel runs on
    them, and ``write_back`` rounds the results into the buffers (to nearest, or at random
    for stochastic rounding). Float32 masters and float32 states are used in place."""

    def __init__(self, buffer: FlatBuffer, plan: GradientPlan):
        self.buffer, self.plan = buffer, plan
        compute = torch.float64 if buffer.dtype == torch.float64 else torch.float32

        def working(tensor):
            return tensor if tensor is None or tensor.dtype == compute else tensor.to(compute)

        self.param = buffer.master if buffer.master is not None else working(buffer.param)
        self.exp_avg, self.exp_avg_sq = working(buffer.exp_avg), working(buffer.exp_avg_sq)
        self.max_exp_avg_sq = working(buffer.max_exp_avg_sq)
        self.grad = _flat_gradients(buffer, plan, compute)
        self._views: dict[str, list] = {}

    def span(self, name: str, first: int, last: int) -> torch.Tensor:
        return self.buffer.segment_slice(getattr(self, name), first, last)

    def segments(self, name: str, segments: list[int]) -> list:
        views = self._views.get(name)
        if views is None:
            flat = getattr(self, name)
            views = [_storage_view(self.buffer, flat, i) for i in range(len(self.buffer.params))]
            self._views[name] = views
        return _pick(views, segments)

    def write_back(self, unscaled: bool) -> None:
        buffer = self.buffer
        draw_bits = _random_bit_source(buffer) if buffer.precision.stochastic_rounding else None
        # As the kernel: with stochastic rounding every bfloat16 value is rounded at random
        # but the model's copy of a master (to nearest). Elements that were not updated are
        # exact in bfloat16: random bits below the last place leave them as they are.
        if draw_bits is not None and buffer.param.dtype == torch.bfloat16 and buffer.master is None:
            _round_stochastically_into(buffer.param, self.param, draw_bits())
        elif self.param is not buffer.param:
            buffer.param.copy_(self.param)
        square_bits = None
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            target, result = getattr(buffer, name), getattr(self, name)
            if target is None or result is target:
                continue
            if draw_bits is not None and target.dtype == torch.bfloat16:
                # (To nearest, exp_avg_sq's decay at beta2 = 0.999 rounds away.) The maximum
                # takes exp_avg_sq's bits, so that it never rounds below exp_avg_sq.
                bits = square_bits if name == "max_exp_avg_sq" else draw_bits()
                if name == "exp_avg_sq" and buffer.max_exp_avg_sq is not None:
                    square_bits = bits.clone()  # the rounding overwrites its bits
                _round_stochastically_into(target, result, bits)
            else:
                target.copy_(result)
        if unscaled:  # as torch's fused kernel: the gradients are left unscaled
            segments = self.plan.with_grad.tolist()
            grads = _real_gradients(buffer, self.plan, segments)
            torch._foreach_copy_(grads, [_storage_view(buffer, self.grad, s) for s in segments])


def _flat_groups(buffer: FlatBuffer, with_grad: np.ndarray, working: bool) -> np.ndarray:
    """Which group ranges torch's kernel can take as one flat span (on the CPU, where it
    costs a parallel region per tensor): every segment has a gradient, none is updated
    where it lives (but in working copies), and all share one step count (the kernel takes
    a count per tensor). Whether the gradients are flat too is decided per group."""
    flat = with_grad == buffer.group_sizes
    if not working:
        flat &= ~buffer.groups_in_place
    counts = buffer.steps.numpy()[buffer.leaders]
    firsts = buffer.group_firsts
    return flat & (np.minimum.reduceat(counts, firsts) == np.maximum.reduceat(counts, firsts))


def _update_fused(
    buffer: FlatBuffer, plan: GradientPlan, groups: list[dict], hyper: HyperTable, grad_scale, found_inf, tensors
) -> None:
    """torch's fused kernel over ``tensors`` (the buffer's own, or working copies): one call
    per parameter group, on flat spans where the gradients are flat too, else on the list
    of segment views. What decides each call is worked out for all groups at once: a model
    with a group per tensor (layer-wise learning rates) pays little Python per group."""
    working = isinstance(tensors, _WorkingCopies)
    with_grad = segments_in_groups(plan.has_grad, buffer.group_firsts)
    # One flat span needs the gradients flat too: in working copies or kept in the gradient
    # buffer. Fresh gradients are neither, and skip the look.
    if buffer.device.type == "cpu" and (working or np.count_nonzero(plan.in_grad_buffer)):
        flat = _flat_groups(buffer, with_grad, working)
        grads_flat = segments_in_groups(plan.in_grad_buffer, buffer.group_firsts) == buffer.group_sizes
    else:
        flat = grads_flat = np.zeros(len(with_grad), dtype=bool)
    # torch's fused kernel expects the step count of this update: every parameter with a
    # gradient is counted before the calls (and taken back where GradScaler found an inf,
    # as torch does).
    counted = plan.with_grad
    _count(buffer, counted)
    scaler = {"grad_scale": grad_scale, "found_inf": found_inf}
    names = ("param", "grad", "exp_avg", "exp_avg_sq")
    for row in np.flatnonzero(with_grad).tolist():
        group_index, first, last = buffer.group_ranges[row]
        group = groups[group_index]
        amsgrad = bool(group["amsgrad"])
        if amsgrad:
            buffer.ensure_max_exp_avg_sq()
            if working and tensors.max_exp_avg_sq is None:  # AMSGrad switched on this step
                tensors.max_exp_avg_sq = buffer.max_exp_avg_sq.to(tensors.exp_avg.dtype)
        fused = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        lr, beta1, beta2, eps, weight_decay = hyper.row(group_index, buffer.device)
        arguments = dict(
            lr=lr, beta1=float(beta1), beta2=float(beta2), weight_decay=float(weight_decay), eps=float(eps),
            amsgrad=amsgrad, maximize=bool(group["maximize"]), **scaler,
        )
        if flat[row] and (working or grads_flat[row]):
            spans = [[tensors.span(name, first, last)] for name in names]
            maxima = [tensors.span("max_exp_avg_sq", first, last)] if amsgrad else []
            fused(*spans, maxima, [buffer.step_views[first]], **arguments)
            continue
        present = None if with_grad[row] == last + 1 - first else plan.has_grad[first : last + 1]
        if present is None:
            segments = list(range(first, last + 1))
        else:
            segments = (first + np.flatnonzero(present)).tolist()
        spans = [tensors.segments(name, segments) for name in names]
        maxima = tensors.segments("max_exp_avg_sq", segments) if amsgrad else []
        steps = _step_views(buffer, segments)
        if buffer.device.type == "cpu" and len(segments) >= ONE_THREAD_MIN_TENSORS:
            # (The lengths are looked up only for lists long enough to take one thread: a
            # model with a group per tensor makes this call per group.)
            lengths = buffer.lengths[first : last + 1]
            lengths = lengths if present is None else lengths[present]
            _update_list_on_cpu(fused, [*spans, maxima, steps], lengths, arguments)
        else:
            fused(*spans, maxima, steps, **arguments)
    if found_inf is not None:
        # One tensor per counter: a lone tensor would bind as a Scalar and be read on the host.
        views = _step_views(buffer, counted.tolist())
        torch._foreach_sub_(views, [found_inf.reshape(())] * len(views))
        buffer.steps_version = buffer.steps._version


#: On CPU, torch's fused kernel opens a parallel region per tensor (``at::parallel_for``).
#: For lists of many small tensors the regions cost about what the work in them does, and
#: when another process holds a core each region waits for it; with one thread
#: ``at::parallel_for`` runs inline and opens none. On 2,000 tensors of 8,000 elements
#: (benchmarks/NOTES.md, idea 30) the list on one thread took 23 to 25 ms against 20 to 23 on
#: two on a quiet machine, 59 to 65 against 145 to 435 with the machine loaded, and beat the
#: copy of the gradients into the flat gradient buffer for one flat update that it replaces
#: (idea 3: 26 to 28 ms quiet, 71 to 80 loaded), which also kept a gradient-sized buffer.
#: Lists of at least this many tensors of at most this mean size take one thread. The size
#: (idea 31): on lists of one size, one thread's time over two threads' had a median of 1.06
#: at 32K elements quiet and 0.56 loaded, and 1.11 quiet and 0.98 loaded at 64K. What
#: counts is the tensors updated (those with gradients), not the whole group. A tensor of
#: more than ONE_THREAD_MAX_ELEMENTS in such a list keeps every thread, in a call of its
#: own: one thread on it would leave the other cores idle (idea 32, 2 cores: a step with a
#: 32M tensor among 1,000 tiny ones took 18 to 26 ms that way, 18 to 19 ms without).
ONE_THREAD_MIN_TENSORS = 64
ONE_THREAD_MAX_MEAN_ELEMENTS = 32768
ONE_THREAD_MAX_ELEMENTS = 32768


def _update_list_on_cpu(fused, lists: list, lengths: np.ndarray, arguments: dict) -> None:
    """``fused`` on ``lists`` (parameters, gradients, moments, maxima, step counts: an entry
    per tensor, of ``lengths`` elements; at least ONE_THREAD_MIN_TENSORS of them, which the
    caller checks), on one thread where the tensors are small on average, with the large
    ones, if any, on every thread. The bits are the same on any number of threads."""
    if lengths.mean() > ONE_THREAD_MAX_MEAN_ELEMENTS:
        fused(*lists, **arguments)
        return
    large = lengths > ONE_THREAD_MAX_ELEMENTS
    if not large.any():
        run_on_one_thread(fused, *lists, **arguments)
        return
    small = ~large
    run_on_one_thread(fused, *(list(compress(items, small)) for items in lists), **arguments)
    fused(*(list(compress(items, large)) for items in lists), **arguments)


def _real_gradients(buffer: FlatBuffer, plan: GradientPlan, segments: list[int]) -> list:
    """The gradients of ``segments``, complex ones as real views (as torch's kernels and the
    buffers' real views take them; only a buffer with complex parameters has any)."""
    grads = _pick(plan.grads, segments)
    return [torch.view_as_real(g) if g.is_complex() else g for g in grads] if buffer.has_complex else grads


def _storage_view(buffer: FlatBuffer, flat: torch.Tensor, segment: int) -> torch.Tensor:
    view = buffer.segment_view(flat, segment)
    return torch.view_as_real(view) if view.is_complex() else view


def _flat_gradients(buffer: FlatBuffer, plan: GradientPlan, dtype: torch.dtype) -> torch.Tensor:
    """Every segment's gradient in one flat tensor of ``dtype`` (zero where there is none)."""
    gradients = torch.zeros(buffer.total, dtype=dtype, device=buffer.device)
    segments = plan.with_grad.tolist()
    present = _real_gradients(buffer, plan, segments)
    torch._foreach_copy_([_storage_view(buffer, gradients, s) for s in segments], present)
    return gradients


def _random_bit_source(buffer: FlatBuffer):
    """A function drawing 16 random bits per element of ``buffer`` for stochastic rounding
    (int32 values in [0, 2**16)), each call the next bits of one stream: on the CPU a stream
    per step, keyed by the seed and the step count; on a device one seeded stream per buffer."""
    if buffer.device.type == "cpu":
        step = int(buffer.steps.numpy()[buffer.leaders].max(initial=0))  # the parameters' own counts
        generator = torch.Generator().manual_seed((buffer.precision.seed + step * _GOLDEN) % (1 << 63))
    else:
        # Reading the device's step count would wait for it: one stream per buffer instead.
        generator = getattr(buffer, "rounding_generator", None)
        if generator is None:
            generator = torch.Generator(device=buffer.device).manual_seed(buffer.precision.seed)
            buffer.rounding_generator = generator
    total, device = buffer.total, buffer.device

    def draw() -> torch.Tensor:
        # Whole 64-bit words cut into four 16-bit fields: the CPU's generator makes a word in
        # about the time it makes one bounded number (torch.randint), so this is 3x faster.
        words = torch.empty((total + 3) // 4, dtype=torch.int64, device=device)
        words.random_(-(1 << 63), None, generator=generator)  # every 64-bit value alike
        return words.view(torch.int16)[:total].to(torch.int32).add_(1 << 15)

    return draw


def _round_stochastically_into(target: torch.Tensor, values: torch.Tensor, random_bits: torch.Tensor) -> None:
    """Store float32 (or float64) ``values`` in bfloat16 ``target``, rounding up with
    probability equal to the distance to the lower neighbour: add 16 random bits below
    bfloat16's last place and clear them. Overwrites ``random_bits``."""
    values = values.float()  # float64 states of float64 parameters: as the kernel, via float32
    rounded = random_bits.add_(values.view(torch.int32)).bitwise_and_(-65536).view(torch.float32)
    # A nan's payload could carry into the sign bit. minimum and maximum pass nans on and leave
    # every other value as rounded (a zero keeps the sign of ``values``): a pass each, where a
    # test for nan and a select take two slower ones.
    kept_nans = torch.minimum(values, rounded)
    target.copy_(torch.maximum(rounded, kept_nans, out=kept_nans))  # exact: the low bits are 0
