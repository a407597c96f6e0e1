"""State tensors replaced between steps, checked against torch's optimizer doing the same.

torch's optimizer steps on whatever tensors ``optimizer.state[p]`` holds, so code that
offloads the state to the CPU and brings it back (by assignment, as RLHF trainers do, or
through ``.data``), or that replaces one moment or step count by hand, changes what the
next step starts from. Ours must take such tensors in at the next step, and must never let
a ``.data`` swap on a state tensor redirect its own update.
"""

import pytest
import torch
from helpers import OddModel, assert_close_params, assert_close_state, optimizers, paired, train

import adam_triton
from adam_triton import _engine, _layout

# A parameter longer than a chunk: its step counter is one per chunk, all of which must
# take a replaced count.
SHAPES = [(37,), (5, 3001), (129,), (7, 13)]


def _offload_by_assignment(optimizer, device):
    """Moved to the CPU and back, each tensor replaced in its entry (verl's offloading)."""
    for target in ("cpu", device):
        for entry in optimizer.state.values():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    entry[key] = value.to(target, copy=True)


def _offload_through_data(optimizer, device):
    """Moved to the CPU and back, each tensor given new ``.data``."""
    for target in ("cpu", device):
        for entry in optimizer.state.values():
            for value in entry.values():
                if isinstance(value, torch.Tensor):
                    value.data = value.data.to(target, copy=True)


def _moments_reset_by_assignment(optimizer, device):
    for entry in list(optimizer.state.values())[1:3]:
        entry["exp_avg"] = torch.zeros_like(entry["exp_avg"])
        entry["exp_avg_sq"] = torch.full_like(entry["exp_avg_sq"], 1e-3)


def _step_counts_set_by_assignment(optimizer, device):
    for entry in optimizer.state.values():
        entry["step"] = torch.tensor(1.0)


def _maxima_given_new_data(optimizer, device):
    for entry in optimizer.state.values():
        entry["max_exp_avg_sq"].data = entry["max_exp_avg_sq"].data * 4.0


CHANGES = [
    pytest.param(_offload_by_assignment, id="offloaded and back by assignment"),
    pytest.param(_offload_through_data, id="offloaded and back through .data"),
    pytest.param(_moments_reset_by_assignment, id="moments replaced"),
    pytest.param(_step_counts_set_by_assignment, id="step counts replaced"),
    pytest.param(_maxima_given_new_data, id="AMSGrad maxima given new .data"),
]


def _train_around(change, target, after=None):
    """Three steps, the change, (``after``), three more: ours and torch's."""
    ours_model, reference_model = paired(lambda: OddModel(shapes=SHAPES), target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, amsgrad=True)
    assert len(ours._engine.buffers[0].chunk_rows) > len(SHAPES)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)
        change(optimizer, target.device)
        if after is not None:
            after(optimizer)
        train(model, optimizer, steps=3, seed=2)
    return ours_model, reference_model, ours, reference


