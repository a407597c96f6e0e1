"""Getting gradients to the update without copying them.

The Triton kernel reads every gradient where autograd (or the user, or a wrapper) left it:
each step we record, per segment, where its gradient lives relative to the flat parameter
buffer (a *shift*). The pure-PyTorch fallback hands torch's fused kernel the same
gradients as a list. Neither copies a gradient, except:

* a gradient whose memory order (its strides, but on dimensions of size 1), dtype (torch's
  ``grad_dtype``) or device differ from its parameter's, or (for the Triton kernel's
  16-byte accesses) that is not 16-byte aligned, is copied into the buffer's own gradient
  buffer first (the kernel walks parameter, state and gradient in one memory order; that
  gradient buffer spans every parameter, and stays while such gradients keep coming);
  where some gradients are views of that gradient buffer at another place (kept gradients
  traded between parameters), such copies are made apart from it instead, so that none is
  written over before it is read;
* ``zero_grad(set_to_none=False)`` replaces gradients with views of that gradient buffer,
  zeroed in one operation; backward then accumulates into them in place, and the CPU
  fallback can update whole parameter groups as single flat tensors;
* on the CPU fallback (``_backends``), master weights or another state dtype read every
  gradient through a float32 (float64) copy.

Everything on the per-step path works on whole lists (``map`` over C-level accessors and
numpy arrays); only the rare copies above loop in Python.
"""

from __future__ import annotations

import operator
from collections import Counter
from itertools import compress, repeat

import numpy as np
import torch

from ._in_place import local, local_grad
from ._layout import FlatBuffer, is_gradient_buffer

NO_GRADIENT = -1  # must equal adam_triton.kernels.NO_GRADIENT (checked by the tests)

_grad_of = operator.attrgetter("grad")



class GradientPlan:
    """Where each segment's gradient is for one step.

    During the step the plan holds the gradients. Between steps it holds none but our own
    gradient buffer's views, so that a gradient its owner drops (``model.zero_grad()``,
    ``p.grad = None``) is freed then, as under torch, and not kept alive until this
    optimizer's next step. It keeps no weak references either (``torch.utils.swap_tensors``,
    which ``model.to()`` uses in swap mode, refuses tensors that have any): the next step's
    gradients can use the plan if they are laid out as these were (same addresses, strides
    and dtypes), whichever tensors they are."""

    def __init__(
        self,
        raw: list,
        grads: list,
        has_grad: np.ndarray,
        with_grad: np.ndarray,
        shifts: np.ndarray,
        in_grad_buffer: np.ndarray,
        staged: list[int],
        copied_apart: bool,
        layout: tuple[list, list, list],
        by_layout: bool,
    ):
        self.raw = raw  # p.grad of each segment, as found (None between steps unless all ours)
        self.grads = grads  # what to read: raw, or the staged copy
        self.has_grad = has_grad
        self.with_grad = with_grad  # the segments that have a gradient, in order
        self.shifts = shifts  # element shift from the flat parameter buffer, or NO_GRADIENT
        self.in_grad_buffer = in_grad_buffer  # the gradient is the segment of buffer.grad
        self.staged = staged  # segments whose gradient is copied into buffer.grad each step
        # ... or, where some gradients are views of buffer.grad at another place, into copies
        # of their own (buffer.grad is then neither written nor gathered into this step).
        self.copied_apart = copied_apart
        # Where each present gradient started, its strides and dtype: the same tensor object
        # may have had its ``.data`` swapped since (``p.grad.data = g``), and then it is
        # elsewhere; other tensors laid out the same way are read the same way. (Shapes are
        # checked when a plan is made: a gradient gets another shape only through ``.data``,
        # and one re-pointed where it was with its strides, as a parameter's, is not noticed.)
        self.pointers, self.strides, self.dtypes = layout
        self._by_layout = by_layout  # False where a gradient's conj/neg bits matter (complex)
        # Staged segments read our views too, but their gradients (``raw``) are someone else's.
        # (Only segments that have a gradient are in the gradient buffer.)
        self._only_our_views = not staged and np.count_nonzero(in_grad_buffer) == len(with_grad)

    def finds(self, raw: list) -> bool:
        """Can this plan read ``raw``: the tensors it holds, or (between steps, when it holds
        none) tensors laid out as the ones it was made for?"""
        if self.copied_apart:  # its copies are gone; and aliases are best found anew
            return False
        if self.raw is not None:  # the same tensors, unless one's .data moved
            return all(map(operator.is_, raw, self.raw)) and all(
                map(operator.eq, map(torch.Tensor.data_ptr, compress(raw, self.has_grad)), self.pointers)
            )
        if not (
            self._by_layout
            and all(map(operator.is_, compress(raw, ~self.has_grad), repeat(None)))
            and all(map(operator.is_not, compress(raw, self.has_grad), repeat(None)))
        ):
            return False
        present = list(compress(raw, self.has_grad))
        try:
            return (
                all(map(operator.eq, map(torch.Tensor.data_ptr, present), self.pointers))
                and all(map(operator.eq, map(torch.Tensor.stride, present), self.strides))
                and all(map(operator.is_, map(_dtype_of, present), self.dtypes))
                and not any(map(torch.Tensor.is_neg, present))  # (read where it is, it would not be)
            )
        except RuntimeError:  # a sparse gradient has no strides: a new plan says so
            return False

    def hold(self, buffer: FlatBuffer, raw: list) -> None:
        """Hold ``raw`` (which ``finds`` matched) for the coming step."""
        if self.raw is None:
            self.raw, self.grads = raw, list(raw)
            for segment in self.staged:
                self.grads[segment] = buffer.current_grad_view(segment)

    def lived_in_grad_buffer(self) -> bool:
        """Every gradient of the step was one of our gradient buffer's views, as placed by
        ``zero_grad(set_to_none=False)`` (none staged there, none gathered into it)."""
        return len(self.with_grad) > 0 and self._only_our_views

    def holds_gradients(self) -> bool:
        """Does the plan hold gradient tensors between steps (our own views)?"""
        return self.raw is not None

    def let_go(self) -> None:
        """The step is over: keep only our own gradient views (the buffer holds those
        anyway, and the usual loop then reuses the plan at no cost)."""
        if not self._only_our_views:
            self.raw = self.grads = None


