"""Half precision: bf16/fp16 parameters, master weights, state dtype, stochastic rounding."""

import copy
import io

import numpy as np
import pytest
import torch
from helpers import OddModel, train

import adam_triton

BF16 = torch.bfloat16


def _bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The gap from each bfloat16 value to the next one away from zero."""
    values = values.to(BF16)
    bits = values.view(torch.int16)
    up = (bits + 1).view(BF16).float()
    return (up - values.float()).abs()


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _random_state(shapes, generator, dtype):
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_bfloat16_parameters_agree_with_torch_fused_to_one_ulp(target, amsgrad):
    """One step from equal state, repeated from fresh random states: within one bfloat16
    unit in the last place of torch.optim.AdamW(fused=True)."""
    shapes = [(1,), (17,), (1025,), (3, 333)]
    generator = torch.Generator().manual_seed(0)
    for step_count in (0, 5):
        params = [torch.nn.Parameter(t.to(target.device)) for t in _random_state(shapes, generator, BF16)]
        reference = [torch.nn.Parameter(p.detach().clone().cpu()) for p in params]
        kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
        ours = adam_triton.AdamW(params, backend=target.backend, **kwargs)
        theirs = torch.optim.AdamW(reference, fused=True, **kwargs)
        grads = _random_state(shapes, generator, BF16)
        for p, q, g in zip(params, reference, grads):
            p.grad, q.grad = g.to(target.device), g.clone()
        ours.step()
        theirs.step()
        # Give both the same non-trivial state, then take the step under test.
        for p, q in zip(params, reference):
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                values = (torch.rand(p.shape, generator=generator) * 0.1).to(BF16)
                ours.state[p][key].copy_(values)
                theirs.state[q][key].copy_(values)
            ours.state[p]["step"].fill_(step_count + 1)
            theirs.state[q]["step"].fill_(step_count + 1)
            q.data.copy_(p.data.cpu())
        grads = _random_state(shapes, generator, BF16)
        for p, q, g in zip(params, reference, grads):
            p.grad, q.grad = g.to(target.device), g.clone()
        ours.step()
        theirs.step()
        for p, q in zip(params, reference):
            assert p.dtype == BF16 and ours.state[p]["exp_avg"].dtype == BF16
            difference = (p.detach().cpu().float() - q.detach().float()).abs()
            assert (difference <= _bf16_ulp(q.detach())).all(), difference.max()


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("state_dtype", [None, BF16])
def test_master_weights_make_a_bfloat16_model_follow_float32_adam(target, state_dtype, amsgrad):
    """The masters (and the moments) follow torch's float32 AdamW fed with the model's own
    gradients, and the model's parameters are exactly the masters rounded to nearest."""
    model = OddModel().to(target.device, BF16)
    masters = [torch.nn.Parameter(p.detach().float().cpu()) for p in model.parameters()]
    ours = adam_triton.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend=target.backend,
                             master_weights=True, state_dtype=state_dtype, amsgrad=amsgrad)
    reference = torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(8, generator=generator).to(target.device, BF16)
        ours.zero_grad()
        model(x).backward()
        for p, master in zip(model.parameters(), masters):
            master.grad = p.grad.detach().float().cpu()
        ours.step()
        reference.step()
    for p, master in zip(model.parameters(), masters):
        state = ours.state[p]
        assert state["master_param"].dtype == torch.float32
        assert state["exp_avg"].dtype == (state_dtype or torch.float32)
        assert torch.equal(p.detach(), state["master_param"].to(BF16)), "parameter != master rounded"
        tolerance = dict(rtol=1e-5, atol=1e-6) if state_dtype is None else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(state["master_param"].cpu(), master.detach(), **tolerance)
        moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        assert set(state) == set(reference.state[master]) | {"master_param"}
        for key in moments:
            expected = reference.state[master][key]
            scale = float(expected.abs().max()) * (1e-5 if state_dtype is None else 1e-2)
            torch.testing.assert_close(state[key].cpu().float(), expected, rtol=tolerance["rtol"], atol=scale)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(master_weights=True, state_dtype=BF16), id="masters, bf16 states"),
        # The random bits are keyed by the seed and the step count, both in the checkpoint.
        pytest.param(
            dict(master_weights=True, state_dtype=BF16, stochastic_rounding=True, stochastic_rounding_seed=5),
            id="masters, bf16 states at random",
        ),
        pytest.param(dict(stochastic_rounding=True, stochastic_rounding_seed=5), id="bf16 at random"),
    ],
)
@pytest.mark.parametrize("optimizer_first", [False, True], ids=["model loaded first", "optimizer loaded first"])
def test_masters_and_bfloat16_states_survive_save_and_load_bit_exactly(target, optimizer_first, options):
    kwargs = dict(lr=1e-2, backend=target.backend, **options)
    model = OddModel().to(target.device, BF16)
    straight_model = copy.deepcopy(model)
    optimizer = adam_triton.AdamW(model.parameters(), **kwargs)
    straight = adam_triton.AdamW(straight_model.parameters(), **kwargs)
    for m, o in ((model, optimizer), (straight_model, straight)):
        train(m, o, steps=3)
    saved = _roundtrip(optimizer.state_dict())
    saved_model = _roundtrip(model.state_dict())
    if options.get("master_weights"):
        assert saved["state"][0]["master_param"].dtype == torch.float32
    assert saved["state"][0]["exp_avg"].dtype == BF16
    assert set(saved["param_groups"][0]) == set(torch.optim.AdamW(OddModel().parameters()).state_dict()["param_groups"][0])

    resumed_model = OddModel(seed=9).to(target.device, BF16)
    resumed = adam_triton.AdamW(resumed_model.parameters(), **kwargs)
    if optimizer_first:  # the checkpoint's masters must survive the model load that follows
        resumed.load_state_dict(saved)
        resumed_model.load_state_dict(saved_model)
    else:
        resumed_model.load_state_dict(saved_model)
        resumed.load_state_dict(saved)
    for m, o in ((resumed_model, resumed), (straight_model, straight)):
        train(m, o, steps=3, seed=4)
    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        assert torch.equal(a, b)
        assert set(resumed.state[a]) == set(straight.state[b])
        for key in straight.state[b]:
            assert torch.equal(resumed.state[a][key], straight.state[b][key]), key


