"""The flat-buffer engine behind Adam and AdamW: layout, state, and the per-step update.

The optimizer class keeps torch's public surface (``param_groups``, ``state``, hooks,
``state_dict``); this engine keeps the parameters and their state in flat buffers and
makes ``optimizer.state[p]`` views of them.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from itertools import repeat

import numpy as np
import torch

from . import _backends
from ._checkpoint import REQUIRED_STATE_KEYS, check_step_values
from ._gradients import adopt_fresh_gradients, plan_gradients, zero_into_grad_buffer
from ._in_place import held_elsewhere, in_shared_memory, is_dtensor, local
from ._layout import ENGINE_STATE_KEYS, PRECISION_KEYS, FlatBuffer, overlaps_itself, precision_of, storage_dtype
from ._shared_memory import SpanIndex, check_no_shared_memory, meets_any
from ._state_tensors import (
    adopt_state_tensors,
    apart_from_buffers,
    apart_from_state,
    check_local_entry,
    check_replaced_entries,
    refuse_deleted_keys,
    replaced_state_tensors,
)
from ._tables import HyperTable, order_chunks, upload, variant_of
from ._validation import check_precision_options

#: How many buffers ``add_param_group`` may leave for the next step to join before it joins
#: them itself: a bound on the per-call work that looks at every buffer.
_MOST_BUFFERS_APART = 64

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)


def check_group_options(groups: list[dict]) -> None:
    """Raise for precision options (each group may override the optimizer's) that cannot work."""
    for options in groups:
        check_precision_options(
            options.get("master_weights"),
            options.get("state_dtype"),
            options.get("stochastic_rounding"),
            options.get("stochastic_rounding_seed") or 0,  # as precision_of reads it
        )


def _unsupported_dtype_error(optimizer_name: str, dtype: torch.dtype) -> TypeError:
    return TypeError(
        f"{optimizer_name} supports parameters of dtype {', '.join(map(str, SUPPORTED_DTYPES))}; "
        f"got a parameter of dtype {dtype}"
    )


def _unsteppable_parameters(groups: list[dict]) -> list:
    """The parameters of a floating dtype no buffer holds (float8), left out while frozen."""
    return [
        param
        for group in groups
        for param in group["params"]
        if param.is_floating_point() and param.dtype not in SUPPORTED_DTYPES
    ]


def _refuse_unsteppable_gradients(params: list, optimizer_name: str) -> None:
    """A left-out parameter given a gradient since (unfrozen): torch's step raises for it
    too, as it cannot compute in its dtype; ours would leave it silently as it was."""
    for param in params:
        if param.grad is not None:
            raise _unsupported_dtype_error(optimizer_name, param.dtype)


def _lazy_parameters(groups: list[dict]) -> list:
    """A lazy module's parameters before its first forward: uninitialized, with no values
    to move or update yet (nor a gradient). torch's optimizers hold them as they are and
    step them once the forward has made them real, the same Parameter objects; the
    buffers take them in at the first look after that (``ensure_current``)."""
    return [param for group in groups for param in group["params"] if torch.nn.parameter.is_lazy(param)]


def is_frozen(param, state) -> bool:
    """Requires no gradient, and has neither one nor state: such a parameter is left where
    it is (``Engine._keys``). A gradient given by hand to one that requires none is still
    used, as torch uses it."""
    return not param.requires_grad and param.grad is None and not state.get(param)


def check_parameters(groups, params: list, group_of: list[int], optimizer_name: str, frozen: list[bool]) -> None:
    """Raise for parameters the buffers cannot hold (with the precision options of their
    groups, ``groups[index]``), before anything is changed. ``frozen`` parameters stay where
    they are, so those may share memory with each other (not with one that moves)."""
    for param, index in zip(params, group_of):
        check_parameter_kind(groups[index], param, index, optimizer_name)
        if (param.requires_grad or param.grad is not None) and overlaps_itself(param):
            raise _self_overlapping_error(optimizer_name, param, index)
    check_no_shared_memory(params, group_of, optimizer_name, frozen)


def check_parameter_kind(group: dict, param, index: int, optimizer_name: str) -> None:
    """The checks that need only a parameter's dtype, layout and device, which a lazy
    module's uninitialized parameters have too (group ``index``, of options ``group``)."""
    if param.dtype not in SUPPORTED_DTYPES:
        raise _unsupported_dtype_error(optimizer_name, param.dtype)
    if param.layout != torch.strided:
        raise TypeError(f"{optimizer_name} supports dense (strided) parameters, got layout {param.layout}")
    if param.device.type == "meta":
        raise ValueError(
            f"{optimizer_name} cannot hold parameters on the meta device: build the optimizer after "
            "model.to_empty(device=...), which gives the model new Parameter objects (outside "
            "torch.__future__'s swap mode) that an optimizer built before would never update"
        )
    state_dtype = group.get("state_dtype")
    if state_dtype is not None and param.is_complex() and state_dtype != storage_dtype(param):
        raise ValueError(
            f"{optimizer_name}: state_dtype={state_dtype} cannot apply to a complex parameter (param group "
            f"{index}, shape {_shape_of(param)}): its state stays complex, of its own precision. Give "
            "complex parameters a param group of their own with \"state_dtype\": None"
        )
    if group.get("stochastic_rounding") and param.dtype == torch.float16 and not group.get("master_weights"):
        raise ValueError(
            "stochastic_rounding rounds bfloat16 values; float16 parameters need master_weights=True "
            "(their bfloat16 states, with state_dtype=torch.bfloat16, are then rounded at random)"
        )


def _shape_of(param) -> tuple | str:
    return "not yet known (a lazy module's)" if torch.nn.parameter.is_lazy(param) else tuple(param.shape)


def _check_lazy_parameters(groups: list[dict], options: list[dict], first_index: int, optimizer_name: str) -> None:
    """``check_parameter_kind`` for the lazy parameters of ``groups`` (the first of which is
    param group ``first_index``, of options ``options[0]``): refused when the optimizer is
    built, not at the first step after their forward."""
    for offset, (group, group_options) in enumerate(zip(groups, options)):
        for param in _lazy_parameters([group]):
            check_parameter_kind(group_options, param, first_index + offset, optimizer_name)


def _precision_options(group: dict) -> tuple:
    return tuple(map(group.get, PRECISION_KEYS))


def _same_group(group: dict, seen: tuple) -> bool:
    """Does ``group`` hold the parameters, and precision options, it held when ``seen``
    (``Engine._group_fingerprint``) was taken? The parameters themselves, not their list: a
    parameter swapped into a group's list in place must be noticed. (Compared by identity:
    == on tensors compares values.)"""
    params, options = seen
    members = group["params"]
    same_members = len(members) == len(params) and all(map(operator.is_, members, params))
    return same_members and _precision_options(group) == options


def _self_overlapping_error(optimizer_name: str, param: torch.Tensor, group_index: int) -> ValueError:
    return ValueError(
        f"{optimizer_name}: a parameter of shape {tuple(param.shape)} (param group {group_index}) has elements "
        f"that share memory (strides {param.stride()}, as from expand()). torch cannot update such a "
        "tensor in place, and a segment of its own would untie its elements; give it memory of its "
        "own (.clone()) or freeze it"
    )


def _inference_tensor_error(optimizer_name: str, param: torch.Tensor, group_index: int) -> RuntimeError:
    # RuntimeError, as torch's optimizer raises when it tries the in-place update
    return RuntimeError(
        f"{optimizer_name}: a parameter of shape {tuple(param.shape)} (param group {group_index}) is an "
        "inference tensor (made under torch.inference_mode()) and has a gradient; adam_triton updates no "
        "inference tensor (torch's optimizers cannot either, outside inference mode). Make it a normal "
        "tensor (.clone() it, outside inference mode) to train it, or freeze it"
    )


def _python_dispatch_error(optimizer_name: str, param: torch.Tensor, group_index: int) -> TypeError:
    return TypeError(
        f"{optimizer_name}: a parameter of shape {tuple(param.shape)} (param group {group_index}) is a "
        f"{type(param).__name__}, a tensor subclass with __torch_dispatch__, and has a gradient. Such a "
        "tensor may keep its values in tensors of its own, which an update of the flat buffers would "
        "not reach, so adam_triton trains none (it holds them frozen). Give the trainable ones to a "
        "torch.optim optimizer of their own"
    )


def _left_alone_error(buffer, segment: int):
    """The error for a gradient given to a parameter the update never writes."""
    if buffer.self_overlapping[segment]:
        return _self_overlapping_error
    return _python_dispatch_error if buffer.python_dispatch[segment] else _inference_tensor_error


def _entry_replaced(entry: dict | None, ours: dict | None) -> bool:
    """Did someone reset or replace a parameter's ``optimizer.state`` entry since we made it
    (``ours``)? Deleted, replaced by another dict, cleared in place (``state[p].clear()``)
    or missing a key now (``del state[p]["exp_avg_sq"]``, which the re-import refuses),
    or, for a parameter without state yet, given some."""
    if ours is None:
        return bool(entry)
    return entry is not ours or not all(map(entry.__contains__, REQUIRED_STATE_KEYS))


def _gradient_buffer_read(buffer: FlatBuffer, plan) -> bool:
    """Did this step read the flat gradient buffer: gradients kept there or staged there
    (a staged segment reads its view of the buffer: ``in_grad_buffer``)?"""
    return bool(np.count_nonzero(plan.in_grad_buffer))


@torch.no_grad()
def _release(buffer: FlatBuffer, segment: int, state) -> None:
    """A parameter that left the optimizer (removed from its group, its group popped) keeps
    its values, gradient and state, as under torch, but in tensors of its own: segments of
    the old buffers would keep those whole buffers alive."""
    param = buffer.params[segment]
    _release_values(buffer, segment)
    if buffer.grad_views is not None and param.grad is buffer.grad_views[segment]:
        param.grad = param.grad.clone(memory_format=torch.preserve_format)
    entry = state.get(param)
    if entry is not None and entry is buffer.state_entries[segment]:
        state[param] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}