@pytest.mark.parametrize("change", CHANGES)
def test_state_tensors_replaced_between_steps_are_the_ones_used_as_in_torch(target, change):
    ours_model, reference_model, ours, reference = _train_around(change, target)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)
    # The entries are views of the buffer again: later steps show in them and in checkpoints.
    moments = ours._engine.buffers[0].exp_avg.untyped_storage().data_ptr()
    for p in ours_model.parameters():
        assert ours.state[p]["exp_avg"].untyped_storage().data_ptr() == moments


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(lambda optimizer: optimizer.state.clear(), id="then the state reset"),
        pytest.param(lambda optimizer: optimizer.load_state_dict(optimizer.state_dict()), id="then its own checkpoint loaded"),
    ],
)
def test_state_swapped_through_data_then_reset_or_loaded_trains_as_in_torch(target, after):
    """A reset or a load writes the optimizer's own views: none of them may be one whose
    ``.data`` a user swapped (which would write the user's tensor, not the buffer)."""
    ours_model, reference_model, ours, reference = _train_around(_offload_through_data, target, after)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_without_storage_use_counts_replacements_are_still_seen(target, monkeypatch):
    """Where torch cannot count a storage's users, every step looks at every state tensor."""
    monkeypatch.setattr(_layout, "STORAGE_USE_COUNT", None)
    ours_model, reference_model, ours, reference = _train_around(_moments_reset_by_assignment, target)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_steps_look_at_each_state_tensor_only_after_a_change(monkeypatch):
    """The pass over every state tensor is not on the hot path: a usual loop (with
    checkpoints taken and the state read) makes it only at its first step."""
    looked = []
    real = _engine.replaced_state_tensors
    monkeypatch.setattr(_engine, "replaced_state_tensors", lambda *a: looked.append(1) or real(*a))
    model = OddModel(shapes=SHAPES)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20)
    for step in range(6):
        optimizer.zero_grad(set_to_none=step % 2 == 0)
        model(torch.randn(8)).backward()
        optimizer.step()
        scheduler.step()
        checkpoint = optimizer.state_dict()
        assert all(entry["exp_avg_sq"].min() >= 0 for entry in checkpoint["state"].values())
    assert len(looked) == 1
    _moments_reset_by_assignment(optimizer, "cpu")
    optimizer.step()
    assert len(looked) == 2


@pytest.mark.parametrize("default_dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_a_step_count_assigned_as_a_number_is_exact_whatever_the_default_dtype(target, default_dtype):
    """``state[p]["step"] = 3001`` taken in by a step run under a float16 or bfloat16
    default dtype must not round on the way (3001 is 3000 in bfloat16, 3000 in float16):
    the bias corrections would use another count. torch's oracle gets the count as a
    float32 tensor (a number step fails in torch's step under such a default)."""
    ours_model, reference_model = paired(lambda: OddModel(shapes=SHAPES), target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer, count in (
        (ours_model, ours, lambda: 3001),
        (reference_model, reference, lambda: torch.tensor(3001.0, dtype=torch.float32)),
    ):
        train(model, optimizer, steps=2)
        for entry in optimizer.state.values():
            entry["step"] = count()
        optimizer.zero_grad()
        model(torch.randn(8, generator=torch.Generator().manual_seed(5)).to(target.device)).backward()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default_dtype)
        try:
            optimizer.step()
        finally:
            torch.set_default_dtype(previous)
        train(model, optimizer, steps=2, seed=2)
    assert {float(entry["step"]) for entry in ours.state.values()} == {3004.0}
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda entry: entry.__setitem__("exp_avg", torch.zeros(3)), id="moment of another shape"),
        pytest.param(lambda entry: entry.__setitem__("exp_avg_sq", 0.0), id="moment as a number"),
        pytest.param(lambda entry: entry.__setitem__("step", torch.ones(2)), id="step of two elements"),
        pytest.param(lambda entry: entry.__setitem__("exp_avg", torch.empty(entry["exp_avg"].shape, device="meta")), id="moment on the meta device"),
        # torch's update raises for these; a cast would train on something else
        pytest.param(lambda entry: entry.__setitem__("exp_avg", torch.ones(entry["exp_avg"].shape, dtype=torch.int32)), id="integer moment"),
        pytest.param(lambda entry: entry.__setitem__("exp_avg_sq", entry["exp_avg_sq"].cpu().to_sparse()), id="sparse moment"),
        pytest.param(lambda entry: entry.__setitem__("step", torch.tensor(2 + 1j)), id="complex step"),
        # (a checkpoint's step is refused so: our own state_dict() must load again)
        pytest.param(lambda entry: entry.__setitem__("step", -1.0), id="negative step"),
        pytest.param(lambda entry: entry.__setitem__("step", torch.tensor(float("nan"))), id="nan step"),
    ],
)
def test_a_state_tensor_that_cannot_stand_in_is_refused_before_anything_changes(target, bad):
    model = OddModel(shapes=SHAPES).to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    entries = list(optimizer.state.values())
    other = entries[0]["exp_avg"]
    before = [p.detach().clone() for p in model.parameters()], other.clone()
    bad(entries[2])
    with pytest.raises(ValueError, match=r"optimizer.state\[p\]\[.*param group 0\) was replaced by"):
        optimizer.step()
    for p, value in zip(model.parameters(), before[0]):
        assert torch.equal(p.detach(), value)
    assert torch.equal(entries[0]["exp_avg"], before[1])
    assert float(entries[0]["step"]) == 2.0


