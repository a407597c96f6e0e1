"""GradScaler, capturable steps and torch.compile."""

import copy

import pytest
import torch
from helpers import OddModel, assert_close_params

import adam_triton


def _scaled_training(model, optimizer, scaler, steps, inf_at=(), clip=False, before_step=None):
    generator = torch.Generator().manual_seed(3)
    device = next(model.parameters()).device
    skipped = []
    for step in range(steps):
        x = torch.randn(8, generator=generator).to(device)
        optimizer.zero_grad()
        scaler.scale(model(x)).backward()
        if step in inf_at:
            next(model.parameters()).grad[0] = float("inf")
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        if before_step is not None:
            before_step(scaler)
        scaler.step(optimizer)
        scaler.update()
        if hasattr(optimizer, "last_step_skipped"):
            skipped.append(bool(optimizer.last_step_skipped))
    return skipped


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused=True"])
@pytest.mark.parametrize("clip", [False, True], ids=["scaler-unscales", "unscale_-then-clip"])
def test_grad_scaler_matches_torch_and_skips_infs(target, clip, fused):
    """GradScaler drives ours as it drives torch's optimizer with the same ``fused`` flag: by
    default it unscales first and does not call ``step()`` on an inf; with ``fused=True`` it
    hands the step its scale and inf check, and the update unscales and skips itself."""
    device_type = target.device
    ours_model = OddModel().to(target.device)
    reference_model = copy.deepcopy(ours_model)
    ours = adam_triton.AdamW(ours_model.parameters(), lr=1e-2, backend=target.backend, fused=fused)
    reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2, fused=fused)
    assert ours._step_supports_amp_scaling == getattr(reference, "_step_supports_amp_scaling", False)
    calls = {id(ours): 0, id(reference): 0}
    for optimizer in (ours, reference):
        optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.__setitem__(id(opt), calls[id(opt)] + 1))
    ours_scaler = torch.amp.GradScaler(device_type, init_scale=2.0**12, growth_interval=2)
    reference_scaler = torch.amp.GradScaler(device_type, init_scale=2.0**12, growth_interval=2)
    skipped = _scaled_training(ours_model, ours, ours_scaler, 7, inf_at=(1, 4), clip=clip)
    _scaled_training(reference_model, reference, reference_scaler, 7, inf_at=(1, 4), clip=clip)
    assert calls[id(ours)] == calls[id(reference)] == (7 if fused else 5)
    assert skipped == ([False, True, False, False, True, False, False] if fused else [False] * 7)
    assert ours_scaler.get_scale() == reference_scaler.get_scale()
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        assert float(ours.state[a]["step"]) == float(reference.state[b]["step"]) == 5
    assert_close_params(ours_model, reference_model)
    # Unscaled after the step, by GradScaler.unscale_ or (fused) by the update, as in torch.
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("master_weights", [False, True], ids=["float16 states", "float32 masters"])
def test_a_float16_model_with_grad_scaler_needs_fused_as_under_torch(target, master_weights):
    """GradScaler refuses to unscale float16 gradients itself: torch's default AdamW cannot
    train a float16 model with it, its fused AdamW can, and so with ours. With float32
    masters the update follows torch's float32 AdamW fed the unscaled gradients."""
    models = [OddModel().to(target.device, torch.float16) for _ in range(2)]
    for model, make in zip(
        models, (lambda ps: adam_triton.AdamW(ps, lr=1e-2, backend=target.backend, master_weights=master_weights),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
    ):
        with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
            _scaled_training(model, make(model.parameters()), torch.amp.GradScaler(target.device), 1)
    ours_model = OddModel().to(target.device, torch.float16)
    reference_model = copy.deepcopy(ours_model)
    ours = adam_triton.AdamW(
        ours_model.parameters(), lr=1e-2, backend=target.backend, master_weights=master_weights, fused=True
    )
    reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2, fused=True)
    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in ours_model.parameters()]
    unscaled = []  # per step, the gradients the update must see, or None where it must skip

    def record_unscaled(scaler):
        scale = scaler.get_scale()  # a power of two: dividing by it is exact
        gradients = [p.grad.float() / scale for p in ours_model.parameters()]
        unscaled.append(gradients if all(g.isfinite().all() for g in gradients) else None)

    scalers = [torch.amp.GradScaler(target.device, init_scale=2.0**8, growth_interval=2) for _ in range(2)]
    skipped = _scaled_training(ours_model, ours, scalers[0], 5, inf_at=(2,), before_step=record_unscaled)
    _scaled_training(reference_model, reference, scalers[1], 5, inf_at=(2,))
    assert skipped == [False, False, True, False, False]
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        assert float(ours.state[a]["step"]) == float(reference.state[b]["step"]) == 4
    if not master_weights:  # the same float16 arithmetic as torch's fused kernel
        assert_close_params(ours_model, reference_model, rtol=1e-3, atol=1e-4)
        return
    float32_reference = torch.optim.AdamW(masters, lr=1e-2)
    for gradients in filter(None, unscaled):
        for master, gradient in zip(masters, gradients):
            master.grad = gradient
        float32_reference.step()
    for p, master, gradient in zip(ours_model.parameters(), masters, unscaled[-1]):
        torch.testing.assert_close(ours.state[p]["master_param"], master.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), ours.state[p]["master_param"].half()), "parameter != master rounded"
        assert torch.equal(p.grad, gradient.half()), "gradient not left unscaled, as torch's fused kernel leaves it"


