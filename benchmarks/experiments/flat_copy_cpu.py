"""What-if for the CPU backend with fresh gradients: copy them into one flat gradient
buffer and update each buffer as one flat tensor, instead of handing torch's fused kernel
the list of per-tensor views (what adam_triton does today).

    python -m benchmarks.experiments.flat_copy_cpu [SHAPES] [ROUNDS] [THREADS]

Times, interleaved round by round in one process so that machine load hits all alike:
  list      torch._fused_adamw_ over the tensors as a list (today's fresh-gradient path)
  copy+flat torch._foreach_copy_ of the gradients into a flat buffer, then
            torch._fused_adamw_ over one flat tensor (the what-if)
  flat      torch._fused_adamw_ over one flat tensor alone (today's kept-gradient path)
Prints medians and the ratios. Pure torch: no adam_triton code runs.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from ..cases import shape_sets
from ..shapes import numel

ADAMW = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-2, "eps": 1e-8, "amsgrad": False,
         "maximize": False}


class Workload:
    """Flat buffers (what adam_triton keeps), per-tensor views of them, two pools of fresh
    gradients to alternate, and the three ways to update them timed here."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = shapes
        self.sizes = [torch.Size(s).numel() for s in shapes]
        self.total = numel(shapes)
        self.param, self.grad_flat, self.exp_avg, self.exp_avg_sq = (torch.randn(self.total) for _ in range(4))
        self.exp_avg_sq.abs_()
        self.views = {
            name: [v.view(s) for v, s in zip(t.split(self.sizes), shapes)]
            for name, t in (("param", self.param), ("grad", self.grad_flat), ("exp_avg", self.exp_avg),
                            ("exp_avg_sq", self.exp_avg_sq))
        }
        self.pools = [[torch.randn(s) for s in shapes] for _ in range(2)]
        self.step = torch.tensor(1.0)

    def list_path(self, grads):
        views = self.views
        torch._fused_adamw_(views["param"], grads, views["exp_avg"], views["exp_avg_sq"], [],
                            [self.step] * len(grads), **ADAMW)

    def copy_flat_path(self, grads):
        torch._foreach_copy_(self.views["grad"], grads)
        self.flat_path(grads)

    def flat_path(self, grads):
        torch._fused_adamw_([self.param], [self.grad_flat], [self.exp_avg], [self.exp_avg_sq], [], [self.step],
                            **ADAMW)


def main(shapes_name: str = "small-2000x8000", rounds: int = 15) -> None:
    shapes = shape_sets("cpu")[shapes_name]
    work = Workload(shapes)
    paths = {"list": work.list_path, "copy+flat": work.copy_flat_path, "flat": work.flat_path}
    times = {name: [] for name in paths}
    for round_index in range(rounds + 1):  # round 0 is warm-up
        grads = work.pools[round_index % 2]
        for name, path in paths.items():
            start = time.perf_counter()
            path(grads)
            if round_index:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{shapes_name}: {len(shapes)} tensors, {work.total / 1e6:.1f}M parameters, {rounds} interleaved rounds, "
          f"torch threads {torch.get_num_threads()}")
    for name, ms in medians.items():
        print(f"  {name:10s} median {ms:8.1f} ms")
    print(f"  copy+flat / list = {medians['copy+flat'] / medians['list']:.2f}; "
          f"flat / list = {medians['flat'] / medians['list']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    main(*(sys.argv[1:2]), *(int(a) for a in sys.argv[2:3]))