@pytest.mark.parametrize("offload", [_offload_by_assignment, _offload_through_data], ids=["by assignment", "through .data"])
def test_an_offload_round_trip_changes_nothing_with_master_weights_and_bfloat16_state(target, offload):
    """torch has no master weights to compare with; the oracle is the same training without
    the round trip, which must give the same bits (masters and bfloat16 moments included)."""
    results = []
    for round_trip in (False, True):
        model = OddModel(shapes=SHAPES).to(device=target.device, dtype=torch.bfloat16)
        optimizer = adam_triton.AdamW(
            model.parameters(), lr=1e-2, backend=target.backend, master_weights=True, state_dtype=torch.bfloat16
        )
        train(model, optimizer, steps=3)
        if round_trip:
            offload(optimizer, target.device)
        train(model, optimizer, steps=3, seed=2)
        results.append(([p.detach().clone() for p in model.parameters()], optimizer.state_dict()["state"]))
    (params, state), (params_after, state_after) = results
    assert all(torch.equal(a, b) for a, b in zip(params, params_after))
    for index, entry in state.items():
        assert set(entry) == set(state_after[index]) and "master_param" in entry
        for key, value in entry.items():
            assert torch.equal(value, state_after[index][key]), (index, key)


# -- state moved from one parameter to another ------------------------------------------------
# A checkpoint or entry that moves state between parameters (experts reordered together with
# their optimizer state, entries swapped) holds views of the very buffers it is copied into:
# each value must be read before any other is written.

SAME_SHAPES = [(5, 3001), (37,), (5, 3001), (5, 3001), (37,)]


def _own_checkpoint_permuted(optimizer):
    """The optimizer's own state_dict(), its entries rotated among equal shapes, loaded back
    (its tensors are views of the optimizer's state)."""
    checkpoint = optimizer.state_dict()
    old = checkpoint["state"]
    checkpoint["state"] = {**old, 0: old[2], 2: old[3], 3: old[0], 1: old[4], 4: old[1]}
    optimizer.load_state_dict(checkpoint)


def _entries_swapped(optimizer):
    params = optimizer.param_groups[0]["params"]
    state = optimizer.state
    state[params[0]], state[params[2]], state[params[3]] = state[params[2]], state[params[3]], state[params[0]]


def _moments_swapped_and_one_replaced(optimizer):
    """Two entries trade moments (each still held, which alone is not noticed); a third
    moment replaced is, and then every entry is looked at."""
    first, _, third, fourth, _ = (optimizer.state[p] for p in optimizer.param_groups[0]["params"])
    first["exp_avg"], third["exp_avg"] = third["exp_avg"], first["exp_avg"]
    first["max_exp_avg_sq"], third["max_exp_avg_sq"] = third["max_exp_avg_sq"], first["max_exp_avg_sq"]
    fourth["exp_avg_sq"] = fourth["exp_avg_sq"] * 0.5


MOVES = [
    pytest.param(_own_checkpoint_permuted, id="own checkpoint permuted and loaded"),
    pytest.param(_entries_swapped, id="entries swapped"),
    pytest.param(_moments_swapped_and_one_replaced, id="moments swapped, one replaced"),
]


@pytest.mark.parametrize("move", MOVES)
def test_state_moved_between_parameters_trains_as_in_torch(target, move):
    ours_model, reference_model = paired(lambda: OddModel(shapes=SAME_SHAPES), target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, amsgrad=True)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)
        move(optimizer)
    assert_close_state(ours, reference, ours_model, reference_model)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3, seed=2)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