def test_grad_scaler_leaves_unscaled_gradients_with_compact_states_too(target):
    """bfloat16 states take another path on the CPU backend (float32 working copies); the
    gradients must still come back unscaled, as torch's fused kernel leaves them."""
    ours_model = OddModel().to(target.device)
    reference_model = copy.deepcopy(ours_model)
    ours = adam_triton.AdamW(
        ours_model.parameters(), lr=1e-2, backend=target.backend, state_dtype=torch.bfloat16, fused=True
    )
    reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2, fused=True)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        _scaled_training(model, optimizer, torch.amp.GradScaler(target.device, init_scale=2.0**12), 2)
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert_close_params(ours_model, reference_model, rtol=2e-2, atol=2e-3)


def test_grad_scaler_leaves_a_gradient_with_other_strides_unscaled_too(target):
    """A gradient laid out otherwise than its parameter (column-major, as a hook may return
    it) is copied into place for the update; with the scale handed to the step, the user's
    gradient must still come back unscaled, as torch leaves it. The reference is torch's
    for-loop: its CPU fused kernel misreads such a gradient (README, Backends)."""
    results = []
    for make in (
        lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=False),
        lambda params: adam_triton.AdamW(params, lr=1e-2, fused=True, backend=target.backend),
    ):
        generator = torch.Generator().manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 8, generator=generator).to(target.device))
        optimizer = make([weight])
        scaler = torch.amp.GradScaler(target.device, init_scale=2.0**10)
        x = torch.randn(3, 8, generator=generator).to(target.device)
        scaler.scale((x @ weight.t()).pow(2).sum()).backward()
        weight.grad = weight.grad.t().contiguous().t()
        assert weight.grad.stride() == (1, 4)  # the case the test is for
        scaler.step(optimizer)
        scaler.update()
        results.append((weight.detach().clone(), weight.grad.clone()))
    (reference_weight, reference_grad), (weight, grad) = results
    assert reference_grad.abs().max() < 100  # unscaled (scaled, it would be about 2**10 larger)
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=0)
    torch.testing.assert_close(weight, reference_weight, rtol=1e-6, atol=1e-7)


def test_a_skipped_step_changes_nothing(target):
    model = OddModel().to(target.device)
    optimizer = adam_triton.Adam(model.parameters(), lr=1e-2, backend=target.backend, amsgrad=True, fused=True)
    scaler = torch.amp.GradScaler(target.device, init_scale=2.0**8)
    _scaled_training(model, optimizer, scaler, 2)
    before = copy.deepcopy(optimizer.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    _scaled_training(model, optimizer, scaler, 1, inf_at=(0,))
    assert bool(optimizer.last_step_skipped)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = optimizer.state_dict()
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, after["state"][index][key]), key


def test_last_step_skipped_without_a_scaler_is_false():
    model = OddModel()
    optimizer = adam_triton.Adam(model.parameters())
    assert not bool(optimizer.last_step_skipped)
    model(torch.ones(8)).backward()
    optimizer.step()
    assert not bool(optimizer.last_step_skipped)


def test_capturable_with_tensor_lr_follows_a_scheduler_writing_into_it(target):
    """On CPU this checks what capture needs of the host side: lr lives in a tensor that the
    scheduler updates in place, and the step picks the new value up."""
    ours_model = OddModel().to(target.device)
    reference_model = copy.deepcopy(ours_model)
    lr = torch.tensor(0.02, device=target.device)
    ours = adam_triton.Adam(ours_model.parameters(), lr=lr, capturable=True, backend=target.backend)
    reference = torch.optim.Adam(reference_model.parameters(), lr=0.02)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (ours, reference)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(8, generator=generator).to(target.device)
        for model, optimizer, scheduler in zip((ours_model, reference_model), (ours, reference), schedulers):
            optimizer.zero_grad()
            model(x).backward()
            optimizer.step()
            scheduler.step()
    assert ours.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.02 / 16)
    assert_close_params(ours_model, reference_model)


