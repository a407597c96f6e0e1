"""The functional entry point on flat tensors the caller owns."""

import numpy as np
import pytest
import torch
from helpers import Wrapped
from torch.optim.adam import _single_tensor_adam

from adam_triton import functional


@pytest.mark.parametrize("held", ["numbers", "0-dim tensors", "1-element tensors"])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_torch_over_several_steps(target, decoupled, amsgrad, held):
    generator = torch.Generator().manual_seed(0)
    n = 3000
    param = torch.randn(n, generator=generator)
    reference = [param.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.tensor(0.0)]
    ours = [t.clone().to(target.device) for t in (param, torch.zeros(n), torch.zeros(n), torch.zeros(n))]
    step = torch.zeros(1, device=target.device)
    hyper = dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    # Tensors on the parameters' device (on CUDA, the kernel's table is filled there).
    shape = () if held == "0-dim tensors" else (1,)
    given = hyper if held == "numbers" else {k: torch.full(shape, v, device=target.device) for k, v in hyper.items()}
    for _ in range(5):
        grad = torch.randn(n, generator=generator)
        functional.adam(
            ours[0], grad.to(target.device), ours[1], ours[2], step, ours[3],
            amsgrad=amsgrad, decoupled_weight_decay=decoupled, backend=target.backend, **given,
        )
        p, m, v, vmax, s = reference
        _single_tensor_adam(
            [p], [grad], [m], [v], [vmax], [s], None, None, amsgrad=amsgrad, has_complex=False, maximize=False,
            capturable=False, differentiable=False, decoupled_weight_decay=decoupled, **hyper,
        )
    assert float(step) == 5
    for actual, expected in zip(ours, reference):
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-6)


def test_a_gradient_with_a_pending_negation_is_read_as_its_values(target):
    """``torch._neg_view(g)`` holds the bytes of ``g`` and the values of ``-g``."""
    generator = torch.Generator().manual_seed(0)
    param, grad = torch.randn(300, generator=generator), torch.randn(300, generator=generator)
    results = []
    for given in (torch._neg_view(grad.clone()), -grad):
        state = [param.clone().to(target.device), torch.zeros(300, device=target.device), torch.zeros(300, device=target.device)]
        functional.adam(state[0], given.to(target.device), state[1], state[2], torch.zeros(1, device=target.device), lr=1e-2, backend=target.backend)
        results.append(state)
    for ours, expected in zip(*results):
        assert torch.equal(ours, expected)


def test_bad_inputs_raise():
    t = torch.zeros(4)
    step = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        functional.adam(t, torch.zeros(5), t.clone(), t.clone(), step, lr=1e-3)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        functional.adam(t, t.clone(), t.clone(), t.clone(), step, amsgrad=True, lr=1e-3)
    with pytest.raises(ValueError, match="step"):
        functional.adam(t, t.clone(), t.clone(), t.clone(), torch.zeros(1, dtype=torch.int64), lr=1e-3)
    with pytest.raises(ValueError, match="contiguous"):
        functional.adam(torch.zeros(4, 2).t(), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), step, lr=1e-3)
    with pytest.raises(ValueError, match="backend"):
        functional.adam(t, t.clone(), t.clone(), t.clone(), step, lr=1e-3, backend="nope")



@pytest.mark.parametrize("hyper", [dict(lr=torch.tensor([1e-3, 2e-3])), dict(beta1="0.9"), dict(eps=None)], ids=str)
def test_a_hyperparameter_that_is_not_one_number_raises_before_anything_changes(target, hyper):
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, generator=generator).abs().to(target.device) for _ in range(4)]
    before = [t.clone() for t in tensors]
    step = torch.full((1,), 3.0, device=target.device)
    with pytest.raises(ValueError, match="one-element tensor"):
        functional.adam(*tensors, step, **{"lr": 1e-3, **hyper}, backend=target.backend)
    assert float(step) == 3.0
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))

