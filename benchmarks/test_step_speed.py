"""Step time of adam_triton.AdamW against torch's for-loop, foreach and fused AdamW.

    python -m pytest benchmarks --benchmark-json=out.json

Each case times ``optimizer.step()`` alone on a parameter list with gradients in place.
Two ways gradients arrive are measured, because they cost differently:

* ``fresh``: new gradient tensors before every step, as after ``zero_grad()`` (its default
  ``set_to_none=True``) and ``backward()``;
* ``kept``: the same gradient tensors every step, as after ``zero_grad(set_to_none=False)``
  (for adam_triton these are views of its flat gradient buffer).

``extra_info`` carries the parameter and tensor counts, the bytes the byte model says a step
must move (fp32 AdamW: read p, g, m, v and write p, m, v = 28 bytes per parameter) and
the achieved bandwidth.
"""

from __future__ import annotations

import pytest
import torch
from shapes import gpt2_small, many_small, numel

import adam_triton

CPU_CASES = {
    "flat-16M": [(16 * 1024 * 1024,)],
    "gpt2-narrow-148": gpt2_small(width=192),
    "small-2000x8000": many_small(2000, 8000),
}
IMPLEMENTATIONS = ["adam_triton", "torch-fused", "torch-foreach", "torch-forloop"]
BYTES_PER_PARAMETER = 28


def _optimizer(name, params):
    if name == "adam_triton":
        return adam_triton.AdamW(params, lr=1e-3)
    flags = {"torch-fused": {"fused": True}, "torch-foreach": {"foreach": True}, "torch-forloop": {"foreach": False}}[name]
    return torch.optim.AdamW(params, lr=1e-3, **flags)


@pytest.mark.parametrize("grads", ["fresh", "kept"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_step(benchmark, case, implementation, grads):
    shapes = CPU_CASES[case]
    if implementation == "torch-forloop" and len(shapes) > 1000:
        rounds = 3  # seconds per step; enough to rank it
    else:
        rounds = 15
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    optimizer = _optimizer(implementation, params)
    pool = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(2)]
    for p, g in zip(params, pool[0]):
        p.grad = g
    optimizer.step()  # state exists before timing
    if grads == "kept":
        optimizer.zero_grad(set_to_none=False)
        for p, g in zip(params, pool[1]):
            p.grad.copy_(g)
        setup = None
    else:
        turn = [0]

        def setup():
            turn[0] ^= 1
            for p, g in zip(params, pool[turn[0]]):
                p.grad = g

    benchmark.pedantic(optimizer.step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=2)
    parameters = numel(shapes)
    moved = BYTES_PER_PARAMETER * parameters
    benchmark.extra_info.update(
        {
            "case": case,
            "implementation": implementation,
            "grads": grads,
            "device": "cpu",
            "parameters": parameters,
            "tensors": len(shapes),
            "bytes_per_step": moved,
            "gb_per_s": moved / benchmark.stats.stats.median / 1e9,
        }
    )


@pytest.mark.parametrize("case", ["gpt2-narrow-148", "small-2000x8000"])
def test_cpu_gradient_lookup_overhead(benchmark, case):
    """Host time to find every gradient of fresh tensors (the per-step cost of reading
    gradients in place rather than copying them into the flat buffer)."""
    from adam_triton._gradients import plan_gradients

    shapes = CPU_CASES[case]
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    optimizer = adam_triton.AdamW(params)
    (buffer,) = optimizer._engine.buffers
    pool = [[torch.zeros(shape) for shape in shapes] for _ in range(2)]
    turn = [0]

    def setup():
        turn[0] ^= 1
        for p, g in zip(params, pool[turn[0]]):
            p.grad = g

    benchmark.pedantic(lambda: plan_gradients(buffer, None, "AdamW"), setup=setup, rounds=50, iterations=1)
    benchmark.extra_info.update({"case": case, "tensors": len(shapes), "what": "gradient lookup (host)"})


@pytest.mark.parametrize("case", ["gpt2-narrow-148", "small-2000x8000"])
def test_cpu_gradient_copy_alternative(benchmark, case):
    """What copying every gradient into a flat buffer would add to each step instead."""
    shapes = CPU_CASES[case]
    grads = [torch.randn(shape) for shape in shapes]
    flat = torch.empty(numel(shapes))
    views = list(flat.split([g.numel() for g in grads]))
    views = [v.view_as(g) for v, g in zip(views, grads)]
    benchmark.pedantic(lambda: torch._foreach_copy_(views, grads), rounds=15, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update({"case": case, "tensors": len(shapes), "what": "copy gradients into a flat buffer"})