def _own_memory_for_frozen(params: list, buffers: list[FlatBuffer]) -> None:
    """Frozen parameters stay where they are; one that is still a segment of a buffer of
    ours (frozen after the optimizer was built) gets memory of its own first, as a
    parameter that leaves the optimizer does (``_release``): a segment would keep its whole
    old buffer alive beside the new ones. Not one whose segment someone else holds too
    (another frozen parameter tied to it, ``b.data = a.data``; a tensor the user kept):
    copied, it would stop sharing their memory; it keeps the old buffer alive instead."""
    frozen = {id(p) for p in params}
    for buffer in buffers:
        for segment, param in enumerate(buffer.params):
            if id(param) in frozen and not held_elsewhere(local(param)):
                _release_values(buffer, segment)


def _step_tensor(step) -> torch.Tensor:
    """A loaded step as a float64 scalar: a tensor stays on its device (one copy brings a
    device's steps to the host together); a number becomes a host tensor whatever the
    default device."""
    if isinstance(step, torch.Tensor):
        return step.to(torch.float64).reshape(())
    return torch.tensor(float(step), dtype=torch.float64, device="cpu")


def _release_values(buffer: FlatBuffer, segment: int) -> None:
    param = buffer.params[segment]
    if not buffer.in_place[segment] and param.data_ptr() == buffer.param_ptrs[segment]:
        param.data = param.data.clone(memory_format=torch.preserve_format)