@pytest.mark.parametrize("optimizer_first", [False, True], ids=["model loaded first", "optimizer loaded first"])
def test_a_checkpoint_whose_masters_are_older_than_its_weights_resumes_onto_the_weights(target, optimizer_first):
    """Weights written outside the optimizer (loaded from elsewhere, averaged) after its last
    step, then a checkpoint: its masters are the older ones. The uninterrupted run's next
    step takes the written weights; so must a run resumed from the checkpoint, whichever of
    model and optimizer it loads first."""
    kwargs = dict(lr=1e-2, backend=target.backend, master_weights=True)
    model = OddModel().to(target.device, BF16)
    optimizer = adam_triton.AdamW(model.parameters(), **kwargs)
    train(model, optimizer, steps=3)
    with torch.no_grad():
        model.weights[1].fill_(0.25)
    saved, saved_model = _roundtrip(optimizer.state_dict()), _roundtrip(model.state_dict())
    assert not torch.equal(saved["state"][1]["master_param"].to(BF16), saved_model["weights.1"])
    resumed_model = OddModel(seed=9).to(target.device, BF16)
    resumed = adam_triton.AdamW(resumed_model.parameters(), **kwargs)
    loads = [lambda: resumed.load_state_dict(saved), lambda: resumed_model.load_state_dict(saved_model)]
    for load in loads if optimizer_first else loads[::-1]:
        load()
    for m, o in ((resumed_model, resumed), (model, optimizer)):
        train(m, o, steps=2, seed=4)
    for a, b in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(resumed.state[a]["master_param"], optimizer.state[b]["master_param"])


def test_masters_kept_by_torchs_optimizer_do_not_undo_its_training(target):
    """torch's AdamW keeps our ``master_param`` entries as they were (unknown keys, cast to
    the parameter's dtype) while it trains: loading its checkpoint back must not take them
    over the weights it trained."""
    model = OddModel().to(target.device, BF16)
    ours = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, master_weights=True)
    train(model, ours, steps=2)
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2)
    theirs.load_state_dict(_roundtrip(ours.state_dict()))
    train(model, theirs, steps=3, seed=3)
    assert "master_param" in theirs.state_dict()["state"][0]
    trained_by_torch = [p.detach().clone() for p in model.parameters()]
    back = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, master_weights=True)
    back.load_state_dict(_roundtrip(theirs.state_dict()))
    model(torch.ones(8, device=target.device, dtype=BF16)).backward()
    back.step()
    for p, before in zip(model.parameters(), trained_by_torch):
        # One step of lr 1e-2 from where torch left the weights (not from the stale masters).
        assert (p.detach().float() - before.float()).abs().max() <= 1.5e-2
        assert torch.equal(back.state[p]["master_param"].to(BF16), p.detach())


