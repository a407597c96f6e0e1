"""How a step is timed, and the copy bandwidth it is compared with.

CUDA work is asynchronous: a timed call that only launched kernels would measure the
launch. Every timed call therefore ends with ``torch.cuda.synchronize``, so a round is the
step's whole wall time, host work included (for many small tensors the host work is the step).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(function: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``function`` followed by waiting for the device: what one timed round runs."""
    if device.type != "cuda":
        return function

    def call():
        function()
        torch.cuda.synchronize(device)

    return call


@dataclass(frozen=True)
class RoundsPolicy:
    """How many rounds to time: enough for a stable median within a time budget.

    Slow peers (torch's for-loop takes seconds per step on thousands of CPU tensors) get
    ``min_rounds``; fast steps get up to ``max_rounds``.
    """

    budget_s: float
    min_rounds: int
    max_rounds: int
    warmup_rounds: int

    def rounds(self, pilot_s: float) -> int:
        if pilot_s <= 0:
            return self.max_rounds
        return max(self.min_rounds, min(self.max_rounds, math.ceil(self.budget_s / pilot_s)))


ROUNDS = {
    # On CPU the pilot rounds are the warm-up: every extra untimed step of a slow peer costs seconds.
    "cpu": RoundsPolicy(budget_s=2.0, min_rounds=5, max_rounds=25, warmup_rounds=0),
    "cuda": RoundsPolicy(budget_s=1.0, min_rounds=20, max_rounds=200, warmup_rounds=3),
}


def pilot_time(step: Callable[[], None], repeats: int = 2) -> float:
    """Median wall time of a few calls of ``step`` (already synchronised); doubles as warm-up."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


REFERENCE_BYTES = {"cpu": 256 * 1024 * 1024, "cuda": 2 * 1024 * 1024 * 1024}


def median_seconds(operation: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median time of ``operation`` over ``repeats`` calls, after two untimed ones (CUDA
    events on a GPU, wall time on the CPU)."""
    for _ in range(2):  # warm-up: first touch of the pages, allocator, clocks
        operation()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            operation()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            operation()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def reference_bandwidths(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> dict[str, float]:
    """Bandwidths of two streaming operations on ``device``, in GB/s: the practical ceiling
    a memory-bound step is compared with. Tensors are far beyond any cache (256 MiB each on
    CPU, 2 GiB on GPU); CUDA runs are timed with events, CPU runs with the wall clock; the
    median of ``repeats`` is reported.

    * ``copy``: ``b.copy_(a)``, counting bytes read plus written (2 x size). On GPU this is
      the device-to-device copy the issue compares against.
    * ``inplace_add``: ``a.add_(b)``, counting 3 x size. This is the access pattern of an
      optimizer step (read-modify-write in place plus read-only streams). On CPUs it is the
      fairer ceiling: a copy's stores to untouched lines first read them (write-allocate),
      traffic the 2 x size count does not see, while an in-place update has read its lines.
    """
    nbytes = nbytes or REFERENCE_BYTES[device.type]
    a = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.ones_like(a)
    copy_s = median_seconds(lambda: b.copy_(a), device, repeats)
    add_s = median_seconds(lambda: a.add_(b), device, repeats)
    a = b = None  # free both before giving the cache back
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"copy": 2 * nbytes / copy_s / 1e9, "inplace_add": 3 * nbytes / add_s / 1e9}