_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")


def _sparse_error(name: str) -> RuntimeError:
    # torch's own words (for AdamW too), for code that matches on them
    return RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")


def _check_gradient_dtype(grad: torch.Tensor, param: torch.Tensor, name: str) -> None:
    """Another floating dtype (torch's grad_dtype) is cast; anything else cannot be a
    gradient of this parameter (torch's optimizers raise too)."""
    floating = grad.is_floating_point() or grad.is_complex()
    if not floating or grad.is_complex() != param.is_complex():
        raise RuntimeError(f"{name}: a gradient of dtype {grad.dtype} cannot update a parameter of dtype {param.dtype}")


def _check_gradient_shapes(present: list, segments: np.ndarray, buffer: FlatBuffer, name: str) -> None:
    """A gradient given ``.data`` of another shape (``p.grad = g`` checks; ``p.grad.data = g``
    does not): torch's fused kernels would read past it, its for-loop raises."""
    for grad, segment in zip(present, segments.tolist()):
        if tuple(grad.shape) != buffer.shapes[segment]:
            reshaped = tuple(local(buffer.params[segment]).shape)
            if reshaped != buffer.shapes[segment]:
                # A move is noticed by the parameter's address; a view that starts where the
                # parameter did (``p.data = p.data[:n]``) leaves it unchanged.
                raise RuntimeError(
                    f"{name}: a parameter of shape {buffer.shapes[segment]} became {reshaped} where it was "
                    "(its .data re-pointed at a view that starts at the same address), which the optimizer "
                    "cannot tell from an unmoved parameter: give it memory of its own "
                    "(p.data = p.data[...].clone()) and, if it has state, fresh state "
                    "(optimizer.state.pop(p)), as torch needs too"
                )
            raise RuntimeError(
                f"{name}: a gradient of shape {tuple(grad.shape)} cannot update a parameter of shape "
                f"{buffer.shapes[segment]} (param group {int(buffer.group_of_segment[segment])})"
            )


