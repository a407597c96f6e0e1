"""Things users do to an optimizer between steps, checked against torch's optimizer doing
the same: resetting its state, swapping a parameter in a group, switching AMSGrad on,
zeroing or dropping gradients, adding a group."""

import copy
import gc
import weakref
from collections import defaultdict
from functools import partial

import pytest
import torch
from helpers import TRITON, OddModel, Wrapped, assert_close_params, assert_close_state, optimizers, paired, train

import adam_triton


@pytest.mark.parametrize(
    "reset",
    [
        pytest.param(lambda opt, model: opt.state.clear(), id="state.clear()"),
        pytest.param(lambda opt, model: setattr(opt, "state", defaultdict(dict)), id="new state dict"),
        pytest.param(lambda opt, model: opt.state.__setitem__(list(model.parameters())[2], {}), id="one entry emptied"),
        pytest.param(lambda opt, model: opt.state.pop(list(model.parameters())[0]), id="one entry removed"),
        pytest.param(lambda opt, model: opt.state[list(model.parameters())[1]].clear(), id="one entry cleared in place"),
    ],
)
def test_resetting_the_state_restarts_adam_as_in_torch(target, reset):
    """A reset state means a fresh start (zero moments, step 1 next) for what was reset,
    and nothing else changes."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, amsgrad=True)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=4)
        reset(optimizer, model)
        train(model, optimizer, steps=2, seed=2)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_state_looked_up_before_the_first_step_is_filled_as_in_torch(target):
    """``optimizer.state`` is a defaultdict: looking a parameter up before its first step
    (wrappers and loggers do) leaves an empty entry, which that step must fill, so that
    the state and the checkpoint hold the moments."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "Adam", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        assert all(len(optimizer.state[p]) == 0 for p in model.parameters())
        train(model, optimizer, steps=3)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)
    assert len(ours.state_dict()["state"]) == len(list(ours_model.parameters()))


