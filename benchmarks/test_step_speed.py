"""Step time of adam_triton's Adam/AdamW against torch's for-loop, foreach and fused
implementations (and apex, bitsandbytes, torchao where installed).

    python -m pytest benchmarks --benchmark-json=out.json
    python -m benchmarks.report out.json --out benchmarks/results

Each case times ``optimizer.step()`` alone, with gradients in place, after a warm-up. The
cases (``cases.py``) cover one large tensor, GPT-2 small's and ResNet-50's parameter lists and
thousands of small tensors, in fp32 and bf16, with and without AMSGrad, Adam and AdamW, and
two ways gradients arrive ("fresh" and "kept", see ``cases.GRADIENT_MODES``). On CUDA every
round ends with a device synchronisation.

``extra_info`` of every result carries the case, the parameter and tensor counts, the bytes
the byte model says a step moves (counted from the optimizer's own tensors, ``byte_model.py``),
the achieved GB/s, and the fractions of the bandwidths of a large same-device copy and
in-place add measured in the same session (``timing.reference_bandwidths``). Nothing here asserts a time: the report evaluates the speed targets.
"""

from __future__ import annotations

import pytest
import torch

from .byte_model import bytes_per_step, working_set_bytes
from .cases import shape_sets
from .implementations import IMPLEMENTATIONS, OURS
from .machine import last_level_cache_bytes
from .shapes import numel
from .timing import ROUNDS, pilot_time
from .workload import prepare, release


def test_step(benchmark, case, implementation, reference_bandwidth):
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    impl = IMPLEMENTATIONS[implementation]
    reason = impl.skip_reason(case)
    if reason:
        pytest.skip(reason)
    device = torch.device(case.device)
    reference = reference_bandwidth.get(device)  # measured before this case allocates

    try:
        workload = prepare(case, impl)
    except Exception as error:
        if not impl.optional:
            raise
        pytest.skip(f"{impl.name} cannot run this case: {type(error).__name__}: {error}")

    try:
        _time_and_describe(benchmark, case, impl, workload, reference)
    finally:
        del workload
        release(case.device)


def _time_and_describe(benchmark, case, impl, workload, reference):
    device = torch.device(case.device)
    policy = ROUNDS[device.type]

    def one_round():
        if workload.setup is not None:
            workload.setup()
        workload.step()

    rounds = policy.rounds(pilot_time(one_round))  # also warms up
    benchmark.group = case.name
    benchmark.pedantic(
        workload.step, setup=workload.setup, rounds=rounds, iterations=1, warmup_rounds=policy.warmup_rounds
    )

    moved = bytes_per_step(workload.optimizer, workload.params)
    working_set = working_set_bytes(workload.optimizer, workload.params)
    cache = last_level_cache_bytes(device.type)
    info = {
        "kind": "step",
        "case": case.name,
        "device": case.device,
        "shapes": case.shapes_name,
        "config": case.config.name,
        "dtype": str(case.config.dtype).removeprefix("torch."),
        "optimizer": case.config.optimizer,
        "amsgrad": case.config.amsgrad,
        "grads": case.config.grads,
        "precision": case.config.precision,
        "groups": case.config.groups,
        "implementation": impl.name,
        "parameters": case.parameters,
        "tensors": len(case.shapes),
        "bytes_per_step": moved,
        "bytes_per_parameter": moved / case.parameters,
        "working_set_bytes": working_set,
        "last_level_cache_bytes": cache,
        "working_set_over_cache": working_set / cache if cache else None,
        "copy_gb_per_s": reference["copy"],
        "inplace_add_gb_per_s": reference["inplace_add"],
        "rounds": rounds,
    }
    if impl.name == OURS:
        info["backends"] = sorted(set(workload.optimizer.backends().values()))
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        info["gb_per_s"] = moved / median / 1e9
        info["fraction_of_copy_bandwidth"] = info["gb_per_s"] / reference["copy"]
        info["fraction_of_inplace_add_bandwidth"] = info["gb_per_s"] / reference["inplace_add"]
    benchmark.extra_info.update(info)


# -- host-side cost of the two ways adam_triton can get at gradients (CPU) -----------------
CPU_LISTS = shape_sets("cpu")


@pytest.mark.parametrize("shapes_name", ["gpt2-narrow-148", "small-2000x8000"])
def test_cpu_gradient_lookup_overhead(benchmark, shapes_name, cpu_selected):
    """Host time to find every gradient of fresh tensors (the per-step cost of reading
    gradients in place rather than copying them into the flat buffer)."""
    import adam_triton
    from adam_triton._gradients import plan_gradients

    shapes = CPU_LISTS[shapes_name]
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
    benchmark.extra_info.update({"kind": "host-overhead", "case": shapes_name, "tensors": len(shapes),
                                 "what": "gradient lookup (host)"})


@pytest.mark.parametrize("shapes_name", ["gpt2-narrow-148", "small-2000x8000"])
def test_cpu_gradient_copy_alternative(benchmark, shapes_name, cpu_selected):
    """What copying every gradient into a flat buffer would add to each step instead."""
    shapes = CPU_LISTS[shapes_name]
    grads = [torch.randn(shape) for shape in shapes]
    flat = torch.empty(numel(shapes))
    views = [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)]
    benchmark.pedantic(lambda: torch._foreach_copy_(views, grads), rounds=15, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update({"kind": "host-overhead", "case": shapes_name, "tensors": len(shapes),
                                 "what": "copy gradients into a flat buffer"})