class _TwoDtypes(torch.nn.Module):
    """Equal shapes in float32 and float64: two flat buffers."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(3, 1000, generator=generator, dtype=dtype))
            for dtype in (torch.float32, torch.float64, torch.float32, torch.float64)
        )

    def forward(self, x):
        return sum((w.float().sin() * x[i]).sum() + (w.float() ** 2).mean() for i, w in enumerate(self.weights))


def test_a_checkpoint_moving_state_across_buffers_loads_as_in_torch(target):
    """Entries rotated across the float32 and float64 buffers: each buffer written must
    not change what the next one reads (the step counts included)."""
    ours_model, reference_model = paired(_TwoDtypes, target.device, dtype=None)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
        params = optimizer.param_groups[0]["params"]
        params[0].grad, params[1].grad = None, None
        optimizer.step()  # different step counts, for the rotation to show
        checkpoint = optimizer.state_dict()
        old = checkpoint["state"]
        checkpoint["state"] = {0: old[1], 1: old[2], 2: old[3], 3: old[0]}
        optimizer.load_state_dict(checkpoint)
    assert_close_state(ours, reference, ours_model, reference_model)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2, seed=2)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def _trade_moments(entries, take):
    first, second, third, _ = entries
    first["exp_avg"], second["exp_avg"] = take(second["exp_avg"]), take(first["exp_avg"])
    third["exp_avg_sq"] = third["exp_avg_sq"] * 0.5  # replaced, so that the step looks


def _trade_entries(entries, take):
    first, second, third, fourth = entries
    # Each entry moves to a parameter of the other dtype: float32 <-> float64.
    return [{k: take(v) for k, v in entry.items()} for entry in (second, first, fourth, third)]


@pytest.mark.parametrize("trade", [_trade_moments, _trade_entries], ids=["moments traded", "entries traded"])
def test_state_traded_across_buffers_is_read_before_any_is_written(target, trade):
    """State traded between float32 and float64 parameters: the same as trading copies of
    it. (torch's step cannot take a float64 moment for a float32 parameter, so the oracle is
    the trade made with copies.)"""
    results = []
    for copies in (False, True):
        model = _TwoDtypes().to(target.device)
        optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
        train(model, optimizer, steps=2)
        params = list(model.parameters())
        params[0].grad = params[3].grad = None
        optimizer.step()  # different step counts, for the trade to show
        take = (lambda t: t.clone()) if copies else (lambda t: t)
        traded = trade([optimizer.state[p] for p in params], take)
        if traded is not None:
            for p, entry in zip(params, traded):
                optimizer.state[p] = entry
        train(model, optimizer, steps=2, seed=2)
        results.append([p.detach().clone() for p in params] + [optimizer.state[p]["step"] for p in params])
    for ours, expected in zip(*results):
        assert torch.equal(ours, expected)


@pytest.mark.parametrize(
    "bad_entry",
    [
        pytest.param(lambda entry: {**entry, "exp_avg": torch.zeros(3)}, id="moment of another shape"),
        pytest.param(lambda entry: {**entry, "exp_avg_sq": torch.empty(entry["exp_avg_sq"].shape, device="meta")}, id="moment on the meta device"),
        pytest.param(lambda entry: {"exp_avg": entry["exp_avg"]}, id="no step"),
        pytest.param(lambda entry: list(entry.values()), id="not a dict"),
    ],
)
def test_a_replaced_entry_that_cannot_stand_in_is_refused_before_anything_changes(target, bad_entry):
    """Entries traded between parameters, and one replaced by an entry that cannot stand in:
    refused with the entry's fault before any of them is copied in."""
    model = OddModel(shapes=SAME_SHAPES).to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    buffer = optimizer._engine.buffers[0]
    before = [t.clone() for t in (buffer.exp_avg, buffer.exp_avg_sq, buffer.steps)]
    params = list(model.parameters())
    state = optimizer.state
    state[params[0]], state[params[2]] = state[params[2]], state[params[0]]
    state[params[4]] = bad_entry(dict(state[params[4]]))
    with pytest.raises(ValueError, match=r"optimizer.state\[p\] of a parameter of shape \(37,\)"):
        optimizer.step()
    for now, then in zip((buffer.exp_avg, buffer.exp_avg_sq, buffer.steps), before):
        assert torch.equal(now, then)