@pytest.mark.parametrize(
    "param_dtype, state_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)], ids=str
)
def test_moments_of_another_dtype_than_the_parameter(target, param_dtype, state_dtype):
    """As the optimizer's state_dtype: the math in float32, each tensor stored in its own
    dtype (torch's kernel alone wants one dtype for all)."""
    generator = torch.Generator().manual_seed(0)
    n = 1000
    param = torch.randn(n, generator=generator).to(param_dtype)
    exp_avg, exp_avg_sq = torch.zeros(n, dtype=state_dtype), torch.zeros(n, dtype=state_dtype)
    ours = [t.clone().to(target.device) for t in (param, exp_avg, exp_avg_sq)]
    step = torch.zeros(1, device=target.device)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(n, generator=generator).to(param_dtype)
        functional.adam(ours[0], grad.to(target.device), ours[1], ours[2], step, backend=target.backend, **hyper)
        p, m, v = (t.float() for t in (param, exp_avg, exp_avg_sq))
        _single_tensor_adam(
            [p], [grad.float()], [m], [v], [], [torch.tensor(float(step) - 1)], None, None, amsgrad=False,
            has_complex=False, maximize=False, capturable=False, differentiable=False, decoupled_weight_decay=False,
            **hyper,
        )
        param, exp_avg, exp_avg_sq = p.to(param_dtype), m.to(state_dtype), v.to(state_dtype)
    for actual, expected in zip(ours, (param, exp_avg, exp_avg_sq)):
        assert actual.dtype == expected.dtype
        # float32 to its rounding; bfloat16 to one unit in the last place (1/128 relative)
        rtol = 1e-5 if expected.dtype == torch.float32 else 8e-3
        torch.testing.assert_close(actual.cpu().float(), expected.float(), rtol=rtol, atol=1e-7)


def _fresh(target, n=33, seed=0):
    generator = torch.Generator().manual_seed(seed)
    param, grad = (torch.randn(n, generator=generator).to(target.device) for _ in range(2))
    exp_avg, exp_avg_sq, max_exp_avg_sq = (torch.rand(n, generator=generator).to(target.device) for _ in range(3))
    return param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, torch.full((1,), 3.0, device=target.device)


@pytest.mark.parametrize("flag", [0, 1, np.bool_(True), np.bool_(False)], ids=["0", "1", "np.True_", "np.False_"])
def test_flags_of_any_truthy_kind_act_as_the_bools_they_mean(target, flag):
    """torch's functional adam takes 0 and 1 for its flags; torch's fused kernel wants bools."""
    results = []
    for given in (flag, bool(flag)):
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step = _fresh(target)
        functional.adam(
            param, grad, exp_avg, exp_avg_sq, step, max_exp_avg_sq,
            lr=1e-2, amsgrad=given, maximize=given, decoupled_weight_decay=given, backend=target.backend,
        )
        results.append((param, exp_avg, exp_avg_sq, max_exp_avg_sq, step))
    for actual, expected in zip(*results):
        assert torch.equal(actual, expected)


def _share_memory(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step):
    return dict(param=param, grad=exp_avg, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def _overlapping_moments(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step):
    both = torch.zeros(param.numel() + 5, device=param.device)
    return dict(param=param, grad=grad, exp_avg=both[:-5], exp_avg_sq=both[5:])


def _float8_moments(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step):
    return dict(param=param, grad=grad, exp_avg=exp_avg.to(torch.float8_e4m3fn), exp_avg_sq=exp_avg_sq)


def _inference_moments(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step):
    with torch.inference_mode():
        exp_avg_sq = exp_avg_sq.clone()
    return dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def _negated_param(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step):
    # The values of ``param`` held as negated bytes: a kernel that wrote the bytes as values
    # would flip the parameter's sign.
    return dict(param=torch._neg_view(-param), grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def _negated_second_moment(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step):
    return dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=torch._neg_view(-exp_avg_sq))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (_negated_param, ValueError, "pending negation"),
        (_negated_second_moment, ValueError, "pending negation"),
        (_share_memory, ValueError, "share memory"),
        (_overlapping_moments, ValueError, "share memory"),
        (_float8_moments, ValueError, "float16, bfloat16, float32 or float64"),
        (_inference_moments, RuntimeError, "inference tensor"),
    ],
    ids=["negated param", "negated exp_avg_sq", "grad is exp_avg", "overlapping moments", "float8 moments",
         "inference-mode moments"],
)
def test_inputs_neither_backend_can_update_are_refused_before_anything_changes(target, make, error, message):
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step = _fresh(target)
    given = make(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step)
    before = {name: t.clone() for name, t in given.items()}
    with pytest.raises(error, match=message):
        functional.adam(**given, step=step, lr=1e-2, backend=target.backend)
    assert float(step) == 3.0
    for name, tensor in given.items():
        assert torch.equal(tensor.float(), before[name].float()), name


