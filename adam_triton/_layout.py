"""Flat buffers: where each parameter and its Adam state live.

All parameters of one (device, storage dtype) share one contiguous buffer; each parameter
is a *segment* of it, and its ``.data`` becomes that segment, so the model keeps its
Parameter objects. ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` are buffers of the
same layout, made with the first state (``ensure_moments``). The parameters' segments have
storages of their own over the buffer's memory (``own_storage_view``); ``optimizer.state[p]``
holds views of the state buffers. Complex parameters have buffers of their own, stored as
their real view (two reals per element), as torch's Adam updates them, and so do frozen
parameters (the engine decides which parameters share a buffer).

Segments start on ``SEGMENT_ALIGNMENT_BYTES`` boundaries so that the kernel's 16-byte
accesses stay aligned. Each segment is cut into *chunks* (one kernel program each); every
chunk owns a completed-step counter, and ``state[p]["step"]`` is a view of the counter of
the segment's first chunk (its *leader*). The other counters of the segment follow the
leader: the kernel bumps them together, and they are re-synchronised when anything else
writes the table (``sync_step_counters``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from ._grad_mode import no_grad
from ._in_place import STORAGE_USE_COUNT, DTensorSpec, is_dtensor, local
from ._tables import refuse_upload_while_capturing, upload

#: Must equal ``adam_triton.kernels.SEGMENT_ALIGNMENT_BYTES`` (checked by the tests); kept
#: here so that building a layout does not import triton.
SEGMENT_ALIGNMENT_BYTES = 128
#: Chunk lengths are multiples of this many elements: of the kernel's tile for every dtype
#: (2048 elements for 16-bit types), so that only a segment's last tile is masked; masked
#: tiles lose the 16-byte vector accesses (checked by the tests).
CHUNK_QUANTUM = 2048
#: The most elements one kernel program updates.
MAX_CHUNK_ELEMENTS = 65536
#: Programs per streaming multiprocessor the chunking aims for on GPUs, so that small
#: models still fill the device.
PROGRAMS_PER_SM = 8

CHUNK_COLUMNS = 5  # start, end, segment, hyper row (param group), step counter


_version_of = operator.attrgetter("_version")
# Stands in for an inference tensor, which keeps no version counter; nothing writes it.
_UNVERSIONED = torch.empty(0, device="cpu")
_local_tensor_of = operator.attrgetter("_local_tensor")


def _show_writes_to_saved_tensors(params: list) -> None:
    """Under ``torch.autograd.graph.allow_mutation_on_saved_tensors()`` a dispatch mode
    copies a tensor saved for backward before an in-place operation writes it. The step
    writes the buffer, not the parameters, so the mode would not see it, and a backward
    after the step would mix new weights with old activations. A resize to the same shape
    writes nothing but is an in-place operation on each parameter, which the mode sees.
    (A Python loop, but only inside that context.)"""
    for param in params:
        values = local(param).detach()
        values.resize_(values.shape)


def storage_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The real dtype a tensor is stored as in a flat buffer."""
    if tensor.is_complex():
        return torch.view_as_real(tensor.detach()).dtype
    return tensor.dtype


def chunk_elements_for(total: int, device: torch.device) -> int:
    """How many elements one kernel program updates, for a buffer of ``total`` elements."""
    if device.type == "cuda" and torch.cuda.is_available():
        programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = 4
    per_program = math.ceil(max(total, 1) / programs)
    per_program = CHUNK_QUANTUM * math.ceil(per_program / CHUNK_QUANTUM)
    return min(max(per_program, CHUNK_QUANTUM), MAX_CHUNK_ELEMENTS)