def test_checkpoint_without_masters_initialises_them_and_load_casts_to_the_policy(target):
    model = OddModel().to(target.device, BF16)
    torch_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, torch_optimizer, steps=2)
    ours = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, master_weights=True, state_dtype=torch.float32)
    ours.load_state_dict(_roundtrip(torch_optimizer.state_dict()))
    for p in model.parameters():
        state = ours.state[p]
        assert torch.equal(state["master_param"], p.detach().float())
        assert state["exp_avg"].dtype == torch.float32  # the policy, not the checkpoint's bf16
        torch.testing.assert_close(state["exp_avg"], torch_optimizer.state[p]["exp_avg"].float().to(state["exp_avg"].device))


def test_parameters_written_outside_the_optimizer_reseed_their_masters(target):
    """model.load_state_dict after the optimizer exists: the loaded values must win."""
    model = OddModel().to(target.device, BF16)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, master_weights=True)
    train(model, optimizer, steps=2)
    untouched = [optimizer.state[p]["master_param"].clone() for p in model.parameters()]
    with torch.no_grad():
        model.weights[1].fill_(0.25)
    loss = model(torch.ones(8, device=target.device, dtype=BF16))
    optimizer.zero_grad()
    loss.backward()
    for p in model.parameters():
        p.grad.zero_()
    optimizer.step()
    # With zero gradients the update is tiny: the filled parameter stays near 0.25 ...
    assert (model.weights[1].float() - 0.25).abs().max() < 0.01
    # ... and the others keep their masters' precision (not re-seeded from bfloat16).
    first = optimizer.state[model.weights[2]]["master_param"]
    assert not torch.equal(untouched[2], untouched[2].to(BF16).float())
    assert not torch.equal(first, first.to(BF16).float())


def test_one_element_written_outside_the_optimizer_reseeds_only_its_master(target):
    """Writing one element of a bfloat16 parameter re-seeds that element's master; the
    rest of the parameter keeps its float32 masters, exactly as an untouched twin does."""
    model = OddModel().to(target.device, BF16)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, master_weights=True)
    train(model, optimizer, steps=3)
    twin_model, twin = copy.deepcopy((model, optimizer))
    with torch.no_grad():
        model.weights[6][0, 0] = 0.75
    for m, o in ((model, optimizer), (twin_model, twin)):
        for p in m.parameters():  # the same (zero) gradients for both: only the write differs
            p.grad = torch.zeros_like(p)
        o.step()
    masters = optimizer.state[model.weights[6]]["master_param"]
    twin_masters = twin.state[twin_model.weights[6]]["master_param"]
    assert abs(float(masters[0, 0]) - 0.75) < 0.05 and abs(float(twin_masters[0, 0]) - 0.75) > 0.05
    rest = torch.ones_like(masters, dtype=torch.bool)
    rest[0, 0] = False
    assert torch.equal(masters[rest], twin_masters[rest])
    assert not torch.equal(masters[rest], masters[rest].to(BF16).float())  # more than bfloat16 holds


@pytest.mark.parametrize("master_weights", [False, True])
def test_float16_with_default_eps_and_tiny_gradients_stays_finite_and_moves(target, master_weights):
    params = [torch.nn.Parameter(torch.ones(64, dtype=torch.float16, device=target.device))]
    optimizer = adam_triton.Adam(params, lr=1e-3, backend=target.backend, master_weights=master_weights)
    for _ in range(5):
        params[0].grad = torch.full((64,), 1e-6, dtype=torch.float16, device=target.device)
        optimizer.step()
    assert torch.isfinite(params[0]).all()
    assert (params[0] < 1).all()


def test_stochastic_rounding_is_unbiased(target):
    """Every element takes the same exact float32 update; rounded up or down at random, the
    share rounded up must match the position of the exact value between its neighbours."""
    n = 8192
    start = torch.full((n,), 1.0, dtype=BF16)
    params = [torch.nn.Parameter(start.clone().to(target.device))]
    optimizer = adam_triton.Adam(params, lr=3e-3, backend=target.backend, stochastic_rounding=True, stochastic_rounding_seed=7)
    params[0].grad = torch.full((n,), 0.5, dtype=BF16, device=target.device)
    optimizer.step()
    exact = 1.0 - 3e-3  # first Adam step moves by lr (up to eps)
    below, above = 0.99609375, 1.0  # the bfloat16 neighbours of 0.997
    values = params[0].detach().float().cpu()
    assert set(values.unique().tolist()) <= {below, above}
    share_up = (values == above).float().mean().item()
    expected = (exact - below) / (above - below)
    sigma = (expected * (1 - expected) / n) ** 0.5
    assert abs(share_up - expected) < 5 * sigma, (share_up, expected)


