"""State tensors that users put in ``optimizer.state[p]`` in place of the optimizer's views.

torch's optimizer updates whatever tensors ``optimizer.state[p]`` holds when it steps. A
loop that moves the state away and back (CPU offloading, by ``state[k] = v.to("cpu")`` or
``v.data = v.data.to("cpu")``, and back before the next step), or a moment replaced by
hand (``state[p]["exp_avg"] = torch.zeros_like(p)``), changes what the next step starts
from. Here the update runs on flat buffers, so such tensors are copied into them at the
next step, and the entry holds a view of the buffer again.

A replacement may be another parameter's state: entries traded between parameters, or a
checkpoint of the optimizer's own ``state_dict()`` with its entries moved (experts
reordered together with their state). Such values are views of the buffers about to be
written, so they are copied out before any is copied in (``apart_from_*``).

Looking at every entry costs a pass over all state tensors. It runs only when a state
buffer's count of users changed since the last step (``FlatBuffer.state_references``):
replacing or swapping a view that only its entry held drops the count.
"""

from __future__ import annotations

import numbers

import torch

from ._checkpoint import REQUIRED_STATE_KEYS, check_entry, check_step
from ._in_place import local
from ._layout import ENGINE_STATE_KEYS, FlatBuffer


def replaced_state_tensors(
    buffer: FlatBuffer, groups: list[dict], state, optimizer_name: str
) -> list[tuple[int, str, object]]:
    """``(segment, key, value)`` for each state tensor in ``buffer``'s entries that is no
    longer the optimizer's view of its segment. Raises ``ValueError`` for one that cannot
    stand in for it, before anything is changed."""
    found = []
    for segment, entry in enumerate(buffer.state_entries):
        if entry is None or state.get(buffer.params[segment]) is not entry:
            continue  # no state yet, or a replaced entry: the engine re-imports those
        amsgrad = _amsgrad_of(buffer, segment, groups)
        refuse_deleted_keys(buffer, segment, entry, amsgrad, _where(optimizer_name, buffer, segment))
        for key, value in entry.items():
            ours = buffer.internal_state_view(key, segment)
            if ours is None and key == "max_exp_avg_sq" and value is not None:
                # Put there while the buffer keeps no maximum (AMSGrad off): torch's step
                # uses it once AMSGrad is on, so it is taken in like any replacement, into
                # a maximum made for it (checked against a moment of the same shape).
                _check_replacement(value, buffer.internal_state_view("exp_avg", segment), key, buffer, segment, optimizer_name)
                found.append((segment, key, value))
                continue
            if ours is None or _is_view_of(value, ours):
                continue
            _check_replacement(value, ours, key, buffer, segment, optimizer_name)
            found.append((segment, key, value))
    return found


