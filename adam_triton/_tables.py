"""Small per-step tables (hyperparameters, gradient shifts, chunk order) and their upload.

Tables are built on the host as numpy arrays and reach a CUDA device through pinned
memory with a non-blocking copy: no host-device synchronisation. torch's caching host
allocator keeps a pinned block alive until the copy that reads it has run.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

HYPER_COLUMNS = ("lr", "beta1", "beta2", "eps", "weight_decay")


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A device copy of ``array``, made without waiting for the device."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return host
    staging = torch.empty(host.shape, dtype=host.dtype, device="cpu", pin_memory=True)
    staging.copy_(host)
    return staging.to(device, non_blocking=True)


def group_values(group: dict) -> tuple:
    """A group's (lr, beta1, beta2, eps, weight_decay), as the group holds them."""
    beta1, beta2 = group["betas"]
    return (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])


class HyperTable:
    """``float64[groups, 5]`` rows of (lr, beta1, beta2, eps, weight_decay), one per device.

    Python numbers and CPU tensors are read on the host and uploaded when they change. A
    hyperparameter held in a tensor on the device itself (``capturable`` training, a
    scheduler writing a tensor lr in place) is copied on the device at every step, so that
    reading it never waits for the device and a captured CUDA graph picks up new values.
    """

    def __init__(self):
        self._host_rows = None
        self._held_on_device: tuple = ()
        self._array = None
        self._version = 0  # counts the arrays made, each different from the one before
        self._device_values: list = []
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._uploaded_version: dict[torch.device, int] = {}
        self._fresh: set = set()

    def refresh(self, groups: list[dict]) -> None:
        """Read every group's values; raise for one that is not a number before anything is
        updated (torch's fused kernel would raise mid-step, after counting the step)."""
        rows = []
        device_values = []  # (row, column, tensor) read on the device itself
        for row, group in enumerate(groups):
            values = group_values(group)
            kinds = tuple(map(type, values))
            if kinds != _FLOATS:  # (a group per tensor: keep the usual cases quick)
                # Adam's default weight_decay is the int 0: ints are as plain as floats.
                if _PLAIN_NUMBERS.issuperset(kinds):
                    values = tuple(map(float, values))
                else:
                    values = _host_values(values, row, device_values)
            rows.append(values)
        rows = tuple(rows)
        # A cell held on the device reads 0.0 here: which cells those are is part of what an
        # upload must match, or a value going from a device tensor to the number 0.0 would
        # leave the table's cell holding the tensor's last value.
        held_on_device = tuple((row, column) for row, column, _ in device_values)
        if rows != self._host_rows or held_on_device != self._held_on_device:
            self._host_rows = rows
            self._held_on_device = held_on_device
            self._array = np.array(rows, dtype=np.float64).reshape(len(rows), len(HYPER_COLUMNS))
            self._version += 1
        self._device_values = device_values
        self._fresh = set()

    def row(self, index: int, device: torch.device) -> tuple:
        """Group ``index``'s (lr, beta1, beta2, eps, weight_decay) as refreshed: floats, and
        a float32 tensor on ``device`` where the group holds the value in a tensor on a
        device (torch's CUDA kernel reads a tensor lr as float32, as torch's Adam passes it)."""
        if not self._device_values:
            return self._host_rows[index]
        values = list(self._host_rows[index])
        for row, column, value in self._device_values:
            if row == index:
                values[column] = value.to(device=device, dtype=torch.float32)
        return tuple(values)

    def on(self, device: torch.device) -> torch.Tensor:
        """The table on ``device``, current for this step."""
        if device in self._fresh:
            return self._tables[device]
        if self._uploaded_version.get(device) != self._version:
            refuse_upload_while_capturing(device, "a hyperparameter held as a Python number")
            self._tables[device] = upload(self._array, device)
            self._uploaded_version[device] = self._version
        table = self._tables[device]
        for row, column, value in self._device_values:
            table[row, column].copy_(value, non_blocking=True)
        self._fresh.add(device)
        return table


