"""Checking a checkpoint completely before any of it is loaded.

``torch.optim.Optimizer.load_state_dict`` checks the group count and sizes, then casts and
installs whatever tensors it finds; a wrong shape surfaces later, mid-step. Here every
state tensor is checked against its parameter first, so a bad checkpoint raises
``ValueError`` and the optimizer is left exactly as it was.
"""

from __future__ import annotations

import math
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from numbers import Number

import torch

from ._layout import ENGINE_STATE_KEYS, PRECISION_KEYS, STATE_BUFFERS

_PER_ELEMENT = tuple(STATE_BUFFERS)  # the state held per element, in the state buffers
_REQUIRED_GROUP_KEYS = ("params", "lr", "betas", "eps", "weight_decay")


def _cast_like(param: torch.Tensor, value):
    """Any other state value as torch's load_state_dict leaves it: tensors (also inside
    dicts, lists and tuples) on the parameter's device, and in its dtype if it is floating."""
    if isinstance(value, torch.Tensor):
        if param.is_floating_point():
            return value.to(dtype=param.dtype, device=param.device)
        return value.to(device=param.device)
    if isinstance(value, dict):
        return {k: _cast_like(param, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_like(param, v) for v in value)
    return value


def dtype_names(groups: list[dict]) -> None:
    """A group's ``state_dtype`` as its name in a checkpoint ("bfloat16"): torch's
    distributed checkpointing (full or CPU-offloaded state dicts) takes no dtype objects."""
    for group in groups:
        if isinstance(group.get("state_dtype"), torch.dtype):
            group["state_dtype"] = str(group["state_dtype"]).removeprefix("torch.")


def _dtype_named(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise _bad(f"a parameter group's state_dtype {name!r} is not the name of a dtype")
    return dtype


def _bad(message: str) -> ValueError:
    return ValueError(f"bad optimizer checkpoint: {message}")


#: Step counts live in float32 tables, as torch keeps them in float32 tensors.
_LARGEST_STEP = float(torch.finfo(torch.float32).max)


def check_step(step, where: str, value_too: bool = True) -> None:
    """A step count: one real number (or one-element tensor), and with ``value_too`` a
    finite count >= 0 that float32 holds (reading a device tensor's value waits for it)."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(f"{where}: 'step' must be a one-element real tensor, got shape {tuple(step.shape)} {step.dtype}")
        if step.device.type == "meta":
            raise ValueError(f"{where}: 'step' is on the meta device: it holds no value")
        if not value_too:
            return
        value = float(step.detach().reshape(()).to("cpu", torch.float64))
    elif isinstance(step, Number) and not isinstance(step, bool):
        try:
            value = float(step)
        except OverflowError:  # an int past float64's range
            value = math.inf
    else:
        raise ValueError(f"{where}: 'step' must be a number or a tensor, got {type(step).__name__}")
    if not value_too:
        return
    if not math.isfinite(value) or value < 0 or value > _LARGEST_STEP:
        raise ValueError(f"{where}: 'step' must be a finite count >= 0 (at most float32's largest), got {value}")


def check_step_values(steps: list[tuple[object, str]]) -> None:
    """``check_step``'s value check for each ``(step, where)`` whose value can be read without
    waiting for a device: numbers, and CPU tensors (read in one pass). Device tensors are
    left as they are."""
    on_cpu = [(step, where) for step, where in steps if isinstance(step, torch.Tensor) and step.device.type == "cpu"]
    for step, where in steps:
        if not isinstance(step, torch.Tensor):
            check_step(step, where)
    if not on_cpu:
        return
    values = torch.stack([step.detach().reshape(()).to(torch.float64) for step, _ in on_cpu])
    bad = ~(torch.isfinite(values) & (values >= 0) & (values <= _LARGEST_STEP))
    if bool(bad.any()):
        step, where = on_cpu[int(bad.nonzero()[0])]
        check_step(step, where)


#: The keys every parameter's state has (``max_exp_avg_sq`` comes with AMSGrad, and is
#: made from zero when AMSGrad is switched on; ``master_param`` from the parameter).
REQUIRED_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def check_entry(param: torch.Tensor, entry, where: str, step_value: bool = True) -> None:
    """One parameter's state, from a checkpoint or put in ``optimizer.state`` by hand: a
    ``ValueError`` that names ``where`` for one that cannot stand in for ours. Without
    ``step_value`` the step's value is not read (no wait for a device)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: state must be a dict, got {type(entry).__name__}")
    if not entry:
        return
    missing = [k for k in REQUIRED_STATE_KEYS if entry.get(k) is None]
    if missing:
        raise ValueError(f"{where}: state lacks {missing}")
    check_step(entry["step"], where, value_too=step_value)
    for key in _PER_ELEMENT:
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}")
        # (A lazy module's parameter has no shape before its first forward; the engine
        # compares it once the parameter has one.)
        if not torch.nn.parameter.is_lazy(param) and tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")
        if value.is_complex() != param.is_complex() or not (value.is_floating_point() or value.is_complex()):
            raise ValueError(f"{where}: {key!r} has dtype {value.dtype}, which cannot hold state of a {param.dtype} parameter")
        if value.layout != torch.strided:
            raise ValueError(f"{where}: {key!r} must be a dense tensor, got layout {value.layout}")
        if value.device.type == "meta":
            raise ValueError(f"{where}: {key!r} is on the meta device: it holds no values")


def validated(groups: list[dict], state_dict: dict) -> tuple[list[dict], defaultdict]:
    """The param groups and state ``state_dict`` would install, or ``ValueError``.

    Mirrors torch's ``load_state_dict`` (same messages for mismatched groups, saved groups
    replace ours with our parameters re-attached, state of unknown keys kept as is) and adds
    the per-tensor checks.
    """
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise _bad(f"missing {key!r}")
    saved_groups = deepcopy(state_dict["param_groups"])
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for group, saved in zip(groups, saved_groups):
        missing = [k for k in _REQUIRED_GROUP_KEYS if k not in saved]
        if missing:
            raise _bad(f"a parameter group lacks {missing}")
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
    id_map = dict(
        zip(
            chain.from_iterable(g["params"] for g in saved_groups),
            chain.from_iterable(g["params"] for g in groups),
        )
    )
    state: defaultdict = defaultdict(dict)
    for key, value in state_dict["state"].items():
        if key in id_map:
            param = id_map[key]
            try:
                check_entry(param, value, f"state of parameter {key}")
            except ValueError as error:
                raise _bad(str(error)) from None
            # The engine casts its own keys as its buffers need.
            state[param] = {k: v if k in ENGINE_STATE_KEYS else _cast_like(param, v) for k, v in value.items()}
        else:
            state[key] = value

    new_groups = []
    for group, saved in zip(groups, saved_groups):
        saved["params"] = group["params"]
        if isinstance(saved.get("state_dtype"), str):
            saved["state_dtype"] = _dtype_named(saved["state_dtype"])
        # What the checkpoint does not say (torch's has no precision options) stays as is.
        for key in ("param_names", *PRECISION_KEYS):
            if key in group and key not in saved:
                saved[key] = group[key]
        new_groups.append(saved)
    return new_groups, state
