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


def main(shapes_name: str = "small-2000x8000", rounds: int = 15) -> None:
    shapes = shape_sets("cpu")[shapes_name]
    total = numel(shapes)
    sizes = [torch.Size(s).numel() for s in shapes]
    # Flat buffers (what adam_triton keeps) and per-tensor views of them.
    param, grad_flat, exp_avg, exp_avg_sq = (torch.randn(total) for _ in range(4))
    exp_avg_sq.abs_()
    views = {name: [v.view(s) for v, s in zip(t.split(sizes), shapes)]
             for name, t in (("param", param), ("grad", grad_flat), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))}
    pools = [[torch.randn(s) for s in shapes] for _ in range(2)]  # fresh gradients, alternated
    step = torch.tensor(1.0)

    def list_path(grads):
        torch._fused_adamw_(views["param"], grads, views["exp_avg"], views["exp_avg_sq"], [],
                            [step] * len(shapes), **ADAMW)

    def copy_flat_path(grads):
        torch._foreach_copy_(views["grad"], grads)
        torch._fused_adamw_([param], [grad_flat], [exp_avg], [exp_avg_sq], [], [step], **ADAMW)

    def flat_path(grads):
        torch._fused_adamw_([param], [grad_flat], [exp_avg], [exp_avg_sq], [], [step], **ADAMW)

    paths = {"list": list_path, "copy+flat": copy_flat_path, "flat": flat_path}
    times = {name: [] for name in paths}
    for round_index in range(rounds + 1):  # round 0 is warm-up
        grads = pools[round_index % 2]
        for name, path in paths.items():
            start = time.perf_counter()
            path(grads)
            if round_index:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{shapes_name}: {len(shapes)} tensors, {total / 1e6:.1f}M parameters, {rounds} interleaved rounds, "
          f"torch threads {torch.get_num_threads()}")
    for name, ms in medians.items():
        print(f"  {name:10s} median {ms:8.1f} ms")
    print(f"  copy+flat / list = {medians['copy+flat'] / medians['list']:.2f}; "
          f"flat / list = {medians['flat'] / medians['list']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    main(*(sys.argv[1:2]), *(int(a) for a in sys.argv[2:3]))
