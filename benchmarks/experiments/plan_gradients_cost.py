"""Host time of finding fresh gradients: one new gradient plan (``plan_gradients``) for N
parameters whose gradients are new tensors, as after the default ``zero_grad()`` when the
allocator put them elsewhere than last step's (on the CPU, usually).

Self-contained, so that it can time another tree's code too:

    python -m benchmarks.experiments.plan_gradients_cost [ROUNDS]
    PYTHONPATH=/path/to/other/tree python benchmarks/experiments/plan_gradients_cost.py [ROUNDS]
"""

import statistics
import sys
import timeit

import torch

import adam_triton
from adam_triton._gradients import plan_gradients

COUNTS = (148, 2000)
ELEMENTS = 64
CALLS = 50


def main(rounds: int = 15) -> None:
    print(f"adam_triton from {adam_triton.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for count in COUNTS:
        params = [torch.nn.Parameter(torch.randn(ELEMENTS)) for _ in range(count)]
        optimizer = adam_triton.AdamW(params, backend="torch")
        (buffer,) = optimizer._engine.buffers
        for p in params:
            p.grad = torch.randn(ELEMENTS)
        times = [
            timeit.timeit(lambda: plan_gradients(buffer, None, "AdamW"), number=CALLS) / CALLS * 1e6
            for _ in range(rounds)
        ]
        print(f"  {count:5d} fresh gradients: a new plan takes {statistics.median(times):7.1f} us "
              f"(median of {rounds} rounds of {CALLS}; rounds from {min(times):.1f} to {max(times):.1f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
