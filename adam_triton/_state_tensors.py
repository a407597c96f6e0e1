"""State tensors that users put in ``optimizer.state[p]`` in place of the optimizer's views.

torch's optimizer updates whatever tensors ``optimizer.state[p]`` holds when it steps. A
loop that moves the state away and back (CPU offloading, by ``state[k] = v.to("cpu")`` or
``v.data = v.data.to("cpu")``, and back before the next step), or a moment replaced by
hand (``state[p]["exp_avg"] = torch.zeros_like(p)``), changes what the next step starts
from. Here the update runs on flat buffers, so such tensors are copied into them at the
next step, and the entry holds a view of the buffer again.

Looking at every entry costs a pass over all state tensors. It runs only when a state
buffer's count of users changed since the last step (``FlatBuffer.state_references``):
replacing or swapping a view that only its entry held drops the count.
"""

from __future__ import annotations

import numbers

import torch

from ._in_place import local
from ._layout import FlatBuffer


def replaced_state_tensors(buffer: FlatBuffer, state, optimizer_name: str) -> list[tuple[int, str, object]]:
    """``(segment, key, value)`` for each state tensor in ``buffer``'s entries that is no
    longer the optimizer's view of its segment. Raises ``ValueError`` for one that cannot
    stand in for it, before anything is changed."""
    found = []
    for segment, entry in enumerate(buffer.state_entries):
        if entry is None or state.get(buffer.params[segment]) is not entry:
            continue  # no state yet, or a replaced entry: the engine re-imports those
        for key, value in entry.items():
            ours = buffer.internal_state_view(key, segment)
            if ours is None or _is_view_of(value, ours):
                continue
            _check_replacement(value, ours, key, buffer, segment, optimizer_name)
            found.append((segment, key, value))
    return found


@torch.no_grad()
def adopt_state_tensors(buffer: FlatBuffer, replaced: list[tuple[int, str, object]]) -> None:
    """Copy each replacement into the buffer and give its entry a view of the buffer again."""
    for segment, key, value in replaced:
        ours = buffer.internal_state_view(key, segment)
        values = local(value) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        ours.copy_(values.reshape(ours.shape) if key == "step" else values)
        buffer.state_entries[segment][key] = buffer.entry_view(key, segment)


def _is_view_of(value, ours: torch.Tensor) -> bool:
    if not isinstance(value, torch.Tensor):
        return False
    values = local(value)
    return values.data_ptr() == ours.data_ptr() and values.dtype == ours.dtype and values.shape == ours.shape


def _check_replacement(value, ours: torch.Tensor, key: str, buffer: FlatBuffer, segment: int, optimizer_name: str):
    where = (
        f"{optimizer_name}: optimizer.state[p][{key!r}] of a parameter of shape "
        f"{tuple(buffer.shapes[segment])} (param group {int(buffer.group_of_segment[segment])})"
    )
    if key == "step":
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(f"{where} was replaced by a tensor of {value.numel()} elements; a step is one number")
        if not isinstance(value, (torch.Tensor, numbers.Real)):
            raise ValueError(f"{where} was replaced by {type(value).__name__}; a step is a number or a tensor")
        return
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where} was replaced by {type(value).__name__}; state must be a tensor")
    if tuple(local(value).shape) != tuple(ours.shape) or value.is_complex() != ours.is_complex():
        raise ValueError(
            f"{where} was replaced by a {'complex ' if value.is_complex() else ''}tensor of shape "
            f"{tuple(value.shape)}; it must have its parameter's shape and kind"
        )