@pytest.mark.parametrize("wrapped", ["param", "exp_avg_sq"])
def test_a_torch_dispatch_subclass_is_updated_through_it_by_torch_and_refused_by_the_kernel(target, wrapped):
    """A wrapper subclass keeps its values elsewhere: torch's fused kernel reaches them through
    its ``__torch_dispatch__``, the Triton kernel cannot, and says so before anything changes
    (it raised torch's "invalid python storage" error from inside the launcher, before)."""
    generator = torch.Generator().manual_seed(3)
    n = 3000
    plain = {"param": torch.randn(n, generator=generator), "grad": torch.randn(n, generator=generator),
             "exp_avg": torch.randn(n, generator=generator), "exp_avg_sq": torch.rand(n, generator=generator)}
    given = {name: t.clone().to(target.device) for name, t in plain.items()}
    given[wrapped] = Wrapped(given[wrapped])
    step = torch.full((1,), 2.0, device=target.device)
    hyper = dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    if target.backend == "triton":
        with pytest.raises(TypeError, match=f"{wrapped} is a Wrapped, a tensor subclass with __torch_dispatch__"):
            functional.adam(**given, step=step, backend="triton", **hyper)
        assert float(step) == 2.0 and torch.equal(given[wrapped].values.cpu(), plain[wrapped])
        return
    functional.adam(**given, step=step, backend=target.backend, **hyper)
    reference = [plain["param"], plain["grad"], plain["exp_avg"], plain["exp_avg_sq"]]
    _single_tensor_adam(
        [reference[0]], [reference[1]], [reference[2]], [reference[3]], [], [torch.tensor(2.0)], None, None,
        amsgrad=False, has_complex=False, maximize=False, capturable=False, differentiable=False,
        decoupled_weight_decay=False, **hyper,
    )
    given[wrapped] = given[wrapped].values
    for name, expected in zip(("param", "grad", "exp_avg", "exp_avg_sq"), reference):
        torch.testing.assert_close(given[name].cpu(), expected, rtol=1e-5, atol=1e-6)
    assert float(step) == 3.0


def test_a_nan_step_count_gives_nan_as_torch(target):
    param, grad, exp_avg, exp_avg_sq, _, step = _fresh(target)
    step.fill_(float("nan"))
    functional.adam(param, grad, exp_avg, exp_avg_sq, step, lr=1e-2, backend=target.backend)
    assert torch.isnan(param).all()


def test_a_negative_step_count_raises_before_anything_changes():
    """torch's functional adam raises too (its bias correction divides by zero). Checked on
    the CPU only, where reading the count does not wait for a device."""
    generator = torch.Generator().manual_seed(0)
    param, grad, exp_avg, exp_avg_sq = (torch.rand(33, generator=generator) for _ in range(4))
    step = torch.zeros(1)
    before = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
    step.fill_(-1.0)
    for backend in ("torch", "triton"):  # (raised before the backend is looked at)
        with pytest.raises(ValueError, match=">= 0, got -1.0"):
            functional.adam(param, grad, exp_avg, exp_avg_sq, step, lr=1e-2, backend=backend)
    assert float(step) == -1.0
    assert all(torch.equal(t, b) for t, b in zip((param, exp_avg, exp_avg_sq), before))


@pytest.mark.parametrize("device", ["meta", "sparse"])
def test_tensors_without_dense_values_are_named_as_such(device):
    """Not as a shape, contiguity or aliasing problem, which the later checks would report."""
    dense = [torch.rand(8) for _ in range(4)]
    if device == "meta":
        given, message = [t.to("meta") for t in dense] + [torch.zeros(1, device="meta")], "param is on the meta device"
    else:
        given, message = [dense[0], dense[1].to_sparse(), dense[2], dense[3], torch.zeros(1)], "grad must be a dense"
    with pytest.raises(ValueError, match=message):
        functional.adam(*given, lr=1e-3, backend="torch")
