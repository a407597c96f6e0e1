"""What counting each step in the parameters' version counters costs a step
(``FlatBuffer.mark_parameters_written``): steps with the count and without it (replaced by
a no-op), alternating in one process, on 2,000 parameters of 8,000 elements (the 2000x8000
target's list), with gradients fresh (after ``zero_grad()``) or kept (after
``zero_grad(set_to_none=False)``).

    python -m benchmarks.experiments.version_count_cost [ROUNDS] [STEPS]
"""

import statistics
import sys
import time

import torch

import adam_triton
from adam_triton import _layout

TENSORS, ELEMENTS, WARMUP = 2000, 8000, 3


def _medians(gradients: str, steps: int) -> dict[bool, float]:
    counted = _layout.FlatBuffer.mark_parameters_written
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(ELEMENTS, generator=generator)) for _ in range(TENSORS)]
    grads = [torch.randn(ELEMENTS, generator=generator) for _ in range(TENSORS)]
    optimizer = adam_triton.AdamW(params, lr=1e-3)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()
    times = {True: [], False: []}
    try:
        for index in range(2 * steps):
            count = index % 2 == 0
            _layout.FlatBuffer.mark_parameters_written = counted if count else (lambda self, segments: None)
            if gradients == "fresh":
                optimizer.zero_grad()
                for p, g in zip(params, grads):
                    p.grad = g.clone()
            else:
                optimizer.zero_grad(set_to_none=False)
                for p, g in zip(params, grads):
                    p.grad.copy_(g)
            start = time.perf_counter()
            optimizer.step()
            times[count].append(time.perf_counter() - start)
    finally:
        _layout.FlatBuffer.mark_parameters_written = counted
    return {count: 1e3 * statistics.median(values[WARMUP:]) for count, values in times.items()}


def main(rounds: int = 3, steps: int = 60) -> None:
    print(f"adam_triton from {adam_triton.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{TENSORS} x {ELEMENTS}, {steps} steps each way per round, alternating; median ms per step")
    for gradients in ("fresh", "kept"):
        for round_index in range(rounds):
            medians = _medians(gradients, steps)
            print(
                f"{gradients:5s} round {round_index + 1}: counted {medians[True]:.2f}, not counted "
                f"{medians[False]:.2f}, difference {medians[True] - medians[False]:+.2f}"
            )


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
