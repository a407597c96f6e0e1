"""Checkpoints: torch's exact layout, both directions, exact resume, bad checkpoints."""

import copy
import io
import pickle

import pytest
import torch
from helpers import OddModel, assert_close_params, assert_close_state, optimizers, paired, train

import adam_triton


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _grouped(model):
    weights = list(model.weights)
    return [{"params": weights[:3], "amsgrad": True}, {"params": weights[3:], "lr": 3e-2, "maximize": True}]


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_layout_matches_torch(target, cls_name):
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, cls_name, target.backend, params_fn=_grouped, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
    saved, expected = ours.state_dict(), reference.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    assert saved["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert saved["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            got = saved["state"][index][key]
            assert (got.shape, got.dtype, got.stride()) == (value.shape, value.dtype, value.stride()), key
    assert saved["state"][0]["step"].shape == () and saved["state"][0]["step"].dtype == torch.float32


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_checkpoint_from_ours_continues_in_torch_and_back(target, cls_name):
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, cls_name, target.backend, params_fn=_grouped, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)

    # ours -> torch: a torch optimizer picks up our checkpoint and keeps pace with torch.
    handover_model = copy.deepcopy(ours_model)
    handover = getattr(torch.optim, cls_name)(_grouped(handover_model))
    handover.load_state_dict(_roundtrip(ours.state_dict()))
    # torch -> ours: a fresh adam_triton optimizer picks up torch's checkpoint.
    takeover_model = copy.deepcopy(reference_model)
    takeover = getattr(adam_triton, cls_name)(_grouped(takeover_model), backend=target.backend)
    takeover.load_state_dict(_roundtrip(reference.state_dict()))

    for model, optimizer in ((reference_model, reference), (handover_model, handover), (takeover_model, takeover)):
        train(model, optimizer, steps=3, seed=7)
    assert_close_params(handover_model, reference_model)
    assert_close_params(takeover_model, reference_model)
    assert_close_state(takeover, reference, takeover_model, reference_model)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad()", "zero_grad(set_to_none=False)"])
def test_resume_is_bit_exact(target, set_to_none):
    """With kept gradients the uninterrupted run reads them from the flat gradient buffer,
    while the resumed run's first step finds fresh ones: both must round alike."""
    torch.manual_seed(0)
    straight_model = OddModel().to(target.device)
    resumed_model = copy.deepcopy(straight_model)
    straight = adam_triton.AdamW(_grouped(straight_model), lr=1e-2, backend=target.backend)
    train(straight_model, straight, steps=4, set_to_none=set_to_none)
    model_checkpoint = _roundtrip(straight_model.state_dict())
    optimizer_checkpoint = _roundtrip(straight.state_dict())
    train(straight_model, straight, steps=3, seed=2, set_to_none=set_to_none)

    resumed_model.load_state_dict(model_checkpoint)
    resumed = adam_triton.AdamW(_grouped(resumed_model), lr=1.0, backend=target.backend)
    resumed.load_state_dict(optimizer_checkpoint)
    train(resumed_model, resumed, steps=3, seed=2, set_to_none=set_to_none)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(straight.state[a][key], resumed.state[b][key])