def _shares_match_position_between_neighbours(stored: torch.Tensor, exact: float) -> None:
    """``stored`` (bfloat16) rounded ``exact`` up or down at random: only its two neighbours
    occur, and the share rounded up matches its position between them (5 sigma)."""
    below = torch.tensor(exact).to(BF16)
    if below.float().item() > exact:
        below = (below.view(torch.int16) - 1).view(BF16)
    below = below.float().item()
    above = below + _bf16_ulp(torch.tensor(below)).item()
    values = stored.float().cpu()
    assert set(values.unique().tolist()) <= {below, above}, (exact, below, above)
    share_up = (values == above).float().mean().item()
    expected = (exact - below) / (above - below)
    sigma = (expected * (1 - expected) / values.numel()) ** 0.5
    assert 0.05 < expected < 0.95 and abs(share_up - expected) < 5 * sigma, (share_up, expected)


# Every configuration that stores bfloat16 moments: (parameter dtype, options).
_ROUNDED_MOMENTS = [
    pytest.param(BF16, dict(), id="bf16 parameters"),
    pytest.param(BF16, dict(master_weights=True, state_dtype=BF16), id="masters, bf16 states"),
    pytest.param(torch.float32, dict(state_dtype=BF16), id="fp32 parameters, bf16 states"),
]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype, options", _ROUNDED_MOMENTS)
def test_stochastic_rounding_rounds_bfloat16_moments_at_random_too(target, dtype, options, amsgrad):
    """The moments' exact float32 values (stock torch's, on a float32 copy) lie between two
    bfloat16 neighbours; each moment is rounded at random, independently of the parameter,
    and the AMSGrad maximum exactly as exp_avg_sq, so it is never below it. A model's copy
    of a master stays the master rounded to nearest; float32 parameters are not rounded."""
    n = 8192
    grad = torch.full((n,), 0.3, dtype=BF16)
    params = [torch.nn.Parameter(torch.ones(n, dtype=dtype, device=target.device))]
    optimizer = adam_triton.Adam(
        params, lr=3e-3, amsgrad=amsgrad, backend=target.backend, stochastic_rounding=True, stochastic_rounding_seed=11,
        **options,
    )
    reference_param = torch.nn.Parameter(torch.ones(n))
    reference = torch.optim.Adam([reference_param], lr=3e-3, amsgrad=amsgrad)
    params[0].grad, reference_param.grad = grad.to(target.device, dtype), grad.float()
    optimizer.step()
    reference.step()
    state, exact = optimizer.state[params[0]], reference.state[reference_param]
    for name in ("exp_avg", "exp_avg_sq"):
        assert state[name].dtype == BF16
        _shares_match_position_between_neighbours(state[name], exact[name][0].item())
    if amsgrad:
        assert torch.equal(state["max_exp_avg_sq"], state["exp_avg_sq"])
    names = ["exp_avg", "exp_avg_sq"]
    ups = [(state[name].float() > exact[name].to(target.device)).cpu() for name in names]
    if "master_param" in state:
        torch.testing.assert_close(state["master_param"].cpu(), reference_param.detach(), rtol=0, atol=0)
        assert torch.equal(params[0].detach(), state["master_param"].to(BF16))
    elif dtype == torch.float32:
        torch.testing.assert_close(params[0].detach().cpu(), reference_param.detach(), rtol=0, atol=0)
    else:
        names.append("param")
        ups.append((params[0].detach().float() > reference_param.detach().to(target.device)).cpu())
    # Independent streams: where one value rounded up says nothing of where another did (the
    # same bits would make the events nested, correlated by about 0.5 here).
    for first in range(len(ups)):
        for second in range(first + 1, len(ups)):
            correlation = torch.corrcoef(torch.stack([ups[first], ups[second]]).float())[0, 1].item()
            assert abs(correlation) < 5 / n**0.5, (names[first], names[second], correlation)


@pytest.mark.parametrize("dtype, options", _ROUNDED_MOMENTS)
def test_stochastic_rounding_lets_bfloat16_second_moments_decay_as_float32_ones(target, dtype, options):
    """At beta2 = 0.999 a step's decay of exp_avg_sq is under half a bfloat16 unit: rounded to
    nearest (stock torch on bfloat16 parameters) it never happens. Rounded at random, the
    moment follows stock torch's float32 one."""
    n, steps = 2048, 200
    generator = torch.Generator().manual_seed(5)
    hyper = dict(lr=1e-3, betas=(0.9, 0.999))
    ours_param = torch.nn.Parameter(torch.zeros(n, dtype=dtype, device=target.device))
    ours = adam_triton.Adam([ours_param], backend=target.backend, stochastic_rounding=True, **options, **hyper)
    float32_param = torch.nn.Parameter(torch.zeros(n))
    float32 = torch.optim.Adam([float32_param], **hyper)
    bf16_param = torch.nn.Parameter(torch.zeros(n, dtype=BF16))
    bf16 = torch.optim.Adam([bf16_param], **hyper)
    for step in range(steps):
        scale = 1.0 if step == 0 else 0.01  # one large gradient, then the moment should decay
        grad = (scale * torch.randn(n, generator=generator)).to(BF16)
        ours_param.grad, float32_param.grad, bf16_param.grad = grad.to(target.device, dtype), grad.float(), grad.clone()
        for optimizer in (ours, float32, bf16):
            optimizer.step()

    def mean(optimizer, param):
        return optimizer.state[param]["exp_avg_sq"].double().mean().item()

    expected = mean(float32, float32_param)
    assert mean(bf16, bf16_param) / expected > 1.15  # the ratchet this guards against
    assert mean(ours, ours_param) / expected == pytest.approx(1.0, abs=0.01)