def plan_gradients(buffer: FlatBuffer, previous: GradientPlan | None, optimizer_name: str) -> GradientPlan:
    """Find every segment's gradient; reuse ``previous`` if the gradients are the same tensors."""
    raw = list(map(local_grad if buffer.has_dtensor else _grad_of, buffer.params))
    if previous is not None and previous.finds(raw):
        previous.hold(buffer, raw)
        _copy_staged(previous.grads, previous.raw, previous.staged)
        return previous

    count = len(raw)
    has_grad = np.fromiter(map(operator.is_not, raw, repeat(None, count)), dtype=bool, count=count)
    present = list(compress(raw, has_grad))
    every = len(present) == count  # the usual case: each segment has its gradient
    segments = buffer.every_segment if every else np.flatnonzero(has_grad)
    grads = list(raw)
    staged: list[int] = []
    copied_apart = False
    raw_pointers: list[int] = []
    strides: list = []
    dtypes: list = []
    if present:
        try:
            strides = list(map(torch.Tensor.stride, present))
            raw_pointers = list(map(torch.Tensor.data_ptr, present))
            pointers = np.array(raw_pointers, dtype=np.int64)
            dtypes = list(map(_dtype_of, present))
        except RuntimeError:  # sparse layouts have neither
            if any(g.layout != torch.strided for g in present):
                raise _sparse_error(optimizer_name) from None
            raise
        # Element counts cost one C-level pass (shapes, twice as much): with the strides
        # compared below, they catch every gradient given .data of another shape, but for
        # an as_strided one with its parameter's strides and count.
        if list(map(torch.Tensor.numel, present)) != list(compress(buffer.numels, has_grad)):
            _check_gradient_shapes(present, segments, buffer, optimizer_name)
        expected_strides = list(compress(buffer.strides, has_grad))
        # Which gradients the update cannot read where they are (None: none of them).
        alignment = buffer.access_alignment
        needs_copy = pointers % alignment != 0 if alignment > 1 and np.count_nonzero(pointers % alignment) else None
        # Gradients may differ from their parameter in dtype (torch's grad_dtype) or device
        # (a .data assignment): such gradients are copied into place.
        # (Every pair of the devices and dtypes seen: more than the pairs present only when
        # some gradient is on another device, which the culprit search below handles.)
        kinds = {(device, dtype) for device in set(map(_device_of, present)) for dtype in set(dtypes)}
        if strides != expected_strides or not kinds <= buffer.param_kinds:
            # Rare: find the culprits one by one.
            _check_gradient_shapes(present, segments, buffer, optimizer_name)
            present_params = list(compress(buffer.params, has_grad))
            for g, p in zip(present, present_params):
                if g.dtype != p.dtype:
                    _check_gradient_dtype(g, p, optimizer_name)
            expected_dtypes = [p.dtype for p in present_params]
            shapes = compress(buffer.shapes, has_grad)
            elsewhere = np.fromiter(
                (
                    not laid_out_alike(g.stride(), stride, shape) or g.dtype != dtype or g.device != buffer.device
                    for g, stride, shape, dtype in zip(present, expected_strides, shapes, expected_dtypes)
                ),
                dtype=bool,
                count=len(present),
            )
            needs_copy = _either(needs_copy, elsewhere)
        # A pending conjugation or negation (a lazy view: its bytes are not its values) is
        # resolved in a copy. Negation can mark a real gradient too (``torch._neg_view``).
        if buffer.has_complex:
            pending = np.fromiter((g.is_conj() or g.is_neg() for g in present), dtype=bool, count=len(present))
            needs_copy = _either(needs_copy, pending)
        elif any(map(torch.Tensor.is_neg, present)):
            needs_copy = _either(needs_copy, np.fromiter(map(torch.Tensor.is_neg, present), dtype=bool, count=len(present)))
        starts = buffer.starts if every else buffer.starts[segments]
        aliases = _aliases_of_gradient_buffer(buffer, pointers, strides, expected_strides, starts)
        if aliases is not None:
            needs_copy = _either(needs_copy, aliases)
            copied_apart = True
        if needs_copy is not None and np.count_nonzero(needs_copy):
            buffer.ensure_grad()
            for position in np.flatnonzero(needs_copy).tolist():
                segment = int(segments[position])
                staged.append(segment)
                view = buffer.current_grad_view(segment)
                grads[segment] = torch.empty_like(view) if copied_apart else view
                pointers[position] = grads[segment].data_ptr()
            _copy_staged(grads, raw, staged)
        shifts_present = (pointers - buffer.param.data_ptr()) // buffer.dtype.itemsize - starts
    if present and every:
        shifts = shifts_present
    else:
        shifts = np.full(count, NO_GRADIENT, dtype=np.int64)
        if present:
            shifts[segments] = shifts_present

    in_grad_buffer = np.zeros(count, dtype=bool)
    if present and buffer.grad_views is not None:
        # Our view, and still where we made it (its .data may have been swapped).
        in_grad_buffer = np.fromiter(map(operator.is_, grads, buffer.grad_views), dtype=bool, count=count)
        where = np.full(count, -1, dtype=np.int64)
        where[segments] = pointers
        in_grad_buffer &= where == np.asarray(buffer.grad_view_pointers, dtype=np.int64)
    layout = (raw_pointers, strides, dtypes)
    return GradientPlan(
        raw, grads, has_grad, segments, shifts, in_grad_buffer, staged, copied_apart, layout, not buffer.has_complex
    )