@pytest.mark.parametrize("name", ["lr", "weight_decay"])
def test_a_hyperparameter_going_from_a_device_tensor_to_the_number_zero_is_read_anew(target, name):
    """A value held in a tensor on the device is copied into the table's cell each step; when
    the group then holds the number 0.0, the cell must be uploaded again, not keep the
    tensor's last value (the host side of the table reads a device-held cell as 0.0 too)."""
    ours_model = OddModel().to(target.device)
    reference_model = copy.deepcopy(ours_model)
    held = torch.tensor(0.05, device=target.device)
    ours = adam_triton.AdamW(ours_model.parameters(), capturable=True, backend=target.backend, **{name: held})
    reference = torch.optim.AdamW(reference_model.parameters(), **{name: 0.05})
    generator = torch.Generator().manual_seed(5)
    for step in range(4):
        if step == 2:
            for optimizer in (ours, reference):
                optimizer.param_groups[0][name] = 0.0
        x = torch.randn(8, generator=generator).to(target.device)
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            optimizer.zero_grad()
            model(x).backward()
            optimizer.step()
    assert_close_params(ours_model, reference_model)


class _SaysItIsOnCuda(torch.Tensor):
    """A CPU tensor reporting a CUDA device: the hyperparameter table's host-side
    bookkeeping for device-held values, checked where no GPU is."""

    @property
    def device(self):
        return torch.device("cuda")


def test_the_hyperparameter_table_uploads_a_cell_that_stops_being_held_on_the_device():
    from adam_triton._tables import HyperTable

    table = HyperTable()
    group = {"lr": torch.tensor(0.5).as_subclass(_SaysItIsOnCuda), "betas": (0.9, 0.999), "eps": 1e-8,
             "weight_decay": torch.tensor(0.25).as_subclass(_SaysItIsOnCuda)}
    host = torch.device("cpu")  # where the table lives; the copies from the "device" go there
    table.refresh([group])
    assert table.on(host)[0].tolist() == [0.5, 0.9, 0.999, 1e-8, 0.25]
    group["lr"] = 0.0
    table.refresh([group])
    assert table.on(host)[0].tolist() == [0.0, 0.9, 0.999, 1e-8, 0.25]
    group["weight_decay"] = 0.0
    table.refresh([group])
    assert table.on(host)[0].tolist() == [0.0, 0.9, 0.999, 1e-8, 0.0]
    group["lr"] = torch.tensor(0.125).as_subclass(_SaysItIsOnCuda)
    table.refresh([group])
    assert table.on(host)[0].tolist() == [0.125, 0.9, 0.999, 1e-8, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay_matches_eager_steps():
    torch.manual_seed(0)
    eager_model = OddModel().cuda()
    graph_model = copy.deepcopy(eager_model)
    lr = torch.tensor(0.01, device="cuda")
    eager = adam_triton.AdamW(eager_model.parameters(), lr=0.01)
    graphed = adam_triton.AdamW(graph_model.parameters(), lr=lr, capturable=True)
    static_x = torch.randn(8, device="cuda")

    def forward_backward(model, optimizer, x):
        optimizer.zero_grad(set_to_none=False)
        model(x).backward()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: state, tables and compiled kernels exist before capture
            forward_backward(graph_model, graphed, static_x)
            graphed.step()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        forward_backward(eager_model, eager, static_x)
        eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward_backward(graph_model, graphed, static_x)
        graphed.step()
    generator = torch.Generator().manual_seed(1)
    for step in range(5):
        new_lr = 0.01 / (step + 1)
        lr.fill_(new_lr)
        eager.param_groups[0]["lr"] = new_lr
        x = torch.randn(8, generator=generator).cuda()
        static_x.copy_(x)
        graph.replay()
        forward_backward(eager_model, eager, x)
        eager.step()
    torch.cuda.synchronize()
    assert_close_params(graph_model, eager_model)


def test_compiled_model_trains_with_our_optimizer(target):
    torch._dynamo.reset()
    eager_model = OddModel(shapes=[(5,), (33,), (4, 7)]).to(target.device)
    compiled_model = copy.deepcopy(eager_model)
    eager = adam_triton.AdamW(eager_model.parameters(), lr=1e-2, backend=target.backend)
    compiled = adam_triton.AdamW(compiled_model.parameters(), lr=1e-2, backend=target.backend)
    forward = torch.compile(compiled_model, backend="aot_eager")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, generator=generator).to(target.device)
        for model, optimizer in ((eager_model, eager), (forward, compiled)):
            optimizer.zero_grad()
            model(x).backward()
            optimizer.step()
    assert_close_params(compiled_model, eager_model, rtol=1e-5, atol=1e-6)


def test_step_called_from_compiled_code_breaks_the_graph_cleanly(target):
    torch._dynamo.reset()
    model = OddModel(shapes=[(5,), (33,)]).to(target.device)
    reference_model = copy.deepcopy(model)
    optimizer = adam_triton.Adam(model.parameters(), lr=1e-2, backend=target.backend)
    reference = torch.optim.Adam(reference_model.parameters(), lr=1e-2)

    def train_step(model, optimizer, x):
        optimizer.zero_grad()
        loss = model(x)
        loss.backward()
        optimizer.step()
        return loss

    compiled_step = torch.compile(train_step, backend="aot_eager")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, generator=generator).to(target.device)
        compiled_step(model, optimizer, x)
        train_step(reference_model, reference, x)
    assert_close_params(model, reference_model)