def test_pure_pytorch_stochastic_rounding_adds_sixteen_random_bits_and_keeps_nans():
    """The CPU backend's rounding against integer arithmetic on the float32 bits: add the 16
    bits, drop the low half. Nans whose payload would carry into the sign bit (or lies only in
    the low half) stay nans; infinities, zeros and the largest floats keep their signs."""
    from adam_triton._backends import _round_stochastically_into

    special = np.array(
        [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFF80FFFF, 0x7FC00000,  # nans
         0x7F800000, 0xFF800000, 0x00000000, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001],
        dtype=np.uint32,
    )
    generator = torch.Generator().manual_seed(11)
    ordinary = torch.randn(4096, generator=generator) * 10.0 ** torch.randint(-30, 30, (4096,), generator=generator)
    values = torch.cat([torch.from_numpy(special.view(np.int32)).view(torch.float32), ordinary])
    random_bits = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, generator=generator)
    random_bits[: len(special)] = 0xFFFF  # the largest carry

    sums = values.view(torch.int32).numpy().view(np.uint32).astype(np.uint64) + random_bits.numpy().astype(np.uint64)
    expected = sums >> 16
    expected = torch.from_numpy((expected & 0xFFFF).astype(np.uint16).view(np.int16)).view(BF16)
    is_nan = torch.isnan(values)
    stored = torch.empty(values.shape, dtype=BF16)
    _round_stochastically_into(stored, values.clone(), random_bits.clone())

    assert torch.equal(torch.isnan(stored), is_nan)
    assert torch.equal(stored[~is_nan].view(torch.int16), expected[~is_nan].view(torch.int16))
    assert stored[5:11].float().tolist() == [float("inf"), float("-inf"), 0.0, -0.0, float("inf"), float("-inf")]
    assert torch.signbit(stored[7:9]).tolist() == [False, True]


def test_float64_parameters_with_bfloat16_states_round_the_states_at_random(target):
    """float64 parameters keep float64 updates (torch's, to float64 rounding); their bfloat16
    moments are torch's float64 moments, through float32, rounded down or up at random."""
    generator = torch.Generator().manual_seed(21)
    start = torch.randn(1000, generator=generator, dtype=torch.float64)
    gradient = torch.randn(1000, generator=generator, dtype=torch.float64)
    ours_param = torch.nn.Parameter(start.clone().to(target.device))
    reference_param = torch.nn.Parameter(start.clone())
    ours = adam_triton.AdamW(
        [ours_param], lr=1e-2, backend=target.backend, state_dtype=BF16, stochastic_rounding=True
    )
    reference = torch.optim.AdamW([reference_param], lr=1e-2)
    ours_param.grad, reference_param.grad = gradient.clone().to(target.device), gradient.clone()
    ours.step()
    reference.step()

    torch.testing.assert_close(ours_param.detach().cpu(), reference_param.detach(), rtol=1e-13, atol=1e-15)
    for key in ("exp_avg", "exp_avg_sq"):
        exact = reference.state[reference_param][key].float()
        toward_zero = (exact.view(torch.int32) & -65536).view(torch.float32)
        away_from_zero = ((exact.view(torch.int32) & -65536) + 65536).view(torch.float32)
        assert ours.state[ours_param][key].dtype == BF16
        stored = ours.state[ours_param][key].cpu().float()
        assert ((stored == toward_zero) | (stored == away_from_zero)).all(), key
        # Rounded to nearest, no element in the lower half of its gap would go away from zero.
        position = (exact - toward_zero).abs() / (away_from_zero - toward_zero).abs()
        for half in (position < 0.5, position >= 0.5):
            share_away = (stored[half] == away_from_zero[half]).float().mean().item()
            expected = position[half].mean().item()  # about 0.25 and 0.75
            assert abs(share_away - expected) < 0.1, (key, share_away, expected)