def _corruptions():
    def shape(sd):
        sd["state"][1]["exp_avg"] = torch.zeros(3)

    def missing_key(sd):
        del sd["state"][2]["exp_avg_sq"]

    def not_a_tensor(sd):
        sd["state"][0]["exp_avg_sq"] = [0.0]

    def negative_step(sd):
        sd["state"][0]["step"] = torch.tensor(-1.0)

    def step_vector(sd):
        sd["state"][0]["step"] = torch.ones(2)

    def integer_state(sd):
        sd["state"][4]["exp_avg"] = torch.zeros(sd["state"][4]["exp_avg"].shape, dtype=torch.int64)

    def group_count(sd):
        sd["param_groups"].pop()

    def group_size(sd):
        sd["param_groups"][0]["params"].pop()

    def group_lacks_lr(sd):
        del sd["param_groups"][1]["lr"]

    def no_state(sd):
        del sd["state"]

    def infinite_step(sd):
        sd["state"][1]["step"] = torch.tensor(float("inf"))

    def step_past_float64(sd):  # a Python int float() cannot take
        sd["state"][1]["step"] = 10**400

    def step_past_float32(sd):  # finite, but our step tables (as torch's steps) are float32
        sd["state"][1]["step"] = torch.tensor(1e39, dtype=torch.float64)

    def maximum_shape(sd):  # parameter 0 is in the AMSGrad group
        sd["state"][0]["max_exp_avg_sq"] = sd["state"][0]["max_exp_avg_sq"].flatten()[:-1]

    def complex_state(sd):
        sd["state"][3]["exp_avg"] = torch.zeros(sd["state"][3]["exp_avg"].shape, dtype=torch.complex64)

    def none_moment(sd):
        sd["state"][3]["exp_avg"] = None

    def meta_moment(sd):
        sd["state"][2]["exp_avg_sq"] = torch.empty(sd["state"][2]["exp_avg_sq"].shape, device="meta")

    def meta_step(sd):
        sd["state"][2]["step"] = torch.empty((), device="meta")

    def integer_state_dtype(sd):  # a precision option the buffers cannot take
        sd["param_groups"][1]["state_dtype"] = torch.int32

    def negative_rounding_seed(sd):
        sd["param_groups"][0]["stochastic_rounding_seed"] = -1

    return [
        pytest.param(fn, id=fn.__name__)
        for fn in (
            shape, missing_key, not_a_tensor, negative_step, step_vector, integer_state, group_count, group_size,
            group_lacks_lr, no_state, infinite_step, step_past_float64, step_past_float32, maximum_shape, complex_state, none_moment, meta_moment, meta_step,
            integer_state_dtype, negative_rounding_seed,
        )
    ]


@pytest.mark.parametrize("corrupt", _corruptions())
def test_bad_checkpoint_raises_and_changes_nothing(target, corrupt):
    torch.manual_seed(0)
    model = OddModel().to(target.device)
    twin = copy.deepcopy(model)
    optimizer = adam_triton.Adam(_grouped(model), lr=1e-2, backend=target.backend)
    untouched = adam_triton.Adam(_grouped(twin), lr=1e-2, backend=target.backend)
    for m, o in ((model, optimizer), (twin, untouched)):
        train(m, o, steps=2)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    corrupt(checkpoint)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
    with pytest.raises(ValueError):
        optimizer.load_state_dict(checkpoint)
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups_before
    for a, b in zip(model.parameters(), twin.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[a][key], untouched.state[b][key])
    # The optimizer goes on exactly as its untouched twin.
    for m, o in ((model, optimizer), (twin, untouched)):
        train(m, o, steps=2, seed=3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_hooks_run(target):
    model = OddModel().to(target.device)
    optimizer = adam_triton.Adam(model.parameters(), backend=target.backend)
    train(model, optimizer, steps=1)
    calls = []

    def pre(opt, sd):
        calls.append("pre")
        sd = dict(sd)
        sd["param_groups"] = copy.deepcopy(sd["param_groups"])
        sd["param_groups"][0]["lr"] = 0.123
        return sd

    optimizer.register_load_state_dict_pre_hook(pre)
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("post"))
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("save-pre"))
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == ["save-pre", "pre", "post"]
    assert optimizer.param_groups[0]["lr"] == 0.123


def test_state_dict_hooks_run_as_torchs(target):
    """A post-hook may return a dict of any shape (a flat one for a saver), and torch returns
    what the last one returned; post-hooks see a group's state_dtype by name, as saved."""
    ours_model, torch_model = paired(OddModel, target.device)
    ours = adam_triton.AdamW(
        [{"params": ours_model.weights[1:]}, {"params": ours_model.weights[:1], "state_dtype": torch.bfloat16}],
        lr=1e-2,
        backend=target.backend,
    )
    reference = torch.optim.AdamW([{"params": torch_model.weights[1:]}, {"params": torch_model.weights[:1]}], lr=1e-2)
    for model, optimizer in ((ours_model, ours), (torch_model, reference)):
        train(model, optimizer, steps=2)
    seen = {}

    def flat(opt, state_dict):
        seen[opt] = [group.get("state_dtype") for group in state_dict["param_groups"]]
        return {
            f"state.{index}.{key}": value
            for index, entry in state_dict["state"].items()
            for key, value in entry.items()
        } | {f"param_groups.{i}.lr": group["lr"] for i, group in enumerate(state_dict["param_groups"])}

    for optimizer in (ours, reference):
        optimizer.register_state_dict_pre_hook(lambda opt: seen.setdefault("pre", []).append(opt))
        optimizer.register_state_dict_post_hook(lambda opt, sd: None)
        optimizer.register_state_dict_post_hook(flat)
    saved, expected = ours.state_dict(), reference.state_dict()
    assert seen["pre"] == [ours, reference]
    assert seen[ours] == [None, "bfloat16"]
    assert saved.keys() == expected.keys()
    assert saved["param_groups.1.lr"] == expected["param_groups.1.lr"] == 1e-2
    assert ours.state_dict().keys() == saved.keys()  # the hooks still in place for the next call