_FLOATS = (float,) * len(HYPER_COLUMNS)
_PLAIN_NUMBERS = frozenset((float, int))  # (not bool, whose type is its own)


def _host_values(values: tuple, row: int, device_values: list) -> tuple:
    """Group ``row``'s values as floats; one held in a tensor on a device reads as 0.0
    here and is added to ``device_values`` as (row, column, tensor), to be copied there."""
    floats = []
    for column, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.device.type == "meta":
                raise TypeError(
                    f"param group {row}: {HYPER_COLUMNS[column]} must be a real number or a 1-element "
                    f"tensor holding a value, got a tensor of shape {tuple(value.shape)} on {value.device}"
                )
            if value.is_complex():  # (torch's update raises for one, after counting the step)
                raise TypeError(
                    f"param group {row}: {HYPER_COLUMNS[column]} must be a real number or a 1-element "
                    f"tensor holding one, got a tensor of dtype {value.dtype}"
                )
            if value.device.type != "cpu":
                # (a 1-element tensor may have shape (1,): copied into one cell, as ())
                device_values.append((row, column, value.reshape(())))
                value = 0.0
            else:
                value = float(value)
        elif type(value) is not float:
            value = _real(value, HYPER_COLUMNS[column], row)
        floats.append(value)
    return tuple(floats)


def _real(value, name: str, group_index: int) -> float:
    """A hyperparameter held as a real number of any kind (int, numpy, Fraction), as torch's
    arithmetic takes most of them; strings, Decimals and complex numbers, which it rejects
    (after updating the groups before), are refused before anything is updated."""
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "biuf":
        return float(value.item())
    raise TypeError(
        f"param group {group_index}: {name} must be a real number or a 1-element tensor, "
        f"got {type(value).__name__} {value!r}"
    )


def refuse_upload_while_capturing(device: torch.device, what: str) -> None:
    """A CUDA graph replays copies from host memory that may be gone by then: a table that
    has to change while a graph is being captured is an error, not a silent hazard."""
    if device.type == "cuda" and _capturing_on(device):
        raise RuntimeError(
            f"{what} changed while a CUDA graph was being captured. Capture the step only after a "
            "warm-up step with the same gradient tensors, parameter groups and hyperparameters; keep "
            "lr and betas in device tensors (capturable=True) to change them between replays."
        )


def _capturing_on(device: torch.device) -> bool:
    with torch.cuda.device(device):  # the device's own current stream, not the current device's
        return torch.cuda.is_current_stream_capturing()


def variant_of(group: dict) -> tuple[bool, bool, bool]:
    """The kernel variant a group needs: (amsgrad, maximize, decoupled_weight_decay)."""
    return (bool(group["amsgrad"]), bool(group["maximize"]), bool(group["decoupled_weight_decay"]))


def order_chunks(chunk_rows: np.ndarray, group_variants: list[tuple]) -> tuple[np.ndarray, list]:
    """Sort chunk rows so that each kernel variant is one contiguous range.

    Returns the sorted rows and ``[(variant, first_row, end_row), ...]``. When every group
    wants the same variant (the usual case) there is one range: one launch per buffer.
    """
    variants = sorted(set(group_variants))
    rank = np.array([variants.index(v) for v in group_variants], dtype=np.int64)
    chunk_rank = rank[chunk_rows[:, 3]] if len(chunk_rows) else np.zeros(0, dtype=np.int64)
    order = np.argsort(chunk_rank, kind="stable")
    sorted_rows = chunk_rows[order]
    sorted_rank = chunk_rank[order]
    ranges = []
    for index, variant in enumerate(variants):
        where = np.flatnonzero(sorted_rank == index)
        if len(where):
            ranges.append((variant, int(where[0]), int(where[-1]) + 1))
    return sorted_rows, ranges