def test_stochastic_rounding_keeps_small_updates_that_round_to_nearest_loses(target):
    n = 4096
    outcomes = {}
    for rounding in (False, True):
        params = [torch.nn.Parameter(torch.ones(n, dtype=BF16, device=target.device))]
        optimizer = adam_triton.Adam(params, lr=1e-4, backend=target.backend, stochastic_rounding=rounding)
        for _ in range(20):
            params[0].grad = torch.ones(n, dtype=BF16, device=target.device)
            optimizer.step()
        outcomes[rounding] = params[0].detach().float().mean().item()
    assert outcomes[False] == 1.0  # each 1e-4 step is under half a bf16 ulp (0.0039): lost
    assert abs(outcomes[True] - (1.0 - 20 * 1e-4)) < 3e-4  # in expectation, kept


def test_stochastic_rounding_is_reproducible_from_its_seed(target):
    results = []
    for seed in (3, np.int64(3), 4):  # (a numpy integer, as configuration code passes, is that int)
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 2048, dtype=BF16, device=target.device))]
        optimizer = adam_triton.Adam(params, lr=1e-3, backend=target.backend, stochastic_rounding=True, stochastic_rounding_seed=seed)
        for _ in range(2):
            params[0].grad = torch.ones(2048, dtype=BF16, device=target.device)
            optimizer.step()
        results.append(params[0].detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(state_dtype=torch.int8), "state_dtype"),
        (dict(stochastic_rounding_seed=-1), "stochastic_rounding_seed"),
        (dict(stochastic_rounding_seed=2**62), "stochastic_rounding_seed"),
        (dict(stochastic_rounding_seed=1.5), "stochastic_rounding_seed"),
        (dict(stochastic_rounding_seed=True), "stochastic_rounding_seed"),
        # a configuration file's string would be true whatever it says
        (dict(master_weights="False"), "master_weights must be True or False"),
        (dict(stochastic_rounding=1), "stochastic_rounding must be True or False"),
    ],
)
def test_bad_precision_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adam_triton.AdamW([torch.nn.Parameter(torch.zeros(2, dtype=BF16))], **kwargs)


def test_a_state_dtype_for_complex_parameters_is_refused_and_a_group_of_their_own_trains_them(target):
    """Complex parameters keep complex state of their own precision (torch's Adam updates
    them through real views): another ``state_dtype`` in their group is refused before
    anything moves, and the way out the message gives trains them as torch does, beside
    real parameters whose moments are bfloat16."""
    generator = torch.Generator().manual_seed(6)
    real = torch.nn.Parameter(torch.randn(37, generator=generator).to(target.device, BF16))
    wave = torch.nn.Parameter(torch.randn(29, dtype=torch.complex64, generator=generator).to(target.device))
    address = wave.data_ptr()
    with pytest.raises(ValueError, match=r'state_dtype=torch.bfloat16 cannot apply to a complex parameter \(param group 0, shape \(29,\)\).*"state_dtype": None'):
        adam_triton.AdamW([real, wave], backend=target.backend, state_dtype=BF16)
    assert wave.data_ptr() == address and real.grad is None

    reference_wave = torch.nn.Parameter(wave.detach().clone())
    ours = adam_triton.AdamW(
        [{"params": [real]}, {"params": [wave], "state_dtype": None}], lr=1e-2, backend=target.backend, state_dtype=BF16
    )
    reference = torch.optim.AdamW([reference_wave], lr=1e-2)
    for _ in range(3):
        target_values = torch.randn(29, dtype=torch.complex64, generator=generator).to(target.device)
        for optimizer, param in ((ours, wave), (reference, reference_wave)):
            optimizer.zero_grad()
            ((param - target_values).abs() ** 2).sum().backward()
            if optimizer is ours:
                real.grad = torch.randn(37, generator=generator).to(target.device, BF16)
            optimizer.step()
    assert ours.state[wave]["exp_avg"].dtype == torch.complex64
    assert ours.state[real]["exp_avg"].dtype == BF16
    torch.testing.assert_close(wave.detach(), reference_wave.detach())


def test_master_weights_leave_float32_parameters_without_a_copy(target):
    """Masters exist for 16-bit parameters only: float32 ones are their own master."""
    model = OddModel().to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), backend=target.backend, master_weights=True)
    train(model, optimizer, steps=1)
    (buffer,) = optimizer._engine.buffers
    assert buffer.master is None
    assert all("master_param" not in optimizer.state[p] for p in model.parameters())