@pytest.mark.parametrize(
    "delete",
    [
        # The test holds what is deleted (the entry's size tells), or lets it go (its
        # buffer's count of users tells: the entry's size is as before).
        pytest.param(lambda entry: entry.pop("exp_avg_sq"), id="exp_avg_sq deleted"),
        pytest.param(lambda entry: entry.pop("step"), id="step deleted"),
        pytest.param(lambda entry: entry.pop("exp_avg_sq") is entry.__setitem__("note", 1), id="deleted, a key added"),
        pytest.param(lambda entry: entry.pop("max_exp_avg_sq"), id="max_exp_avg_sq deleted, AMSGrad on"),
        pytest.param(lambda entry: entry.pop("master_param"), id="master_param deleted"),
    ],
)
@pytest.mark.parametrize("then", [None, "a group added", "a parameter moved", "after a load", "a neighbour reset"])
def test_a_state_key_deleted_is_refused_before_anything_changes(target, delete, then, request):
    """``del optimizer.state[p]["exp_avg_sq"]``: torch's next step raises a KeyError. Ours
    raises too, before anything changes; it once stepped on with the key missing for good,
    and its state_dict() then saved a checkpoint that it refused to load. A deleted maximum
    or master was worse: the step went on from the buffer, and checkpoints lost them. A
    re-homing before the step (a group added, a parameter given new memory) must not hide
    the deletion, as it once did: it re-imported the entry as if it were a checkpoint's;
    nor may a load just before it (the step then put the deleted maximum back), nor another
    entry of the buffer reset (all of them are imported again then)."""
    case = request.node.callspec.id
    dtype = torch.bfloat16 if "master_param" in case else torch.float32
    model = OddModel(shapes=SHAPES).to(device=target.device, dtype=dtype)
    options = dict(lr=1e-2, amsgrad="max_exp_avg_sq" in case, master_weights="master_param" in case)
    optimizer = adam_triton.AdamW(model.parameters(), **options, backend=target.backend)
    train(model, optimizer, steps=2)
    if then == "after a load":  # a resume: a new optimizer, given the checkpoint
        checkpoint = optimizer.state_dict()
        optimizer = adam_triton.AdamW(model.parameters(), **options, backend=target.backend)
        optimizer.load_state_dict(checkpoint)
    entries = list(optimizer.state.values())
    before = [p.detach().clone() for p in model.parameters()], entries[0]["exp_avg"].clone()
    held = delete(entries[2])  # noqa: F841
    if then == "a group added":
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, device=target.device, dtype=dtype))]})
    elif then == "a parameter moved":
        moved = next(iter(model.parameters()))
        moved.data = moved.data.clone()
    elif then == "a neighbour reset":  # its buffer's entries are all imported again
        entries[1].clear()
    missing = r"lacks \['(exp_avg_sq|step|max_exp_avg_sq|master_param)'\]"
    with pytest.raises(ValueError, match=r"optimizer.state\[p\] of a parameter of shape .* " + missing):
        optimizer.step()
    for p, value in zip(model.parameters(), before[0]):
        assert torch.equal(p.detach(), value)
    assert torch.equal(entries[0]["exp_avg"], before[1])
    assert float(entries[0]["step"]) == 2.0


def test_a_maximum_gained_by_switching_amsgrad_on_is_refused_once_deleted(target):
    model = OddModel(shapes=SHAPES).to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    optimizer.param_groups[0]["amsgrad"] = True
    train(model, optimizer, steps=1, seed=2)
    entry = next(iter(optimizer.state.values()))
    del entry["max_exp_avg_sq"]
    with pytest.raises(ValueError, match=r"lacks \['max_exp_avg_sq'\]"):
        optimizer.step()