def test_empty_state_entries_stay_as_in_torch(target):
    """An empty entry (a lookup of a parameter that never steps; a checkpoint's ``{}``) is
    kept by torch, in ``optimizer.state`` and in the next checkpoint, also where the
    optimizer re-homes its parameters (one frozen after it was built) or loads state."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    results = []
    for model, optimizer, cls in ((ours_model, ours, adam_triton.AdamW), (reference_model, reference, torch.optim.AdamW)):
        frozen = model.weights[1]
        frozen.requires_grad_(False)
        assert len(optimizer.state[frozen]) == 0
        train(model, optimizer, steps=2)
        saved = optimizer.state_dict()
        frozen.requires_grad_(True)
        saved["state"][len(list(model.parameters())) - 1] = {}  # the last parameter's: no state
        loaded = cls(model.parameters(), lr=1e-2, **({"backend": target.backend} if cls is adam_triton.AdamW else {}))
        loaded.load_state_dict(saved)
        results.append(
            (
                frozen in optimizer.state,
                {k: sorted(v) for k, v in optimizer.state_dict()["state"].items()},
                {k: sorted(v) for k, v in loaded.state_dict()["state"].items()},
            )
        )
    assert results[0] == results[1]
    assert results[0][1][1] == [] and results[0][2][1] == []


class _StoredTransposed(torch.nn.Module):
    """Keeps a weight as its transpose: ``right_inverse`` returns a view, so registering or
    removing it re-points the parameter at the same memory with other strides (``set_``)."""

    def forward(self, stored):
        return stored.T

    def right_inverse(self, weight):
        return weight.T


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
@pytest.mark.parametrize("set_to_none", [True, False], ids=["fresh gradients", "kept gradients"])
@pytest.mark.parametrize(
    "change", ["registered after the first steps", "removed mid-training", "channels_last weight read in another order"]
)
@pytest.mark.parametrize("after_zero_grad", [False, True], ids=["before zero_grad", "after zero_grad"])
def test_parameters_laid_out_anew_in_place_train_as_in_torch(target, change, set_to_none, after_zero_grad):
    """A parameter re-pointed at a transposed view of its own memory (same address, other
    strides) is re-homed: updated by its old layout, each element would take another's
    gradient and moments. Also when that happens after zero_grad, which does not look."""
    from torch.nn.utils import parametrize

    def make_model():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        if change == "channels_last weight read in another order":
            model[0] = torch.nn.Conv2d(8, 8, 2)
            model[2] = torch.nn.Conv2d(8, 3, 1)
            model = model.to(memory_format=torch.channels_last)
        if change == "removed mid-training":
            parametrize.register_parametrization(model[0], "weight", _StoredTransposed())
        return model

    # Made twice from one seed: a parametrized module does not deep-copy.
    ours_model, reference_model = make_model().to(target.device), make_model().to(target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        generator = torch.Generator().manual_seed(1)
        for step in range(6):
            if after_zero_grad:
                optimizer.zero_grad(set_to_none=set_to_none)
            if step == 2 and change == "registered after the first steps":
                parametrize.register_parametrization(model[0], "weight", _StoredTransposed())
            if step == 2 and change == "removed mid-training":
                parametrize.remove_parametrizations(model[0], "weight")
            if step == 2 and change == "channels_last weight read in another order":
                weight = model[0].weight
                # The same memory, its elements in another order, neither contiguous nor
                # channels_last: the first two dimensions' strides traded.
                strides = weight.stride()
                with torch.no_grad():
                    weight.set_(weight.as_strided(weight.shape, (strides[1], strides[0], *strides[2:])))
                assert not weight.is_contiguous()
            if not after_zero_grad:
                optimizer.zero_grad(set_to_none=set_to_none)
            shape = (2, 8, 3, 3) if change == "channels_last weight read in another order" else (5, 8)
            x = torch.randn(shape, generator=generator).to(target.device)
            model(x).square().mean().backward()
            optimizer.step()
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def _swap_gradient_data(model):
    for p in model.parameters():
        p.grad.data = p.grad.data.clone()


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda model: model.half().float(), id="model.half().float()"),
        pytest.param(lambda model: model.to(memory_format=torch.channels_last), id="to(channels_last)"),
        pytest.param(_swap_gradient_data, id="grad.data swapped"),
        pytest.param(lambda model: model.double(), id="model.double()"),
    ],
)
def test_kept_gradients_converted_with_the_model_are_zeroed_as_in_torch(target, convert):
    """Module._apply (model.half(), model.to(...)) swaps each kept gradient's .data for a
    converted copy: the same tensor object, somewhere else. zero_grad(set_to_none=False)
    must zero that, or the next backward adds onto last step's gradient."""

    def make_model():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Tanh(), torch.nn.Conv2d(5, 2, 2))

    ours_model, reference_model = paired(make_model, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        generator = torch.Generator().manual_seed(0)
        for step in range(4):
            if step == 2:  # there is something to zero
                assert all(p.grad.abs().sum() > 0 for p in model.parameters())
            optimizer.zero_grad(set_to_none=False)
            x = torch.randn(2, 3, 6, 6, generator=generator).to(target.device, next(model.parameters()).dtype)
            model(x).square().mean().backward()
            optimizer.step()
            if step == 1:
                convert(model)
                if optimizer is reference:  # torch's optimizer needs its state cast by hand
                    for p in model.parameters():
                        state = optimizer.state[p]
                        state.update({k: v.to(p.dtype) for k, v in state.items() if k != "step"})
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize(
    "set_to_none", [False, True, None], ids=["kept gradients", "fresh gradients", "no zero_grad between steps"]
)
def test_gradients_given_new_data_between_backward_and_step_are_the_ones_used(target, set_to_none):
    """``p.grad.data = ...`` (older code scales or clips gradients this way) keeps the
    gradient object but moves its values elsewhere; the step must read them there, also
    when that object is one of our kept views or the very gradient the last step read
    (without zero_grad, backward accumulates into the same tensors)."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        generator = torch.Generator().manual_seed(0)
        for step in range(4):
            if set_to_none is not None or step == 0:
                optimizer.zero_grad(set_to_none=bool(set_to_none))
            model(torch.randn(8, generator=generator).to(target.device)).backward()
            for p in model.parameters():
                p.grad.data = -3 * p.grad.data
            optimizer.step()
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device kind: CUDA")
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton")), "torch"])
def test_a_cuda_parameters_gradient_moved_to_the_cpu_is_copied_over_not_read_as_a_device_address(backend):
    """``p.grad.data = g.cpu()`` is allowed (CPU and CUDA tensors share a tensor type): the
    step must bring that gradient to the device, as if it were there, and never hand the
    kernel a host address. torch's optimizers refuse such a gradient, so the reference gets
    it back on the device."""
    ours_model, reference_model = paired(OddModel, "cuda")
    ours, reference = optimizers(ours_model, reference_model, "AdamW", backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, generator=generator).to("cuda")).backward()
            moved = next(iter(model.parameters()))
            moved.grad.data = moved.grad.data.cpu()
            if optimizer is reference:
                moved.grad.data = moved.grad.data.to("cuda")
            optimizer.step()
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize(
    "later",
    ["zero_grad(set_to_none=False)", "staged", "adopted at the step"],
    ids=["zeroed into the buffer", "copied into the buffer", "moved into the buffer at the step"],
)
def test_a_kept_gradient_given_new_data_and_dropped_is_not_reused_later(target, later):
    """``p.grad.data = g`` on a kept gradient (one of our views), then ``zero_grad()`` drops
    it. The view object now points at ``g`` and the user may still hold it: no later step
    may hand it out as a gradient again (it would not be zeroed, and backward would add to
    ``g``'s values) or copy gradients into it, whichever way later gradients reach the
    gradient buffer. Found by a random scenario test."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        generator = torch.Generator().manual_seed(0)
        for step in range(4):
            optimizer.zero_grad(set_to_none=step == 2)
            if step == 2 and later == "adopted at the step":
                optimizer.zero_grad(set_to_none=False)  # no gradients: they join at the step
            model(torch.randn(8, generator=generator).to(target.device)).backward()
            if step == 1:  # kept gradients by now: ours are views of the gradient buffer
                for p in model.parameters():
                    p.grad.data = torch.randn(p.shape, generator=generator).to(target.device)
                held = [(p.grad, p.grad.clone()) for p in model.parameters()]
            if step == 2 and later == "staged":
                for p in model.parameters():  # transposed fresh gradients: copied into the buffer
                    if p.dim() == 2:
                        p.grad = p.grad.t().contiguous().t()
            optimizer.step()
        for tensor, values in held:
            assert torch.equal(tensor, values)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_a_parameter_swapped_into_a_group_is_the_one_updated(target):
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
        replacement = torch.nn.Parameter(model.weights[3].detach() * 2)
        optimizer.param_groups[0]["params"][3] = replacement  # in place: the list stays the same object
        model.weights[3] = replacement
        train(model, optimizer, steps=2, seed=2)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_parameters_trading_groups_take_their_new_groups_hyperparameters(target, set_to_none):
    """Two groups trade a parameter each, so every group keeps its length: each parameter
    goes on with its own moments and step under the other group's lr and weight decay."""
    params_fn = lambda model: [  # noqa: E731
        {"params": list(model.weights)[0:6:2], "lr": 3e-2, "weight_decay": 0.5},
        {"params": list(model.weights)[1:6:2], "lr": 1e-3, "weight_decay": 0.0},
        {"params": list(model.weights)[6:]},
    ]
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, params_fn=params_fn)
    assert len(ours.param_groups[0]["params"]) == len(ours.param_groups[1]["params"])
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2, set_to_none=set_to_none)
        first, second = optimizer.param_groups[0]["params"], optimizer.param_groups[1]["params"]
        first[1], second[2] = second[2], first[1]
        train(model, optimizer, steps=3, seed=2, set_to_none=set_to_none)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_amsgrad_switched_on_mid_training_is_in_the_state_and_the_checkpoint(target):
    """torch's own optimizer fails on its next step (KeyError) when a group switches AMSGrad
    on after its state exists; ours goes on, and its checkpoint must then hold the maxima
    so that torch's optimizer can resume from it and agree with ours."""
    ours_model = OddModel().to(target.device)
    ours = adam_triton.AdamW(ours_model.parameters(), lr=1e-2, backend=target.backend)
    train(ours_model, ours, steps=2)
    ours.param_groups[0]["amsgrad"] = True
    train(ours_model, ours, steps=2, seed=2)
    assert all("max_exp_avg_sq" in ours.state[p] for p in ours_model.parameters())
    reference_model = copy.deepcopy(ours_model)
    reference = torch.optim.AdamW(reference_model.parameters())
    reference.load_state_dict(copy.deepcopy(ours.state_dict()))  # step tensors would be shared
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2, seed=3)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_a_maximum_put_in_the_state_while_amsgrad_is_off_is_the_one_used_once_it_is_on(target):
    """torch's step uses whatever ``state[p]["max_exp_avg_sq"]`` holds once AMSGrad is on
    (and keeps it, unused, while it is off). Ours keeps no maximum while AMSGrad is off: the
    tensor was once left unchecked, not used at the first AMSGrad step and copied in at the
    second, over the maximum that step had made."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
        generator = torch.Generator().manual_seed(5)
        for p in model.parameters():  # above most of the second moments, not all
            optimizer.state[p]["max_exp_avg_sq"] = (torch.rand(p.shape, generator=generator) * 2e-3).to(p.device)
        train(model, optimizer, steps=1, seed=2)  # still off: kept, unused
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        optimizer.param_groups[0]["amsgrad"] = True
        train(model, optimizer, steps=3, seed=3)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_a_maximum_of_another_shape_put_in_the_state_is_refused_before_anything_changes(target):
    model = OddModel().to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.state[next(model.parameters())]["max_exp_avg_sq"] = torch.ones(2, device=target.device)
    optimizer.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match=r"\['max_exp_avg_sq'\] .* tensor of shape \(2,\)"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert {float(optimizer.state[p]["step"]) for p in model.parameters()} == {2.0}


def test_zero_grad_lets_the_gradients_go(target):
    model = OddModel().to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), backend=target.backend)
    train(model, optimizer, steps=1)
    gradients = [weakref.ref(p.grad) for p in model.parameters()]
    optimizer.zero_grad()
    gc.collect()
    assert [ref() for ref in gradients] == [None] * len(gradients)


@pytest.mark.parametrize(
    "drop",
    [
        pytest.param(lambda model: model.zero_grad(), id="model.zero_grad()"),
        pytest.param(lambda model: [setattr(p, "grad", None) for p in model.parameters()], id="p.grad = None"),
    ],
)
def test_gradients_dropped_outside_the_optimizer_are_freed_as_in_torch(target, drop):
    """The loop of many trainers (Hugging Face's among them) calls the module's zero_grad,
    which the optimizer never hears of: last step's gradients must be freed there, as under
    torch, not held until the next step (that would double gradient memory during the
    next backward). The next steps, on new gradients, must still agree with torch."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        generator = torch.Generator().manual_seed(3)
        for _ in range(3):
            x = torch.randn(8, generator=generator).to(target.device)
            model(x).backward()
            optimizer.step()
            gradients = [weakref.ref(p.grad) for p in model.parameters()]
            drop(model)
            gc.collect()
            assert [ref() for ref in gradients] == [None] * len(gradients)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_gradients_kept_by_their_owner_are_read_again_after_a_dropped_one(target):
    """Between steps the optimizer remembers gradients it does not own only weakly; one that
    its owner keeps is still recognised next step, and one that died in between is neither
    mistaken for its successor nor, when none follows it, for a gradient at all."""
    params = [torch.nn.Parameter(torch.randn(n, device=target.device)) for n in (3, 5, 7)]
    optimizer = adam_triton.AdamW(params, lr=1e-2, backend=target.backend)
    for p in params:
        p.grad = torch.randn_like(p)  # held by the parameters only
    optimizer.step()
    (buffer,) = optimizer._engine.buffers
    plan = buffer.last_plan
    optimizer.step()
    assert buffer.last_plan is plan  # the same gradient tensors: the plan is reused
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.AdamW(reference_params, lr=1e-2)
    reference.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # else it shares our step tensors

    def drop_then(index, replacement):
        params[index].grad = None
        gc.collect()
        params[index].grad = replacement
        for p, q in zip(params, reference_params):
            q.grad = None if p.grad is None else p.grad.clone()
        optimizer.step()
        reference.step()
        assert buffer.last_plan is not plan
        for p, q in zip(params, reference_params):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
        for p, q in zip(params, reference_params):
            assert float(optimizer.state[p]["step"]) == float(reference.state[q]["step"])

    drop_then(1, torch.randn_like(params[1]))
    plan = buffer.last_plan
    drop_then(2, None)  # not updated, not counted


@pytest.mark.parametrize("set_to_none", [False, True], ids=["kept", "fresh-where-the-last-were"])
def test_zero_grad_leaves_the_gradient_plan_for_gradients_found_as_before(target, set_to_none):
    """Finding the gradients is much of a small model's step. After ``zero_grad``, the
    gradients of the next backward are the same tensors (kept, ``set_to_none=False``) or
    may lie where the last ones lay (fresh ones from a caching allocator; here the same
    tensors, refilled and given back): the last step's plan then serves again, and reads
    the new values."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    ours_grads = [torch.empty_like(p) for p in ours_model.parameters()]
    (buffer,) = ours._engine.buffers
    plans = []
    generator = torch.Generator().manual_seed(5)
    for _ in range(4):
        x = torch.randn(8, generator=generator).to(target.device)
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            optimizer.zero_grad(set_to_none=set_to_none)
            model(x).backward()
        if set_to_none:  # our gradients moved into the tensors of the last step
            for p, g in zip(ours_model.parameters(), ours_grads):
                p.grad = g.copy_(p.grad)
        ours.step()
        reference.step()
        plans.append(buffer.last_plan)
    assert plans[1] is plans[2] is plans[3]
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_step_counters_moved_into_shared_memory_keep_counting(target):
    """``share_memory_()`` on a state tensor moves its whole buffer into shared memory: for
    ``state[p]["step"]`` the table of step counters, which later steps must count where it
    now is (a view of the table's old memory would count into freed memory)."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
        optimizer.state[model.weights[1]]["step"].share_memory_()
        train(model, optimizer, steps=3, seed=2)
    assert float(ours.state[ours_model.weights[0]]["step"]) == 5.0
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_a_staged_gradient_dropped_outside_the_optimizer_is_freed():
    """A gradient whose strides differ from its parameter's is copied into our gradient
    buffer each step; the gradient itself is still the owner's, to free when it drops it."""
    weight = torch.nn.Parameter(torch.randn(5, 7))
    optimizer = adam_triton.AdamW([weight], lr=1e-2)
    weight.grad = torch.randn(7, 5).t()  # the same shape, transposed strides
    optimizer.step()
    optimizer.step()
    assert optimizer._engine.buffers[0].last_plan.staged  # it was copied, not read in place
    gradient = weakref.ref(weight.grad)
    weight.grad = None
    gc.collect()
    assert gradient() is None


def test_zero_grad_after_kept_gradients_lets_the_gradient_buffer_go(target):
    """Kept gradients (``zero_grad(set_to_none=False)``) live in our flat gradient buffer;
    switching to ``zero_grad()`` means backward makes new ones, so the buffer must not stay
    alive beside them. Training goes on as torch's, and back to kept gradients too."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2, set_to_none=False)
        if optimizer is ours:
            (buffer,) = ours._engine.buffers
            storage = weakref.ref(buffer.grad if buffer.grad._base is None else buffer.grad._base)
        optimizer.zero_grad()
        gc.collect()
        if optimizer is ours:
            assert storage() is None and buffer.grad is None
        train(model, optimizer, steps=2, seed=2)
        train(model, optimizer, steps=2, seed=3, set_to_none=False)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize("drop", ["model.zero_grad()", "p.grad = None"])
def test_gradients_dropped_outside_the_optimizer_after_kept_ones_let_the_buffer_go_at_the_next_step(target, drop):
    """After kept gradients, a loop that drops them without the optimizer (Hugging Face's
    Trainer calls ``model.zero_grad()``): this optimizer cannot see that, and the flat
    gradient buffer stayed alive for good beside backward's new gradients (twice the
    gradient memory). The next step, which reads none of it, lets it go."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2, set_to_none=False)
    (buffer,) = ours._engine.buffers
    storage = weakref.ref(buffer.grad if buffer.grad._base is None else buffer.grad._base)
    for _ in range(2):
        x = torch.randn(8, generator=generator).to(target.device)
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            if drop == "model.zero_grad()":
                model.zero_grad()
            else:
                for p in model.parameters():
                    p.grad = None
            model(x).backward()
            optimizer.step()
    gc.collect()
    assert buffer.grad is None and storage() is None
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_gradients_kept_by_their_owner_in_another_layout_are_staged_step_after_step(target):
    """Gradients someone else keeps across steps, laid out as the update cannot read them
    (transposed): each step copies them into the flat gradient buffer, which therefore
    stays, and the plan that found them is reused, as torch reads them."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4), (6,)]
    initial = [torch.randn(s, generator=generator).to(target.device) for s in shapes]
    ours_params = [torch.nn.Parameter(t.clone()) for t in initial]
    reference_params = [torch.nn.Parameter(t.clone()) for t in initial]
    ours = adam_triton.AdamW(ours_params, lr=1e-2, backend=target.backend)
    reference = torch.optim.AdamW(reference_params, lr=1e-2, foreach=False)
    kept = [torch.empty(s[::-1], device=target.device).t() if len(s) == 2 else torch.empty(s, device=target.device) for s in shapes]
    for p, g in zip(ours_params, kept):
        p.grad = g
    for _ in range(3):
        values = [torch.randn(s, generator=generator).to(target.device) for s in shapes]
        for g, v in zip(kept, values):
            g.copy_(v)
        for p, v in zip(reference_params, values):
            p.grad = v
        ours.step()
        reference.step()
        assert sorted(ours._engine.buffers[0].last_plan.staged)[:2] == [0, 1]
    for p, q in zip(ours_params, reference_params):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


def test_zero_grad_without_set_to_none_leaves_a_gradient_of_another_dtype_alone():
    """A parameter whose gradient has its own dtype (``grad_dtype``) keeps it: it is zeroed
    where it is, as torch does, and every other gradient still becomes a zeroed view.
    (torch's Adam cannot step a float32 gradient on a bfloat16 parameter; ours rounds it,
    which is what autograd does without ``grad_dtype``: the reference.)"""
    results = {}
    for name in ("ours", "torch"):
        params = [torch.nn.Parameter(torch.full((5,), float(i + 1), dtype=torch.bfloat16)) for i in range(3)]
        if name == "ours":
            params[1].grad_dtype = torch.float32
            optimizer = adam_triton.AdamW(params, lr=1e-2)
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
        for step in range(3):
            optimizer.zero_grad(set_to_none=False)
            assert all(not p.grad.any() for p in params if p.grad is not None)
            sum(((p.float() - step / 3) ** 2).sum() for p in params).backward()
            optimizer.step()
        results[name] = [p.detach() for p in params] + [p.grad.to(torch.bfloat16) for p in params]
        if name == "ours":
            assert params[1].grad.dtype == torch.float32
            (buffer,) = optimizer._engine.buffers
            assert params[0].grad is buffer.grad_views[0] and params[2].grad is buffer.grad_views[2]
    for ours, reference in zip(results["ours"], results["torch"]):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_gradients_rejoin_the_flat_buffer_after_a_group_is_added():
    """add_param_group re-homes the parameters; the next zero_grad(set_to_none=False) must
    make every gradient a view of the new gradient buffer, not keep the old buffer alive."""
    ours_model, reference_model = paired(OddModel, "cpu")
    ours = adam_triton.AdamW(list(ours_model.parameters())[:4], lr=1e-2, backend="torch")
    reference = torch.optim.AdamW(list(reference_model.parameters())[:4], lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2, set_to_none=False)
        optimizer.add_param_group({"params": list(model.parameters())[4:], "lr": 3e-3})
        train(model, optimizer, steps=2, seed=2, set_to_none=False)
    assert_close_params(ours_model, reference_model)
    (buffer,) = ours._engine.buffers
    assert all(p.grad is view for p, view in zip(buffer.params, buffer.grad_views))
    assert buffer.last_plan.in_grad_buffer.all()

def test_adding_a_group_lets_the_old_buffers_go(target):
    """Once the added group's parameters join the others (at the next step), the old state
    (views of the old flat buffers) must be freed at once, not held by anything the
    optimizer remembers: on a GPU it would double the optimizer's memory."""
    model = OddModel().to(target.device)
    optimizer = adam_triton.AdamW(list(model.parameters())[:4], lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    # The state's tensors are views that keep their flat buffer alive.
    old = [weakref.ref(tensor) for entry in optimizer.state.values() for tensor in entry.values()]
    optimizer.add_param_group({"params": list(model.parameters())[4:]})
    train(model, optimizer, steps=1, seed=2)
    gc.collect()
    assert [ref() for ref in old] == [None] * len(old)
    assert len(optimizer._engine.buffers) == 1


def test_groups_added_one_at_a_time_move_only_themselves_and_train_like_torch(target):
    """A loop of add_param_group calls (per-layer learning rates built one group at a time,
    after training began): each call moves its own parameters into a flat buffer and leaves
    the others where they are, as re-homing all of them at each call would make the loop
    quadratic; the next step joins them into one buffer. More groups are added than may
    wait apart, and the numbers are torch's."""
    from adam_triton._engine import _MOST_BUFFERS_APART

    shapes = [((1,), (17,), (7, 13), (3, 5, 11))[i % 4] for i in range(_MOST_BUFFERS_APART + 6)]
    ours_model, reference_model = paired(lambda: OddModel(shapes), target.device)
    ours = adam_triton.AdamW([ours_model.weights[0]], lr=1e-2, backend=target.backend)
    reference = torch.optim.AdamW([reference_model.weights[0]], lr=1e-2)
    left_in_place = 0
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=1)
        for index, param in enumerate(list(model.weights)[1:], 1):
            first, original = model.weights[0].data_ptr(), param.data_ptr()
            hyper = {"lr": 1e-2 * (1 + index % 3), "weight_decay": 0.1 * (index % 2), "amsgrad": index % 5 == 0}
            optimizer.add_param_group({"params": [param], **hyper})
            if optimizer is ours:
                assert param.data_ptr() != original  # moved into a flat buffer
                left_in_place += model.weights[0].data_ptr() == first
        train(model, optimizer, steps=2, seed=2)
    # Every call but the one that found the most buffers apart already waiting.
    assert left_in_place == len(shapes) - 2
    assert len(ours._engine.buffers) == 1
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def _move_the_first_parameter_to_the_second_group(groups: list, spare) -> list:
    groups[1]["params"].append(groups[0]["params"].pop(0))
    return [spare]


def _swap_a_new_parameter_into_the_first_group(groups: list, spare) -> list:
    old = groups[0]["params"][0]
    groups[0]["params"][0] = spare
    return [old]


# What happens to the groups already there before ``add_param_group``; each returns the
# parameters of the group then added.
_EARLIER_GROUPS_EDITED = {
    "a parameter taken out and added back": lambda groups, spare: [groups[0]["params"].pop(1), spare],
    "a group deleted": lambda groups, spare: [*groups.pop(0)["params"], spare],
    "a group's parameters reordered": lambda groups, spare: groups[1]["params"].reverse() or [spare],
    "a parameter moved to another group": _move_the_first_parameter_to_the_second_group,
    "a new parameter swapped into a group": _swap_a_new_parameter_into_the_first_group,
    "a group's hyperparameters edited": lambda groups, spare: groups[0].update(lr=0.05, betas=(0.8, 0.99)) or [spare],
}


@pytest.mark.parametrize("edit", list(_EARLIER_GROUPS_EDITED), ids=list(_EARLIER_GROUPS_EDITED))
def test_groups_edited_before_a_group_is_added_train_like_torch(target, edit):
    """``add_param_group`` moves only the new group's parameters and leaves noticing what
    else changed to the next step; a new parameter still in our memory (taken out of its
    group) makes it rebuild at once."""
    shapes = [(1,), (17,), (7, 13), (3, 5, 11), (1025,), (2, 9)]
    ours_model, reference_model = paired(lambda: OddModel(shapes), target.device)
    for model in (ours_model, reference_model):
        # The added parameter in a buffer of its own kind: no join at the next step, whose
        # check of the groups alone must notice the edits.
        model.weights[4].data = model.weights[4].data.double()
    sides = []
    for model, cls in ((ours_model, adam_triton.AdamW), (reference_model, torch.optim.AdamW)):
        weights = list(model.weights)
        groups = [{"params": weights[0:2]}, {"params": weights[2:4], "lr": 2e-2}]
        optimizer = cls(groups, lr=1e-2, **({"backend": target.backend} if cls is adam_triton.AdamW else {}))
        sides.append((model, optimizer, weights))
    for model, optimizer, weights in sides:
        train(model, optimizer, steps=2, set_to_none=False)
        added = _EARLIER_GROUPS_EDITED[edit](optimizer.param_groups, weights[4])
        optimizer.add_param_group({"params": added, "weight_decay": 0.3})
        train(model, optimizer, steps=3, seed=2)
        train(model, optimizer, steps=2, seed=3, set_to_none=False)
    assert_close_params(ours_model, reference_model)
    assert_close_state(sides[0][1], sides[1][1], ours_model, reference_model)


def test_groups_added_beside_frozen_parameters_move_only_themselves(target, monkeypatch):
    """Frozen parameters stay where they are (no buffer copies them), which must not make
    ``add_param_group`` re-home everything held at each call, as it does where trained
    parameters live outside the buffers: a loop of calls would be quadratic again."""
    from adam_triton._engine import Engine

    ours_model, reference_model = paired(OddModel, target.device)
    sides = []
    for model, cls in ((ours_model, adam_triton.AdamW), (reference_model, torch.optim.AdamW)):
        weights = list(model.weights)
        for weight in weights[2:5]:
            weight.requires_grad_(False)
        optimizer = cls([{"params": weights[:5]}], lr=1e-2, **({"backend": target.backend} if cls is adam_triton.AdamW else {}))
        sides.append((model, optimizer, weights))
    rebuilds = []
    rebuild = Engine.rebuild
    monkeypatch.setattr(Engine, "rebuild", lambda self, *a, **k: rebuilds.append(1) or rebuild(self, *a, **k))
    for model, optimizer, weights in sides:
        train(model, optimizer, steps=2)
        for index, weight in enumerate(weights[5:]):
            optimizer.add_param_group({"params": [weight], "lr": 2e-2 * (index + 1)})
    assert not rebuilds
    for model, optimizer, _ in sides:
        train(model, optimizer, steps=3, seed=2)
    assert_close_params(ours_model, reference_model)
    assert_close_state(sides[0][1], sides[1][1], ours_model, reference_model)


def test_the_gradient_table_is_uploaded_only_when_a_gradient_moved(monkeypatch):
    """Gradients set to None and handed back at the same addresses (as the caching
    allocator often does) need no new shift table; gradients elsewhere do."""
    from adam_triton import _backends

    if not _backends.triton_importable() or not _backends.kernels().is_interpreted():
        pytest.skip("needs the Triton interpreter")
    model = OddModel()
    optimizer = adam_triton.AdamW(model.parameters(), backend="triton")
    uploads = []
    real_upload = _backends.upload
    monkeypatch.setattr(_backends, "upload", lambda array, device: uploads.append(array) or real_upload(array, device))
    gradients = [torch.randn_like(p) for p in model.parameters()]
    counts = []
    for _ in range(3):
        optimizer.zero_grad()
        for p, g in zip(model.parameters(), gradients):
            p.grad = g
        optimizer.step()
        counts.append(len(uploads))
    optimizer.zero_grad()
    for p, g in zip(model.parameters(), gradients):
        p.grad = g.clone()
    optimizer.step()
    counts.append(len(uploads))
    assert counts[0] == counts[1] == counts[2] == counts[3] - 1, counts


def test_a_step_count_edited_in_place_counts_for_the_whole_parameter(target):
    """A parameter larger than a chunk has a step counter per chunk; a count written into
    ``state[p]["step"]`` must reach all of them (torch: the bias corrections restart)."""
    make = lambda: OddModel(shapes=[(37,), (5, 3001), (129,)])  # noqa: E731
    ours_model, reference_model = paired(make, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    assert len(ours._engine.buffers[0].chunk_rows) > 3  # the middle parameter spans chunks
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)
        optimizer.state[model.weights[1]]["step"].fill_(1.0)
        train(model, optimizer, steps=2, seed=2)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_a_gradient_off_the_vector_alignment_is_copied_and_still_correct(target):
    """The kernel reads gradients with 16-byte accesses: one 8 bytes off goes through the
    gradient buffer (torch's kernel reads it where it is), and the result is unchanged."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for step in range(2):
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            optimizer.zero_grad()
            generator = torch.Generator().manual_seed(step)
            for p in model.parameters():
                storage = torch.randn(p.numel() + 2, generator=generator).to(target.device)
                p.grad = storage[2:].view_as(p)  # 8 bytes past a 16-byte boundary
            optimizer.step()
    assert_close_params(ours_model, reference_model)
    (buffer,) = ours._engine.buffers
    expected = list(range(len(buffer.params))) if target.backend == "triton" else []
    assert sorted(buffer.last_plan.staged) == expected


def test_a_gradient_with_a_pending_negation_is_read_as_its_values(target):
    """A lazily negated gradient (``torch._neg_view``: its bytes are minus its values) is
    read as torch's for-loop reads it (torch's fused kernels refuse it). The Triton kernel
    read its bytes where they were, and stepped the wrong way; so did a plan reused because
    the negated view lay where last step's plain gradients had."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, foreach=False)
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(p.shape, generator=generator).to(target.device) for p in ours_model.parameters()]
    for negated in (False, True, True):
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            for p, g in zip(model.parameters(), gradients):
                p.grad = torch._neg_view(g) if negated else g
            optimizer.step()
        assert_close_params(ours_model, reference_model)
    assert ours_model.weights[0].grad.is_neg()