def test_frozen_bfloat16_parameters_get_no_masters_until_they_train(target):
    """Fine-tuning a bfloat16 model with master weights: the frozen part costs no float32
    masters (4 bytes per parameter, twice the part itself); unfrozen, it gets them, taken
    from its parameters, and follows float32 AdamW like the rest."""
    model = OddModel().to(target.device, BF16)
    frozen = list(model.weights)[2:]
    for p in frozen:
        p.requires_grad_(False)
    addresses = [p.data_ptr() for p in frozen]
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, master_weights=True)
    train(model, optimizer, steps=2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    masters = sum(b.master.numel() for b in optimizer._engine.buffers if b.master is not None)
    assert masters <= trainable + 64 * len(list(model.parameters()))  # segments padded to 128 bytes
    # Nor room for the frozen ones in a buffer (the CPU backend's working copies included):
    # they stay where they are.
    assert [p.data_ptr() for p in frozen] == addresses
    held = sum(b.param.numel() for b in optimizer._engine.buffers)
    assert held <= trainable + 64 * (len(list(model.parameters())) + 1)
    assert all(p not in optimizer.state for p in frozen)

    before = [p.detach().clone() for p in frozen]
    for p in frozen:
        p.requires_grad_(True)
    optimizer.zero_grad()
    model(torch.randn(8, generator=torch.Generator().manual_seed(2)).to(target.device, BF16)).backward()
    grads = [p.grad.detach().float() for p in frozen]
    optimizer.step()
    for p, start, grad in zip(frozen, before, grads):
        # One AdamW step from fresh state: m_hat = g and v_hat = g * g.
        g = grad.double()
        expected = start.double() * (1 - 1e-2 * 1e-2) - 1e-2 * g / (g.abs() + 1e-8)
        master = optimizer.state[p]["master_param"]
        torch.testing.assert_close(master.double(), expected, rtol=0, atol=1e-6)
        assert torch.equal(p.detach(), master.to(BF16))


def test_stochastic_rounding_of_float16_is_refused():
    with pytest.raises(ValueError, match="bfloat16"):
        adam_triton.AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))], stochastic_rounding=True)


def test_bfloat16_with_masters_and_bfloat16_states_reaches_the_float32_loss(target):
    """The 20-bytes-per-parameter configuration trains as well as torch's float32 AdamW:
    final loss (evaluated in float32) within 1% on a small regression run."""
    torch.manual_seed(0)
    inputs = torch.randn(128, 16)
    targets = torch.sin(inputs @ torch.randn(16, 1)) + 0.1 * torch.randn(128, 1)

    def run(dtype, make_optimizer):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(target.device, dtype)
        optimizer = make_optimizer(model.parameters())
        x, y = inputs.to(target.device, dtype), targets.to(target.device, dtype)
        for _ in range(120):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            optimizer.step()
        with torch.no_grad():
            model = model.float()
            return torch.nn.functional.mse_loss(model(inputs.to(target.device)), targets.to(target.device)).item()

    reference = run(torch.float32, lambda params: torch.optim.AdamW(params, lr=3e-3))
    compact = run(
        BF16,
        lambda params: adam_triton.AdamW(
            params, lr=3e-3, backend=target.backend, master_weights=True, state_dtype=BF16
        ),
    )
    assert abs(compact - reference) <= 0.01 * reference, (compact, reference)


def _drop_one(optimizer, param):
    params = optimizer.param_groups[0]["params"]
    params[:] = [p for p in params if p is not param]  # remove() compares values


@pytest.mark.parametrize("rebuild", ["add_param_group", "another parameter removed", "removed, written, added back"])
def test_parameters_written_before_the_buffers_are_rebuilt_reseed_their_masters(target, rebuild):
    """A write to a parameter (model.load_state_dict, say) is taken into its master at the
    next step; when the buffers are rebuilt before that step, the rebuilt masters must not
    bring the old values back."""
    model = OddModel().to(target.device, BF16)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, master_weights=True)
    train(model, optimizer, steps=3)
    if rebuild == "removed, written, added back":
        _drop_one(optimizer, model.weights[1])
        train(model, optimizer, steps=1, seed=2)  # the rebuild without it
    model.load_state_dict({name: torch.full_like(value, 0.5) for name, value in model.state_dict().items()})
    if rebuild == "add_param_group":
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=BF16, device=target.device))]})
    elif rebuild == "another parameter removed":
        _drop_one(optimizer, model.weights[0])
    else:
        optimizer.add_param_group({"params": [model.weights[1]]})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a step that moves nothing but by weight decay and momentum
    optimizer.step()
    for p in (model.weights[1], model.weights[2]):
        assert (p.float() - 0.5).abs().max() < 0.02
        assert (optimizer.state[p]["master_param"] - 0.5).abs().max() < 0.02