def test_deepcopy_and_pickle_give_working_optimizers(target):
    model = OddModel().to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    clone = copy.deepcopy(optimizer)
    assert clone.backend == target.backend
    cloned_params = [p for g in clone.param_groups for p in g["params"]]
    for original, copied in zip(model.parameters(), cloned_params):
        assert torch.equal(original, copied)
        assert torch.equal(optimizer.state[original]["exp_avg"], clone.state[copied]["exp_avg"])
    for p in cloned_params:
        p.grad = torch.ones_like(p)
    clone.step()
    assert float(clone.state[cloned_params[0]]["step"]) == 3


class _Flagged(adam_triton.AdamW):
    def __init__(self, params, flag=True, **kwargs):
        super().__init__(params, **kwargs)
        self.flag = flag


class _FlaggedWithTorchsKeys(_Flagged):
    def __getstate__(self):
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups, "flag": self.flag}


class _FlaggedWithItsWholeDict(_Flagged):
    def __getstate__(self):
        return self.__dict__.copy()


def _pickled(optimizer):
    return pickle.loads(pickle.dumps(optimizer))


def _saved(optimizer):
    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copy_", [copy.deepcopy, _pickled, _saved], ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("cls", [_FlaggedWithTorchsKeys, _FlaggedWithItsWholeDict], ids=["torch's keys", "whole __dict__"])
def test_subclasses_with_their_own_getstate_copy_as_under_torch(target, cls, copy_):
    """Subclasses write ``__getstate__`` as torch's Optimizer lets them: torch's three keys
    and their own attributes (ours then left out), or the whole ``__dict__`` (our engine,
    whose buffers hold storages, in it). The copies work, keep the subclass's attributes,
    and train on as the original does."""
    model = OddModel().to(target.device)
    optimizer = cls(model.parameters(), flag=False, lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    clone = copy_(optimizer)
    assert clone.flag is False
    cloned_params = [p for g in clone.param_groups for p in g["params"]]
    for params, opt in ((list(model.parameters()), optimizer), (cloned_params, clone)):
        for p in params:
            p.grad = torch.linspace(-1, 1, p.numel(), device=target.device).view_as(p)
        opt.step()
    for original, copied in zip(model.parameters(), cloned_params):
        torch.testing.assert_close(original, copied, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(optimizer.state[original]["exp_avg_sq"], clone.state[copied]["exp_avg_sq"], rtol=1e-6, atol=1e-12)
        assert float(clone.state[copied]["step"]) == 3


def test_loading_copies_the_groups_and_keeps_unknown_state_as_torch_does(target):
    """The checkpoint's groups are copied (changing the dict afterwards changes nothing), and
    state keys the optimizer does not know travel on, in state and in the next checkpoint."""
    model = OddModel().to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, optimizer, steps=2)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    checkpoint["state"][1]["ema_of_norm"] = torch.tensor(3.5)
    checkpoint["state"][1]["note"] = "kept"
    optimizer.load_state_dict(checkpoint)
    checkpoint["param_groups"][0]["lr"] = 123.0
    checkpoint["param_groups"][0]["betas"] = (0.0, 0.0)
    assert optimizer.param_groups[0]["lr"] == 1e-2 and optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    state = optimizer.state[list(model.parameters())[1]]
    assert float(state["ema_of_norm"]) == 3.5 and state["note"] == "kept"
    train(model, optimizer, steps=1, seed=2)
    saved = optimizer.state_dict()["state"][1]
    assert float(saved["ema_of_norm"]) == 3.5 and saved["note"] == "kept"


def test_other_state_is_cast_to_its_parameter_as_torch_casts_it(target):
    """torch's load_state_dict casts every state tensor but the step to its parameter's
    dtype and device, inside dicts and lists too; other libraries' extra state relies on it."""
    loaded = {}
    for name, cls in (("ours", adam_triton.AdamW), ("torch", torch.optim.AdamW)):
        model = OddModel().to(target.device)
        kwargs = {"backend": target.backend} if name == "ours" else {}
        optimizer = cls(model.parameters(), lr=1e-2, **kwargs)
        train(model, optimizer, steps=1)
        checkpoint = copy.deepcopy(optimizer.state_dict())
        checkpoint["state"][0]["scale"] = torch.tensor([1.5, 2.5], dtype=torch.float64)
        checkpoint["state"][0]["count"] = torch.tensor(3, dtype=torch.int64)
        checkpoint["state"][0]["history"] = {"norms": [torch.ones(2, dtype=torch.float64)], "beta": 0.5}
        optimizer.load_state_dict(checkpoint)
        state = optimizer.state[next(iter(model.parameters()))]
        loaded[name] = {
            "scale": (state["scale"].dtype, state["scale"].device),
            "count": state["count"].dtype,
            "norm": state["history"]["norms"][0].dtype,
            "beta": state["history"]["beta"],
        }
    assert loaded["ours"] == loaded["torch"]
    assert loaded["ours"]["scale"][0] == torch.float32


def test_load_state_dict_goes_through_setstate_as_in_torch(target):
    """Subclasses fill in group keys that older checkpoints lack in __setstate__, which
    torch's load_state_dict calls."""

    class WithClipping(adam_triton.AdamW):
        def __init__(self, params, max_norm=1.0, **kwargs):
            super().__init__(params, **kwargs)
            for group in self.param_groups:
                group.setdefault("max_norm", max_norm)

        def __setstate__(self, state):
            super().__setstate__(state)
            for group in self.param_groups:
                group.setdefault("max_norm", 1.0)

        def step(self, closure=None):
            for group in self.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], group["max_norm"])
            return super().step(closure)

    model = OddModel().to(target.device)
    plain = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend)
    train(model, plain, steps=2)
    checkpoint = copy.deepcopy(plain.state_dict())  # no "max_norm": made before the subclass
    del plain
    optimizer = WithClipping(model.parameters(), lr=1e-2, backend=target.backend)
    optimizer.load_state_dict(checkpoint)
    assert optimizer.param_groups[0]["max_norm"] == 1.0
    assert optimizer.backend == target.backend
    train(model, optimizer, steps=1, seed=2)
    assert float(optimizer.state[next(iter(model.parameters()))]["step"]) == 3.0