def aligned_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed 1-D tensor whose first element sits on a ``SEGMENT_ALIGNMENT_BYTES`` boundary
    (CUDA's allocator gives that anyway; CPU allocators may give only 64 bytes)."""
    spare = SEGMENT_ALIGNMENT_BYTES // dtype.itemsize
    raw = torch.zeros(numel + spare, dtype=dtype, device=device)
    offset = (-raw.data_ptr() % SEGMENT_ALIGNMENT_BYTES) // dtype.itemsize
    return raw[offset : offset + numel]


def segments_in_groups(marked: np.ndarray, group_firsts: np.ndarray) -> np.ndarray:
    """How many segments of each group range ``marked`` (a flag per segment) marks. The
    ranges start at ``group_firsts`` and cover every segment, in order."""
    return np.add.reduceat(marked, group_firsts, dtype=np.int64)


def is_gradient_buffer(tensor: torch.Tensor) -> bool:
    """Is ``tensor`` the allocation behind a flat gradient buffer of this library (the
    ``._base`` of its gradient views), of this optimizer or an earlier layout of it?"""
    return getattr(tensor, "_adam_triton_gradients", False)


def overlaps_itself(values: torch.Tensor) -> bool:
    """Whether two elements of ``values`` may share memory (a stride of 0, as ``expand()``
    makes). Dimensions taken in order of stride must each step past the previous ones'
    reach; layouts interleaved otherwise count as overlapping (no view torch makes has them)."""
    if values.numel() <= 1:
        return False
    reach = 1
    for stride, size in sorted((stride, size) for size, stride in zip(values.shape, values.stride()) if size > 1):
        if stride < reach:
            return True
        reach = stride * size
    return False


def is_inference_tensor(tensor: torch.Tensor) -> bool:
    """Made under ``torch.inference_mode()``: it keeps no version counter, and nothing may
    write it outside inference mode. (A tensor given such a tensor as its ``.data`` reports
    ``is_inference()`` too, but keeps its own counter and may be written.)"""
    if not tensor.is_inference():
        return False
    try:
        tensor._version
    except RuntimeError:
        return True
    return False


def dispatches_to_python(tensor: torch.Tensor) -> bool:
    """A tensor subclass with ``__torch_dispatch__`` (a wrapper such as torchao's quantized
    tensors): every operation on it runs its Python code, which may keep the values in
    tensors of its own, so an update written into its memory would not reach them."""
    return torch._C._dispatch_keys(tensor).has(torch._C.DispatchKey.Python)


def _preserved_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    # The strides torch gives state created with memory_format=preserve_format: the
    # parameter's own when it is dense (channels_last, transposed), contiguous otherwise.
    return torch.empty_like(tensor, device="meta").stride()


@dataclass(frozen=True)
class Precision:
    """How a buffer stores its state and writes its parameters.

    ``master_weights``: the update runs on a float32 copy and the model's float16/bfloat16
    parameters receive it rounded to nearest. ``stochastic_rounding``: every bfloat16 value
    the update stores (parameters without masters, bfloat16 moments) is rounded up or down
    at random, in proportion to the distance; set only where there is one. ``seed`` keys the
    random stream.
    """

    state_dtype: torch.dtype
    master_weights: bool = False
    stochastic_rounding: bool = False
    seed: int = 0


LOW_PRECISION = (torch.float16, torch.bfloat16)
PRECISION_KEYS = ("master_weights", "state_dtype", "stochastic_rounding", "stochastic_rounding_seed")


def precision_of(options: dict, dtype: torch.dtype) -> Precision:
    """The precision a parameter of storage ``dtype`` gets under ``options`` (those that
    cannot apply to that dtype, such as master weights for float32, have no effect).
    States follow the dtype the update is computed against: the parameters', or float32
    with master weights; ``state_dtype`` overrides."""
    master = bool(options.get("master_weights")) and dtype in LOW_PRECISION
    state_dtype = options.get("state_dtype") or (torch.float32 if master else dtype)
    stores_bfloat16 = (dtype == torch.bfloat16 and not master) or state_dtype == torch.bfloat16
    rounding = bool(options.get("stochastic_rounding")) and stores_bfloat16
    seed = int(options.get("stochastic_rounding_seed") or 0) if rounding else 0
    return Precision(state_dtype, master, rounding, seed)


class FlatBuffer:
    """One (device, dtype, precision) buffer of parameters and their Adam state."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        params: list,
        groups: list[int],
        precision: Precision | None = None,
        chunk_elements: int | None = None,
        in_place: list[bool] | None = None,
        stage_in_place: bool = False,
        frozen: bool = False,
        vector_aligned: bool = True,
    ):
        """``in_place`` marks parameters updated where they live (see ``_in_place``) rather
        than re-homed; ``stage_in_place`` gives them room in ``param`` anyway, for an
        implementation that works on the flat buffer (the torch backend's working copies).
        ``frozen``: the parameters required no gradient, and had none and no state, when the
        buffer was made (``Engine._keys``). ``vector_aligned``: parameters left in place, and
        gradients, must be 16-byte aligned to be used where they are (the Triton kernel's
        vector accesses; torch's kernels need not), else they are staged."""
        self.device = device
        self.dtype = dtype
        self.precision = precision or Precision(dtype)
        self.state_dtype = self.precision.state_dtype
        self.params = params
        self.group_of_segment = np.asarray(groups, dtype=np.int64)
        self.in_place = np.zeros(len(params), dtype=bool) if in_place is None else np.asarray(in_place, dtype=bool)
        # Parameters the update must never write stay as they are, never staged; the engine
        # refuses a gradient for one should it come. Those whose elements share memory are
        # frozen (Engine.check refuses others); inference tensors (torch.inference_mode())
        # may be trainable, but nothing may write them outside inference mode, and torch's
        # optimizer accepts them until one has a gradient. So are ``__torch_dispatch__``
        # subclasses (DTensor aside: ``local`` unwraps it), which are mostly frozen
        # quantized bases under trainable adapters.
        self.self_overlapping = np.array([overlaps_itself(local(p)) for p in params], dtype=bool)
        self.inference = np.array([is_inference_tensor(local(p)) for p in params], dtype=bool)
        self.python_dispatch = np.array([dispatches_to_python(local(p)) for p in params], dtype=bool)
        self.left_alone = self.self_overlapping | self.inference | self.python_dispatch
        # Frozen parameters are never written either: one given a gradient or state moves
        # to another buffer before its step (``Engine._regrouping_needed``). Copied in, a
        # frozen trunk would cost a second copy of itself while the optimizer is built, and
        # for good where its old memory stays referenced (the tensor handed to
        # ``Embedding.from_pretrained``, weights loaded with ``mmap=True``).
        self.frozen = frozen
        self.untouched = self.left_alone | frozen
        self.in_place = self.in_place | self.untouched
        self.frozen_spans = None  # (their sizes, where a frozen buffer's parameters lie): ``Engine._meets_memory_held``
        self.any_left_alone = bool(self.left_alone.any())
        self.dtensor_specs = [DTensorSpec(p) if is_dtensor(p) else None for p in params]
        self.has_dtensor = any(spec is not None for spec in self.dtensor_specs)
        values = [local(p) for p in params]  # a DTensor's geometry is its local shard's
        self.is_complex = [v.is_complex() for v in values]
        self.param_kinds = {(device, v.dtype) for v in values}
        self.has_complex = any(self.is_complex)
        #: What the engine groups parameters into this buffer by (see ``Engine._keys``).
        self.key = (device, dtype, self.precision, self.has_complex, frozen)
        self.param_dtype = _complex_of(dtype) if self.has_complex else dtype
        self.shapes = [tuple(v.shape) for v in values]
        self.numels = [v.numel() for v in values]
        # Complex parameters are laid out contiguously so that their real view is too.
        self.strides = [
            _contiguous_strides(shape) if complex_ else _preserved_strides(v)
            for v, shape, complex_ in zip(values, self.shapes, self.is_complex)
        ]

        align = SEGMENT_ALIGNMENT_BYTES // dtype.itemsize
        lengths = np.array([n * (2 if c else 1) for n, c in zip(self.numels, self.is_complex)], dtype=np.int64)
        padded = (lengths + align - 1) // align * align
        starts = np.zeros(len(params), dtype=np.int64)
        if len(params) > 1:
            starts[1:] = np.cumsum(padded)[:-1]
        self.starts = starts
        self.lengths = lengths
        self.total = int(padded.sum())

        self.chunk_elements = chunk_elements or chunk_elements_for(self.total, device)
        self._build_chunks()

        # A parameter left in place is addressed where it is if it is dense, laid out as its
        # segment and (for the Triton kernel) 16-byte aligned; others (a column slice, or a
        # packed bucket's views for the kernel) are staged: copied into their segment of
        # `param` before the update and back after it.
        alignment = self.access_alignment = 16 if vector_aligned else 1
        self.addressable = np.array(
            [
                not here or v.numel() == 0 or (v.stride() == stride and v.data_ptr() % alignment == 0 and not c)
                for v, here, stride, c in zip(values, self.in_place, self.strides, self.is_complex)
            ],
            dtype=bool,
        )
        self.stage_in_place = stage_in_place
        # Padding is zero in every buffer and stays zero under the update (g = m = v = 0).
        # When every parameter is addressed in place, `param` holds nothing: it is only the
        # base their shifts count from (no second copy of an FSDP2 shard).
        needs_param = (stage_in_place and not self.untouched.all()) or not (
            self.in_place & (self.addressable | self.untouched)
        ).all()
        self.param = aligned_zeros(self.total if needs_param else align, dtype, device)
        self.param_shifts = np.zeros(len(params), dtype=np.int64)
        self.param_shifts_on_device: torch.Tensor | None = None
        self.staged_params: list = []  # (segment of `param`, the parameter's own tensor)
        # The masters and moments are made with the first state, as torch makes its state at
        # the first step: a buffer of frozen parameters never needs them.
        self.master: torch.Tensor | None = None
        self.exp_avg: torch.Tensor | None = None
        self.exp_avg_sq: torch.Tensor | None = None
        self.max_exp_avg_sq: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        self.steps = torch.zeros(self.n_chunks, dtype=torch.float32, device=device)
        self.steps_version = self.steps._version
        self._leader_of_chunk: torch.Tensor | None = None  # each chunk's segment's first chunk
        self._state_storages: list | None = None  # (storage, its _cdata) for state_references

        self.master_views: list | None = None
        self.exp_avg_views: list | None = None
        self.exp_avg_sq_views: list | None = None
        self.max_exp_avg_sq_views: list | None = None
        self.grad_views: list | None = None
        self.grad_view_pointers: list[int] | None = None
        # Segments without a gradient at the last zero_grad(set_to_none=False): their fresh
        # gradients join the gradient buffer at the next step (``adopt_fresh_gradients``).
        self.adopt_at_step: np.ndarray | None = None
        self.step_views = [self.steps[int(chunk)] for chunk in self.leaders]
        # The dict the engine put in ``optimizer.state`` for each segment (None before its
        # first step): another object there means someone reset or replaced that state.
        self.state_entries: list = [None] * len(params)
        # Which entries were given a maximum: one deleted from them is refused (``_state_tensors``).
        self.maximum_given = np.zeros(len(params), dtype=bool)
        # (group, first segment, last segment): segments are laid out in group order.
        boundaries = np.flatnonzero(np.diff(self.group_of_segment)) + 1
        firsts = np.concatenate(([0], boundaries)) if len(params) else np.zeros(0, dtype=np.int64)
        lasts = np.concatenate((boundaries - 1, [len(params) - 1])) if len(params) else firsts
        self.group_ranges = [
            (int(self.group_of_segment[first]), int(first), int(last)) for first, last in zip(firsts, lasts)
        ]
        self.group_firsts, self.group_lasts = firsts.astype(np.int64), lasts.astype(np.int64)
        self.group_sizes = self.group_lasts + 1 - self.group_firsts
        self.every_segment = np.arange(len(params), dtype=np.int64)
        self.every_segment.flags.writeable = False  # shared by gradient plans
        # Which group ranges hold a parameter updated where it lives (fixed with the layout).
        self.groups_in_place = segments_in_groups(self.in_place, self.group_firsts) > 0
        self._real_views: dict[str, list] = {}
        self.span_cache: dict = {}  # (name, first segment, last segment) -> that span of the tensor

        # Filled in by the engine: the chunk table in launch order, its kernel-variant
        # ranges, and the last step's gradient plan and shift table.
        self.variant_key = None  # the kernel variant of each group range, as last prepared for
        self.chunk_ranges: list = []
        self.chunks_on_device: torch.Tensor | None = None
        self.last_plan = None
        self.shifts_on_device: torch.Tensor | None = None
        self.uploaded_shifts: np.ndarray | None = None  # what shifts_on_device holds

    @property
    def initialized(self) -> np.ndarray:
        """Which segments have state (in ``optimizer.state``, as views of this buffer)."""
        return np.fromiter(map(operator.is_not, self.state_entries, repeat(None)), dtype=bool, count=len(self.params))

    # -- geometry ---------------------------------------------------------------------------
    def _build_chunks(self) -> None:
        rows = []
        leaders = []
        for segment, (start, length) in enumerate(zip(self.starts.tolist(), self.lengths.tolist())):
            leaders.append(len(rows))
            group = int(self.group_of_segment[segment])
            # An empty parameter still gets one (empty) chunk: its step is counted as torch does.
            chunk_starts = range(start, start + length, self.chunk_elements) if length else [start]
            for chunk_start in chunk_starts:
                chunk_end = min(chunk_start + self.chunk_elements, start + length)
                rows.append((chunk_start, chunk_end, segment, group, len(rows)))
        self.chunk_rows = np.array(rows, dtype=np.int64).reshape(-1, CHUNK_COLUMNS)
        self.leaders = np.array(leaders, dtype=np.int64)
        self.chunk_segment = self.chunk_rows[:, 2].copy()
        self.n_chunks = len(rows)

    def segment_view(self, flat: torch.Tensor, segment: int) -> torch.Tensor:
        """The segment of ``flat`` shaped (and strided, and typed) like its parameter."""
        # as_strided counts from the start of the storage, not of the (aligned) view.
        start = flat.storage_offset() + int(self.starts[segment])
        shape = self.shapes[segment]
        if self.is_complex[segment]:
            real = flat.as_strided(shape + (2,), _contiguous_strides(shape + (2,)), start)
            return torch.view_as_complex(real)
        return flat.as_strided(shape, self.strides[segment], start)

    def own_storage_view(self, flat: torch.Tensor, segment: int) -> torch.Tensor:
        """``segment_view(flat, segment)`` as a tensor with a storage of its own: a slice of
        ``flat``'s storage that shares its memory and keeps it alive, but covers only this
        segment. Savers that take tensors sharing one storage for tied weights (safetensors'
        ``save_model``, accelerate's ``save_model`` and ``save_state``) and ``torch.save``
        of a part of a state dict then see each parameter as the tensor it is.

        For the parameters only: no tensor handed out may have ``flat``'s own storage, since
        an operation that replaces a storage's memory (``share_memory_()``) would free it
        under the slices. (The moments stay views: sharing one moves its whole buffer, which
        the optimizer then keeps updating, as torch's keeps updating a shared moment.)"""
        shape = self.shapes[segment]
        strides = _contiguous_strides(shape) if self.is_complex[segment] else self.strides[segment]
        dtype = _complex_of(flat.dtype) if self.is_complex[segment] else flat.dtype
        if not self.lengths[segment]:  # nothing to alias: an empty tensor of its own
            return torch.empty_strided(shape, strides, dtype=dtype, device=flat.device)
        itemsize = flat.element_size()
        first = (flat.storage_offset() + int(self.starts[segment])) * itemsize
        piece = flat.untyped_storage()[first : first + int(self.lengths[segment]) * itemsize]
        return torch.empty(0, dtype=dtype, device=flat.device).set_(piece, 0, shape, strides)

    def real_views(self, name: str) -> list:
        """Per-segment views of buffer ``name`` as torch's kernels take them (complex as real).
        For ``"param"``, what the update writes (``update_values``)."""
        views = self._real_views.get(name)
        if views is None:
            flat = getattr(self, name)
            if name == "param":
                views = [self.update_values(i) for i in range(len(self.params))]
            else:
                views = [self.segment_view(flat, i) for i in range(len(self.params))]
            views = [torch.view_as_real(v) if v.is_complex() else v for v in views]
            self._real_views[name] = views
        return views

    def segment_slice(self, flat: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """The flat span from the start of segment ``first`` to the end of ``last``."""
        return flat[int(self.starts[first]) : int(self.starts[last] + self.lengths[last])]

    # -- buffers created on demand ----------------------------------------------------------
    # (Made outside inference mode: inference tensors could not be trained afterwards.)
    # Each makes everything in locals and sets the attribute its ``is None`` test reads
    # last: an out-of-memory error or a KeyboardInterrupt half-way leaves the buffer as it
    # was, and the next call starts again.
    @torch.inference_mode(False)
    @no_grad  # the masters are filled from the parameters
    def ensure_moments(self) -> None:
        """The moments, and the masters (taken from the parameters) with master weights."""
        if self.exp_avg is None:
            segments = range(len(self.params))
            exp_avg = aligned_zeros(self.total, self.state_dtype, self.device)
            exp_avg_sq = aligned_zeros(self.total, self.state_dtype, self.device)
            master = aligned_zeros(self.total, torch.float32, self.device) if self.precision.master_weights else None
            if master is not None:
                versions = self.param_versions_now()
                master_views = [self.segment_view(master, i) for i in segments]
                self._fill_masters(master_views)
                self.master, self.master_views, self.param_versions = master, master_views, versions
            self.exp_avg_views = [self.segment_view(exp_avg, i) for i in segments]
            self.exp_avg_sq_views = [self.segment_view(exp_avg_sq, i) for i in segments]
            self.exp_avg_sq = exp_avg_sq
            self._state_storages = None
            self.exp_avg = exp_avg

    @torch.inference_mode(False)
    def ensure_max_exp_avg_sq(self) -> None:
        if self.max_exp_avg_sq is None:
            max_exp_avg_sq = aligned_zeros(self.total, self.state_dtype, self.device)
            self.max_exp_avg_sq_views = [self.segment_view(max_exp_avg_sq, i) for i in range(len(self.params))]
            self._state_storages = None
            self.max_exp_avg_sq = max_exp_avg_sq

    @torch.inference_mode(False)
    def ensure_grad(self) -> None:
        if self.grad is None:
            grad = aligned_zeros(self.total, self.dtype, self.device)
            storage = grad if grad._base is None else grad._base
            storage._adam_triton_gradients = True  # what its views' ._base is: see is_gradient_buffer
            grad_views = [self.segment_view(grad, i) for i in range(len(self.params))]
            # Where each view starts: a view whose .data someone swapped (Module._apply does,
            # in model.half() or model.to(memory_format=...)) is the same object elsewhere.
            self.grad_view_pointers = list(map(torch.Tensor.data_ptr, grad_views))
            self.grad_views = grad_views
            self.grad = grad

    def current_grad_view(self, segment: int) -> torch.Tensor:
        """The segment's view of the gradient buffer. A view that was some parameter's
        ``.grad`` may have had its ``.data`` swapped since (``p.grad.data = g``), even if it
        is no one's gradient now: that object is elsewhere, so a new view is made."""
        if self.grad_views[segment].data_ptr() != self.grad_view_pointers[segment]:
            self.grad_views[segment] = self.segment_view(self.grad, segment)
        return self.grad_views[segment]

    def release_grad(self) -> None:
        """Let the gradient buffer go (it is made again, zeroed, when next needed), and
        every view of it kept for the kernels: one left behind would be written instead of
        the new buffer."""
        self.grad = self.grad_views = self.grad_view_pointers = None
        self._real_views.pop("grad", None)
        for key in [key for key in self.span_cache if key[0] == "grad"]:
            del self.span_cache[key]

    # -- parameters -------------------------------------------------------------------------
    @torch.no_grad()
    def adopt_parameters(self) -> None:
        """Copy each parameter into its segment and make its ``.data`` that segment; leave
        the parameters in place that are to stay where they are, and note where they are."""
        shifts = np.zeros(len(self.params), dtype=np.int64)
        self.staged_params = []
        for segment, param in enumerate(self.params):
            if not self.in_place[segment]:
                view = self.segment_view(self.param, segment)
                view.copy_(param.data)
                param.data = self.own_storage_view(self.param, segment)
            elif self.untouched[segment]:
                pass  # never updated: nothing to stage or address
            elif not self.addressable[segment] or self.stage_in_place:
                self.staged_params.append((self.segment_view(self.param, segment), local(param)))
            elif self.lengths[segment]:
                address = local(param).data_ptr()
                shifts[segment] = (address - self.param.data_ptr()) // self.dtype.itemsize - self.starts[segment]
        self.param_shifts = shifts
        self.param_shifts_on_device = None
        # Whose version counters tell that a parameter was written: the Parameter's own (a
        # `.data =` view does not share the buffer's); for a DTensor, its own (edits made
        # through it: load_state_dict, p.mul_()) and its local shard's (writes to the shard).
        self.version_sources = [_UNVERSIONED if inference else p for p, inference in zip(self.params, self.inference)]
        self.shard_version_sources = None
        if self.has_dtensor:
            self.shard_version_sources = [
                local(p) if spec is not None and not inference else _UNVERSIONED
                for p, spec, inference in zip(self.params, self.dtensor_specs, self.inference)
            ]
        self.param_ptrs = self._current_pointers()
        self.param_strides = self._current_strides()
        self.param_contiguous = self._of_local_values(torch.Tensor.is_contiguous)
        self.strided_segments = [i for i, contiguous in enumerate(self.param_contiguous) if not contiguous]
        self.sync_master_weights(force=True)

    def model_values(self, segment: int) -> torch.Tensor:
        """The model's own values of ``segment``: its view of ``param``, or the tensor it was
        left in place as."""
        if self.in_place[segment]:
            return local(self.params[segment])
        return self.segment_view(self.param, segment)

    def update_values(self, segment: int) -> torch.Tensor:
        """Where the update reads and writes ``segment``'s values: the parameter's own tensor
        when it is addressed where it lives, else its segment of ``param`` (re-homed there, or
        staged there around the update: a kernel over a list of tensors takes each as dense)."""
        # (Untouched ones, never written, get no room in ``param``.)
        if self.untouched[segment] or (self.in_place[segment] and self.addressable[segment] and not self.stage_in_place):
            return local(self.params[segment])
        return self.segment_view(self.param, segment)

    @no_grad
    def stage_in(self) -> None:
        for staging, values in self.staged_params:
            staging.copy_(values)

    @no_grad
    def stage_out(self) -> None:
        for staging, values in self.staged_params:
            values.copy_(staging)

    @property
    def updated(self) -> torch.Tensor:
        """The buffer the update runs on: the float32 masters, or the parameters themselves."""
        return self.param if self.master is None else self.master

    @no_grad
    def sync_master_weights(self, force: bool = False) -> None:
        """Re-seed the masters where something but the optimizer wrote the parameters
        (``model.load_state_dict``, an in-place edit of a parameter): there the parameters
        are the truth. Elements whose parameter still equals its master rounded keep the
        master's precision. Each Parameter keeps its own version counter (``.data =`` does
        not share the buffer's), so the check is one C-level pass over the parameters, and
        the re-seeding touches only the parameters that changed."""
        if self.master is None:
            return
        versions = self.param_versions_now()
        if force:
            self._fill_masters(self.master_views)
        elif versions != self.param_versions:
            changed = np.flatnonzero(np.array(versions) != np.array(self.param_versions))
            for segment in changed.tolist():
                self.reseed_master(segment)
        self.param_versions = versions

    def _fill_masters(self, master_views: list) -> None:
        """Each segment's master taken from the model's values."""
        for segment, master in enumerate(master_views):
            master.copy_(self.model_values(segment))

    def mark_parameters_written(self, segments: np.ndarray) -> None:
        """Count the update in the version counters of the parameters of ``segments``, as
        torch's in-place update does: a backward through a graph that saved them before the
        step raises then, instead of using the new values. (The kernel writes the buffer, and
        a ``.data =`` view keeps its Parameter's own counter.) One C-level call."""
        written = self.params if len(segments) == len(self.params) else [self.params[i] for i in segments.tolist()]
        if getattr(torch.autograd.graph, "_allow_mutation_on_saved_tensors_enabled", False):
            _show_writes_to_saved_tensors(written)  # first: the mode knows them by version
        torch.autograd.graph.increment_version(written)

    def remember_own_writes(self) -> None:
        """After the step: its counts (``mark_parameters_written``, and the shards' own
        when a step writes them) are the optimizer's writes, not edits of the weights."""
        if self.master is not None:
            self.param_versions = self.param_versions_now()

    def param_versions_now(self) -> list[int]:
        versions = map(_version_of, self.version_sources)
        if self.shard_version_sources is None:
            return list(versions)
        return list(map(operator.add, versions, map(_version_of, self.shard_version_sources)))

    @torch.no_grad()
    def reseed_master(self, segment: int) -> None:
        """Where the parameter no longer equals its master rounded, someone else wrote it:
        take the parameter's value there; elsewhere the master keeps its precision."""
        master, param = self.master_views[segment], self.model_values(segment)
        torch.where(master.to(self.dtype) == param, master, param.to(torch.float32), out=master)

    def _of_local_values(self, getter) -> list:
        """``getter`` of each parameter's values (a DTensor's local shard: a DTensor's own
        ``data_ptr()`` is 0). C-level getters when no parameter, or every one, is a DTensor
        (as under FSDP2)."""
        if not self.has_dtensor:
            return list(map(getter, self.params))
        if all(spec is not None for spec in self.dtensor_specs):
            return list(map(getter, map(_local_tensor_of, self.params)))
        return [getter(local(p)) for p in self.params]

    def _current_pointers(self) -> list[int]:
        return self._of_local_values(torch.Tensor.data_ptr)

    def _current_strides(self) -> list[tuple[int, ...]]:
        return self._of_local_values(torch.Tensor.stride)

    def parameters_moved(self, strides: bool = True) -> bool:
        """True when some parameter's values no longer live where this buffer put (or found)
        them (e.g. after ``model.to(device)``, ``model.half()`` or an ``.data =`` assignment),
        or (``strides``) are laid out in another order there: re-pointed at a transposed view
        of themselves (a parametrization whose ``right_inverse`` returns ``A.T``), the update
        would pair each element with another's gradient and moments."""
        if self._current_pointers() != self.param_ptrs:
            return True
        return strides and self._laid_out_anew()

    def _laid_out_anew(self) -> bool:
        # is_contiguous() is a flag read, about half the price of stride(), which builds a
        # tuple; a contiguous parameter keeps its elements' order unless it stops being
        # contiguous (a contiguous view of another shape keeps the order, and the gradient
        # checks refuse its shape). The others' strides are compared.
        if self._of_local_values(torch.Tensor.is_contiguous) != self.param_contiguous:
            return True
        return any(local(self.params[i]).stride() != self.param_strides[i] for i in self.strided_segments)

    def moved_segments(self, strides: bool = True) -> list[int]:
        now = zip(self._current_pointers(), self._current_strides() if strides else self.param_strides)
        then = zip(self.param_ptrs, self.param_strides)
        return [i for i, (place, place_then) in enumerate(zip(now, then)) if place != place_then]

    # -- step counters ----------------------------------------------------------------------
    @no_grad
    def sync_step_counters(self) -> None:
        """Give every chunk its leader's count if anything but the kernel wrote the table."""
        if self.steps._version != self.steps_version:
            if self._leader_of_chunk is None:
                # Uploaded once, through pinned memory: a loop that puts state["step"] back
                # every step (CPU offloading) must not wait for the device every step.
                refuse_upload_while_capturing(self.device, "a step count written into the optimizer's state")
                self._leader_of_chunk = upload(self.leaders[self.chunk_segment], self.device)
            self.steps.copy_(self.steps[self._leader_of_chunk])
            self.steps_version = self.steps._version

    def state_views(self, segment: int, amsgrad: bool) -> dict:
        """``optimizer.state[p]`` for the parameter of ``segment``: views, under torch's keys
        (``entry_view``)."""
        self.ensure_moments()
        keys = ["step", "exp_avg", "exp_avg_sq"]
        if self.master_views is not None:
            keys.append("master_param")
        if amsgrad:
            self.ensure_max_exp_avg_sq()
            keys.append("max_exp_avg_sq")
        self.maximum_given[segment] = amsgrad
        return {key: self.entry_view(key, segment) for key in keys}

    def entry_view(self, key: str, segment: int):
        """A new view of state ``key`` (torch's name) of ``segment``, for ``optimizer.state``:
        a DTensor for a DTensor parameter, as torch's optimizer keeps its moments.

        Held only by the entry: the optimizer's own views stay out of users' reach (a
        ``.data`` swap on a state tensor cannot redirect the update), and a state tensor
        swapped or replaced lets go of its buffer's storage, which ``state_references``
        notices."""
        if key == "step":
            return self.steps[int(self.leaders[segment])]
        view = self.segment_view(getattr(self, STATE_BUFFERS[key]), segment)
        spec = self.dtensor_specs[segment]
        return view if spec is None else spec.wrap(view)

    def internal_state_view(self, key: str, segment: int) -> torch.Tensor | None:
        """The optimizer's own view of state ``key`` (torch's name) of ``segment``, or None
        where this buffer keeps no such state."""
        if key == "step":
            return self.step_views[segment]
        name = STATE_BUFFERS.get(key)  # other keys (other libraries' state) are not ours
        views = None if name is None else getattr(self, f"{name}_views")
        return None if views is None else views[segment]

    def state_tensors(self) -> list[torch.Tensor]:
        """The step counters and every state buffer made so far."""
        tensors = [getattr(self, name) for name in STATE_BUFFERS.values()]
        return [self.steps] + [t for t in tensors if t is not None]

    def state_references(self) -> tuple[int, ...] | None:
        """How many tensors hold each state buffer's memory (None where this torch cannot
        tell). Between steps only users change these counts: a state tensor replaced in
        ``optimizer.state`` (and let go) or given other ``.data`` drops one; a view of one
        kept somewhere adds one."""
        if STORAGE_USE_COUNT is None:
            return None
        if self._state_storages is None:
            # Held, so that their addresses stay theirs (each holds one reference, always).
            storages = [t.untyped_storage() for t in self.state_tensors()]
            self._state_storages = [(storage, storage._cdata) for storage in storages]
        return tuple(STORAGE_USE_COUNT(address) for _, address in self._state_storages)


#: optimizer.state keys held in state buffers, and the FlatBuffer attributes holding them
#: (``step`` is the other key the optimizer owns: a view of ``steps``).
STATE_BUFFERS = {
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
    "max_exp_avg_sq": "max_exp_avg_sq",
    "master_param": "master",
}

#: Per-parameter state keys the engine owns; any other key in a loaded state is kept as is.
ENGINE_STATE_KEYS = ("step", *STATE_BUFFERS)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    running = 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


def _complex_of(real: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}[real]