@pytest.mark.parametrize("removal", ["parameter removed from its group", "group popped"])
def test_parameters_that_leave_the_optimizer_let_the_old_buffers_go(target, removal):
    """A parameter removed from the optimizer keeps its values, gradient and state (as in
    torch, whose state keeps its entry), but no longer in segments of the old buffers, which
    would keep all of them alive: twice the optimizer's memory."""
    from torch.multiprocessing.reductions import StorageWeakRef

    def remove(optimizer, model):
        if removal == "group popped":
            optimizer.param_groups.pop()
        else:
            params = optimizer.param_groups[0]["params"]
            params[:] = [p for p in params if p is not model.weights[1]]  # remove() compares values

    ours_model, reference_model = paired(OddModel, target.device)
    params_fn = lambda model: [  # noqa: E731
        {"params": list(model.weights)[:4]},
        {"params": list(model.weights)[4:], "lr": 3e-3},
    ]
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, params_fn=params_fn, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3, set_to_none=False)
    # The moments exist from the first step on.
    old = [StorageWeakRef(tensor.untyped_storage()) for b in ours._engine.buffers for tensor in (b.param, b.exp_avg, b.exp_avg_sq)]
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        remove(optimizer, model)
        train(model, optimizer, steps=2, seed=2, set_to_none=False)
    gc.collect()
    assert all(ref.expired() for ref in old)
    assert_close_params(ours_model, reference_model)
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):  # removed ones too
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[a][key], reference.state[b][key], rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(a.grad, b.grad)