def test_a_maximum_deleted_with_amsgrad_switched_off_trains_as_in_torch(target):
    """Torch's step needs no maximum once AMSGrad is off, so deleting it then is fine; a
    maximum deleted while AMSGrad is on is refused (above), not this."""
    ours_model, reference_model = paired(lambda: OddModel(shapes=SHAPES), target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, amsgrad=True)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)
        optimizer.param_groups[0]["amsgrad"] = False
        for entry in optimizer.state.values():
            del entry["max_exp_avg_sq"]
        moved = next(iter(model.parameters()))
        moved.data = moved.data.clone()  # a re-homing before the step looks at the entries too
        train(model, optimizer, steps=3, seed=2)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)
    assert all("max_exp_avg_sq" not in entry for entry in ours.state_dict()["state"].values())


def test_amsgrad_switched_on_while_state_is_replaced_starts_its_maximum_from_zero(target):
    """Switched on after the state was made, AMSGrad starts from a zero maximum (torch
    raises a ``KeyError``; its reference here is given zeros by hand). A state tensor
    replaced at the same time makes the step look at every entry, which lack the maximum
    the group now wants: that is not a deleted maximum."""
    ours_model, reference_model = paired(lambda: OddModel(shapes=SHAPES), target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)
        optimizer.param_groups[0]["amsgrad"] = True
    _offload_by_assignment(ours, target.device)
    for p, entry in reference.state.items():
        entry["max_exp_avg_sq"] = torch.zeros_like(p)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3, seed=2)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def _add_group_with_bad_state(model, optimizer, extra):
    optimizer.add_param_group({"params": [extra]})


def _step_after_a_move(model, optimizer, extra):
    train(model, optimizer, steps=1, seed=3)  # after model.double()


def _entry_lacking_a_moment(param):
    return {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(param)}


def _entry_with_a_negative_step(param):
    return {"step": torch.tensor(-1.0), "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


@pytest.mark.parametrize(
    "make_entry, message",
    [(_entry_lacking_a_moment, r"lacks \['exp_avg_sq'\]"), (_entry_with_a_negative_step, r"'step' must be a finite count >= 0")],
    ids=["lacking exp_avg_sq", "negative step"],
)
@pytest.mark.parametrize(
    "rehome", [_add_group_with_bad_state, _step_after_a_move], ids=["add_param_group", "step after model.double()"]
)
def test_an_entry_a_re_homing_cannot_take_is_refused_before_any_parameter_moves(target, rehome, make_entry, message):
    """An entry lacking a key, or with a step count below zero, met while parameters are
    re-homed (add_param_group of a parameter with state, or the step after
    ``model.double()``): refused before anything moves. A missing key once raised half-way,
    after the parameters had moved, and the others' step counts read 0 afterwards: training
    went on with the wrong bias corrections. A negative step (on the CPU, where it is read
    without waiting for a device) was once taken in, and the parameter became NaN."""
    ours_model, reference_model = paired(lambda: OddModel(shapes=SHAPES), target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
    extra = torch.nn.Parameter(torch.randn(3, device=target.device))
    bad = extra if rehome is _add_group_with_bad_state else next(ours_model.parameters())
    ours.state[bad] = make_entry(bad)
    if rehome is _step_after_a_move:
        ours_model.double()  # the parameters leave the buffers; the step would re-home them
    pointers = [p.data_ptr() for p in ours_model.parameters()]
    with pytest.raises(ValueError, match=message):
        rehome(ours_model, ours, extra)
    assert [p.data_ptr() for p in ours_model.parameters()] == pointers
    assert len(ours.param_groups) == 1
    del ours.state[bad]  # the caller gives up on that state and trains on
    if rehome is _step_after_a_move:
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            model.float()
            optimizer.state.pop(next(model.parameters()), None)
    else:
        ours_model.float()
    assert {float(ours.state[p]["step"]) for p in list(ours_model.parameters())[1:]} == {2.0}
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2, seed=4)
    assert_close_params(ours_model, reference_model)