class Engine:
    def __init__(self, optimizer_name: str, backend: str, precision: dict | None = None):
        self.name = optimizer_name
        self.backend = backend
        self.precision = precision or {}  # the optimizer's precision options; groups may override
        self.buffers: list[FlatBuffer] = []
        self.backend_of: dict[int, str] = {}
        self.hyper = HyperTable()
        self.found_inf = None  # GradScaler's verdict on the last step, if it gave one
        self._fingerprint: list[tuple] = []
        self._params: list = []
        self._unsteppable: list = []  # frozen float8 parameters, left out of the buffers
        self._lazy: list = []  # uninitialized parameters (``_lazy_parameters``), left out too
        # ``optimizer.state`` and its entries (and their sizes) as the last step left them:
        # when all are the same, nobody reset, replaced or cleared an entry (C-level passes,
        # not a lookup per parameter).
        self._state_seen = None
        self._state_entries_seen: list = []
        self._state_sizes_seen: list[int] = []
        # Each buffer's ``state_references()`` as the last step left them (None: look at
        # every state tensor at the next step).
        self._state_references_seen: list | None = None
        # ids of parameters whose .data someone re-pointed at storage of the same kind after
        # they were re-homed (ZeroRedundancyOptimizer's buckets): updated there from now on.
        self._left_in_place: set[int] = set()
        # Parameters added by add_param_group sit in buffers of their own until the next
        # step joins them with the others (``add_group``).
        self._join_pending = False

    # A subclass whose __getstate__ returns its whole __dict__ pickles the engine with the
    # optimizer; the optimizer's __setstate__ then builds a new one around the restored
    # parameters, so only what names it travels (its buffers hold storages pickle cannot
    # restore, and would double what is copied).
    def __getstate__(self) -> dict:
        return {"name": self.name, "backend": self.backend, "precision": self.precision}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"], state["backend"], state["precision"])

    # -- structure --------------------------------------------------------------------------
    @staticmethod
    def _group_fingerprint(groups: list[dict]) -> list[tuple]:
        return [(list(g["params"]), _precision_options(g)) for g in groups]

    def _remember_groups(self, groups: list[dict], added: bool = False) -> None:
        """The groups as the buffers now hold them (or, ``added``, one more), and the frozen
        float8 and the uninitialized parameters they hold, which the buffers leave out."""
        fingerprint, unsteppable = self._group_fingerprint(groups), _unsteppable_parameters(groups)
        lazy = _lazy_parameters(groups)
        if added:
            fingerprint, unsteppable = self._fingerprint + fingerprint, self._unsteppable + unsteppable
            lazy = self._lazy + lazy
        self._fingerprint, self._unsteppable, self._lazy = fingerprint, unsteppable, lazy

    def _groups_unchanged(self, groups: list[dict]) -> bool:
        seen = self._fingerprint
        return len(groups) == len(seen) and all(map(_same_group, groups, seen))

    def _options(self, group: dict) -> dict:
        return {key: group.get(key, self.precision.get(key)) for key in PRECISION_KEYS}

    @staticmethod
    def _ordered_parameters(groups: list[dict]) -> tuple[list, list[int]]:
        """The parameters the buffers hold, each once. Integer (and bool) tensors are left
        out: they cannot have gradients, so torch never updates them either (a quantized
        model's frozen weights passed along with ``model.parameters()``). So are frozen
        ones of a floating dtype no buffer holds (float8 weights): torch cannot step them;
        and uninitialized ones (``_lazy_parameters``)."""
        params, group_of, seen = [], [], set()
        for index, group in enumerate(groups):
            for param in group["params"]:
                if not (param.is_floating_point() or param.is_complex()) or torch.nn.parameter.is_lazy(param):
                    continue
                if param.dtype not in SUPPORTED_DTYPES and not param.requires_grad and param.grad is None:
                    continue
                if id(param) not in seen:  # torch warns about duplicates; update them once
                    seen.add(id(param))
                    params.append(param)
                    group_of.append(index)
        return params, group_of

    def _keys(self, groups, params, group_of, state) -> dict:
        """Parameters by buffer: (device, storage dtype, precision, complex or not, frozen or
        not) of their local values. Complex parameters get buffers of their own: a storage
        viewed as two dtypes cannot be saved by torch.save. So do frozen parameters, those
        that require no gradient and have neither one nor state (a fine-tuned model's
        trunk, passed along in ``model.parameters()``): their buffer makes no moments (nor
        masters) until one of them gets state, so they cost no memory, and the others'
        state, views of their own buffer's moments, no checkpoint space."""
        keyed: dict[tuple, tuple[list, list]] = {}
        for param, index in zip(params, group_of):
            values = local(param)
            dtype = storage_dtype(values)
            precision = precision_of(self._options(groups[index]), dtype)
            key = (values.device, dtype, precision, values.is_complex(), is_frozen(param, state))
            members = keyed.setdefault(key, ([], []))
            members[0].append(param)
            members[1].append(index)
        return keyed

    def load(self, groups: list[dict], state: defaultdict) -> None:
        """Take a loaded checkpoint's state (its masters as saved), into buffers of the
        groups' precision if the checkpoint changed it."""
        # State for a frozen parameter (trained in an earlier phase) moves it out of the
        # frozen buffer, whose moments would be made for all of them.
        if not self._join_pending and self._groups_unchanged(groups) and self._buffers_match(groups, state):
            self.import_state(groups, state, saved_masters_win=True)
        else:
            self.rebuild(groups, state, saved_masters_win=True)

    def check(self, groups: list[dict], state) -> tuple[list, list[int]]:
        """Everything ``rebuild`` needs to hold for ``groups`` and ``state``, checked before
        anything changes; the parameters it would hold, and their groups."""
        params, group_of = self._ordered_parameters(groups)
        options = [self._options(g) for g in groups]
        check_group_options(options)
        frozen = [is_frozen(p, state) for p in params]
        check_parameters(options, [local(p) for p in params], group_of, self.name, frozen)
        _check_lazy_parameters(groups, options, 0, self.name)
        # Entries of ours a key was deleted from: refused as the step refuses them
        # (``replaced_state_tensors``), which a re-homing would otherwise come before.
        ours = {id(p): (b, s) for b in self.buffers for s, p in enumerate(b.params) if b.state_entries[s] is not None}
        readable_steps = []
        for param, group_index in zip(params, group_of):
            entry = state.get(param)
            moment = entry.get("exp_avg") if isinstance(entry, dict) else None
            if isinstance(moment, torch.Tensor) and moment.shape != param.shape:
                # (Or a checkpoint loaded before a lazy module's forward chose its shape.)
                raise ValueError(
                    f"{self.name}: a parameter's shape changed from {tuple(moment.shape)} to "
                    f"{tuple(param.shape)} after its state was made or loaded; give it its shape back, "
                    "or reset its state (optimizer.state[p] = {}) to start it afresh"
                )
            # The state is imported after parameters have moved: an entry it cannot take
            # (a key deleted, a tensor put there by hand) is refused now. Step values are
            # read where that does not wait for a device (on the CPU), all in one pass.
            if entry:
                where = f"{self.name}: optimizer.state[p] of a parameter of shape {tuple(param.shape)} (param group {group_index})"
                buffer, segment = ours.get(id(param), (None, None))
                if buffer is not None and buffer.state_entries[segment] is entry:
                    # (The groups may have changed since the buffer was laid out.)
                    refuse_deleted_keys(buffer, segment, entry, bool(groups[group_index]["amsgrad"]), where)
                check_local_entry(param, entry, where, step_value=False)
                readable_steps.append((local(entry["step"]), where))
        check_step_values(readable_steps)
        return params, group_of

    # Buffers made under inference_mode (an optimizer built there) would be inference
    # tensors, which neither count versions nor can be trained afterwards.
    @torch.inference_mode(False)
    def rebuild(self, groups: list[dict], state: defaultdict, saved_masters_win: bool = False) -> None:
        """(Re)home every parameter into flat buffers, keeping whatever state it has;
        DTensor parameters, parameters a wrapper re-pointed and CPU parameters in shared
        memory stay where they are (``_in_place``)."""
        params, group_of = self.check(groups, state)
        keyed = self._keys(groups, params, group_of, state)
        backends = {key: _backends.resolve_backend(self.backend, key[0]) for key in keyed}
        self._left_in_place &= {id(p) for p in params}

        # Nothing has been changed up to here; from here on parameters move.
        kept = {id(p) for p in params}
        departed = [(b, s) for b in self.buffers for s, p in enumerate(b.params) if id(p) not in kept]
        _own_memory_for_frozen([p for key, (members, _) in keyed.items() if key[4] for p in members], self.buffers)
        buffers = self._home(keyed, backends)
        for buffer, segment in departed:
            _release(buffer, segment, state)
        self.buffers = buffers
        self.backend_of = {id(b): backends[b.key] for b in buffers}
        self._params = params
        self._remember_groups(groups)
        self._join_pending = False
        self.import_state(groups, state, saved_masters_win=saved_masters_win)

    def _home(self, keyed: dict, backends: dict) -> list[FlatBuffer]:
        """A buffer for each key's parameters, which move into it."""
        buffers = []
        for key, (members, member_groups) in keyed.items():
            in_place = [is_dtensor(p) or id(p) in self._left_in_place or in_shared_memory(p) for p in members]
            working = backends[key] == "torch" and _backends.needs_working_copies(key[1], key[2])
            buffer = FlatBuffer(
                key[0], key[1], members, member_groups,
                precision=key[2], in_place=in_place, stage_in_place=working, frozen=key[4],
                vector_aligned=backends[key] == "triton",
            )
            buffer.adopt_parameters()
            buffers.append(buffer)
        return buffers

    def add_group(self, groups: list[dict], state: defaultdict) -> None:
        """``add_param_group``: the last of ``groups`` is new. Its parameters move at once
        into buffers of their own, and the next ``ensure_current`` (the next step) joins
        each kind's buffers into one. Re-homing every parameter at each call would make a
        loop of ``add_param_group`` calls quadratic in the parameters held; so would looking
        at every earlier group at each call: edits to those are noticed at the next
        ``ensure_current``, against their fingerprints from before. Everything is rebuilt
        now instead, as the constructor does, where the new parameters come with state or
        lie in memory the optimizer holds (taken out of another group), and once
        ``_MOST_BUFFERS_APART`` buffers wait to be joined."""
        new_params, _ = self._ordered_parameters(groups[-1:])
        new_group_of = [len(groups) - 1] * len(new_params)
        options = self._options(groups[-1])
        check_group_options([options])
        frozen = [is_frozen(p, state) for p in new_params]
        check_parameters({len(groups) - 1: options}, [local(p) for p in new_params], new_group_of, self.name, frozen)
        _check_lazy_parameters(groups[-1:], [options], len(groups) - 1, self.name)
        # (torch's add_param_group refuses parameters that the other groups hold.)
        if (
            len(self.buffers) >= _MOST_BUFFERS_APART
            or any(state.get(p) for p in new_params)
            or any((b.in_place.any() and not b.frozen) or b.parameters_moved() for b in self.buffers)
            or self._meets_memory_held([local(p) for p in new_params])
        ):
            self.rebuild(groups, state)
            return
        keyed = self._keys(groups, new_params, new_group_of, state)
        backends = {key: _backends.resolve_backend(self.backend, key[0]) for key in keyed}

        # Nothing has been changed up to here.
        added = self._home(keyed, backends)
        self._join_pending = self._join_pending or any(b.key in keyed for b in self.buffers)
        self.buffers = self.buffers + added
        self.backend_of.update({id(b): backends[b.key] for b in added})
        self._params = self._params + new_params
        self._remember_groups(groups[-1:], added=True)
        self.import_state(groups, state, buffers=added)

    def _meets_memory_held(self, values: list[torch.Tensor]) -> bool:
        """Whether any of ``values`` lies in memory of the parameters held: the buffers, and
        the frozen parameters left where they are (moved into a new buffer, a parameter over
        one of those would stop sharing it)."""
        if meets_any(values, [b.param for b in self.buffers]):
            return True
        for buffer in self.buffers:
            if buffer.frozen:
                frozen = [local(p) for p in buffer.params]
                # A parameter given other memory or strides makes the caller rebuild
                # (``parameters_moved``); a longer view at the same address does not, and
                # makes the index anew here (one C-level read of the sizes).
                sizes = list(map(torch.Tensor.size, frozen))
                if buffer.frozen_spans is None or buffer.frozen_spans[0] != sizes:
                    buffer.frozen_spans = (sizes, SpanIndex(frozen))
                if any(map(buffer.frozen_spans[1].meets, values)):
                    return True
        return False

    def _buffers_match(self, groups: list[dict], state) -> bool:
        """Do the buffers hold exactly the groups' parameters, each in the group and buffer
        (kind, precision, frozen or not) it would get now? One look at each parameter."""
        params, group_of = self._ordered_parameters(groups)
        current = {id(p): b.key for b in self.buffers for p in b.params}
        wanted = {id(p): key for key, (members, _) in self._keys(groups, params, group_of, state).items() for p in members}
        current_groups = [g for b in self.buffers for g in b.group_of_segment.tolist()]
        current_params = [p for b in self.buffers for p in b.params]
        same_groups = {id(p): g for p, g in zip(params, group_of)} == {
            id(p): g for p, g in zip(current_params, current_groups)
        }
        return current == wanted and same_groups

    def ensure_current(self, groups: list[dict], state: defaultdict, strides: bool = True) -> None:
        """Re-home if the groups' parameters or precision changed, or a parameter's data moved
        away (``model.to(device)``, ``model.half()``, a ``.data`` assignment) or, with
        ``strides``, was laid out anew where it was, or a lazy module's forward made its
        parameters real. Zeroing gradients needs no look at the strides (a pass over every
        parameter), the update does."""
        if not self._groups_unchanged(groups):
            # Options edited into a group dict are checked as the constructor checks them,
            # also when they leave every parameter where it is.
            self.check(groups, state)
            if self._buffers_match(groups, state):
                self._remember_groups(groups)
            else:
                self.rebuild(groups, state)
                return
        moved = [(b, s) for b in self.buffers if b.parameters_moved(strides) for s in b.moved_segments(strides)]
        if moved:
            for buffer, segment in moved:
                param = buffer.params[segment]
                values = local(param)
                if (values.device, storage_dtype(values)) == (buffer.device, buffer.dtype) and held_elsewhere(values):
                    # Re-pointed at other storage of the same kind that someone else holds
                    # (ZeroRedundancyOptimizer's buckets, say): they read it there, so it is
                    # updated there. Storage only the parameter holds is re-homed, also
                    # for a parameter that was left in someone's storage before.
                    self._left_in_place.add(id(param))
                else:
                    self._left_in_place.discard(id(param))
        materialized = self._lazy_materialized()
        if moved or self._join_pending or materialized:
            # A checkpoint loaded before the forward is imported only now: its masters are
            # compared with the parameters at their next update, as at a load, for the
            # model's weights may yet be loaded too.
            self.rebuild(groups, state, saved_masters_win=materialized)

    def _lazy_materialized(self) -> bool:
        """Has a forward made a left-out lazy parameter real? It is the same Parameter
        object, so the groups' fingerprints cannot tell."""
        return bool(self._lazy) and not all(map(torch.nn.parameter.is_lazy, self._lazy))

    # -- state ------------------------------------------------------------------------------
    @torch.no_grad()
    def import_state(
        self,
        groups: list[dict],
        state: defaultdict,
        buffers: list[FlatBuffer] | None = None,
        saved_masters_win: bool = False,
    ) -> None:
        """Copy each parameter's state (views of old buffers, or loaded tensors) into the
        buffers (all, or ``buffers``), cast to the buffer's precision, and make ``state[p]``
        views of them. Parameters without state start fresh; masters missing from the state
        are taken from the parameters, and so are the elements of a saved master that no
        longer rounds to its parameter (written while it was out of the optimizer), unless
        ``saved_masters_win`` (a checkpoint, which may be loaded before the model is)."""
        self._forget_state_seen()  # it holds the entries being replaced, and their buffers
        buffers = self.buffers if buffers is None else buffers
        apart = apart_from_buffers(buffers, state)
        for buffer in buffers:
            step_values = np.zeros(len(buffer.params), dtype=np.float64)
            loaded_steps = []
            for segment, param in enumerate(buffer.params):
                entry = apart.get(id(param)) or state.get(param)
                has_state = bool(entry) and "exp_avg" in entry
                if has_state:
                    buffer.ensure_moments()
                if buffer.master_views is not None:
                    saved_master = entry.get("master_param") if entry else None
                    if isinstance(saved_master, torch.Tensor):
                        buffer.master_views[segment].copy_(local(saved_master))
                        if not saved_masters_win:
                            buffer.reseed_master(segment)
                    else:
                        buffer.master_views[segment].copy_(buffer.model_values(segment))
                if not has_state:
                    if buffer.exp_avg is not None:
                        buffer.exp_avg_views[segment].zero_()
                        buffer.exp_avg_sq_views[segment].zero_()
                    if buffer.max_exp_avg_sq is not None:
                        buffer.max_exp_avg_sq_views[segment].zero_()
                    buffer.state_entries[segment] = None
                    continue
                # DTensor states (ours, or loaded) are copied through their local shards.
                buffer.exp_avg_views[segment].copy_(local(entry["exp_avg"]))
                buffer.exp_avg_sq_views[segment].copy_(local(entry["exp_avg_sq"]))
                has_max = entry.get("max_exp_avg_sq") is not None
                if has_max:
                    buffer.ensure_max_exp_avg_sq()
                    buffer.max_exp_avg_sq_views[segment].copy_(local(entry["max_exp_avg_sq"]))
                elif buffer.max_exp_avg_sq is not None:
                    buffer.max_exp_avg_sq_views[segment].zero_()
                loaded_steps.append((segment, entry.get("step", 0)))
                group = groups[int(buffer.group_of_segment[segment])]
                views = buffer.state_views(segment, amsgrad=has_max or bool(group["amsgrad"]))
                extra = {k: v for k, v in entry.items() if k not in ENGINE_STATE_KEYS}
                state[param] = buffer.state_entries[segment] = {**views, **extra}
            if loaded_steps:
                tensors = [_step_tensor(v) for _, v in loaded_steps]
                # Steps on one device (ours are views of a device's step table) come to the
                # host in one copy: a wait for the device per parameter would be a wait per
                # parameter at every re-homing.
                if len({t.device for t in tensors}) == 1:
                    host = torch.stack(tensors).cpu()
                else:
                    host = torch.stack([t.cpu() for t in tensors])
                step_values[[s for s, _ in loaded_steps]] = host.numpy()
            per_chunk = step_values[buffer.chunk_segment].astype(np.float32)
            buffer.steps.copy_(torch.from_numpy(per_chunk))
            buffer.steps_version = buffer.steps._version
            # A checkpoint's masters may be older than its parameters (saved after an edit of
            # the weights, or brought back by torch's optimizer, which keeps them untouched):
            # the next step looks at every segment, and keeps a master only where it still
            # rounds to its parameter, whichever of the two was loaded first.
            buffer.param_versions = [-1] * len(buffer.params) if saved_masters_win else buffer.param_versions_now()
            buffer.last_plan = None
            buffer.variant_key = None

    def _new_state_segments(self, plans: list) -> list[tuple[FlatBuffer, int]]:
        """(buffer, segment) of each parameter getting its first state this step, in the
        optimizer's parameter order (torch's order of ``optimizer.state``)."""
        new = []
        for buffer, plan in zip(self.buffers, plans):
            if not len(plan.with_grad) or not any(map(operator.is_, buffer.state_entries, repeat(None))):
                continue  # no gradient, or every parameter has its state already
            new.extend((buffer, segment) for segment in np.flatnonzero(plan.has_grad & ~buffer.initialized).tolist())
        if len({id(buffer) for buffer, _ in new}) > 1:
            position = {id(p): i for i, p in enumerate(self._params)}
            new.sort(key=lambda item: position[id(item[0].params[item[1]])])
        return new

    def _regrouping_needed(self, groups: list[dict], state, new: list[tuple[FlatBuffer, int]]) -> bool:
        """A buffer about to make its moments, or a frozen one about to give state: do its
        parameters still belong together? (Frozen after the optimizer was built, or
        unfrozen since.) Rare, so a look at each of its parameters is affordable."""
        for buffer in {id(buffer): buffer for buffer, _ in new}.values():
            if buffer.exp_avg is None or buffer.frozen:
                keys = self._keys(groups, buffer.params, buffer.group_of_segment.tolist(), state)
                if set(keys) != {buffer.key}:
                    return True
        return False

    def _initialize_new_state(self, new: list[tuple[FlatBuffer, int]], groups: list[dict], state) -> None:
        for buffer, segment in new:
            group = groups[int(buffer.group_of_segment[segment])]
            entry = buffer.state_views(segment, amsgrad=bool(group["amsgrad"]))
            state[buffer.params[segment]] = buffer.state_entries[segment] = entry

    def _notice_replaced_state(self, groups: list[dict], state) -> None:
        """Take in what someone changed in ``optimizer.state`` since the last step: whole
        entries reset or replaced, and single state tensors replaced (``_state_tensors``)."""
        # A key added to an entry (a maximum put there while AMSGrad is off) changes no
        # state buffer's count of users, but the entry's size.
        entries_changed = not self._state_unchanged(state)
        if entries_changed:
            self._notice_replaced_entries(groups, state)
        self._notice_replaced_tensors(groups, state, look=entries_changed)

    def _notice_replaced_entries(self, groups: list[dict], state) -> None:
        """Re-import the state of buffers where someone reset or replaced a parameter's
        entry in ``optimizer.state`` (``state.clear()``, a new ``state`` dict, ``state[p] =
        {}``): those parameters start afresh, or from the tensors put there, as in torch."""
        entries_of = {id(buffer): list(map(state.get, buffer.params)) for buffer in self.buffers}
        replaced = {
            id(buffer)
            for buffer in self.buffers
            if any(map(_entry_replaced, entries_of[id(buffer)], buffer.state_entries))
        }
        for buffer in self.buffers:
            if id(buffer) in replaced:
                check_replaced_entries(buffer, groups, entries_of[id(buffer)], self.name)
        if replaced and not self._buffers_match(groups, state):
            # State put there for a frozen parameter (ZeroRedundancyOptimizer loads a
            # checkpoint so), or taken from one: it belongs in another buffer now.
            self.rebuild(groups, state)
            return
        for buffer in self.buffers:
            if id(buffer) not in replaced:
                # Empty entries of parameters without state yet (a defaultdict lookup leaves
                # them behind) are no state: the first step with a gradient replaces them.
                buffer.state_entries = [entry or None for entry in entries_of[id(buffer)]]
        if replaced:
            # In one import: an entry moved from one buffer to another is read before either is written.
            self.import_state(groups, state, [buffer for buffer in self.buffers if id(buffer) in replaced])

    def _notice_replaced_tensors(self, groups: list[dict], state, look: bool = False) -> None:
        references = [buffer.state_references() for buffer in self.buffers]
        if not look and references == self._state_references_seen and None not in references:
            return
        # Every replacement is checked before any is copied in.
        replaced = [(buffer, replaced_state_tensors(buffer, groups, state, self.name)) for buffer in self.buffers]
        # ... and every one that is another entry's view is read before any is copied in.
        replaced = [(buffer, apart_from_state(self.buffers, found)) for buffer, found in replaced]
        for buffer, found in replaced:
            adopt_state_tensors(buffer, found)

    def _state_unchanged(self, state) -> bool:
        seen = self._state_entries_seen
        return (
            state is self._state_seen
            and len(state) == len(seen)
            and all(map(operator.is_, state.values(), seen))
            and list(map(len, seen)) == self._state_sizes_seen  # an entry cleared in place
        )

    def _remember_state(self, state) -> None:
        self._state_seen, self._state_entries_seen = state, list(state.values())
        self._state_sizes_seen = list(map(len, self._state_entries_seen))
        self._state_references_seen = [buffer.state_references() for buffer in self.buffers]

    def _forget_state_seen(self) -> None:
        self._state_seen, self._state_entries_seen, self._state_sizes_seen = None, [], []
        self._state_references_seen = None

    def _prepare_variants(self, buffer: FlatBuffer, variants: list[tuple], state) -> None:
        """When a group's kernel variant changed (or on the first step): a group that
        switched AMSGrad on after its state was created gains ``max_exp_avg_sq`` in its
        parameters' state (so that checkpoints carry it), and the Triton backend re-orders
        its chunk table by variant."""
        key = tuple(variants[g] for g, _, _ in buffer.group_ranges)
        if key == buffer.variant_key:
            return
        initialized = buffer.initialized
        for (amsgrad, _, _), (_, first, last) in zip(key, buffer.group_ranges):
            if amsgrad:
                buffer.ensure_max_exp_avg_sq()
                for segment in np.flatnonzero(initialized[first : last + 1]) + first:
                    entry = state[buffer.params[segment]]
                    entry.setdefault("max_exp_avg_sq", buffer.entry_view("max_exp_avg_sq", segment))
                    buffer.maximum_given[segment] = True
        if self.backend_of[id(buffer)] == "triton":
            _backends.refuse_upload_while_capturing(buffer.device, "the kernel variants of the parameter groups")
            rows, ranges = order_chunks(buffer.chunk_rows, variants)
            buffer.chunks_on_device = upload(rows, buffer.device)
            buffer.chunk_ranges = ranges
        buffer.variant_key = key

    # -- the step ---------------------------------------------------------------------------
    def step(self, groups: list[dict], state: defaultdict, grad_scale=None, found_inf=None) -> None:
        """One update of every buffer. ``grad_scale`` and ``found_inf`` are GradScaler's: the
        gradients are divided by the scale, and nothing is updated or counted where
        ``found_inf`` is not zero, without the host ever reading it."""
        # Read first: a hyperparameter that is not a number raises before anything (a
        # re-homing, the adoption of fresh gradients) is done.
        self.hyper.refresh(groups)
        self.ensure_current(groups, state)
        if self._unsteppable:
            _refuse_unsteppable_gradients(self._unsteppable, self.name)
        self._notice_replaced_state(groups, state)
        # Find every gradient first: a bad one raises before anything is updated.
        plans = [plan_gradients(b, b.last_plan, self.name) for b in self.buffers]
        for index, buffer in enumerate(self.buffers):
            if buffer.adopt_at_step is not None:
                if self.backend_of[id(buffer)] == "torch":  # the Triton kernel rounds alike anywhere
                    adopt_fresh_gradients(buffer, buffer.adopt_at_step)
                    plans[index] = plan_gradients(buffer, None, self.name)  # where they are now
                buffer.adopt_at_step = None
        new_state = self._new_state_segments(plans)
        if new_state and self._regrouping_needed(groups, state, new_state):
            self.rebuild(groups, state)
            plans = [plan_gradients(b, None, self.name) for b in self.buffers]
            new_state = self._new_state_segments(plans)
        for buffer, plan in zip(self.buffers, plans):
            refused = np.flatnonzero(buffer.left_alone & plan.has_grad) if buffer.any_left_alone else ()
            if len(refused):
                segment = int(refused[0])
                group_index = int(buffer.group_of_segment[segment])
                raise _left_alone_error(buffer, segment)(self.name, local(buffer.params[segment]), group_index)
        variants = [variant_of(group) for group in groups]
        self.found_inf = found_inf
        # GradScaler's skip, where reading it waits for no device: nothing is written then,
        # and nothing is counted (a skip decided on a GPU is counted, as reading it would
        # wait for the device).
        skipped_on_the_host = found_inf is not None and found_inf.device.type == "cpu" and bool(found_inf != 0)
        on_device: dict = {}

        def scaler_value(value, device):
            if value is None:
                return None
            key = (id(value), device)
            if key not in on_device:
                on_device[key] = value.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)
            return on_device[key]

        try:
            self._initialize_new_state(new_state, groups, state)
            for buffer, plan in zip(self.buffers, plans):
                buffer.last_plan = plan
                if len(plan.with_grad):
                    self._prepare_variants(buffer, variants, state)
                    buffer.sync_step_counters()
                    buffer.sync_master_weights()
                    scale, inf = scaler_value(grad_scale, buffer.device), scaler_value(found_inf, buffer.device)
                    if not skipped_on_the_host:
                        # Counted before the update writes: right after streaming the
                        # buffers, the parameters' counters would be out of the caches.
                        buffer.mark_parameters_written(plan.with_grad)
                    if self.backend_of[id(buffer)] == "triton":
                        _backends.update_triton(buffer, plan, self.hyper, scale, inf)
                    else:
                        _backends.update_torch(buffer, plan, groups, self.hyper, scale, inf)
                    if scale is not None and plan.staged:
                        _backends.return_unscaled_gradients(buffer, plan)
                    buffer.remember_own_writes()
                if buffer.grad is not None and not _gradient_buffer_read(buffer, plan):
                    # The gradients arrive elsewhere now (after kept ones, a loop that drops
                    # them with model.zero_grad() or p.grad = None, which this optimizer does
                    # not see): holding the buffer would double gradient memory for nothing.
                    buffer.release_grad()
        finally:
            for plan in plans:
                plan.let_go()
        self._remember_state(state)

    def last_step_skipped(self) -> torch.Tensor:
        """A boolean tensor: did GradScaler skip the last step? (On the scaler's device; a
        CPU ``False`` when no scaler took part.)"""
        if self.found_inf is None:
            return torch.zeros((), dtype=torch.bool, device="cpu")
        return self.found_inf != 0

    def zero_grad_into_buffers(self) -> None:
        # The last plan stays: the next step reuses it if the gradients are still the
        # tensors it holds, where it found them (``GradientPlan.finds``).
        for buffer in self.buffers:
            zero_into_grad_buffer(buffer)

    def forget_gradients(self) -> None:
        """After ``zero_grad(set_to_none=True)``: hold no gradient, so that it can be freed.
        That includes the gradient buffer when the last step's gradients all lived in it
        (``zero_grad(set_to_none=False)`` before): backward will now make new ones, and
        keeping it would double gradient memory. As a staging area for gradients that
        arrive elsewhere it is kept, to be reused next step."""
        for buffer in self.buffers:
            plan = buffer.last_plan
            if plan is not None and buffer.grad is not None and plan.lived_in_grad_buffer():
                buffer.release_grad()
            if plan is not None and plan.holds_gradients():
                buffer.last_plan = None
            # (A plan that holds none stays: fresh gradients laid out as the last ones were,
            # as a caching allocator often places them, reuse it.)
            buffer.adopt_at_step = None

