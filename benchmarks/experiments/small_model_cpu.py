"""Small models, CPU: what a step costs when there is little to update.

A model of a few tensors (the README's two-layer MLP has four) updates in microseconds, so
its step is the Python around the update: the large shape sets of the suite never show
it. Two measurements, each a median of steps, the implementations taking turns round by
round:

* the whole step, with fresh gradients (two sets of gradient tensors in turn, assigned
  untimed, as after the default ``zero_grad()`` and backward) and with kept ones
  (``zero_grad(set_to_none=False)``: the same tensors every step), against torch's fused
  AdamW and its default (foreach);
* the README's training loop itself (``zero_grad``, forward, ``backward()``, a timed
  ``step()``) on its MLP, with either ``zero_grad``: the step right after backward, whose
  OpenMP threads may still be spinning, as users time it;
* the host's share alone: the same fresh steps with torch's fused kernel (and the Triton
  launcher) replaced by a no-op, so torch's fused AdamW and both of adam_triton's backends
  do their Python and nothing else.

    python -m benchmarks.experiments.small_model_cpu [ROUNDS]
"""

import copy
import functools
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

import adam_triton
from adam_triton import _backends
from benchmarks.shapes import many_small

STEPS = 200
SHAPE_SETS = {
    "readme-mlp-4": [(32, 10), (32,), (1, 32), (1,)],
    "16x1000": many_small(16, 1000),
    "64x1000": many_small(64, 1000),
}


def _build(name: str, shapes, gradients: str):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    if name == "torch-fused":
        optimizer = torch.optim.AdamW(params, weight_decay=0.01, fused=True)
    elif name == "torch-foreach":
        optimizer = torch.optim.AdamW(params, weight_decay=0.01, foreach=True)
    else:
        optimizer = adam_triton.AdamW(params, weight_decay=0.01, backend=name.split("-", 1)[1])
    grads = [[torch.randn(shape) for shape in shapes] for _ in range(2)]
    if gradients == "kept":
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
        optimizer.zero_grad(set_to_none=False)
        for p, g in zip(params, grads[0]):
            p.grad.add_(g)
        grads = None
    return params, optimizer, grads


def _median_step_us(params, optimizer, grads, steps: int) -> float:
    times = []
    for step in range(steps):
        if grads is not None:
            for p, g in zip(params, grads[step % 2]):
                p.grad = g
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times)[steps // 2] * 1e6


def _interleaved(names, shapes, gradients: str, rounds: int) -> dict:
    built = {name: _build(name, shapes, gradients) for name in names}
    for name in names:
        _median_step_us(*built[name], 20)  # state and caches
    medians = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            medians[name].append(_median_step_us(*built[name], STEPS))
    return medians


def _readme_loop_medians(set_to_none: bool, rounds: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    x = torch.randn(64, 10)
    built = {}
    for name in ("torch-fused", "adam_triton-torch"):
        twin = copy.deepcopy(model)
        make = functools.partial(torch.optim.AdamW, fused=True) if name == "torch-fused" else adam_triton.AdamW
        built[name] = (twin, make(twin.parameters(), lr=1e-3))

    def median_step_us(twin, optimizer, steps):
        times = []
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=set_to_none)
            twin(x).square().mean().backward()
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return sorted(times)[steps // 2] * 1e6

    for pair in built.values():
        median_step_us(*pair, 20)
    medians = {name: [] for name in built}
    for _ in range(rounds):
        for name, pair in built.items():
            medians[name].append(median_step_us(*pair, STEPS))
    return medians


def _no_op(*args, **kwargs):
    return None


def _report(title: str, medians: dict) -> None:
    print(title + "; ".join(f"{name} {' / '.join(f'{m:.0f}' for m in values)}" for name, values in medians.items()))
    for name, values in medians.items():
        if name.startswith("adam_triton"):
            print(
                f"  {name} / torch fused, per round: "
                + " / ".join(f"{a / b:.2f}" for a, b in zip(values, medians["torch-fused"]))
            )


def main(rounds: int) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
        f"load {os.getloadavg()[0]:.2f}; medians of {STEPS} steps per round, {rounds} rounds in turn"
    )
    for label, shapes in SHAPE_SETS.items():
        for gradients in ("fresh", "kept"):
            medians = _interleaved(("torch-fused", "torch-foreach", "adam_triton-torch"), shapes, gradients, rounds)
            _report(f"{label}, {gradients} gradients, whole step (us): ", medians)
    for set_to_none in (True, False):
        medians = _readme_loop_medians(set_to_none, rounds)
        _report(
            f"readme-mlp-4, the README's loop, zero_grad(set_to_none={set_to_none}), step after backward (us): ",
            medians,
        )
    torch._fused_adamw_ = _no_op
    _backends.kernels().adam_chunked_update = _no_op
    for label, shapes in SHAPE_SETS.items():
        medians = _interleaved(("torch-fused", "adam_triton-torch", "adam_triton-triton"), shapes, "fresh", rounds)
        _report(f"{label}, fresh gradients, kernel replaced by a no-op (host time, us): ", medians)
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
