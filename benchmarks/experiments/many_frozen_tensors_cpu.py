"""The host time a step spends on frozen parameters: 5,000 frozen tensors of 64 elements
passed along with one trainable tensor, as ``AdamW(model.parameters())`` over a frozen
model with a small head does.

Each step looks at every parameter it holds (has a frozen one been given a gradient, or
moved?), in C-level passes; torch's step looks at each one's ``.grad`` in Python. Times
``step()`` followed by ``zero_grad()`` (both modes), in milliseconds, medians of rounds of
50, for torch's fused and for-loop AdamW and adam_triton's CPU backend. Self-contained, so
that it can measure another tree's code too:

    python -m benchmarks.experiments.many_frozen_tensors_cpu [rounds]
    PYTHONPATH=/path/to/other/tree python benchmarks/experiments/many_frozen_tensors_cpu.py
"""

import statistics
import sys
import time

import torch

import adam_triton

OPTIMIZERS = {
    "torch fused AdamW": lambda params: torch.optim.AdamW(params, fused=True),
    "torch for-loop AdamW": lambda params: torch.optim.AdamW(params, foreach=False),
    "adam_triton AdamW": lambda params: adam_triton.AdamW(params, backend="torch"),
}


def main(rounds: int = 7) -> None:
    print(f"adam_triton from {adam_triton.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    frozen = [torch.nn.Parameter(torch.randn(64), requires_grad=False) for _ in range(5000)]
    head = torch.nn.Parameter(torch.randn(64))
    gradient = torch.ones(64)
    for name, make in OPTIMIZERS.items():
        optimizer = make(frozen + [head])
        for set_to_none in (True, False):
            medians = []
            for round_ in range(rounds + 1):
                start = time.perf_counter()
                for _ in range(50):
                    if head.grad is None:
                        head.grad = gradient.clone()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=set_to_none)
                if round_:  # the first round warms up
                    medians.append((time.perf_counter() - start) / 50 * 1e3)
            print(
                f"{name:22s} zero_grad(set_to_none={set_to_none!s:5s}): "
                f"{statistics.median(medians):.2f} ms per step and zero_grad (rounds: "
                + ", ".join(f"{m:.2f}" for m in medians) + ")",
                flush=True,
            )
        head.grad = None
        del optimizer


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