def laid_out_alike(strides: tuple, expected: tuple, shape: tuple) -> bool:
    """Elements in the same memory order: strides may differ only on dimensions of size 1,
    which never step to another element. Autograd leaves those as they come (a ``(1, D)``
    parameter's gradient through ``einsum`` has strides ``(1, 1)``, the parameter ``(D, 1)``)."""
    return all(a == b or size <= 1 for a, b, size in zip(strides, expected, shape))


def _either(flags: np.ndarray | None, more: np.ndarray) -> np.ndarray:
    """``flags | more``, where ``flags`` None means none set."""
    return more if flags is None else flags | more


def _aliases_of_gradient_buffer(
    buffer: FlatBuffer, pointers: np.ndarray, strides: list, expected_strides: list, starts: np.ndarray
) -> np.ndarray | None:
    """Which gradients are views of our gradient buffer other than their own segment as
    laid out (kept gradients swapped between parameters, ``p.grad = p.grad.t()``), or None
    if none is. Staging one into the buffer could overwrite a gradient still to be read,
    or its own source, so such gradients are copied apart first."""
    if buffer.grad is None:
        return None
    itemsize = buffer.dtype.itemsize
    begin = buffer.grad.data_ptr()
    inside = (pointers >= begin) & (pointers < begin + buffer.total * itemsize)
    if not np.count_nonzero(inside):
        return None
    aliases = inside & (pointers != begin + starts * itemsize)
    for position in np.flatnonzero(inside & ~aliases).tolist():
        aliases[position] = strides[position] != expected_strides[position]
    return aliases if np.count_nonzero(aliases) else None


@torch.no_grad()
def _copy_staged(grads: list, raw: list, segments: list[int]) -> None:
    for segment in segments:
        grads[segment].copy_(raw[segment].resolve_conj().resolve_neg())