def refuse_deleted_keys(buffer: FlatBuffer, segment: int, entry: dict, amsgrad: bool, where: str) -> None:
    """``ValueError`` for a key the step needs deleted from ``entry``, the optimizer's own
    entry of ``segment``, whose group has AMSGrad on or off (torch's next step raises a
    ``KeyError``)."""
    missing = [key for key in _keys_the_step_needs(buffer, segment, amsgrad) if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks {missing}, which the step needs")


def _keys_the_step_needs(buffer: FlatBuffer, segment: int, amsgrad: bool) -> tuple[str, ...]:
    """The keys whose deletion from an entry of ours is refused: without them torch's step
    raises a ``KeyError``, and ours would go on from its buffers while checkpoints lost
    the key. A maximum is needed where the entry was given one and its group has AMSGrad
    on (``amsgrad``; a group switching it on gains the key at its next step)."""
    keys = REQUIRED_STATE_KEYS
    if buffer.master_views is not None:
        keys += ("master_param",)
    if amsgrad and buffer.maximum_given[segment]:
        keys += ("max_exp_avg_sq",)
    return keys


@torch.no_grad()
def adopt_state_tensors(buffer: FlatBuffer, replaced: list[tuple[int, str, object]]) -> None:
    """Copy each replacement into the buffer and give its entry a view of the buffer again."""
    for segment, key, value in replaced:
        if key == "max_exp_avg_sq":
            buffer.ensure_max_exp_avg_sq()
        ours = buffer.internal_state_view(key, segment)
        if isinstance(value, torch.Tensor):
            values = local(value)
        else:  # a number: float64 whatever the default dtype, which could round a count
            values = torch.tensor(float(value), dtype=torch.float64, device="cpu")
        ours.copy_(values.reshape(ours.shape) if key == "step" else values)
        buffer.state_entries[segment][key] = buffer.entry_view(key, segment)


def apart_from_buffers(buffers: list[FlatBuffer], state) -> dict[int, dict]:
    """For each parameter of ``buffers`` whose entry holds a state tensor sharing memory with
    those buffers' state, other than its own segment's: ``id(param)`` -> a copy of the entry
    with such tensors cloned. The buffers are then written one segment at a time without
    changing a value before it is read: a checkpoint of the optimizer's own state with its
    entries moved between parameters (experts reordered with their state), or entries
    swapped in ``optimizer.state``, hold views of the very memory being written."""
    spans = _memory_spans(buffers)
    apart = {}
    for buffer in buffers:
        for segment, param in enumerate(buffer.params):
            entry = state.get(param)
            if not entry:
                continue
            moved = {
                key: value.clone()
                for key, value in entry.items()
                if key in ENGINE_STATE_KEYS
                and _overlaps(value, spans)
                and not _is_view_of(value, buffer.internal_state_view(key, segment))
            }
            if moved:
                apart[id(param)] = {**entry, **moved}
    return apart


def apart_from_state(buffers: list[FlatBuffer], replaced: list[tuple[int, str, object]]) -> list:
    """``replaced`` with each replacement that shares memory with ``buffers``' state (another
    parameter's entry view, moved here) cloned, for ``adopt_state_tensors``."""
    spans = _memory_spans(buffers)
    return [(segment, key, value.clone() if _overlaps(value, spans) else value) for segment, key, value in replaced]


def _memory_spans(buffers: list[FlatBuffer]) -> list[tuple[torch.device, int, int]]:
    """Where each of ``buffers``' state tensors lives: (device, first byte, end)."""
    tensors = [t for buffer in buffers for t in buffer.state_tensors()]
    storages = [t.untyped_storage() for t in tensors]
    return [(t.device, s.data_ptr(), s.data_ptr() + s.nbytes()) for t, s in zip(tensors, storages) if s.nbytes()]


def _overlaps(value, spans) -> bool:
    if not isinstance(value, torch.Tensor):
        return False
    values = local(value)
    try:
        storage = values.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a subclass without storage holds none of ours
        return False
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    return any(device == values.device and start < last and first < end for device, first, last in spans)


def _is_view_of(value, ours: torch.Tensor | None) -> bool:
    if ours is None or not isinstance(value, torch.Tensor):
        return False
    values = local(value)
    if values.is_nested or values.layout != torch.strided:
        return False  # no data pointer to compare
    return values.data_ptr() == ours.data_ptr() and values.dtype == ours.dtype and values.shape == ours.shape


def check_replaced_entries(buffer: FlatBuffer, groups: list[dict], entries: list, optimizer_name: str) -> None:
    """Whole entries put in ``optimizer.state`` (``state[p] = {...}``) for ``buffer``'s
    parameters, checked as a checkpoint's before any is copied in: ``ValueError`` for one that
    cannot stand in. The buffer's other entries, re-imported with them, are its own: a key
    deleted from one of those is refused as the step refuses it."""
    for segment, (param, entry) in enumerate(zip(buffer.params, entries)):
        where = _where(optimizer_name, buffer, segment)
        if entry and entry is buffer.state_entries[segment]:  # (an emptied one is a reset)
            refuse_deleted_keys(buffer, segment, entry, _amsgrad_of(buffer, segment, groups), where)
        check_local_entry(param, entry, where)


def check_local_entry(param, entry, where: str, step_value: bool = True) -> None:
    """``check_entry`` on local values (a DTensor's shard, as the buffers hold it)."""
    if not entry:
        return
    if isinstance(entry, dict):  # (check_entry refuses anything else)
        entry = {key: local(value) if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
    check_entry(local(param), entry, where, step_value=step_value)


def _amsgrad_of(buffer: FlatBuffer, segment: int, groups: list[dict]) -> bool:
    return bool(groups[int(buffer.group_of_segment[segment])]["amsgrad"])


def _where(optimizer_name: str, buffer: FlatBuffer, segment: int, key: str | None = None) -> str:
    entry = "optimizer.state[p]" + ("" if key is None else f"[{key!r}]")
    return (
        f"{optimizer_name}: {entry} of a parameter of shape {tuple(buffer.shapes[segment])} "
        f"(param group {int(buffer.group_of_segment[segment])})"
    )


def _check_replacement(value, ours: torch.Tensor, key: str, buffer: FlatBuffer, segment: int, optimizer_name: str):
    where = _where(optimizer_name, buffer, segment, key)
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise ValueError(f"{where} was replaced by a tensor on the meta device, which holds no values")
    if key == "step":
        if isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_complex() or value.dtype == torch.bool):
            raise ValueError(
                f"{where} was replaced by a {value.dtype} tensor of {value.numel()} elements; a step is one real number"
            )
        if not isinstance(value, (torch.Tensor, numbers.Real)):
            raise ValueError(f"{where} was replaced by {type(value).__name__}; a step is a number or a tensor")
        # Its value as a checkpoint's is checked, where reading it does not wait for a
        # device (offloading loops put a device's step back at every step).
        step = local(value) if isinstance(value, torch.Tensor) else value
        if not isinstance(step, torch.Tensor) or step.device.type == "cpu":
            try:
                check_step(step, where)
            except ValueError:
                raise ValueError(
                    f"{where} was replaced by {float(step)}; a step must be a finite count >= 0 (at most float32's largest)"
                ) from None
        return
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where} was replaced by {type(value).__name__}; state must be a tensor")
    # As a checkpoint's state tensors are checked (``check_entry``): dense, and of a
    # floating-point or complex dtype (torch's update raises for an integer one).
    if value.is_nested or local(value).layout != torch.strided:
        raise ValueError(f"{where} was replaced by a sparse or nested tensor; state must be a dense tensor")
    if not (value.is_floating_point() or value.is_complex()):
        raise ValueError(f"{where} was replaced by a {value.dtype} tensor; state must be floating point")
    if tuple(local(value).shape) != tuple(ours.shape) or value.is_complex() != ours.is_complex():
        raise ValueError(
            f"{where} was replaced by a {'complex ' if value.is_complex() else ''}tensor of shape "
            f"{tuple(value.shape)}; it must have its parameter's shape and kind"
        )
