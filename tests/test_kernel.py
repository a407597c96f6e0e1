"""The Triton kernel itself: one step from equal state against torch, layout contract, checks.

On CPU the kernel runs through Triton's interpreter (small sizes); on a GPU, compiled.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


from torch.optim.adam import _single_tensor_adam

import adam_triton
from adam_triton import functional

kernels = pytest.importorskip("adam_triton.kernels")

BLOCK = kernels.block_size(torch.float32)
SIZES = [1, 15, 16, 17, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5]


def _adversarial_state(numel, dtype, device, seed, step):
    """State spanning many magnitudes, so eps, the bias corrections and every product matter."""
    generator = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.empty(numel, dtype=torch.float64).uniform_(-9, 2, generator=generator)
    sign = torch.randint(0, 2, (numel,), generator=generator) * 2 - 1
    grad = scale * sign * torch.rand(numel, generator=generator, dtype=torch.float64)
    param = torch.randn(numel, generator=generator, dtype=torch.float64)
    exp_avg = grad * torch.rand(numel, generator=generator, dtype=torch.float64) * 0.8 if step else torch.zeros(numel, dtype=torch.float64)
    exp_avg_sq = (grad * torch.rand(numel, generator=generator, dtype=torch.float64)) ** 2 if step else torch.zeros(numel, dtype=torch.float64)
    max_exp_avg_sq = exp_avg_sq * (1 + torch.rand(numel, generator=generator, dtype=torch.float64)) if step else torch.zeros(numel, dtype=torch.float64)
    tensors = [t.to(device=device, dtype=dtype) for t in (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)]
    return tensors


def _torch_single_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, completed, decoupled, **hyper):
    """torch's own for-loop implementation (the default on CPU), on copies, after
    ``completed`` steps."""
    p, g, m, v, vmax = (t.detach().clone().cpu() for t in (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq))
    state_step = torch.tensor(float(completed))
    _single_tensor_adam(
        [p], [g], [m], [v], [vmax], [state_step], None, None,
        has_complex=False, capturable=False, differentiable=False, decoupled_weight_decay=decoupled, **hyper,
    )
    return p, m, v, vmax


VARIANTS = [
    dict(amsgrad=False, maximize=False, decoupled=False, weight_decay=0.0),
    dict(amsgrad=False, maximize=False, decoupled=False, weight_decay=0.1),
    dict(amsgrad=True, maximize=True, decoupled=False, weight_decay=0.1),
    dict(amsgrad=True, maximize=False, decoupled=True, weight_decay=0.1),
    dict(amsgrad=False, maximize=True, decoupled=True, weight_decay=0.0),
]


def _assert_within_ulps(actual, expected, ulps, name, scale=None):
    """|actual - expected| within ``ulps`` units in the last place of the largest term that
    went into the value (``scale``, default |expected|): where terms cancel, a fused
    multiply-add or a different association changes the last bits of the terms, not of
    the small result."""
    actual, expected = actual.cpu(), expected.cpu()
    eps = torch.finfo(expected.dtype).eps
    tiny = torch.finfo(expected.dtype).tiny
    scale = expected.abs() if scale is None else torch.maximum(scale.cpu(), expected.abs())
    excess = (actual - expected).abs() - (ulps * eps * scale + tiny)
    assert (excess <= 0).all(), f"{name}: worst excess {excess.max().item():.3g} over {ulps} ulps"


def _term_scales(param, grad, exp_avg, exp_avg_sq, weight_decay, decoupled, beta1=0.9, beta2=0.999):
    """The magnitude of the terms each new value is a sum of. With L2 weight decay the
    gradient is itself a sum, g + wd * p, and its rounding error is doubled by squaring."""
    param, grad, exp_avg, exp_avg_sq = (t.detach().double().cpu().abs() for t in (param, grad, exp_avg, exp_avg_sq))
    gradient = grad if decoupled else grad + weight_decay * param
    return (
        param,
        beta1 * exp_avg + (1 - beta1) * gradient,
        beta2 * exp_avg_sq + (1 - beta2) * 2 * gradient**2,
    )


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("step", [0, 6])
def test_one_step_agrees_with_torch_to_float32_rounding(kernel_device, numel, variant, step):
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=variant["weight_decay"])
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq = _adversarial_state(numel, torch.float32, kernel_device, 0, step)
    param_scale, exp_avg_scale, exp_avg_sq_scale = _term_scales(
        param, grad, exp_avg, exp_avg_sq, variant["weight_decay"], variant["decoupled"]
    )
    expected = _torch_single_step(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, variant["decoupled"],
        amsgrad=variant["amsgrad"], maximize=variant["maximize"], **hyper,
    )
    step_tensor = torch.tensor([float(step)], device=kernel_device)
    functional.adam(
        param, grad, exp_avg, exp_avg_sq, step_tensor, max_exp_avg_sq,
        amsgrad=variant["amsgrad"], maximize=variant["maximize"], decoupled_weight_decay=variant["decoupled"],
        backend="triton", **hyper,
    )
    assert float(step_tensor) == step + 1
    # The moments follow torch's operations exactly up to fused multiply-adds; the parameter
    # adds the rounding of sqrt, two divisions and the update.
    _assert_within_ulps(exp_avg, expected[1], 2, "exp_avg", exp_avg_scale)
    _assert_within_ulps(exp_avg_sq, expected[2], 2, "exp_avg_sq", exp_avg_sq_scale)
    _assert_within_ulps(max_exp_avg_sq, expected[3], 2, "max_exp_avg_sq", exp_avg_sq_scale)
    _assert_within_ulps(param, expected[0], 2, "param", param_scale)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.5), (0.0, 0.0), (0.99, 0.9999)])
def test_float64_buffers_compute_in_float64(kernel_device, betas):
    hyper = dict(lr=1e-2, beta1=betas[0], beta2=betas[1], eps=1e-12, weight_decay=0.01)
    completed = 3
    tensors = _adversarial_state(BLOCK + 3, torch.float64, kernel_device, 1, completed)
    expected = _torch_single_step(*tensors, completed, True, amsgrad=True, maximize=False, **hyper)
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq = tensors
    scales = list(_term_scales(param, grad, exp_avg, exp_avg_sq, 0.01, True, *betas))
    # 1 - beta**t cancels when beta**t is near 1; torch's Python pow and the kernel's
    # squaring round differently there, which moves the update by this relative amount.
    t = completed + 1
    eps64 = torch.finfo(torch.float64).eps
    bias_rounding = 4 * eps64 * (1 / (1 - betas[0] ** t) + 1 / (1 - betas[1] ** t))
    scales[0] = scales[0] + (expected[0].cpu() - param.cpu()).abs() * bias_rounding / eps64
    functional.adam(
        param, grad, exp_avg, exp_avg_sq, torch.tensor([float(completed)], device=kernel_device), max_exp_avg_sq,
        amsgrad=True, decoupled_weight_decay=True, backend="triton", **hyper,
    )
    # float64: torch's CPU kernels fuse some of the multiply-adds that the kernel rounds twice.
    for actual, wanted, scale, name in zip((param, exp_avg, exp_avg_sq), expected, scales, ("param", "exp_avg", "exp_avg_sq")):
        _assert_within_ulps(actual, wanted, 3, name, scale)


def test_update_multiplies_before_it_divides_as_torch_does(kernel_device):
    """torch computes step_size * m / denom, the product first. Where that product overflows
    float32 and m / denom first would not, the two orders part by more than rounding."""
    hyper = dict(lr=1e30, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0)
    grad = torch.tensor([1e10, -3e9, 2e-3, 5.0], device=kernel_device)
    param, exp_avg, exp_avg_sq, max_exp_avg_sq = (torch.ones(4, device=kernel_device) for _ in range(4))
    expected = _torch_single_step(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, 0, False, amsgrad=False, maximize=False, **hyper
    )[0]
    functional.adam(
        param, grad, exp_avg, exp_avg_sq, torch.zeros(1, device=kernel_device),
        backend="triton", amsgrad=False, maximize=False, decoupled_weight_decay=False, **hyper,
    )
    assert expected[:2].isinf().all()  # the case the test is for
    assert torch.equal(param.cpu().isinf(), expected.isinf())
    _assert_within_ulps(param.cpu()[2:], expected[2:], 2, "param")


def test_decoupled_decay_of_zero_is_skipped_as_torch_skips_it(kernel_device):
    """With weight_decay == 0 torch leaves the parameter alone before the update, so an
    infinite lr makes it infinite, not 0 * inf = nan."""
    hyper = dict(lr=float("inf"), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    grad = torch.tensor([0.5, -2.0, 3e-3], device=kernel_device)
    param = torch.tensor([1.0, -4.0, 0.25], device=kernel_device)
    exp_avg, exp_avg_sq = torch.zeros(3, device=kernel_device), torch.zeros(3, device=kernel_device)
    expected = _torch_single_step(
        param, grad, exp_avg, exp_avg_sq, torch.zeros(3), 0, True, amsgrad=False, maximize=False, **hyper
    )[0]
    functional.adam(
        param, grad, exp_avg, exp_avg_sq, torch.zeros(1, device=kernel_device),
        backend="triton", amsgrad=False, maximize=False, decoupled_weight_decay=True, **hyper,
    )
    assert expected.isinf().all()  # the case the test is for
    assert torch.equal(param.cpu(), expected)


@pytest.mark.parametrize("beta2", [0.999, 1 - 1e-12])
@pytest.mark.parametrize("completed", [2.5, 1e19, float("inf")], ids=["fractional", "past-int64", "infinite"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_counts_torch_never_makes_give_torch_s_update(kernel_device, backend, completed, beta2):
    """A checkpoint may carry any step count torch accepts: a fraction (hand-edited), or
    one too large for an int64. torch raises beta to that power as given: with beta2 a
    hair below 1, even 1e19 steps leave beta2**t far from where a smaller count would."""
    if backend == "torch" and kernel_device != "cpu":
        pytest.skip("the torch backend is covered on the CPU")
    hyper = dict(lr=1e-2, beta1=0.9, beta2=beta2, eps=1e-8, weight_decay=0.1)
    tensors = _adversarial_state(BLOCK + 5, torch.float32, kernel_device, 3, 1)
    expected = _torch_single_step(*tensors, completed, True, amsgrad=False, maximize=False, **hyper)
    param, grad, exp_avg, exp_avg_sq, _ = tensors
    scales = _term_scales(param, grad, exp_avg, exp_avg_sq, 0.1, True, beta2=beta2)
    functional.adam(
        param, grad, exp_avg, exp_avg_sq, torch.tensor([completed], device=kernel_device),
        amsgrad=False, maximize=False, decoupled_weight_decay=True, backend=backend, **hyper,
    )
    assert param.isfinite().all()
    for actual, wanted, scale, name in zip((param, exp_avg, exp_avg_sq), expected, scales, ("param", "exp_avg", "exp_avg_sq")):
        _assert_within_ulps(actual, wanted, 2, name, scale)


def _chunk_rows(segments, chunk):
    rows = []
    for segment, (start, length, group) in enumerate(segments):
        for first in range(start, start + max(length, 1), chunk):
            rows.append((first, min(first + chunk, start + length), segment, group, len(rows)))
    return np.array(rows, dtype=np.int64)


def test_launcher_updates_segments_in_place_and_skips_those_without_gradient(kernel_device):
    """Three segments in one buffer, two hyperparameter rows, one segment without a
    gradient, gradients read from separate tensors through their shifts."""
    device = kernel_device
    segments = [(0, 2 * BLOCK + 7, 0), (2 * BLOCK + 32, 100, 1), (2 * BLOCK + 160, 40, 0)]
    total = 2 * BLOCK + 224
    generator = torch.Generator().manual_seed(4)
    param = torch.randn(total, generator=generator).to(device)
    exp_avg = torch.zeros(total, device=device)
    exp_avg_sq = torch.zeros(total, device=device)
    grads = [torch.randn(length, generator=generator).to(device) for _, length, _ in segments]
    shifts = [(g.data_ptr() - param.data_ptr()) // 4 - start for g, (start, _, _) in zip(grads, segments)]
    shifts[2] = kernels.NO_GRADIENT
    rows = _chunk_rows(segments, chunk=1024)
    steps = torch.zeros(len(rows), device=device)
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.0], [3e-2, 0.5, 0.9, 1e-6, 0.2]], dtype=torch.float64, device=device)
    before = param.clone()
    kernels.adam_chunked_update(
        param, param, exp_avg, exp_avg_sq, None,
        torch.tensor(shifts, device=device), torch.from_numpy(rows).to(device), steps, hyper,
        amsgrad=False, maximize=False, decoupled_weight_decay=True,
    )
    for (start, length, group), grad in zip(segments[:2], grads[:2]):
        lr, beta1, beta2, eps, wd = hyper[group].tolist()
        expected = _torch_single_step(
            before[start : start + length], grad, torch.zeros(length), torch.zeros(length), torch.zeros(length), 0, True,
            amsgrad=False, maximize=False, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
        )
        _assert_within_ulps(param[start : start + length], expected[0], 2, f"segment at {start}", before[start : start + length].abs())
    untouched = torch.ones(total, dtype=torch.bool)
    for start, length, _ in segments[:2]:
        untouched[start : start + length] = False
    assert torch.equal(param.cpu()[untouched], before.cpu()[untouched]), "padding or the gradient-less segment changed"
    counts = steps.cpu()[torch.from_numpy(rows[:, 4])]
    assert counts[torch.from_numpy(rows[:, 2]) < 2].eq(1).all() and counts[torch.from_numpy(rows[:, 2]) == 2].eq(0).all()


def test_launcher_rejects_bad_inputs(kernel_device):
    device = kernel_device
    n = 64
    good = dict(
        param=torch.zeros(n, device=device),
        grad_base=torch.zeros(n, device=device),
        exp_avg=torch.zeros(n, device=device),
        exp_avg_sq=torch.zeros(n, device=device),
        max_exp_avg_sq=None,
        grad_shifts=torch.zeros(1, dtype=torch.int64, device=device),
        chunks=torch.tensor([[0, n, 0, 0, 0]], dtype=torch.int64, device=device),
        steps=torch.zeros(1, device=device),
        hyper=torch.zeros(1, 5, dtype=torch.float64, device=device),
    )
    flags = dict(amsgrad=False, maximize=False, decoupled_weight_decay=False)
    bad_cases = {
        "exp_avg": torch.zeros(n - 1, device=device),
        "grad_base": torch.zeros(n, dtype=torch.float64, device=device),
        "chunks": torch.zeros(1, 4, dtype=torch.int64, device=device),
        "hyper": torch.zeros(1, 5, dtype=torch.float32, device=device),
        "steps": torch.zeros(1, dtype=torch.float64, device=device),
        "param": torch.zeros(n, dtype=torch.int32, device=device),
        "grad_scale": 2.0,
    }
    for name, bad in bad_cases.items():
        with pytest.raises(ValueError, match="adam_chunked_update"):
            kernels.adam_chunked_update(**{**good, name: bad}, **flags)
    # With master weights the model's buffer may be elsewhere (shifts), but its kind is checked.
    shifted = dict(good, param_shifts=good["grad_shifts"])
    bad_copies = {
        "int16 model": dict(param_copy=torch.zeros(n, dtype=torch.int16, device=device),
                            grad_base=torch.zeros(n, dtype=torch.int16, device=device)),
        "meta model": dict(param_copy=torch.zeros(n, dtype=torch.bfloat16, device="meta"),
                           grad_base=torch.zeros(n, dtype=torch.bfloat16, device=device)),
        "float64 masters": dict(param=torch.zeros(n, dtype=torch.float64, device=device),
                                param_copy=torch.zeros(n, dtype=torch.bfloat16, device=device),
                                grad_base=torch.zeros(n, dtype=torch.bfloat16, device=device)),
    }
    for name, changes in bad_copies.items():
        with pytest.raises(ValueError, match="adam_chunked_update"):
            kernels.adam_chunked_update(**{**shifted, **changes}, **flags)
    bf16 = dict(good, param=torch.zeros(n, dtype=torch.bfloat16, device=device),
                grad_base=torch.zeros(n, dtype=torch.bfloat16, device=device))
    for seed in (2**63, -1, 1.5):
        with pytest.raises(ValueError, match="stochastic_rounding_seed"):
            kernels.adam_chunked_update(**bf16, stochastic_rounding_seed=seed, **flags)
    with pytest.raises(ValueError, match="stochastic rounding rounds bfloat16"):  # nothing to round
        kernels.adam_chunked_update(**good, stochastic_rounding_seed=0, **flags)
    with pytest.raises(ValueError, match="stochastic rounding rounds bfloat16"):  # the masters' copy is to nearest
        kernels.adam_chunked_update(**dict(good, param_copy=bf16["param"], grad_base=bf16["grad_base"]),
                                    stochastic_rounding_seed=0, **flags)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        kernels.adam_chunked_update(**good, amsgrad=True, maximize=False, decoupled_weight_decay=False)
    with pytest.raises(ValueError, match="at least one row"):
        kernels.adam_chunked_update(**dict(good, hyper=good["hyper"][:0]), **flags)


def test_launcher_says_which_input_is_wrong(kernel_device):
    """Each bad input is refused before anything is written, with its own reason (a check
    left out would let another one, or the kernel, meet the input first)."""
    n = 64
    device, bf16 = kernel_device, torch.bfloat16

    def inputs():
        return dict(
            param=torch.rand(n, device=device), grad_base=torch.rand(n, device=device),
            exp_avg=torch.rand(n, device=device), exp_avg_sq=torch.rand(n, device=device), max_exp_avg_sq=None,
            grad_shifts=torch.zeros(1, dtype=torch.int64, device=device),
            chunks=torch.tensor([[0, n, 0, 0, 0]], device=device), steps=torch.zeros(1, device=device),
            hyper=torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0]], dtype=torch.float64, device=device),
        )

    cases = {
        "a second moment shorter than the first": (dict(exp_avg_sq=torch.rand(n - 16, device=device)), {}, "64 elements like exp_avg"),
        "a strided second moment": (dict(exp_avg_sq=torch.rand(2 * n, device=device)[::2]), {}, "contiguous"),
        "gradients on another device": (dict(grad_base=torch.zeros(n, device="meta")), {}, "grad_base is on"),
        "strided gradients": (dict(grad_base=torch.rand(2 * n, device=device)[::2]), {}, "grad_base must be contiguous"),
        "a 2-D shift table": (dict(grad_shifts=torch.zeros(1, 1, dtype=torch.int64, device=device)), {}, "dimensions"),
        "two gradient scales": ({}, dict(grad_scale=torch.ones(2, device=device)), "one value"),
        "two counts to share": (dict(steps=torch.zeros(2, device=device)), dict(bump_steps=False), "one shared step count"),
        "no shift rows": (dict(grad_shifts=torch.zeros(0, dtype=torch.int64, device=device)), {}, "at least one row"),
        "a bfloat16 gradient shift off 16 bytes": (
            dict(param_copy=torch.zeros(n, dtype=bf16, device=device), grad_base=torch.zeros(n + 8, dtype=bf16, device=device),
                 grad_shifts=torch.tensor([4], device=device)), {}, "multiples of 8"),
        "the masters' model on another device": (
            dict(param_copy=torch.zeros(n, dtype=bf16, device="meta"), grad_base=torch.zeros(n, dtype=bf16, device=device)),
            {}, "param_copy is on"),
    }
    flags = dict(amsgrad=False, maximize=False, decoupled_weight_decay=False)
    for name, (changes, options, message) in cases.items():
        arguments = {**inputs(), **changes}
        before = {k: v.cpu().clone() for k, v in arguments.items() if isinstance(v, torch.Tensor) and not v.is_meta}
        with pytest.raises(ValueError, match=message):
            kernels.adam_chunked_update(**arguments, **flags, **options)
        for key, value in before.items():
            assert torch.equal(arguments[key].cpu(), value), (name, key)


def test_launcher_rejects_written_tensors_that_share_memory(kernel_device):
    """Programs read and write them in parallel: an alias gives racing results."""
    n = 64
    memory = torch.rand(3 * n, generator=torch.Generator().manual_seed(0)).to(kernel_device)
    before = memory.clone()
    good = dict(
        param=memory[:n], grad_base=torch.zeros(n, device=kernel_device), exp_avg=memory[n : 2 * n],
        exp_avg_sq=memory[2 * n :], max_exp_avg_sq=None,
        grad_shifts=torch.zeros(1, dtype=torch.int64, device=kernel_device),
        chunks=torch.tensor([[0, n, 0, 0, 0]], dtype=torch.int64, device=kernel_device),
        steps=torch.zeros(1, device=kernel_device),
        hyper=torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0]], dtype=torch.float64, device=kernel_device),
    )
    flags = dict(amsgrad=False, maximize=False, decoupled_weight_decay=False)
    aliases = {
        "exp_avg_sq is exp_avg": dict(exp_avg_sq=good["exp_avg"]),
        "overlapping moments": dict(exp_avg=memory[n + 1 : 2 * n + 1]),
        "steps in param": dict(steps=memory[:1]),
        "amsgrad maximum is param": dict(max_exp_avg_sq=good["param"]),
    }
    for name, changes in aliases.items():
        amsgrad = "max_exp_avg_sq" in changes
        with pytest.raises(ValueError, match="share memory"):
            kernels.adam_chunked_update(**{**good, **changes}, **{**flags, "amsgrad": amsgrad})
        assert torch.equal(memory, before), name
    # grad_base is only the base the shifts count from: the parameter's own buffer serves,
    # with the unscaled gradients stored back where the shifts point.
    grad = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    shift = (grad.data_ptr() - good["param"].data_ptr()) // 4
    scaled = grad.clone()
    kernels.adam_chunked_update(
        **dict(good, grad_base=good["param"], grad_shifts=torch.tensor([shift], device=kernel_device)),
        grad_scale=torch.full((1,), 2.0, device=kernel_device), **flags, bump_steps=False,
    )
    assert not torch.equal(memory[:n], before[:n])
    assert torch.equal(grad, scaled / 2)


def test_launcher_checks_table_values_where_they_can_be_read_without_a_device_wait(kernel_device):
    """On the CPU (the interpreter) an index out of range would read or write outside the
    tensors (a segment past grad_shifts crashed the process); on a GPU reading the tables
    would wait for the device, and they are the caller's contract."""
    if kernel_device != "cpu":
        pytest.skip("on a GPU the tables' values are the caller's contract")
    n = 64
    good = dict(
        param=torch.zeros(n), grad_base=torch.zeros(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n),
        max_exp_avg_sq=None, grad_shifts=torch.tensor([0, kernels.NO_GRADIENT]),
        chunks=torch.tensor([[0, 32, 0, 0, 0], [32, n, 1, 0, 1]]), steps=torch.zeros(2),
        hyper=torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0]], dtype=torch.float64),
    )
    flags = dict(amsgrad=False, maximize=False, decoupled_weight_decay=False)

    def rows(*changed):
        table = good["chunks"].clone()
        for row, column, value in changed:
            table[row, column] = value
        return dict(chunks=table)

    bad = {
        "an end past the buffers": (rows((1, 1, n + 16)), "start <= end"),
        "a start past its end": (rows((0, 0, 48)), "start <= end"),
        "a start off 16 elements": (rows((1, 0, 40)), "multiples of 16"),
        "a segment past grad_shifts": (rows((1, 2, 2)), "segments must index"),
        "a segment past param_shifts": (dict(param_shifts=torch.zeros(1, dtype=torch.int64)), "segments must index"),
        "a hyper row past the table": (rows((0, 3, 1)), "hyper rows must index"),
        "a negative counter": (rows((0, 4, -1)), "counters must index"),
        "a counter past steps": (rows((1, 4, 2)), "counters must index"),
        "two chunks on one counter": (rows((1, 4, 0)), "share a step counter"),
        "a gradient shift off 16 bytes": (dict(grad_shifts=torch.tensor([2, kernels.NO_GRADIENT])), "multiples of 4"),
    }
    for name, (changes, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            kernels.adam_chunked_update(**{**good, **changes}, **flags)
    kernels.adam_chunked_update(**good, **flags)  # (a segment without a gradient has no shift to align)


_OFFSETS_PAST_INT32 = """
import torch
import adam_triton.kernels as kernels

start = 2**31  # the first element an int32 offset cannot reach
end = start + 64
# bfloat16 moments of 2**31 + 64 elements: 4 GiB each of address space, of which only the
# last pages are ever written. The parameter and gradient are small tensors that the
# shifts place at the chunk's offsets.
exp_avg, exp_avg_sq = torch.empty(end, dtype=torch.bfloat16), torch.empty(end, dtype=torch.bfloat16)
exp_avg[start:].zero_()
exp_avg_sq[start:].zero_()
generator = torch.Generator().manual_seed(0)
param = torch.randn(64, generator=generator).to(torch.bfloat16)
grad = torch.randn(64, generator=generator).to(torch.bfloat16)
before = param.clone()
kernels.adam_chunked_update(
    param, grad, exp_avg, exp_avg_sq, None, torch.tensor([-start]), torch.tensor([[start, end, 0, 0, 0]]),
    torch.zeros(1), torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.0]], dtype=torch.float64),
    amsgrad=False, maximize=False, decoupled_weight_decay=True, param_shifts=torch.tensor([-start]),
)
assert torch.equal(exp_avg[start:], (0.1 * grad.float()).to(torch.bfloat16)), "exp_avg"
assert bool((param != before).all()), "param"
print("updated")
"""


def test_element_offsets_past_two_to_the_31_reach_their_elements():
    """Offsets are int64: an element at 2**31 or past it is read and written where it is
    (int32 offsets wrap to -2**31 there, and the process crashes or writes elsewhere). Run
    through the interpreter in a process of its own, which such a crash cannot take down."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", _OFFSETS_PAST_INT32], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0 and "updated" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_constants_shared_with_the_host_agree():
    from adam_triton import _gradients, _layout

    assert _gradients.NO_GRADIENT == kernels.NO_GRADIENT
    assert _layout.SEGMENT_ALIGNMENT_BYTES == kernels.SEGMENT_ALIGNMENT_BYTES
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert _layout.CHUNK_QUANTUM % kernels.block_size(dtype) == 0, dtype


def test_one_launch_per_buffer_whatever_the_tensors_and_groups(kernel_device, monkeypatch):
    from adam_triton import _backends

    launches = []
    real = kernels.adam_chunked_update

    def counting(*args, **kwargs):
        launches.append(args[0].data_ptr())
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "adam_chunked_update", counting)
    assert _backends.kernels() is kernels
    params = [torch.nn.Parameter(torch.randn(n, device=kernel_device)) for n in range(1, 60)]
    params += [torch.nn.Parameter(torch.randn(5, device=kernel_device, dtype=torch.float64))]
    groups = [{"params": params[i::3], "lr": 1e-3 * (i + 1)} for i in range(3)]
    optimizer = adam_triton.Adam(groups, backend="triton")
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert len(launches) == 2  # one float32 buffer, one float64 buffer
    launches.clear()
    optimizer.step()
    assert len(launches) == 2


def test_fp32_math_eps_does_not_underflow_in_half_precision(kernel_device):
    """float16 storage: eps=1e-8 is applied in float32, so a zero second moment gives a
    finite update (torch's for-loop in float16 divides by zero here)."""
    n = 40
    param = torch.ones(n, dtype=torch.float16, device=kernel_device)
    grad = torch.full((n,), 1e-4, dtype=torch.float16, device=kernel_device)
    exp_avg = torch.zeros_like(param)
    exp_avg_sq = torch.zeros_like(param)
    functional.adam(param, grad, exp_avg, exp_avg_sq, torch.zeros(1, device=kernel_device), lr=1e-3, backend="triton")
    assert torch.isfinite(param).all() and (param < 1).all()


def test_bfloat16_stores_round_to_nearest_even_like_torch(kernel_device):
    """Master weights written into bfloat16 parameters: exactly torch's float32 -> bfloat16
    rounding, ties to even included (Triton's interpreter truncates on that conversion, so
    the kernel rounds on the bits itself)."""
    generator = torch.Generator().manual_seed(5)
    bf16_neighbours = torch.randn(600, generator=generator).to(torch.bfloat16)
    lower = bf16_neighbours.float()
    upper = (bf16_neighbours.view(torch.int16) + 1).view(torch.bfloat16).float()
    halfway = (lower + upper) / 2  # exactly representable in float32
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.3895e38, float("inf"), -float("inf"), 1.0 + 2**-8, 1.0 + 3 * 2**-8])
    # NaNs whose payload sits in the low bits, which rounding must not carry into the exponent.
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FFF8000, 0x7F80FFFF, 0x7FC00000], dtype=torch.int64).to(torch.int32)
    master = torch.cat([halfway, torch.randn(400, generator=generator), special, nans.view(torch.float32)])
    master = master.to(kernel_device)
    n = master.numel()
    copy = torch.zeros(n, dtype=torch.bfloat16, device=kernel_device)
    grad = torch.zeros(n, dtype=torch.bfloat16, device=kernel_device)
    zeros = torch.zeros(n, device=kernel_device)
    kernels.adam_chunked_update(
        master, copy, zeros.clone(), zeros.clone(), None,
        torch.tensor([(grad.data_ptr() - copy.data_ptr()) // 2], device=kernel_device),
        torch.tensor([[0, n, 0, 0, 0]], device=kernel_device), torch.zeros(1, device=kernel_device),
        torch.tensor([[0.0, 0.9, 0.999, 1e-8, 0.0]], dtype=torch.float64, device=kernel_device),
        amsgrad=False, maximize=False, decoupled_weight_decay=True, param_copy=copy,
    )
    expected = master.cpu().to(torch.bfloat16)
    numbers = ~expected.isnan()
    assert torch.equal(copy.cpu()[numbers].view(torch.int16), expected[numbers].view(torch.int16))
    assert copy.cpu()[~numbers].isnan().all()  # (torch's CPU conversion gives every nan one pattern)


def test_bfloat16_loads_are_exact_subnormals_included(kernel_device):
    """bfloat16 parameters and gradients widen to float32 exactly (Triton's interpreter
    mangles subnormals on that conversion, so the kernel widens on the bits itself): an
    lr=0 step keeps every parameter, and the first moment is torch's 0.1 * g, rounded."""
    generator = torch.Generator().manual_seed(6)
    tiny = torch.finfo(torch.bfloat16).tiny
    subnormal = torch.rand(300, generator=generator) * tiny * torch.randn(300, generator=generator).sign()
    normal = torch.randn(200, generator=generator)
    special = torch.tensor([0.0, -0.0, tiny, -tiny, 9.2e-41, 3.3e38])
    values = torch.cat([subnormal, normal, special]).to(torch.bfloat16)
    assert (values.float().abs() < tiny).sum() > 250  # the case the test is for
    param = values.flip(0).to(kernel_device)
    grad = values.to(kernel_device)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    functional.adam(
        param, grad, exp_avg, exp_avg_sq, torch.zeros(1, device=kernel_device),
        lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, backend="triton",
    )
    assert torch.equal(param.cpu().view(torch.int16), values.flip(0).view(torch.int16))
    expected = (0.0 + torch.tensor(0.1) * values.float()).to(torch.bfloat16)  # lerp from 0: -0.0 becomes 0.0
    assert torch.equal(exp_avg.cpu().view(torch.int16), expected.view(torch.int16))


def test_stochastic_rounding_keeps_nans(kernel_device):
    """bfloat16 moments rounded at random from a nan gradient stay nan whatever the random
    bits: added to a nan's low bits, they could carry into its sign and exponent."""
    payloads = torch.tensor([0x7FFFFFFF, -1, 0x7FFF8000, 0x7FC00001], dtype=torch.int64).to(torch.int32)
    n = 4096
    grad = payloads.view(torch.float32).repeat(n // 4).to(kernel_device)
    param = torch.ones(n, device=kernel_device)
    exp_avg = torch.zeros(n, dtype=torch.bfloat16, device=kernel_device)
    exp_avg_sq = torch.zeros(n, dtype=torch.bfloat16, device=kernel_device)
    kernels.adam_chunked_update(
        param, grad, exp_avg, exp_avg_sq, None, torch.tensor([0], device=kernel_device),
        torch.tensor([[0, n, 0, 0, 0]], device=kernel_device), torch.zeros(1, device=kernel_device),
        torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0]], dtype=torch.float64, device=kernel_device),
        amsgrad=False, maximize=False, decoupled_weight_decay=True, stochastic_rounding_seed=3,
    )
    assert exp_avg.isnan().all() and exp_avg_sq.isnan().all() and param.isnan().all()