def _tie_through_data(model):
    model.weights[3].data = model.weights[2].data


@pytest.mark.parametrize("when", ["before the optimizer is built", "after some steps"])
def test_distinct_parameters_sharing_memory_are_refused_before_anything_changes(target, when):
    """Two Parameter objects over the same memory cannot both get a segment of their own and
    stay tied: a clear error, with the model and the optimizer left as they were, rather
    than silently untied weights."""
    model = OddModel(shapes=[(7, 13), (5,), (4, 3), (4, 3)]).to(target.device)
    if when == "before the optimizer is built":
        _tie_through_data(model)
        with pytest.raises(ValueError, match="share memory"):
            adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
        assert model.weights[3].data_ptr() == model.weights[2].data_ptr()
        return
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    _tie_through_data(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="share memory"):
        train(model, optimizer, steps=1, seed=2)
    assert model.weights[3].data_ptr() == model.weights[2].data_ptr()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class _TwoPretrainedTables(torch.nn.Module):
    """A source and a target table made from one pretrained tensor, frozen (as a
    translation model's embeddings from one set of word vectors), under a trainable head."""

    def __init__(self, vectors):
        super().__init__()
        self.source = torch.nn.Embedding.from_pretrained(vectors)
        self.target = torch.nn.Embedding.from_pretrained(vectors)
        self.head = torch.nn.Linear(vectors.shape[1], 3)

    def forward(self, x):
        indices = (x.abs() * 1000).long() % self.source.num_embeddings
        return (self.head(self.source(indices) * self.target(indices.flip(0))) ** 2).mean()


def test_frozen_parameters_sharing_memory_are_accepted_until_one_would_move(target):
    """Frozen parameters stay where they are, so two over the same memory stay tied, as under
    torch. A parameter that would move, and so stop sharing it, is refused as any other is,
    before anything changes: one added over that memory, or one of them unfrozen."""
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(53, 11, generator=generator).to(target.device)
    ours_model, reference_model = _TwoPretrainedTables(vectors), _TwoPretrainedTables(vectors.clone())
    reference_model.head.load_state_dict(ours_model.head.state_dict())
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)
    assert ours_model.source.weight.data_ptr() == ours_model.target.weight.data_ptr() == vectors.data_ptr()
    assert_close_params(ours_model, reference_model)

    with pytest.raises(ValueError, match="share memory"):
        ours.add_param_group({"params": [torch.nn.Parameter(vectors[5:9])]})
    assert len(ours.param_groups) == 1

    ours_model.target.weight.requires_grad_(True)
    before = [p.detach().clone() for p in ours_model.parameters()]
    with pytest.raises(ValueError, match="share memory"):
        train(ours_model, ours, steps=1, seed=2)
    assert all(torch.equal(p, b) for p, b in zip(ours_model.parameters(), before))
    assert ours_model.target.weight.data_ptr() == vectors.data_ptr()


@pytest.mark.parametrize("grown", ["longer", "rows further apart"])
def test_a_parameter_added_over_a_frozen_one_that_grew_in_place_is_refused(target, grown):
    """Where the frozen parameters lie is looked up in an index made at an earlier
    ``add_param_group``; one given a view of more memory at the same address since must
    count with its new extent, or a parameter added over the new part would silently stop
    sharing it."""
    table = torch.randn(8, 3, device=target.device)
    frozen = torch.nn.Parameter(table[:2], requires_grad=False)
    optimizer = adam_triton.Adam([frozen], lr=0.1, backend=target.backend)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, device=target.device))]})
    # The same first address; rows 0-3, or rows 0 and 3 (the same shape, other strides).
    frozen.data = table[:4] if grown == "longer" else table[::3][:2]
    with pytest.raises(ValueError, match="share memory"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(table[3])]})
    assert len(optimizer.param_groups) == 2


def _tie_through_data_after_freezing(optimizer, first, second):
    second.data = first.data
    return second


def _add_a_frozen_parameter_over_the_first(optimizer, first, second):
    tied = torch.nn.Parameter(first.detach(), requires_grad=False)  # Embedding.from_pretrained(first.detach())
    optimizer.add_param_group({"params": [tied]})
    return tied


@pytest.mark.parametrize(
    "tie", [_tie_through_data_after_freezing, _add_a_frozen_parameter_over_the_first], ids=["b.data = a.data", "add_param_group"]
)
def test_parameters_frozen_after_the_optimizer_was_built_stay_tied_as_in_torch(target, tie):
    """Frozen after the optimizer was built, a parameter is still a segment of a buffer of
    ours; the next re-homing gives it memory of its own, but not when another frozen
    parameter lies over that memory: the two would stop sharing it, where under torch a
    write to one shows in the other."""
    results = []
    for cls, options in ((adam_triton.Adam, {"backend": target.backend}), (torch.optim.Adam, {})):
        generator = torch.Generator().manual_seed(0)
        first, second, head = (
            torch.nn.Parameter(torch.randn(shape, generator=generator).to(target.device)) for shape in ((4, 3), (4, 3), (5,))
        )
        optimizer = cls([first, second, head], lr=0.1, **options)
        first.requires_grad_(False)
        second.requires_grad_(False)
        tied = tie(optimizer, first, second)
        for _ in range(2):
            optimizer.zero_grad()
            head.square().sum().backward()
            optimizer.step()  # (the first re-homes: the buffers make their moments)
        with torch.no_grad():
            first.fill_(7.0)
        assert tied.data_ptr() == first.data_ptr() and bool((tied == 7.0).all())
        results.append(head.detach())
    torch.testing.assert_close(*results)


def test_the_span_index_tells_overlapping_ranges_from_touching_ones():
    from adam_triton._shared_memory import SpanIndex

    memory = torch.zeros(100)
    # Held: 10-20, and 30-35 inside 25-50 (a range that ends before another that started earlier).
    index = SpanIndex([memory[10:20], memory[25:50], memory[30:35], torch.zeros(0)])
    for piece, meets in [
        (memory[0:10], False), (memory[20:25], False), (memory[50:60], False),  # touching only
        (memory[9:11], True), (memory[19:21], True), (memory[40:41], True), (memory[49:70], True),
        (memory[0:100], True), (memory[22:23], False), (memory[::7], True), (torch.zeros(3), False),
    ]:
        assert index.meets(piece) is meets, piece
    assert not SpanIndex([]).meets(memory)


