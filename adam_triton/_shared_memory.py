"""Distinct parameters over the same memory, which flat buffers cannot keep tied.

Each parameter gets a segment of its own in a flat buffer, so two parameters that share
memory (``Parameter(other)``, ``b.data = a.data``, overlapping slices of one tensor) would
silently stop sharing it: they are refused before anything moves. Slices whose byte ranges
interleave without sharing an element (``w[0::2]`` and ``w[1::2]``) are fine.
"""

from __future__ import annotations

import numpy as np
import torch


def _memory_span(values: torch.Tensor) -> tuple | None:
    """(device, first byte, end byte, dense) of a tensor's elements; None for an empty one
    (or one with negative strides, which torch does not make). A gappy tensor's (``W[:, :3]``,
    a diagonal) range may interleave with another's without sharing an element."""
    if values.numel() == 0 or any(s < 0 for s in values.stride()):
        return None
    extent = 1 + sum((size - 1) * stride for size, stride in zip(values.shape, values.stride()))
    start = values.data_ptr()
    return values.device, start, start + extent * values.element_size(), extent == values.numel()


def _element_indices(values: torch.Tensor, base: int, itemsize: int, elements: int = 1 << 20):
    """The index of each element of ``values`` in units of ``itemsize`` from byte ``base``,
    about ``elements`` at a time (rare: gappy parameters whose ranges meet another's)."""
    first = (values.data_ptr() - base) // itemsize
    if values.dim() == 0:
        yield torch.tensor([first], dtype=torch.int64, device="cpu")
        return
    inner = torch.zeros((), dtype=torch.int64, device="cpu")  # offsets within one slice along dim 0
    for dim, (size, stride) in enumerate(zip(values.shape[1:], values.stride()[1:])):
        shape = [1] * (values.dim() - 1)
        shape[dim] = size
        inner = inner + torch.arange(size, dtype=torch.int64, device="cpu").view(shape) * stride
    inner = inner.reshape(-1)
    rows, row_stride = values.shape[0], values.stride()[0]
    step = max(1, elements // max(1, inner.numel()))
    for row in range(0, rows, step):
        outer = torch.arange(row, min(row + step, rows), dtype=torch.int64, device="cpu") * row_stride
        yield (first + outer[:, None] + inner[None, :]).reshape(-1)


def _shared_memory_error(params: list, group_of: list[int], first: int, second: int, optimizer_name: str):
    first, second = sorted((first, second))
    return ValueError(
        f"{optimizer_name}: two parameters share memory (param group {group_of[first]}, shape "
        f"{tuple(params[first].shape)}, and param group {group_of[second]}, shape "
        f"{tuple(params[second].shape)}). Each parameter gets a segment of its own in a flat "
        "buffer, so they would stop sharing it. Tie weights by assigning the same Parameter "
        "(b.weight = a.weight), or drop the one the model no longer uses from the optimizer."
    )


def _check_cluster(cluster: list, params: list, group_of: list[int], optimizer_name: str, frozen: list[bool]) -> None:
    """``cluster``: spans (start, end, dense, position), in order of start, whose byte
    ranges meet one after another. Dense ones that meet share memory; where gappy ones take
    part, each element is marked with its owner over the cluster's range (one pass, however
    many parameters interleave)."""
    if len(cluster) < 2 or all(frozen[position] for _, _, _, position in cluster):
        return
    if all(dense for _, _, dense, _ in cluster):
        reach = cluster[0]
        for span in cluster[1:]:
            if span[0] < reach[1]:
                raise _shared_memory_error(params, group_of, reach[3], span[3], optimizer_name)
            reach = max(reach, span, key=lambda s: s[1])
    base = cluster[0][0]
    itemsize = params[cluster[0][3]].element_size()
    if any(params[p].element_size() != itemsize or (start - base) % itemsize for start, _, _, p in cluster):
        # Views of one storage as two dtypes, or misaligned: taken as sharing.
        raise _shared_memory_error(params, group_of, cluster[0][3], cluster[1][3], optimizer_name)
    elements = (max(end for _, end, _, _ in cluster) - base) // itemsize
    owner = torch.full((elements,), -1, dtype=torch.int32, device="cpu")
    for start, end, dense, position in cluster:
        whole = [slice((start - base) // itemsize, (end - base) // itemsize)]
        for where in whole if dense else _element_indices(params[position], base, itemsize):
            taken = owner[where]
            shared = taken >= 0
            if bool(shared.any()):
                raise _shared_memory_error(params, group_of, int(taken[shared][0]), position, optimizer_name)
            owner[where] = position


def check_no_shared_memory(params: list, group_of: list[int], optimizer_name: str, frozen: list[bool]) -> None:
    """Two distinct parameters over the same memory (``Parameter(other)``, ``b.data =
    a.data``, slices of one tensor that overlap) would each get a segment of their own and
    silently stop sharing it. ``frozen`` ones stay where they are: among themselves they
    may share (two tables made with ``Embedding.from_pretrained`` from one tensor)."""
    spans = sorted(
        (span[0].type, span[0].index or 0, span[1], span[2], span[3], position)
        for position, span in enumerate(map(_memory_span, params))
        if span is not None
    )
    cluster, device, reach = [], None, 0
    for device_type, device_index, start, end, dense, position in spans:
        if cluster and (device_type, device_index) == device and start < reach:
            cluster.append((start, end, dense, position))
            reach = max(reach, end)
            continue
        _check_cluster(cluster, params, group_of, optimizer_name, frozen)
        cluster, device, reach = [(start, end, dense, position)], (device_type, device_index), end
    _check_cluster(cluster, params, group_of, optimizer_name, frozen)


def meets_any(params: list, regions: list[torch.Tensor]) -> bool:
    """Whether the byte range of any of ``params`` meets that of any of ``regions`` (whole
    flat buffers): a quick test that parameters joining an optimizer are nowhere near the
    memory it holds, before the element-wise check is needed."""
    taken = [span for span in map(_memory_span, regions) if span is not None]
    for span in map(_memory_span, params):
        if span is not None and any(
            span[0] == other[0] and span[1] < other[2] and other[1] < span[2] for other in taken
        ):
            return True
    return False


class SpanIndex:
    """The byte ranges of many tensors, sorted, so that whether another tensor's range meets
    any of them takes a binary search rather than a look at each (frozen parameters left in
    place, checked at every ``add_param_group``)."""

    def __init__(self, tensors: list):
        ranges: dict = {}
        for span in map(_memory_span, tensors):
            if span is not None:
                ranges.setdefault(span[0], []).append(span[1:3])
        self._by_device = {}
        for device, spans in ranges.items():
            spans.sort()
            starts = np.array([start for start, _ in spans], dtype=np.int64)
            # The furthest end among the ranges starting at or before each one: ranges may
            # overlap (frozen parameters may share memory among themselves).
            reach = np.maximum.accumulate(np.array([end for _, end in spans], dtype=np.int64))
            self._by_device[device] = (starts, reach)

    def meets(self, values: torch.Tensor) -> bool:
        span = _memory_span(values)
        if span is None or span[0] not in self._by_device:
            return False
        starts, reach = self._by_device[span[0]]
        last = int(np.searchsorted(starts, span[2], side="left")) - 1  # the last range starting before its end
        return last >= 0 and int(reach[last]) > span[1]