def test_a_gradient_scale_that_is_not_a_power_of_two_divides_as_torch_does(kernel_device):
    """GradScaler's scale is a power of two unless set otherwise; for any other, dividing
    by it and multiplying by its reciprocal differ in the last bit. torch's fused kernel
    divides: the gradients it leaves unscaled, and the update, are the same bits."""
    generator = torch.Generator().manual_seed(1)
    n = 4096
    param, grad = torch.randn(n, generator=generator), torch.randn(n, generator=generator) * 3
    exp_avg, exp_avg_sq = torch.rand(n, generator=generator) * 0.1, torch.rand(n, generator=generator) * 0.1
    expected = [t.clone() for t in (param, grad, exp_avg, exp_avg_sq)]
    torch._fused_adamw_(
        *[[t] for t in expected], [], [torch.tensor(4.0)], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0,
        eps=1e-8, amsgrad=False, maximize=False, grad_scale=torch.tensor(3.0),
    )
    ours = [t.clone().to(kernel_device) for t in (param, grad, exp_avg, exp_avg_sq)]
    kernels.adam_chunked_update(
        ours[0], ours[0], ours[2], ours[3], None,
        torch.tensor([(ours[1].data_ptr() - ours[0].data_ptr()) // 4], device=kernel_device),
        torch.tensor([[0, n, 0, 0, 0]], device=kernel_device), torch.tensor([3.0], device=kernel_device),
        torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0]], dtype=torch.float64, device=kernel_device),
        amsgrad=False, maximize=False, decoupled_weight_decay=True,
        grad_scale=torch.tensor([3.0], device=kernel_device), bump_steps=False,
    )
    assert torch.equal(ours[1].cpu(), expected[1])
    # The update itself agrees to rounding (torch's CPU kernel associates its terms its own way).
    torch.testing.assert_close(ours[0].cpu(), expected[0], rtol=1e-6, atol=1e-7)