# Slices of one tensor, at least one gappy (its byte range has holes): whether two share an
# element is told element by element.
_OVERLAPPING_SLICES = {
    "columns 0-2 and 2-3": lambda w: (w[:, :3], w[:, 2:]),
    "the diagonal and a row": lambda w: (w.diagonal(), w[1]),
    "the whole and two columns": lambda w: (w, w[:, :2]),
}
_DISJOINT_SLICES = {
    "even and odd rows": lambda w: (w[0::2], w[1::2]),
    "even and odd columns": lambda w: (w[:, 0::2], w[:, 1::2]),
    "the diagonal and the first row's tail": lambda w: (w.diagonal(), w[0, 1:]),
}


@pytest.mark.parametrize("slices", list(_OVERLAPPING_SLICES), ids=list(_OVERLAPPING_SLICES))
def test_gappy_slices_sharing_an_element_are_refused_before_anything_changes(target, slices):
    weights = torch.randn(6, 6, device=target.device)
    first, second = (torch.nn.Parameter(t) for t in _OVERLAPPING_SLICES[slices](weights))
    with pytest.raises(ValueError, match="share memory"):
        adam_triton.AdamW([first, second], lr=1e-2, backend=target.backend)
    assert first.data_ptr() >= weights.data_ptr() and second.data_ptr() >= weights.data_ptr()
    # Re-pointed so after the optimizer was built: refused at the next step, nothing changed.
    first, second = torch.nn.Parameter(torch.randn(6, 6, device=target.device)), torch.nn.Parameter(torch.randn(6, 2, device=target.device))
    optimizer = adam_triton.AdamW([first, second], lr=1e-2, backend=target.backend)
    first.grad, second.grad = torch.randn_like(first), torch.randn_like(second)
    optimizer.step()
    second.data = first.data[:, 1:3]
    before = first.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        optimizer.step()
    assert torch.equal(first.detach(), before) and second.data_ptr() == first[:, 1:].data_ptr()


@pytest.mark.parametrize("slices", list(_DISJOINT_SLICES), ids=list(_DISJOINT_SLICES))
def test_interleaved_slices_sharing_no_element_train_as_in_torch(target, slices):
    """Their byte ranges interleave, but no element is shared: accepted, trained as torch's
    for-loop trains them (torch's fused kernel mishandles gappy parameters)."""
    weights = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)).to(target.device)
    results = []
    for make in (
        lambda params: adam_triton.AdamW(params, lr=1e-2, backend=target.backend),
        lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=False),
    ):
        params = [torch.nn.Parameter(t) for t in _DISJOINT_SLICES[slices](weights.clone())]
        optimizer = make(params)
        for step in range(3):
            optimizer.zero_grad()
            (params[0].sin().sum() * (step + 1) + params[1].square().sum()).backward()
            optimizer.step()
        results.append(params)
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=2e-5, atol=2e-6)


def test_a_group_sharing_memory_with_the_optimizer_is_refused_and_not_added(target):
    """weight_norm applied after the optimizer was built: its new Parameter wraps the old
    weight's memory, which is still in the optimizer. Refused, and nothing changes; once
    the old weight is taken out, the new parameters train as under torch."""

    def make_model():
        return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))

    def run(model, optimizer):
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(3, 7, generator=generator).to(target.device)).square().mean().backward()
            optimizer.step()

    ours_model, reference_model = paired(make_model, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        run(model, optimizer)
        old_weight = model[2].weight
        torch.nn.utils.parametrizations.weight_norm(model[2])
        new = list(model[2].parametrizations.weight.parameters())
        if optimizer is ours:
            with pytest.raises(ValueError, match="share memory"):
                optimizer.add_param_group({"params": new})
            assert len(optimizer.param_groups) == 1
        params = optimizer.param_groups[0]["params"]
        params[:] = [p for p in params if p is not old_weight]  # remove() compares values
        optimizer.add_param_group({"params": new})
        run(model, optimizer)
    assert_close_params(ours_model, reference_model)


def _with_empty_and_complex(model):
    model.empty = torch.nn.Parameter(torch.empty(0, device=model.weights[0].device))  # a device-tracking idiom
    model.phase = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64, device=model.weights[0].device))
    return model


def _complex_forward(model, x):
    return model(x) + (model.phase.abs().square() * x[:5]).sum() + model.empty.sum()


@pytest.mark.parametrize(
    "share", ["model.share_memory()", "an empty parameter's share_memory_()", "a moment's share_memory_()"]
)
def test_storages_shared_after_the_optimizer_was_built_keep_training_as_in_torch(share):
    """Moving a storage into shared memory (Hogwild, or a tensor sent through a
    torch.multiprocessing queue) replaces its memory: no other tensor may point into the old
    memory (an empty parameter with the whole buffer's storage left every other parameter
    pointing into freed memory), and a shared moment must still be the optimizer's state."""
    ours_model, reference_model = paired(lambda: _with_empty_and_complex(OddModel()), "cpu", dtype=None)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", "torch", lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        generator = torch.Generator().manual_seed(0)
        for step in range(5):
            if step == 2:
                if share == "model.share_memory()":
                    model.share_memory()
                elif share == "an empty parameter's share_memory_()":
                    model.empty.share_memory_()
                else:
                    optimizer.state[model.weights[1]]["exp_avg"].share_memory_()
                torch.randn(1 << 20)  # reuses freed memory, if any was freed under a tensor
            optimizer.zero_grad()
            _complex_forward(model, torch.randn(8, generator=generator)).backward()
            optimizer.step()
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_complex_real_and_empty_parameters_save_with_torch_save(tmp_path):
    """A storage viewed as two dtypes cannot be saved: complex parameters get buffers of
    their own, and an empty parameter a tensor of its own."""
    model = _with_empty_and_complex(OddModel())
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2)
    assert set(optimizer.backends()) == {(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.complex64)}
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        optimizer.zero_grad()
        _complex_forward(model, torch.randn(8, generator=generator)).backward()
        optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "all.pt")
    loaded = torch.load(tmp_path / "all.pt", weights_only=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    torch.save(model.empty, tmp_path / "empty.pt")
    assert (tmp_path / "empty.pt").stat().st_size < 4096


@pytest.mark.parametrize("through", ["step", "add_param_group"])
def test_a_parameter_given_another_shape_is_refused_before_anything_changes(target, through):
    """Its state no longer fits: a clear error before any parameter moves or any count
    changes, and the optimizer goes on once the shape is back."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)
    original = ours_model.weights[2].data
    steps = [float(ours.state[p]["step"]) for p in ours_model.parameters()]
    pointers = [p.data_ptr() for p in ours_model.parameters()]
    ours_model.weights[2].data = torch.randn(2, 5, device=target.device)
    with pytest.raises(ValueError, match="shape changed"):
        if through == "step":
            for p in ours_model.parameters():
                p.grad = torch.ones_like(p)
            ours.step()
        else:
            ours.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, device=target.device))]})
    assert len(ours.param_groups) == 1
    assert [float(ours.state[p]["step"]) for p in ours_model.parameters()] == steps
    assert [p.data_ptr() for i, p in enumerate(ours_model.parameters()) if i != 2] == pointers[:2] + pointers[3:]
    ours_model.weights[2].data = original
    ours.zero_grad()
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2, seed=3)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_a_parameter_cut_short_where_it_was_is_named_and_trains_as_in_torch_once_given_its_own_memory(target):
    """``emb.weight.data = emb.weight.data[:n]`` (a vocabulary trimmed) keeps the parameter's
    address, by which moves are noticed: the error names that, not the gradient's shape, and
    its advice (memory of its own, fresh state as torch needs) trains on as torch does."""
    ours_model, reference_model = paired(lambda: torch.nn.Embedding(10, 4), target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)

    def train_on(vocabulary, seed, models=((ours_model, ours), (reference_model, reference))):
        for model, optimizer in models:
            tokens = torch.randint(0, vocabulary, (7,), generator=torch.Generator().manual_seed(seed)).to(target.device)
            optimizer.zero_grad()
            model(tokens).square().sum().backward()
            optimizer.step()

    for seed in range(2):
        train_on(10, seed)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        model.weight.data = model.weight.data[:6]
        optimizer.state.pop(model.weight)
    with pytest.raises(RuntimeError, match=r"shape \(10, 4\) became \(6, 4\) where it was .* memory of its own"):
        train_on(6, 2, models=[(ours_model, ours)])
    ours_model.weight.data = ours_model.weight.data.clone()
    for seed in range(2, 5):
        train_on(6, seed)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64], ids=str)
def test_a_gradient_that_cannot_belong_to_its_parameter_is_refused(target, dtype):
    """An integer, boolean or complex gradient of a real parameter (through .data, or a
    grad_dtype): torch's optimizers raise; casting it would train on something else."""
    model = OddModel().to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.weights[1].grad.data = torch.ones(model.weights[1].shape, dtype=dtype, device=target.device)
    with pytest.raises(RuntimeError, match="cannot update a parameter"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad()", "zero_grad(set_to_none=False)"])
def test_model_converted_in_swap_mode_after_a_step(target, set_to_none):
    """torch.utils.swap_tensors (what model.to() uses in swap mode, and for tensor
    subclasses) refuses a gradient that has weak references: the optimizer must hold none
    between steps, or the conversion fails half-way."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        ours_model, reference_model = paired(OddModel, target.device)
        ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            train(model, optimizer, steps=2, set_to_none=set_to_none)
            model.double()
            if optimizer is reference:  # torch's optimizer needs its state cast by hand
                for p in model.parameters():
                    state = optimizer.state[p]
                    state.update({k: v.double() for k, v in state.items() if k != "step"})
            train(model, optimizer, steps=2, seed=2, set_to_none=set_to_none)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert all(p.dtype == torch.float64 for p in ours_model.parameters())
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def _column_slice_of_a_wider_tensor(param, extra_columns=7):
    """A tensor wider than ``param`` whose first columns hold its values, and the rest
    random values that are no part of it."""
    generator = torch.Generator().manual_seed(11)
    rows, columns = param.shape
    wider = torch.randn(rows, columns + extra_columns, generator=generator).to(param.device)
    wider[:, :columns] = param.detach()
    return wider


@pytest.mark.parametrize("how", ["data re-pointed after some steps", "a Parameter of a slice in shared memory"])
def test_a_parameter_left_in_place_that_is_not_dense_is_updated_as_in_torch(target, how):
    """Parameters that stay where they are (``.data`` re-pointed at storage of the same kind,
    or shared memory) may be column slices of a wider tensor. Only their own elements are
    updated, as torch updates them; the rest of the wider tensor is not touched."""
    if how == "a Parameter of a slice in shared memory" and target.device != "cpu":
        pytest.skip("shared memory is for CPU tensors")
    ours_model, reference_model = paired(lambda: OddModel(shapes=[(5,), (7, 13), (3, 4)]), target.device)
    wider = {}

    def make_slice(model):
        wider[model] = _column_slice_of_a_wider_tensor(model.weights[1])
        return wider[model][:, :13]

    if how == "a Parameter of a slice in shared memory":
        for model in (ours_model, reference_model):
            model.weights[1] = torch.nn.Parameter(make_slice(model))
            model.share_memory()
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, amsgrad=True)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
        if how == "data re-pointed after some steps":
            model.weights[1].data = make_slice(model)
        train(model, optimizer, steps=3, seed=2)
    assert ours_model.weights[1].data_ptr() == wider[ours_model].data_ptr()
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)
    assert torch.equal(wider[ours_model][:, 13:], wider[reference_model][:, 13:])


@pytest.mark.parametrize("kept", [False, True], ids=["only the parameter holds it", "the new tensor kept"])
def test_data_given_storage_of_the_same_kind_is_re_homed_unless_someone_else_holds_it(target, kept):
    """``p.data = t`` (as ``torch.nn.utils.prune.remove`` does): with ``t`` dropped, nobody
    else can read it, so the parameter goes back into its flat buffer, whose segment would
    otherwise sit unused beside it (a second copy of the parameter, for good). With ``t``
    kept, it is updated there, where ``t`` sees it, as under torch."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, amsgrad=True)
    new_values = torch.randn(ours_model.weights[2].shape, generator=torch.Generator().manual_seed(5)).to(target.device)
    held = {}
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
        replacement = new_values.clone()
        if kept:
            held[model] = replacement
        model.weights[2].data = replacement
        del replacement
        train(model, optimizer, steps=3, seed=2)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)
    weight = ours_model.weights[2]
    buffer = next(b for b in ours._engine.buffers if any(p is weight for p in b.params))
    in_buffer = buffer.param.data_ptr() <= weight.data_ptr() < buffer.param.data_ptr() + buffer.param.nbytes
    assert in_buffer != kept
    if kept:
        assert torch.equal(held[ours_model], weight.detach())


@pytest.mark.parametrize("when", ["at construction", "re-pointed after some steps", "unfrozen after loading its state"])
def test_a_parameter_whose_elements_share_memory_is_refused_before_anything_changes(target, when):
    """An expanded tensor (stride 0) cannot be updated in place (torch raises at its step),
    and a segment of its own would untie its elements: a clear error, with nothing moved or
    counted. Frozen, it is harmless and accepted, as torch accepts it. Elements that share
    memory without a zero stride (overlapping rows) are refused alike."""
    overlapping = torch.nn.Parameter(torch.randn(5, device=target.device).as_strided((2, 3), (2, 1)))
    with pytest.raises(ValueError, match="share memory"):
        adam_triton.AdamW([overlapping], lr=1e-2, backend=target.backend)
    model = OddModel(shapes=[(5,), (7, 13)]).to(target.device)
    expanded = torch.randn(1, device=target.device).expand(5)
    if when == "at construction":
        model.weights[0] = torch.nn.Parameter(expanded)
        with pytest.raises(ValueError, match="share memory"):
            adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
        model.weights[0].requires_grad_(False)
        optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
        train(model, optimizer, steps=2)
        assert model.weights[0].data_ptr() == expanded.data_ptr() and model.weights[0].stride() == (0,)
        assert optimizer.state.get(model.weights[0]) is None
        model.weights[0].requires_grad_(True)  # and unfrozen later: refused at the step that would train it
        steps = float(optimizer.state[model.weights[1]]["step"])
        model(torch.randn(8, device=target.device)).backward()
        with pytest.raises(ValueError, match="share memory"):
            optimizer.step()
        assert float(optimizer.state[model.weights[1]]["step"]) == steps
        return
    if when == "unfrozen after loading its state":
        # A checkpoint with state for it puts it among the trained parameters' buffer.
        reference_model = copy.deepcopy(model)
        reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2)
        train(reference_model, reference, steps=2)
        model.weights[0] = torch.nn.Parameter(expanded, requires_grad=False)
        optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
        optimizer.load_state_dict(reference.state_dict())
        model.weights[0].requires_grad_(True)
        model(torch.randn(8, device=target.device)).backward()
        with pytest.raises(ValueError, match="share memory"):
            optimizer.step()
        assert [float(optimizer.state[p]["step"]) for p in model.parameters()] == [2.0, 2.0]
        assert model.weights[0].data_ptr() == expanded.data_ptr()
        return
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    model.weights[0].data = expanded
    model(torch.randn(8, device=target.device)).backward()
    with pytest.raises(ValueError, match="share memory"):
        optimizer.step()
    assert [float(optimizer.state[p]["step"]) for p in model.parameters()] == [2.0, 2.0]
    assert torch.equal(model.weights[1], before[1]) and model.weights[0].data_ptr() == expanded.data_ptr()


