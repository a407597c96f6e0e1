"""The functional entry point on flat tensors the caller owns."""

import pytest
import torch
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
