"""What-if for the CPU backend with fresh gradients on many small tensors: instead of one
OpenMP parallel region per tensor (torch's fused kernel on a list) or a copy into the flat
gradient buffer first (adam_triton today, for such lists), cut the list into one share per
core and let Python threads update the shares at once, each thread running torch's fused
kernel with a single OpenMP thread (so no parallel region is opened at all).

    python -m benchmarks.experiments.split_list_cpu [SHAPES] [ROUNDS]
    GOMP_SPINCOUNT=0 python -m benchmarks.experiments.split_list_cpu [SHAPES] [ROUNDS]

Times, interleaved round by round in one process:
  list          torch._fused_adamw_ over the list (a parallel region per tensor)
  copy+flat     the gradients copied into a flat buffer, then one flat update (adam_triton's
                path for many small fresh gradients)
  flat          one flat update alone (the kept-gradient path; the floor of the others)
  split/busy    the split update started right after a parallel region, as in a training
                loop, where backward's last operations ran just before step()
  split/idle    the split update started after 50 ms without parallel work

libgomp's idle team threads spin for a while after each parallel region before they sleep
(GOMP_SPINCOUNT). On two cores one spinning thread leaves a single core to the two workers;
split/busy against split/idle shows that cost, and GOMP_SPINCOUNT=0 removes it (and makes
every parallel region of the list path pay a wake-up instead).

Each worker sets its own OpenMP thread count through libgomp's ``omp_set_num_threads`` (a
per-thread setting; ``torch.set_num_threads`` would also change process-wide state), so this
needs torch's bundled libgomp. Pure torch otherwise: no adam_triton code runs.
"""

from __future__ import annotations

import ctypes
import os
import queue
import statistics
import sys
import threading
import time

import torch

from ..cases import shape_sets
from .flat_copy_cpu import ADAMW, Workload

#: Share boundaries fall on multiples of this many elements (64-byte lines of fp32).
ALIGNMENT = 16


def _libgomp() -> ctypes.CDLL:
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not os.path.exists(path):
        sys.exit(f"needs torch's bundled libgomp ({path} not found)")
    return ctypes.CDLL(path)


class SingleThreadedWorker(threading.Thread):
    """Runs the jobs it is given with one OpenMP thread, so torch opens no parallel region."""

    def __init__(self, libgomp: ctypes.CDLL):
        super().__init__(daemon=True)
        self._libgomp = libgomp
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.start()

    def run(self) -> None:
        self._libgomp.omp_set_num_threads(1)
        while True:
            job = self.jobs.get()
            try:
                job()
                self.done.put(None)
            except BaseException as error:  # handed to the waiting thread, which raises it
                self.done.put(error)

    def wait(self) -> None:
        error = self.done.get()
        if error is not None:
            raise error


def shares(sizes: list[int], count: int) -> list[list[tuple[int, int, int]]]:
    """``count`` runs of (tensor index, first element, end element) with equal numbers of
    elements (within ALIGNMENT), cutting a tensor where a share ends; a cut inside a tensor
    falls on an ALIGNMENT multiple of its own elements, so each piece starts on a 64-byte line."""
    total = sum(sizes)
    runs: list[list[tuple[int, int, int]]] = [[] for _ in range(count)]
    share, filled = 0, 0
    for index, size in enumerate(sizes):
        first = 0
        while first < size:
            if share == count - 1:
                end = size
            else:
                wanted = max(total * (share + 1) // count - filled, 1)
                end = min(size, -(-(first + wanted) // ALIGNMENT) * ALIGNMENT)
            runs[share].append((index, first, end))
            filled += end - first
            first = end
            while share < count - 1 and filled >= total * (share + 1) // count:
                share += 1
    return runs


def _cut(tensors: list[torch.Tensor], run: list[tuple[int, int, int]], sizes: list[int]) -> list[torch.Tensor]:
    return [tensors[i] if end - first == sizes[i] else tensors[i].view(-1)[first:end] for i, first, end in run]


def main(shapes_name: str = "small-2000x8000", rounds: int = 15) -> None:
    libgomp = _libgomp()
    shapes = shape_sets("cpu")[shapes_name]
    work = Workload(shapes)
    sizes, views = work.sizes, work.views
    threads = torch.get_num_threads()
    workers = [SingleThreadedWorker(libgomp) for _ in range(threads)]
    runs = shares(sizes, threads)
    # What a real implementation would cache per parameter layout; only gradients are cut per step.
    states = [[_cut(views[name], run, sizes) for name in ("param", "exp_avg", "exp_avg_sq")] for run in runs]
    wake_team = torch.randn(1 << 20)

    def split_path(grads):
        for worker, run, (params, averages, squares) in zip(workers, runs, states):
            share = _cut(grads, run, sizes)
            worker.jobs.put(lambda p=params, g=share, m=averages, v=squares:
                            torch._fused_adamw_(p, g, m, v, [], [work.step] * len(p), **ADAMW))
        for worker in workers:
            worker.wait()

    def after_parallel_region(grads):
        wake_team.mul_(1.0)  # untimed below: a parallel region, as backward's last ops
        return grads

    def after_idle(grads):
        time.sleep(0.05)
        return grads

    paths = {"list": (None, work.list_path), "copy+flat": (None, work.copy_flat_path), "flat": (None, work.flat_path),
             "split/busy": (after_parallel_region, split_path), "split/idle": (after_idle, split_path)}
    times = {name: [] for name in paths}
    for round_index in range(rounds + 1):  # round 0 is warm-up
        grads = work.pools[round_index % 2]
        for name, (prepare, path) in paths.items():
            if prepare is not None:
                prepare(grads)
            start = time.perf_counter()
            path(grads)
            if round_index:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    spin = os.environ.get("GOMP_SPINCOUNT", "libgomp's default")
    print(f"{shapes_name}: {len(shapes)} tensors, {work.total / 1e6:.1f}M parameters, {rounds} interleaved rounds, "
          f"torch threads {threads}, GOMP_SPINCOUNT {spin}")
    for name, ms in medians.items():
        print(f"  {name:10s} median {ms:8.2f} ms   / list {ms / medians['list']:.2f}   / copy+flat "
              f"{ms / medians['copy+flat']:.2f}")


if __name__ == "__main__":
    main(*(sys.argv[1:2]), *(int(a) for a in sys.argv[2:3]))