def _lazy_model(device):
    torch.manual_seed(0)
    lazy_body = torch.nn.Sequential(torch.nn.LazyLinear(5), torch.nn.Tanh())
    return torch.nn.Sequential(lazy_body, torch.nn.Linear(5, 1), torch.nn.LazyLinear(1)).to(device)


def _train_lazy(model, optimizer, seed: int, steps: int = 3, set_to_none: bool = True):
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        model(torch.randn(6, 9, generator=generator).to(device)).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "how", ["in the constructor", "zeroed with set_to_none=False", "beside an added group", "checkpoint loaded first"]
)
def test_a_lazy_modules_parameters_train_like_torch_when_the_optimizer_comes_before_the_first_forward(target, how):
    """torch's optimizers take a lazy module's uninitialized parameters and step them once the
    first forward has made them real (the same Parameter objects). Ours leaves them out of
    its buffers until then, takes them in at the next look, and gives torch's numbers; a
    checkpoint may be loaded before that forward, as into torch's."""
    if how == "checkpoint loaded first":
        trained = _lazy_model(target.device)
        trained_optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
        _train_lazy(trained, trained_optimizer, seed=3)
        checkpoint = copy.deepcopy({"model": trained.state_dict(), "optimizer": trained_optimizer.state_dict()})
    results = []
    for make in (partial(adam_triton.AdamW, backend=target.backend), torch.optim.AdamW):
        model = _lazy_model(target.device)
        # Added: a group of real parameters after one of lazy ones only, so no join follows.
        added = how == "beside an added group"
        optimizer = make([*model[0].parameters(), *model[2].parameters()] if added else model.parameters(), lr=1e-2)
        if added:
            optimizer.add_param_group({"params": list(model[1].parameters()), "lr": 3e-2})
        if how == "checkpoint loaded first":
            optimizer.load_state_dict(copy.deepcopy(checkpoint["optimizer"]))
            model.load_state_dict(checkpoint["model"])  # lazy modules take their shapes from it
        _train_lazy(model, optimizer, seed=4, set_to_none=how != "zeroed with set_to_none=False")
        results.append((model, optimizer))
    (ours_model, ours), (reference_model, reference) = results
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)
    assert ours_model[0][0].weight.shape == (5, 9)


def test_a_lazy_parameter_never_run_stays_out_of_the_way(target):
    """A lazy module the forward never reaches stays uninitialized: the others train to
    torch's numbers, and checkpoints list it without state, as torch's do."""
    results = []
    for make in (partial(adam_triton.Adam, backend=target.backend), torch.optim.Adam):
        model = _lazy_model(target.device)
        unused = torch.nn.LazyLinear(4).to(target.device)
        optimizer = make([*model.parameters(), *unused.parameters()], lr=1e-2, amsgrad=True)
        _train_lazy(model, optimizer, seed=5)
        results.append((model, optimizer, unused))
    (ours_model, ours, unused), (reference_model, reference, _) = results
    assert_close_params(ours_model, reference_model)
    assert torch.nn.parameter.is_lazy(unused.weight)
    saved, expected = ours.state_dict(), reference.state_dict()
    assert saved["param_groups"][0]["params"] == expected["param_groups"][0]["params"] == list(range(8))
    assert saved["state"].keys() == expected["state"].keys() == set(range(6))


def test_a_checkpoint_loaded_before_the_first_forward_that_does_not_fit_is_refused_at_the_step(target):
    """Before the forward a lazy parameter has no shape to check a checkpoint against; once
    it has one that the loaded state does not fit, the step refuses it before anything
    changes (torch's fails inside its update)."""
    trained = _lazy_model(target.device)
    trained_optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    _train_lazy(trained, trained_optimizer, seed=3)
    model = _lazy_model(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    optimizer.load_state_dict(copy.deepcopy(trained_optimizer.state_dict()))
    model(torch.randn(6, 8, device=target.device)).square().mean().backward()  # 8 features, not 9
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"shape changed from \(5, 9\) to \(5, 8\)"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert [float(entry["step"]) for entry in optimizer.state.values()] == [3.0] * 6


@pytest.mark.parametrize("between", ["zero_grad(set_to_none=False)", "a step without gradients"])
def test_masters_loaded_before_a_lazy_modules_forward_survive_until_the_model_is_loaded(target, between):
    """A bfloat16 lazy model resumed with master weights: the optimizer's checkpoint first,
    then the dry run, then (after a zero_grad or step that takes the parameters in) the
    model's weights. The float32 masters must survive to meet those weights, as they do
    for an optimizer built after the dry run: training goes on bit for bit as if never
    interrupted."""

    def lazy_bf16_model():
        return torch.nn.Sequential(
            torch.nn.LazyLinear(4, dtype=torch.bfloat16), torch.nn.Tanh(), torch.nn.LazyLinear(2, dtype=torch.bfloat16)
        ).to(target.device)

    def train_bf16(model, optimizer, steps):
        for step in steps:
            optimizer.zero_grad()
            x = torch.randn(5, 7, generator=torch.Generator().manual_seed(step)).to(target.device, torch.bfloat16)
            model(x).float().square().sum().backward()
            optimizer.step()

    torch.manual_seed(0)
    original = lazy_bf16_model()
    options = {"lr": 1e-2, "master_weights": True, "backend": target.backend}
    original_optimizer = adam_triton.AdamW(original.parameters(), **options)
    train_bf16(original, original_optimizer, range(4))
    checkpoint = copy.deepcopy({"model": original.state_dict(), "optimizer": original_optimizer.state_dict()})
    train_bf16(original, original_optimizer, range(4, 7))

    torch.manual_seed(5)
    resumed = lazy_bf16_model()
    optimizer = adam_triton.AdamW(resumed.parameters(), **options)
    optimizer.load_state_dict(copy.deepcopy(checkpoint["optimizer"]))
    with torch.no_grad():
        resumed(torch.randn(1, 7, device=target.device, dtype=torch.bfloat16))  # the dry run
    if between == "a step without gradients":
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=False)
    resumed.load_state_dict(checkpoint["model"])
    train_bf16(resumed, optimizer, range(4, 7))
    for a, b in zip(resumed.parameters(), original.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["master_param"], original_optimizer.state[b]["master_param"])


