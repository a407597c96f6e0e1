"""A param group per tensor (layer-wise learning rates), CPU: adam_triton against torch.

Layer-wise learning-rate decay and per-parameter weight decay give a model hundreds of
param groups. torch's fused AdamW calls its kernel once per group; so does adam_triton's
CPU backend, and what differs is the Python around each call. Two measurements, each a
median of steps with fresh gradients (two sets of gradient tensors in turn, assigned
untimed), the implementations taking turns round by round:

* the whole step, on tensors of 8,000 elements and on GPT-2's 148 tensors at width 192,
  one group each (learning rates decaying 0.99 per group), against torch's fused AdamW and
  its default (foreach);
* the host's share alone: the same step with torch's fused kernel (and the Triton
  launcher) replaced by a no-op, on tensors of 64 elements: Python per group, nothing else.

    python -m benchmarks.experiments.group_per_tensor_cpu [ROUNDS]
"""

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

import adam_triton
from adam_triton import _backends
from benchmarks.shapes import gpt2_small, many_small

STEPS = 30
SHAPE_SETS = {
    "100x8000": many_small(100, 8000),
    "300x8000": many_small(300, 8000),
    "gpt2-narrow-148": gpt2_small(width=192),
}


def _groups(params):
    return [{"params": [p], "lr": 1e-3 * 0.99**i} for i, p in enumerate(params)]


def _build(name: str, shapes):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    if name == "torch-fused":
        optimizer = torch.optim.AdamW(_groups(params), weight_decay=0.01, fused=True)
    elif name == "torch-foreach":
        optimizer = torch.optim.AdamW(_groups(params), weight_decay=0.01, foreach=True)
    else:
        optimizer = adam_triton.AdamW(_groups(params), weight_decay=0.01, backend=name.split("-", 1)[1])
    grads = [[torch.randn(shape) for shape in shapes] for _ in range(2)]
    return params, optimizer, grads


def _median_step_ms(params, optimizer, grads, steps: int) -> float:
    times = []
    for step in range(steps):
        for p, g in zip(params, grads[step % 2]):
            p.grad = g
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times)[steps // 2] * 1e3


def _interleaved(names, shapes, rounds: int) -> dict:
    built = {name: _build(name, shapes) for name in names}
    for name in names:
        _median_step_ms(*built[name], 3)  # state and caches
    medians = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            medians[name].append(_median_step_ms(*built[name], STEPS))
    return medians


def _no_op(*args, **kwargs):
    return None


def main(rounds: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"load {os.getloadavg()[0]:.2f}; medians of {STEPS} steps per round, {rounds} rounds in turn")
    for label, shapes in SHAPE_SETS.items():
        medians = _interleaved(("torch-fused", "torch-foreach", "adam_triton-torch"), shapes, rounds)
        ours = medians["adam_triton-torch"]
        print(f"{label}, a group per tensor, whole step (ms): " + "; ".join(
            f"{name} {' / '.join(f'{m:.2f}' for m in values)}" for name, values in medians.items()))
        print("  ours / torch fused, per round: " + " / ".join(
            f"{a / b:.2f}" for a, b in zip(ours, medians["torch-fused"])))
    torch._fused_adamw_ = _no_op
    _backends.kernels().adam_chunked_update = _no_op
    for count in (148, 2000):
        medians = _interleaved(("torch-fused", "adam_triton-torch", "adam_triton-triton"), many_small(count, 64), rounds)
        print(f"{count} groups of 64 elements, kernel replaced by a no-op (host time, ms): " + "; ".join(
            f"{name} {' / '.join(f'{m:.2f}' for m in values)}" for name, values in medians.items()))
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