def test_l2_decay_of_zero_is_skipped_for_infinite_parameters_as_torch_skips_it(kernel_device):
    """Adam with weight_decay == 0 adds nothing to the gradient: an infinite parameter
    leaves its moments finite (0 * inf would make them nan)."""
    param = torch.tensor([float("inf"), 1.0, -float("inf"), 2.0], device=kernel_device)
    grad = torch.tensor([0.5, -1.0, 2.0, 3e-3], device=kernel_device)
    exp_avg, exp_avg_sq = torch.zeros(4, device=kernel_device), torch.zeros(4, device=kernel_device)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    expected = _torch_single_step(
        param, grad, exp_avg, exp_avg_sq, torch.zeros(4), 0, False, amsgrad=False, maximize=False, **hyper
    )
    functional.adam(
        param, grad, exp_avg, exp_avg_sq, torch.zeros(1, device=kernel_device),
        backend="triton", amsgrad=False, maximize=False, decoupled_weight_decay=False, **hyper,
    )
    assert expected[1].isfinite().all()  # the case the test is for
    torch.testing.assert_close(exp_avg.cpu(), expected[1], rtol=0, atol=0)
    torch.testing.assert_close(param.cpu(), expected[0], rtol=1e-6, atol=1e-7)


def test_amsgrad_maximum_carries_nans_from_either_side_as_torch_does(kernel_device):
    """torch.maximum is nan where either operand is: a nan second moment or a nan running
    maximum both leave a nan maximum."""
    param = torch.ones(4, device=kernel_device)
    grad = torch.tensor([float("nan"), 1.0, 1.0, 1.0], device=kernel_device)
    exp_avg, exp_avg_sq = torch.zeros(4, device=kernel_device), torch.zeros(4, device=kernel_device)
    maximum = torch.tensor([1.0, float("nan"), 1.0, 1.0], device=kernel_device)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    expected = _torch_single_step(param, grad, exp_avg, exp_avg_sq, maximum, 0, True, amsgrad=True, maximize=False, **hyper)
    functional.adam(
        param, grad, exp_avg, exp_avg_sq, torch.zeros(1, device=kernel_device), maximum,
        backend="triton", amsgrad=True, maximize=False, decoupled_weight_decay=True, **hyper,
    )
    assert expected[3][:2].isnan().all()  # the case the test is for
    assert torch.equal(maximum.cpu().isnan(), expected[3].isnan())
    assert torch.equal(param.cpu().isnan(), expected[0].isnan())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_parameters_with_bfloat16_moments_are_updated_in_float64(kernel_device, backend):
    """Moments stored in bfloat16 are widened exactly; the arithmetic is the parameter's
    float64, as torch's on float64 copies of the same moments."""
    if backend == "torch" and kernel_device != "cpu":
        pytest.skip("the torch backend is covered on the CPU")
    generator = torch.Generator().manual_seed(2)
    n = 1000
    param = torch.randn(n, generator=generator, dtype=torch.float64)
    grad = torch.randn(n, generator=generator, dtype=torch.float64)
    exp_avg = (torch.randn(n, generator=generator) * 0.1).to(torch.bfloat16)
    exp_avg_sq = (torch.rand(n, generator=generator) * 0.1).to(torch.bfloat16)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    expected = _torch_single_step(
        param, grad, exp_avg.double(), exp_avg_sq.double(), torch.zeros(n, dtype=torch.float64), 3, True,
        amsgrad=False, maximize=False, **hyper,
    )[0]
    ours = [t.to(kernel_device) for t in (param, grad, exp_avg, exp_avg_sq)]
    functional.adam(
        *ours, torch.tensor([3.0], device=kernel_device), backend=backend, decoupled_weight_decay=True, **hyper
    )
    torch.testing.assert_close(ours[0].cpu(), expected, rtol=1e-13, atol=1e-15)
