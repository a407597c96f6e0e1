"""The flat-buffer engine behind Adam and AdamW: layout, state, and the per-step update.

The optimizer class keeps torch's public surface (``param_groups``, ``state``, hooks,
``state_dict``); this engine keeps the parameters and their state in flat buffers and
makes ``optimizer.state[p]`` views of them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from . import _backends
from ._gradients import plan_gradients, zero_into_grad_buffer
from ._layout import FlatBuffer, storage_dtype
from ._tables import HyperTable, order_chunks, upload, variant_of

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_parameters(params: list, optimizer_name: str) -> None:
    """Raise for parameters the flat buffers cannot hold, before anything is changed."""
    for param in params:
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{optimizer_name} supports parameters of dtype {', '.join(map(str, SUPPORTED_DTYPES))}; "
                f"got a parameter of dtype {param.dtype}"
            )
        if param.layout != torch.strided:
            raise TypeError(f"{optimizer_name} supports dense (strided) parameters, got layout {param.layout}")
        if param.device.type == "meta":
            raise ValueError(f"{optimizer_name} cannot hold parameters on the meta device: materialize them first")


class Engine:
    def __init__(self, optimizer_name: str, backend: str):
        self.name = optimizer_name
        self.backend = backend
        self.buffers: list[FlatBuffer] = []
        self.backend_of: dict[int, str] = {}
        self.hyper = HyperTable()
        self._fingerprint = None
        self._params: list = []

    # -- structure --------------------------------------------------------------------------
    @staticmethod
    def _group_fingerprint(groups: list[dict]) -> tuple:
        return tuple((id(group["params"]), len(group["params"])) for group in groups)

    @staticmethod
    def _ordered_parameters(groups: list[dict]) -> tuple[list, list[int]]:
        params, group_of, seen = [], [], set()
        for index, group in enumerate(groups):
            for param in group["params"]:
                if id(param) not in seen:  # torch warns about duplicates; update them once
                    seen.add(id(param))
                    params.append(param)
                    group_of.append(index)
        return params, group_of

    def rebuild(self, groups: list[dict], state: defaultdict) -> None:
        """(Re)home every parameter into flat buffers, keeping whatever state it has."""
        params, group_of = self._ordered_parameters(groups)
        check_parameters(params, self.name)
        keyed: dict[tuple, tuple[list, list]] = {}
        for param, group in zip(params, group_of):
            members = keyed.setdefault((param.device, storage_dtype(param)), ([], []))
            members[0].append(param)
            members[1].append(group)
        backends = {key: _backends.resolve_backend(self.backend, key[0]) for key in keyed}

        # Nothing has been changed up to here; from here on parameters move.
        buffers = []
        for key, (members, member_groups) in keyed.items():
            buffer = FlatBuffer(key[0], key[1], members, member_groups)
            buffer.adopt_parameters()
            buffers.append(buffer)
        self.buffers = buffers
        self.backend_of = {id(b): backends[(b.device, b.dtype)] for b in buffers}
        self._params = params
        self._fingerprint = self._group_fingerprint(groups)
        self.import_state(groups, state)

    def ensure_current(self, groups: list[dict], state: defaultdict) -> None:
        """Re-home if the groups' parameters changed or a parameter's data moved away."""
        if self._group_fingerprint(groups) != self._fingerprint:
            params, group_of = self._ordered_parameters(groups)
            current = [p for b in self.buffers for p in b.params]
            current_groups = [g for b in self.buffers for g in b.group_of_segment.tolist()]
            same = {id(p): g for p, g in zip(params, group_of)} == {
                id(p): g for p, g in zip(current, current_groups)
            }
            if same:
                self._fingerprint = self._group_fingerprint(groups)
            else:
                self.rebuild(groups, state)
                return
        if any(buffer.parameters_moved() for buffer in self.buffers):
            self.rebuild(groups, state)

    # -- state ------------------------------------------------------------------------------
    @torch.no_grad()
    def import_state(self, groups: list[dict], state: defaultdict) -> None:
        """Copy each parameter's Adam state (views of old buffers, or loaded tensors) into the
        buffers, and make ``state[p]`` views of them. Parameters without state start fresh."""
        for buffer in self.buffers:
            step_values = np.zeros(len(buffer.params), dtype=np.float64)
            loaded_steps = []
            for segment, param in enumerate(buffer.params):
                entry = state.get(param)
                if not entry or "exp_avg" not in entry:
                    buffer.exp_avg_views[segment].zero_()
                    buffer.exp_avg_sq_views[segment].zero_()
                    if buffer.max_exp_avg_sq is not None:
                        buffer.max_exp_avg_sq_views[segment].zero_()
                    buffer.initialized[segment] = False
                    continue
                buffer.exp_avg_views[segment].copy_(entry["exp_avg"])
                buffer.exp_avg_sq_views[segment].copy_(entry["exp_avg_sq"])
                has_max = entry.get("max_exp_avg_sq") is not None
                if has_max:
                    buffer.ensure_max_exp_avg_sq()
                    buffer.max_exp_avg_sq_views[segment].copy_(entry["max_exp_avg_sq"])
                elif buffer.max_exp_avg_sq is not None:
                    buffer.max_exp_avg_sq_views[segment].zero_()
                loaded_steps.append((segment, entry.get("step", 0)))
                group = groups[int(buffer.group_of_segment[segment])]
                views = buffer.state_views(segment, amsgrad=has_max or bool(group["amsgrad"]))
                extra = {k: v for k, v in entry.items() if k not in ADAM_STATE_KEYS}
                state[param] = {**views, **extra}
                buffer.initialized[segment] = True
            if loaded_steps:
                tensors = [torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for _, v in loaded_steps]
                step_values[[s for s, _ in loaded_steps]] = torch.stack(tensors).numpy()
            per_chunk = step_values[buffer.chunk_segment].astype(np.float32)
            buffer.steps.copy_(torch.from_numpy(per_chunk))
            buffer.steps_version = buffer.steps._version
            buffer.last_plan = None
            buffer.variant_key = None
        # Drop the empty entries a defaultdict lookup may have left behind, as torch has none.
        ours = {id(p) for p in self._params}
        for key in [k for k, v in state.items() if id(k) in ours and not v]:
            del state[key]

    def _initialize_new_state(self, buffer: FlatBuffer, has_grad: np.ndarray, groups: list[dict], state) -> None:
        new = has_grad & ~buffer.initialized
        if not new.any():
            return
        for segment in np.flatnonzero(new).tolist():
            group = groups[int(buffer.group_of_segment[segment])]
            state[buffer.params[segment]] = buffer.state_views(segment, amsgrad=bool(group["amsgrad"]))
        buffer.initialized |= new

    def _order_chunks(self, buffer: FlatBuffer, variants: list[tuple], state) -> None:
        key = tuple(variants[g] for g, _, _ in buffer.group_ranges)
        if key == buffer.variant_key:
            return
        rows, ranges = order_chunks(buffer.chunk_rows, variants)
        buffer.chunks_on_device = upload(rows, buffer.device)
        buffer.chunk_ranges = ranges
        buffer.variant_key = key
        if any(v[0] for v in key):
            buffer.ensure_max_exp_avg_sq()
            # A group switched to amsgrad after its state was created: expose the new state.
            for group_index, first, last in buffer.group_ranges:
                if variants[group_index][0]:
                    for segment in range(first, last + 1):
                        if buffer.initialized[segment]:
                            state[buffer.params[segment]].setdefault(
                                "max_exp_avg_sq", buffer.max_exp_avg_sq_views[segment]
                            )

    # -- the step ---------------------------------------------------------------------------
    def step(self, groups: list[dict], state: defaultdict) -> None:
        self.ensure_current(groups, state)
        # Find every gradient first: a bad one raises before anything is updated.
        plans = [plan_gradients(b, b.last_plan, self.name) for b in self.buffers]
        variants = [variant_of(group) for group in groups]
        self.hyper.refresh(groups)
        for buffer, plan in zip(self.buffers, plans):
            buffer.last_plan = plan
            if not plan.has_grad.any():
                continue
            self._initialize_new_state(buffer, plan.has_grad, groups, state)
            buffer.sync_step_counters()
            if self.backend_of[id(buffer)] == "triton":
                self._order_chunks(buffer, variants, state)
                _backends.update_triton(buffer, plan, self.hyper)
            else:
                _backends.update_torch(buffer, plan, groups)

    def zero_grad_into_buffers(self) -> None:
        for buffer in self.buffers:
            zero_into_grad_buffer(buffer)
            buffer.last_plan = None