def test_adamw_loading_an_adam_checkpoint_stays_adamw_as_in_torch(target):
    """torch's AdamW forces decoupled weight decay on whatever groups it loads."""
    source_model = OddModel().to(target.device)
    source = torch.optim.Adam(source_model.parameters(), lr=1e-2, weight_decay=0.5)
    train(source_model, source, steps=2)
    checkpoint = source.state_dict()
    assert checkpoint["param_groups"][0]["decoupled_weight_decay"] is False
    ours_model, reference_model = copy.deepcopy(source_model), copy.deepcopy(source_model)
    ours = adam_triton.AdamW(ours_model.parameters(), backend=target.backend)
    reference = torch.optim.AdamW(reference_model.parameters())
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        optimizer.load_state_dict(copy.deepcopy(checkpoint))
        assert optimizer.param_groups[0]["decoupled_weight_decay"] is True
        train(model, optimizer, steps=2, seed=2)
    assert_close_params(ours_model, reference_model)


def test_each_saver_writes_every_parameter_and_only_its_own_bytes(tmp_path):
    """Parameters live in a flat buffer, but each has a storage of its own over its segment:
    savers that keep one tensor per storage for tied weights (safetensors' save_model) must
    still write every parameter, and torch.save or deepcopy of part of a model's state dict
    must take only that part."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = OddModel()
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, steps=2)
    whole = model.state_dict()
    part = {"weights.3": whole["weights.3"]}  # 1,025 of the model's 4,384 parameters
    own_bytes = whole["weights.3"].numel() * 4

    safetensors_torch.save_file(whole, tmp_path / "whole.safetensors")
    safetensors_torch.save_file(part, tmp_path / "part.safetensors")
    loaded = safetensors_torch.load_file(tmp_path / "whole.safetensors")
    assert loaded.keys() == whole.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in whole.items())
    assert (tmp_path / "part.safetensors").stat().st_size < own_bytes + 4096

    safetensors_torch.save_model(model, tmp_path / "model.safetensors")
    loaded = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == whole.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in whole.items())

    torch.save(part, tmp_path / "part.pt")
    assert (tmp_path / "part.pt").stat().st_size < own_bytes + 4096
    assert sum(t.untyped_storage().nbytes() for t in copy.deepcopy(part).values()) == own_bytes


def test_accelerate_save_state_keeps_every_parameter_and_resumes_exactly(tmp_path):
    """accelerate's save_state and save_model (safetensors by default) keep one tensor per
    storage: with parameters sharing the flat buffer's storage they kept one parameter, and
    load_state then failed. The checkpoint must hold every parameter and resume bit for bit."""
    accelerate = pytest.importorskip("accelerate")

    def run(steps, first_seed=0, save_after=None, resume_from=None):
        accelerator = accelerate.Accelerator(cpu=True)
        model = OddModel()
        optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        if resume_from is not None:
            accelerator.load_state(resume_from)
        for step in range(steps):
            train(model, optimizer, steps=1, seed=first_seed + step)
            if step + 1 == save_after:
                accelerator.save_state(tmp_path / "checkpoint")
                accelerator.save_model(model, tmp_path / "model")
        return model

    uninterrupted = run(5, save_after=3)
    names = set(uninterrupted.state_dict())
    assert _safetensors_names(tmp_path / "checkpoint" / "model.safetensors") == names
    assert _safetensors_names(tmp_path / "model" / "model.safetensors") == names
    resumed = run(2, first_seed=3, resume_from=tmp_path / "checkpoint")
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_save_pretrained_writes_every_parameter_and_from_pretrained_reads_them_back(tmp_path):
    """Hugging Face's ``save_pretrained`` (what ``Trainer.save_model`` calls) tells tied
    weights by their storage; releases have differed in what they do with other tensors
    sharing one (drop them, raise, or clone the disjoint ones). Each parameter has a storage
    of its own (the savers' test above checks that), so a trained GPT-2, tied embedding and
    head included, must come back whole from the installed release."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=61, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    trained, loaded = model.state_dict(), reloaded.state_dict()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in trained.items())
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight


def _safetensors_names(path) -> set:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def test_state_loaded_under_inference_mode_can_be_trained(target):
    """``load_state_dict`` inside ``torch.inference_mode()`` (an evaluation script that
    resumes training) leaves state the next steps can update, as loading outside does."""
    model = OddModel().to(target.device)
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, amsgrad=True)
    train(model, optimizer, steps=2)
    checkpoint = copy.deepcopy(optimizer.state_dict())
    resumed = [copy.deepcopy(model) for _ in range(2)]
    optimizers = [adam_triton.AdamW(m.parameters(), lr=1e-2, backend=target.backend, amsgrad=True) for m in resumed]
    optimizers[0].load_state_dict(checkpoint)
    with torch.inference_mode():
        optimizers[1].load_state_dict(checkpoint)
    assert not any(t.is_inference() for entry in optimizers[1].state.values() for t in entry.values())
    for m, o in zip(resumed, optimizers):
        train(m, o, steps=2, seed=2)
    assert_close_params(resumed[0], resumed[1], rtol=0, atol=0)