@torch.no_grad()
def zero_into_grad_buffer(buffer: FlatBuffer) -> None:
    """``zero_grad(set_to_none=False)``: existing gradients become zeroed views of the buffer.

    Gradients the buffer cannot hold are zeroed where they are, as torch does, so that
    their owners keep seeing them: views of someone else's storage (DistributedDataParallel's
    buckets with ``gradient_as_bucket_view=True``, for one), sparse gradients, and gradients
    of another dtype than their parameter (``grad_dtype``). Views of an earlier gradient
    buffer of ours (before ``add_param_group`` re-homed the parameters) move to the new one.
    """
    raw = list(map(_grad_of, buffer.params))
    missing = np.fromiter(map(operator.is_, raw, repeat(None)), dtype=bool, count=len(raw))
    # (A frozen buffer's parameter given a gradient moves to a trainable buffer at its
    # step: adopting it here would make a gradient buffer as large as the frozen ones.)
    adopting = missing.any() and not buffer.has_dtensor and not buffer.frozen
    buffer.adopt_at_step = np.flatnonzero(missing) if adopting else None
    if missing.all():
        return
    if buffer.has_dtensor or buffer.frozen:
        # A DTensor parameter (FSDP2) takes only DTensor gradients; a frozen buffer's
        # parameter with a gradient moves to a trainable buffer at its step, and a gradient
        # buffer here would be as large as the frozen ones: zero them where they are.
        foreign = [grad for grad in raw if grad is not None]
    else:
        buffer.ensure_grad()
        foreign, adopted = [], []
        views, pointers = buffer.grad_views, buffer.grad_view_pointers
        if not (all(map(operator.is_, raw, views)) and list(map(torch.Tensor.data_ptr, raw)) == pointers):
            shared = _shared_by_several(raw)
            for segment, (grad, view, pointer) in enumerate(zip(raw, views, pointers)):
                if grad is None:
                    continue
                if grad is view:
                    if grad.data_ptr() != pointer:  # our view, its .data swapped: a new view
                        adopted.append(segment)
                    continue
                if id(grad) not in shared and _fits_gradient_buffer(grad, buffer):
                    adopted.append(segment)
                else:
                    foreign.append(grad)
        # Decided for every gradient first: nothing below can fail half-way. A view swapped
        # while it was a gradient and dropped since is made anew here too (current_grad_view).
        for segment in adopted:
            buffer.params[segment].grad = buffer.current_grad_view(segment)
        buffer.grad.zero_()
    for grad in foreign:
        if grad.grad_fn is not None:
            grad.detach_()
        else:
            grad.requires_grad_(False)
        grad.zero_()


@torch.no_grad()
def adopt_fresh_gradients(buffer: FlatBuffer, segments: np.ndarray) -> None:
    """Move the fresh gradients of ``segments`` into the flat gradient buffer, as the next
    ``zero_grad(set_to_none=False)`` would. For the segments that had no gradient when the
    user last zeroed them that way (the first step of such a loop, and the first after
    resuming from a checkpoint): the pure-PyTorch backend's flat update then runs on the
    same tensors at every step of the loop, and rounds the same way whether or not the run
    was interrupted."""
    fresh = [(s, buffer.params[s].grad) for s in segments.tolist()]
    shared = _shared_by_several(list(map(_grad_of, buffer.params)))  # (with any parameter)
    fresh = [(s, g) for s, g in fresh if g is not None and id(g) not in shared and _adoptable(g, buffer)]
    if not fresh:
        return
    buffer.ensure_grad()
    views = [buffer.current_grad_view(s) for s, _ in fresh]
    torch._foreach_copy_(views, [g for _, g in fresh])
    for (s, _), view in zip(fresh, views):
        buffer.params[s].grad = view


def _shared_by_several(grads: list) -> set[int]:
    """The ids of gradient tensors that more than one parameter has (``b.grad = a.grad``):
    moved into the buffer, each would get a view of its own, and the tie would be cut."""
    counts = Counter(id(grad) for grad in grads if grad is not None)
    return {key for key, count in counts.items() if count > 1}


def _fits_gradient_buffer(grad: torch.Tensor, buffer: FlatBuffer) -> bool:
    """A dense gradient of the buffer's device and dtype that is no one else's view (alone
    in its storage, as autograd makes gradients, or a view of a gradient buffer of ours):
    it can move into the buffer. (A slice of someone's flat gradient tensor need not say
    so in ``_base``: ``.detach()`` drops it, and so does autograd when it keeps the view a
    gradient hook returned.)"""
    if grad.layout != torch.strided or (grad.device, grad.dtype) not in buffer.param_kinds:
        return False
    if grad._base is not None:
        return is_gradient_buffer(grad._base)
    storage = grad.untyped_storage()
    return storage.data_ptr() == grad.data_ptr() and storage.nbytes() == grad.numel() * grad.element_size()


def _adoptable(grad: torch.Tensor, buffer: FlatBuffer) -> bool:
    """A gradient whose values can be copied into the buffer as they are (not part of a
    graph, no pending conjugation or negation)."""
    return _fits_gradient_buffer(grad, buffer) and not grad.requires_grad and not (grad.is_conj() or grad.is_neg())