@pytest.mark.parametrize("kind", ["on the meta device", "float16 with stochastic_rounding, no masters"])
def test_a_lazy_parameter_the_buffers_could_not_hold_is_refused_when_the_optimizer_is_built(target, kind):
    """Its dtype and device are known before its forward: refused then, as a real parameter
    of that kind is, not at the first step after the forward."""
    if kind == "on the meta device":
        model, options, message = torch.nn.LazyLinear(3, device="meta"), {}, "meta device"
    else:
        model = torch.nn.LazyLinear(3, dtype=torch.float16).to(target.device)
        options, message = {"stochastic_rounding": True}, "float16 parameters need master_weights=True"
    with pytest.raises(ValueError, match=message):
        adam_triton.AdamW(model.parameters(), backend=target.backend, **options)
    real = torch.nn.Linear(2, 2).to(target.device)
    optimizer = adam_triton.AdamW(real.parameters(), backend=target.backend, **options)
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": list(model.parameters())})
    assert len(optimizer.param_groups) == 1


def test_parameters_on_the_meta_device_are_refused(target):
    """torch's optimizer takes them, but ``model.to_empty`` then gives the model new Parameter
    objects (outside swap mode), so an optimizer built before never updates the model: a
    clear error instead of training that silently does nothing."""
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    stale = model.weight
    torch.optim.AdamW(model.parameters())
    model.to_empty(device=target.device)
    assert model.weight is not stale  # why torch's optimizer would update nothing
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta device: build the optimizer after model.to_empty"):
        adam_triton.AdamW(model.parameters(), backend=target.backend)


def test_dense_parameters_left_in_place_off_the_vector_alignment_are_copied_only_for_the_kernel(target):
    """Views of a packed bucket in shared memory (left in place) at an odd offset: torch's
    kernels update them where they are; only the Triton kernel, whose accesses are 16-byte
    vectors, needs them copied into their segment and back. Both give torch's numbers."""
    if target.device != "cpu":
        pytest.skip("shared memory is for CPU tensors")
    generator = torch.Generator().manual_seed(3)
    bucket = torch.randn(40, generator=generator).share_memory_()
    ours_params = [torch.nn.Parameter(bucket[3:13]), torch.nn.Parameter(bucket[16:33])]  # 12 and 64 bytes in
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = adam_triton.AdamW(ours_params, lr=1e-2, backend=target.backend)
    reference = torch.optim.AdamW(reference_params, lr=1e-2)
    for params, optimizer in ((ours_params, ours), (reference_params, reference)):
        data = torch.Generator().manual_seed(4)
        for _ in range(3):
            optimizer.zero_grad()
            sum(((p - torch.randn(p.shape, generator=data)) ** 2).sum() for p in params).backward()
            optimizer.step()
    (buffer,) = ours._engine.buffers
    assert len(buffer.staged_params) == (1 if target.backend == "triton" else 0)
    for a, b in zip(ours_params, reference_params):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert ours_params[0].data_ptr() == bucket.data_ptr() + 12


@pytest.mark.parametrize("when", ["at construction", "in a group added after some steps"])
def test_inference_tensors_stay_as_they_are_and_are_refused_once_they_have_a_gradient(target, when):
    """A feature extractor made under torch.inference_mode() and run under no_grad, given to
    the optimizer with the rest of the model (torch's accepts it): nothing may write an
    inference tensor outside inference mode, so it stays where it is and keeps working while
    the head trains to torch's numbers. A gradient for it is refused before anything
    changes; torch's default raises at that step too."""
    device = target.device

    def build():
        torch.manual_seed(0)
        with torch.inference_mode():
            extractor = torch.nn.Linear(6, 5, device=device)
        return extractor, torch.nn.Linear(5, 3, device=device)

    def run(extractor, head, optimizer, steps, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            optimizer.zero_grad()
            with torch.no_grad():
                features = extractor(torch.randn(8, 6, generator=generator).to(device))
            head(features).square().mean().backward()
            optimizer.step()

    runs = []
    for cls, options in ((adam_triton.AdamW, {"backend": target.backend}), (torch.optim.AdamW, {})):
        extractor, head = build()
        pointers = [p.data_ptr() for p in extractor.parameters()]
        if when == "at construction":
            optimizer = cls([*extractor.parameters(), *head.parameters()], lr=1e-2, **options)
            run(extractor, head, optimizer, steps=3, seed=1)
        else:
            optimizer = cls(head.parameters(), lr=1e-2, **options)
            run(extractor, head, optimizer, steps=2, seed=1)
            optimizer.add_param_group({"params": list(extractor.parameters())})
            run(extractor, head, optimizer, steps=2, seed=2)
        assert [p.data_ptr() for p in extractor.parameters()] == pointers
        runs.append((extractor, head, optimizer))
    (extractor, head, ours), (reference_extractor, reference_head, reference) = runs
    assert all(torch.equal(a, b) for a, b in zip(extractor.parameters(), reference_extractor.parameters()))
    assert_close_params(head, reference_head)
    extractor(torch.randn(2, 6, device=device))  # still a working module

    # Outside no_grad the extractor's bias gets a gradient (its weight cannot: autograd
    # keeps no inference tensor for backward).
    for model, optimizer in ((extractor, ours), (reference_extractor, reference)):
        optimizer.zero_grad()
        head(model(torch.randn(4, 6, device=device))).sum().backward()
    assert extractor.bias.grad is not None
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        reference.step()
    head_before = [p.detach().clone() for p in head.parameters()]
    steps_before = [float(ours.state[p]["step"]) for p in head.parameters()]
    with pytest.raises(RuntimeError, match="inference tensor"):
        ours.step()
    assert all(torch.equal(p, b) for p, b in zip(head.parameters(), head_before))
    assert [float(ours.state[p]["step"]) for p in head.parameters()] == steps_before


def test_tensor_subclass_parameters_stay_frozen_and_are_refused_once_they_have_a_gradient(target):
    """A frozen base of a ``__torch_dispatch__`` subclass (a quantized base under a trainable
    adapter, QLoRA-style) given to the optimizer with the adapter: it stays as it is and the
    adapter trains to torch's numbers. Once the base has a gradient, the step raises before
    anything changes: written into the base's own memory, an update would never reach the
    values the subclass keeps elsewhere (it silently did not train, before)."""
    device = target.device
    runs = []
    for cls, options in ((adam_triton.AdamW, {"backend": target.backend}), (torch.optim.AdamW, {})):
        base_values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(device)
        base = torch.nn.Parameter(Wrapped(base_values), requires_grad=False)
        adapter = torch.nn.Parameter(torch.randn(7, 3, generator=torch.Generator().manual_seed(1)).to(device))
        optimizer = cls([base, adapter], lr=1e-2, **options)
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            optimizer.zero_grad()
            (torch.randn(4, 5, generator=generator).to(device) @ base.values @ adapter).tanh().sum().backward()
            optimizer.step()
        assert type(base) is Wrapped and base.values.data_ptr() == base_values.data_ptr()
        runs.append((base, adapter, optimizer))
    (base, adapter, ours), (_, reference_adapter, _) = runs
    torch.testing.assert_close(adapter, reference_adapter)
    torch.testing.assert_close(base.values, torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(device))

    base.requires_grad_(True)
    ours.zero_grad()
    (base * 2).sum().backward()
    adapter.grad = torch.ones_like(adapter)
    base_before, adapter_before = base.values.clone(), adapter.detach().clone()
    with pytest.raises(TypeError, match="Wrapped, a tensor subclass with __torch_dispatch__"):
        ours.step()
    assert torch.equal(base.values, base_before) and torch.equal(adapter, adapter_before)
    assert float(ours.state[adapter]["step"]) == 3 and base not in ours.state


def test_an_inference_tensor_beside_parameters_in_shared_memory_needs_no_room_and_breaks_nothing(target):
    """Every parameter of the buffer stays where it is (one in shared memory, trained there;
    a column slice made under inference_mode, never written), so the buffer makes no room
    for parameters; the update must then address neither of them in that room."""
    if target.device != "cpu":
        pytest.skip("shared memory (Hogwild) is for CPU tensors")
    runs = []
    for cls, options in ((adam_triton.AdamW, {"backend": target.backend}), (torch.optim.AdamW, {})):
        with torch.inference_mode():
            table = torch.randn(40, 60, generator=torch.Generator().manual_seed(0))
            frozen_columns = torch.nn.Parameter(table[:, :30])
        shared = torch.nn.Parameter(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))
        shared.share_memory_()
        optimizer = cls([shared, frozen_columns], lr=1e-2, **options)
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            optimizer.zero_grad()
            (shared - torch.randn(5, 5, generator=generator)).square().sum().backward()
            optimizer.step()
        assert shared.is_shared()
        runs.append((shared, frozen_columns))
    (ours_shared, ours_columns), (reference_shared, reference_columns) = runs
    torch.testing.assert_close(ours_shared, reference_shared)
    assert torch.equal(ours_columns, reference_columns)