def test_loading_a_checkpoint_keeps_or_takes_each_groups_precision(target):
    """A checkpoint without precision options (torch's) leaves each group's as they are; one
    with them changes them, and its masters are the ones the run continues from."""
    def build(model, **group_options):
        return adam_triton.AdamW([{"params": model.parameters(), **group_options}], lr=1e-2, backend=target.backend)

    model = OddModel().to(target.device, BF16)
    torch_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, torch_optimizer, steps=2)
    ours = build(model, master_weights=True, state_dtype=torch.float32)
    ours.load_state_dict(_roundtrip(torch_optimizer.state_dict()))
    train(model, ours, steps=1, seed=2)
    assert ours.param_groups[0]["master_weights"] is True
    assert all(ours.state[p]["master_param"].dtype == torch.float32 for p in model.parameters())
    assert all(ours.state[p]["exp_avg"].dtype == torch.float32 for p in model.parameters())

    straight_model = OddModel().to(target.device, BF16)
    straight = build(straight_model, master_weights=True)
    train(straight_model, straight, steps=3)
    resumed_model = copy.deepcopy(straight_model)
    resumed = build(resumed_model)  # without the option: the checkpoint brings it
    resumed.load_state_dict(_roundtrip(straight.state_dict()))
    for m, o in ((straight_model, straight), (resumed_model, resumed)):
        train(m, o, steps=2, seed=3)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(straight.state[a]["master_param"], resumed.state[b]["master_param"])


def _only_plain_values(value) -> bool:
    """What torch's distributed checkpointing takes in a state dict (full, or offloaded to
    the CPU): tensors, numbers, strings, None, and lists, tuples and dicts of them."""
    if isinstance(value, dict):
        return all(map(_only_plain_values, value.values()))
    if isinstance(value, (list, tuple)):
        return all(map(_only_plain_values, value))
    return value is None or isinstance(value, (torch.Tensor, int, float, str, bytes))


def test_a_groups_state_dtype_is_saved_by_name_and_loaded_back(target):
    """A group's ``state_dtype`` was saved as a ``torch.dtype``, which torch's distributed
    checkpointing refuses (``get_optimizer_state_dict`` with ``full_state_dict`` or
    ``cpu_offload``: "Unexpected value type"). It is saved by name and loaded back."""
    straight_model = OddModel().to(target.device)
    resumed_model = copy.deepcopy(straight_model)
    straight = adam_triton.AdamW(
        [{"params": straight_model.parameters(), "state_dtype": BF16}], lr=1e-2, backend=target.backend
    )
    train(straight_model, straight, steps=2)
    saved = straight.state_dict()
    assert saved["param_groups"][0]["state_dtype"] == "bfloat16" and _only_plain_values(saved)
    assert straight.param_groups[0]["state_dtype"] is BF16
    resumed = adam_triton.AdamW(resumed_model.parameters(), lr=1e-2, backend=target.backend)
    resumed_model.load_state_dict(straight_model.state_dict())
    bad = _roundtrip(saved)
    bad["param_groups"][0]["state_dtype"] = "bfloat17"
    with pytest.raises(ValueError, match="'bfloat17' is not the name of a dtype"):
        resumed.load_state_dict(bad)
    resumed.load_state_dict(_roundtrip(saved))
    assert resumed.param_groups[0]["state_dtype"] is BF16
    for m, o in ((straight_model, straight), (resumed_model, resumed)):
        train(m, o, steps=2, seed=3)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert resumed.state[b]["exp_avg"].dtype == BF16
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(state_dtype=torch.int8), "state_dtype"),
        (dict(stochastic_rounding_seed=-5), "seed"),
        (dict(master_weights="no"), "master_weights must be True or False"),
    ],
    ids=["integer states", "negative seed", "master_weights a string"],
)
def test_precision_options_edited_into_a_group_are_checked_at_the_next_step(target, edit, message):
    """Refused as the constructor refuses them, even where the edit would leave every
    parameter in its buffer (a seed matters only to stochastic rounding, which these float32
    states do not have): accepted, they made the optimizer's own checkpoint unloadable."""
    model = OddModel().to(target.device, BF16)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, master_weights=True)
    train(model, optimizer, steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[0].update(edit)
    model(torch.ones(8, device=target.device, dtype=BF16)).backward()
    with pytest.raises(ValueError, match=message):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for key in edit:
        del optimizer.param_groups[0][key]
    optimizer.step()
    twin = adam_triton.AdamW(OddModel().to(target.device, BF16).parameters(), lr=1e-2, backend=target.backend, master_weights=True)
    twin.load_state_dict(optimizer.state_dict())