def _dcp_round_trip(model, optimizer, source_model, source_optimizer, directory, partial=False):
    """Save ``source``'s model and optimizer with torch.distributed.checkpoint in this one
    process (no process group), and load them into ``model`` and ``optimizer`` the way DCP
    loads: into the state dicts it is given, then set."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(source_model, source_optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=directory, no_dist=True)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optim": optimizer_state}
    planner = dcp.DefaultLoadPlanner(allow_partial_load=True) if partial else None
    dcp.load(loaded, checkpoint_id=directory, no_dist=True, planner=planner)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["float32 states", "bfloat16 states"])
def test_distributed_checkpoint_in_one_process_resumes_master_weights_exactly(target, state_dtype, tmp_path):
    """``torch.distributed.checkpoint`` without a process group (``no_dist=True``): the
    masters travel under ``master_param`` and a resumed bfloat16 run repeats the
    uninterrupted one bit for bit. A checkpoint saved by torch's AdamW (no masters) loaded
    with ``allow_partial_load`` trains as the same checkpoint loaded by ``load_state_dict``:
    the masters it leaves are re-seeded from the loaded parameters."""
    options = dict(lr=1e-2, weight_decay=0.1, master_weights=True, state_dtype=state_dtype, backend=target.backend)

    def bf16_model():
        return OddModel().to(device=target.device, dtype=torch.bfloat16)

    straight_model = bf16_model()
    straight = adam_triton.AdamW(straight_model.parameters(), **options)
    train(straight_model, straight, steps=3)
    resumed_model = bf16_model()
    resumed = adam_triton.AdamW(resumed_model.parameters(), **options)
    _dcp_round_trip(resumed_model, resumed, straight_model, straight, tmp_path / "ours")
    assert all("master_param" in entry for entry in resumed.state_dict()["state"].values())
    for optimizer, model in ((straight, straight_model), (resumed, resumed_model)):
        train(model, optimizer, steps=3, seed=2)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq", "master_param"):
            assert torch.equal(straight.state[a][key], resumed.state[b][key]), key

    torch_model = bf16_model()
    torch_optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, weight_decay=0.1)
    train(torch_model, torch_optimizer, steps=3)
    by_dcp_model, by_load_model = bf16_model(), bf16_model()
    by_dcp = adam_triton.AdamW(by_dcp_model.parameters(), **options)
    _dcp_round_trip(by_dcp_model, by_dcp, torch_model, torch_optimizer, tmp_path / "torch", partial=True)
    by_load = adam_triton.AdamW(by_load_model.parameters(), **options)
    by_load_model.load_state_dict(torch_model.state_dict())
    by_load.load_state_dict(copy.deepcopy(torch_optimizer.state_dict()))
    for optimizer, model in ((by_dcp, by_dcp_model), (by_load, by_load_model)):
        train(model, optimizer, steps=3, seed=2)
    for a, b, c in zip(by_dcp_model.parameters(), by_load_model.parameters(), torch_model.parameters()):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # trained on from the checkpoint
        for key in ("step", "exp_avg", "exp_avg_sq", "master_param"):
            assert torch.equal(by_dcp.state[a][key], by_load.state[b][key]), key


def test_a_checkpoint_without_amsgrad_starts_the_maximum_from_zero_in_a_trained_optimizer(target):
    """Loading a checkpoint saved without AMSGrad into an optimizer that has trained with it,
    then switching AMSGrad on: the maximum starts from zero, as in a fresh optimizer loading
    the same checkpoint (and as torch makes it), not from the maxima the optimizer had."""
    source = OddModel().to(target.device)
    source_optimizer = adam_triton.AdamW(source.parameters(), lr=1e-2, backend=target.backend)
    train(source, source_optimizer, steps=3)
    checkpoint = copy.deepcopy(source_optimizer.state_dict())
    results = []
    for trained_first in (False, True):
        model = copy.deepcopy(source)
        optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, amsgrad=True, backend=target.backend)
        if trained_first:
            train(model, optimizer, steps=3, seed=2)
            model.load_state_dict(source.state_dict())
        optimizer.load_state_dict(checkpoint)
        assert not optimizer.param_groups[0]["amsgrad"]
        optimizer.param_groups[0]["amsgrad"] = True
        train(model, optimizer, steps=2, seed=3)
        results.append((model, optimizer))
    (fresh_model, fresh), (trained_model, trained) = results
    for a, b in zip(fresh_model.parameters(), trained_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(fresh.state[a]["max_exp_avg_sq"], trained.state[b]["max_exp_avg_sq"])


def test_a_parameter_first_stepped_later_under_amsgrad_gets_torch_s_state_keys(target):
    """A parameter whose first gradient comes steps after the others' gets the AMSGrad
    maximum in its state when it gets the rest, as under torch, so that the checkpoint
    carries it and torch's AdamW(amsgrad=True) continues from it."""
    def run(make):
        generator = torch.Generator().manual_seed(0)
        early = torch.nn.Parameter(torch.randn(5, generator=generator).to(target.device))
        late = torch.nn.Parameter(torch.randn(3, generator=generator).to(target.device))
        optimizer = make([early, late])
        for step in range(3):
            optimizer.zero_grad()
            loss = early.pow(2).sum() + (late.pow(3).sum() if step > 0 else 0)
            loss.backward()
            optimizer.step()
        return optimizer, early, late

    reference, *reference_params = run(lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True))
    ours, early, late = run(lambda p: adam_triton.AdamW(p, lr=1e-2, amsgrad=True, backend=target.backend))
    assert set(ours.state[late]) == set(reference.state[reference_params[1]]) == {
        "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"
    }
    continued = torch.optim.AdamW([early, late], lr=1e-2, amsgrad=True)
    continued.load_state_dict(copy.deepcopy(ours.state_dict()))
    early.grad, late.grad = torch.ones_like(early), torch.ones_like(late)
    continued.step()