def test_a_parameter_given_an_inference_tensors_data_trains_as_in_torch(target):
    """``p.data = t`` with ``t`` made under inference mode: ``p`` reports is_inference() but
    keeps its own version counter and may be written, so torch trains it, and so must we."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
        with torch.inference_mode():
            loaded = torch.randn(model.weights[3].shape, generator=torch.Generator().manual_seed(5))
        model.weights[3].data = loaded.to(target.device)
        train(model, optimizer, steps=2, seed=2)
    assert ours_model.weights[3].is_inference()
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize("how", ["shorter", "longer", "of another rank"])
def test_a_gradient_given_data_of_another_shape_is_refused_before_anything_changes(target, how):
    """``p.grad = g`` checks the shape, ``p.grad.data = g`` does not. torch's for-loop raises
    at the step and its fused kernel reads past the gradient; we raise before any buffer (here
    a float64 one comes first) is updated or counted."""
    device = target.device
    generator = torch.Generator().manual_seed(7)
    first = torch.nn.Parameter(torch.randn(4, dtype=torch.float64, generator=generator).to(device))
    params = [torch.nn.Parameter(torch.randn(n, generator=generator).to(device)) for n in (3, 7, 5)]
    ours = adam_triton.AdamW([first, *params], lr=1e-2, backend=target.backend)
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.AdamW(reference_params, lr=1e-2, foreach=False)
    for group, optimizer in (([first, *params], ours), (reference_params, reference)):
        gradients = torch.Generator().manual_seed(8)
        for p in group:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gradients).to(device)
        optimizer.step()
    for bad in (params[1], reference_params[1]):
        if how == "shorter":
            bad.grad.data = torch.randn(6, device=device)
        elif how == "longer":
            bad.grad.data = torch.randn(8, device=device)
        else:
            bad.grad.data = torch.randn(7, 1, device=device)
    with pytest.raises(RuntimeError):
        reference.step()
    before = [p.detach().clone() for p in (first, *params)]
    with pytest.raises(RuntimeError, match=r"a gradient of shape \(.*\) cannot update a parameter of shape \(7,\)"):
        ours.step()
    assert all(torch.equal(p, b) for p, b in zip((first, *params), before))
    assert [float(ours.state[p]["step"]) for p in (first, *params)] == [1.0] * 4


# Kept gradients (views of our gradient buffer) handed to other parameters after backward,
# as code that permutes heads or experts together with their gradients does.
_KEPT_GRADIENTS_REARRANGED = {
    "a gradient transposed in place": lambda g: [g[0].t(), g[1], g[2]],
    "two traded": lambda g: [g[1], g[0], g[2]],
    "three rotated and transposed": lambda g: [g[2].t(), g[0].t(), g[1].t()],
}


def _train_with_rearranged_kept_gradients(model, optimizer, rearrange, scaler=None, steps=3, rearranged_at=(1,)):
    generator = torch.Generator().manual_seed(5)
    device = next(model.parameters()).device
    for step in range(steps):
        optimizer.zero_grad(set_to_none=False)
        loss = model(torch.randn(8, generator=generator).to(device))
        (scaler.scale(loss) if scaler else loss).backward()
        if step in rearranged_at:
            weights = model.weights
            for weight, grad in zip(weights, rearrange([w.grad for w in weights[:3]])):
                weight.grad = grad
        # Stepped twice on the rearranged gradients: the second step finds them as before.
        for _ in range(2 if step in rearranged_at else 1):
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "GradScaler unscaling in the step"])
@pytest.mark.parametrize("rearrange", list(_KEPT_GRADIENTS_REARRANGED), ids=list(_KEPT_GRADIENTS_REARRANGED))
def test_kept_gradients_traded_between_parameters_are_read_as_in_torch(target, rearrange, scaled):
    """Gradients that are views of our gradient buffer at another parameter's place, or at
    their own in another layout, were staged into the buffer one by one: over a gradient
    still to be read (a parameter stepped with its neighbour's new gradient) or over their
    own source (an overlap error). They are copied apart first now, and each parameter is
    left with torch's gradient, unscaled by the step where GradScaler asks for that."""
    make = lambda: OddModel(shapes=[(9, 9)] * 3 + [(17,), (2, 1031)])  # noqa: E731
    ours_model, reference_model = paired(make, target.device)
    # The reference is torch's for-loop: its CPU fused kernel ignores a gradient's strides.
    ours = adam_triton.AdamW(ours_model.parameters(), lr=1e-2, backend=target.backend, fused=scaled or None)
    reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler(target.device, init_scale=2.0**10) if scaled else None for _ in range(2)]
    for model, optimizer, scaler in zip((ours_model, reference_model), (ours, reference), scalers):
        _train_with_rearranged_kept_gradients(model, optimizer, _KEPT_GRADIENTS_REARRANGED[rearrange], scaler, steps=2)
    assert ours._engine.buffers[0].last_plan.copied_apart
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)
    for model, optimizer, scaler in zip((ours_model, reference_model), (ours, reference), scalers):
        _train_with_rearranged_kept_gradients(model, optimizer, _KEPT_GRADIENTS_REARRANGED[rearrange], scaler)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize("rearrange", list(_KEPT_GRADIENTS_REARRANGED)[1:], ids=list(_KEPT_GRADIENTS_REARRANGED)[1:])
def test_kept_gradients_traded_between_many_small_parameters_train_like_torch(rearrange, two_torch_threads):
    """On the CPU backend with two threads, many small fresh gradients were once gathered
    into the flat gradient buffer one copy after another, and traded kept gradients were
    read after the copy for their neighbour had overwritten them. They are copied apart
    first, and the long list is updated on one thread."""
    make = lambda: OddModel(shapes=[(5, 5)] * 3 + [(7,)] * 70)  # noqa: E731
    ours_model, reference_model = paired(make, "cpu")
    ours, reference = optimizers(ours_model, reference_model, "AdamW", "torch", lr=1e-2, foreach=False)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        _train_with_rearranged_kept_gradients(model, optimizer, _KEPT_GRADIENTS_REARRANGED[rearrange], steps=2)
    assert ours._engine.buffers[0].last_plan.copied_apart
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def _flatten_like_cudnn(rnn: torch.nn.RNNBase) -> None:
    """What ``flatten_parameters()`` does on CUDA: copy the weights into one new chunk and
    re-point each at its slice (``set_``), so that they share one storage."""
    weights = rnn._flat_weights
    chunk = torch.empty(sum(w.numel() for w in weights), dtype=weights[0].dtype, device=weights[0].device)
    offset = 0
    with torch.no_grad():
        for weight in weights:
            view = chunk[offset : offset + weight.numel()].view_as(weight)
            view.copy_(weight)
            weight.set_(view)
            offset += weight.numel()


def test_rnn_weights_flattened_once_after_the_optimizer_was_built_are_updated_where_they_are(target, monkeypatch):
    """The README's advice for cuDNN's RNNs: flattened into one chunk after the optimizer
    moved them, the weights stay in that chunk (held by each other, so left in place), are
    updated there as torch updates them, and are not re-homed at every step."""
    from adam_triton._engine import Engine

    torch.manual_seed(0)
    ours_model = torch.nn.LSTM(6, 10, num_layers=2, batch_first=True).to(target.device)
    reference_model = copy.deepcopy(ours_model)
    ours = adam_triton.Adam(ours_model.parameters(), lr=1e-2, backend=target.backend)
    reference = torch.optim.Adam(reference_model.parameters(), lr=1e-2, foreach=False)
    for model in (ours_model, reference_model):
        _flatten_like_cudnn(model)
    where = [p.data_ptr() for p in ours_model.parameters()]
    rebuilds = []
    rebuild = Engine.rebuild
    monkeypatch.setattr(Engine, "rebuild", lambda self, *a, **k: rebuilds.append(1) or rebuild(self, *a, **k))
    generator = torch.Generator().manual_seed(1)
    for step in range(5):
        if step == 2:
            rebuilds.clear()
        x = torch.randn(3, 4, 6, generator=generator).to(target.device)
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            optimizer.zero_grad()
            model(x)[0].pow(2).mean().backward()
            optimizer.step()
    assert [p.data_ptr() for p in ours_model.parameters()] == where
    assert not rebuilds
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def _gradients_in_a_flat_tensor_of_ones_own(model, how: str) -> torch.Tensor:
    """A flat gradient tensor the user owns, as Megatron-LM and Apex keep one, with each
    parameter's gradient a slice of it that does not say so in ``_base``."""
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    offset = 0
    for p in params:
        end = offset + p.numel()
        if how == "a gradient hook's returned slice":  # autograd keeps it, without its _base
            p.register_hook(lambda g, offset=offset, end=end: flat[offset:end].view_as(g).copy_(g))
        else:
            p.grad = flat[offset:end].view_as(p).detach()
        offset = end
    return flat


# (A hook's slice becomes the gradient at the first backward: only zero_grad zeroes it first.)
@pytest.mark.parametrize(
    "how, zeroed_by",
    [
        ("detached slices", "zero_grad(set_to_none=False)"),
        ("detached slices", "the user"),
        ("a gradient hook's returned slice", "zero_grad(set_to_none=False)"),
    ],
)
def test_gradients_that_are_slices_of_a_users_flat_tensor_stay_there(target, how, zeroed_by):
    """torch zeroes such gradients in place and backward accumulates into them, so the
    user's flat tensor sees every gradient (and edits of it, an all-reduce's, reach the
    update). We moved them into our gradient buffer, at zero_grad or at the first step,
    as we move gradients that are alone in their storage, and the user's tensor was cut
    off: wrong numbers, or gradients accumulated across steps."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, foreach=False)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        optimizer.zero_grad(set_to_none=False)  # nothing to zero yet: under torch, a no-op
        flat = _gradients_in_a_flat_tensor_of_ones_own(model, how)
        generator = torch.Generator().manual_seed(3)
        for _ in range(3):
            if zeroed_by == "the user":
                flat.zero_()
            else:
                optimizer.zero_grad(set_to_none=False)
            model(torch.randn(8, generator=generator).to(target.device)).backward()
            flat.mul_(0.5)  # as an all-reduce averaging over two ranks writes it
            optimizer.step()
            begin, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
            assert all(begin <= p.grad.data_ptr() < end for p in model.parameters())
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize("tied", ["before the loop", "at the loop's first step", "to a kept one at the first step"])
def test_parameters_given_one_gradient_tensor_keep_sharing_it(target, tied):
    """``b.grad = a.grad``: torch zeroes the one tensor in place and backward adds both
    parameters' gradients into it. Moving it into our buffer gave each parameter a view of
    its own (at zero_grad, or at the first step of a kept loop), which cut the tie."""
    make = lambda: OddModel(shapes=[(7, 13), (7, 13), (17,)])  # noqa: E731
    ours_model, reference_model = paired(make, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, foreach=False)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        a, b = model.weights[0], model.weights[1]
        generator = torch.Generator().manual_seed(4)
        if tied != "at the loop's first step":
            model(torch.randn(8, generator=generator).to(target.device)).backward()
            if tied == "before the loop":
                b.grad = a.grad
            optimizer.step()
        if tied == "to a kept one at the first step":
            optimizer.zero_grad(set_to_none=False)  # b's gradient kept, a's new at the next backward
            a.grad = None
        for step in range(3):
            optimizer.zero_grad(set_to_none=False)
            model(torch.randn(8, generator=generator).to(target.device)).backward()
            if tied != "before the loop" and step == 0:
                if tied == "to a kept one at the first step":
                    a.grad = b.grad
                else:
                    b.grad = a.grad
            optimizer.step()
            assert a.grad is b.grad
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=2e-6)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)
