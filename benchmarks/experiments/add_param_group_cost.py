"""Host time of a loop of ``add_param_group`` calls: an optimizer built on one parameter,
then N groups of one parameter each added one at a time (per-layer learning rates built in
a loop), then one step; torch's AdamW does the same in turn, as the ratio's reference.

Self-contained, so that it can time another tree's code too:

    python -m benchmarks.experiments.add_param_group_cost [ROUNDS]
    PYTHONPATH=/path/to/other/tree python benchmarks/experiments/add_param_group_cost.py [ROUNDS]
"""

import statistics
import sys
import time

import torch

import adam_triton

COUNTS = (250, 1000, 2000)
ELEMENTS = 8000


def _adds_then_step(cls, count: int) -> tuple[float, float]:
    params = [torch.nn.Parameter(torch.randn(ELEMENTS)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(ELEMENTS)
    started = time.perf_counter()
    optimizer = cls([params[0]], lr=1e-3)
    for index, param in enumerate(params[1:], 1):
        optimizer.add_param_group({"params": [param], "lr": 1e-3 * (1 + index % 3)})
    added = time.perf_counter()
    optimizer.step()
    return added - started, time.perf_counter() - added


def main(rounds: int = 3) -> None:
    torch.set_num_threads(1)  # the host work is what is timed; the step's update is small
    print(f"adam_triton from {adam_triton.__file__}; torch {torch.__version__}, 1 thread")
    for count in COUNTS:
        timings = {name: [] for name in ("adam_triton", "torch")}
        for _ in range(rounds):  # in turn, so that both see the same machine
            timings["adam_triton"].append(_adds_then_step(adam_triton.AdamW, count))
            timings["torch"].append(_adds_then_step(torch.optim.AdamW, count))
        (ours_adds, ours_step), (torch_adds, torch_step) = (
            tuple(statistics.median(t[i] for t in timings[name]) for i in range(2)) for name in ("adam_triton", "torch")
        )
        print(f"  {count:5d} groups added one at a time: adam_triton {ours_adds:7.2f} s (then a step, "
              f"{ours_step:5.2f} s), torch {torch_adds:5.2f} s ({torch_step:5.2f} s): "
              f"{ours_adds / torch_adds:6.1f}x torch's adds; medians of {rounds} rounds, adds from "
              f"{min(t[0] for t in timings['adam_triton']):.2f} to {max(t[0] for t in timings['adam_triton']):.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
