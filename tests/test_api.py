"""The public surface: torch's signature, validation, errors, hooks and base-class checks."""

import contextlib
import inspect
import os
import re
import subprocess
import sys
import warnings
from decimal import Decimal
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np

import pytest
import torch
from helpers import OddModel, assert_close_params, optimizers, paired, train
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import adam_triton


OUR_KEYWORDS = {
    "backend": "auto",
    "master_weights": False,
    "state_dtype": None,
    "stochastic_rounding": False,
    "stochastic_rounding_seed": 0,
}


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_signature_is_torchs_plus_our_keywords(name):
    ours = inspect.signature(getattr(adam_triton, name).__init__).parameters
    theirs = inspect.signature(getattr(torch.optim, name).__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for key, parameter in theirs.items():
        assert ours[key].default == parameter.default, key
        assert ours[key].kind == parameter.kind, key
    assert list(ours)[len(theirs) :] == list(OUR_KEYWORDS)
    for key, default in OUR_KEYWORDS.items():
        assert ours[key].default == default and ours[key].kind == inspect.Parameter.KEYWORD_ONLY


def test_is_a_torch_optimizer_and_adamw_is_an_adam():
    model = nn.Linear(3, 2)
    optimizer = adam_triton.AdamW(model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert isinstance(optimizer, adam_triton.Adam)
    assert optimizer.defaults == torch.optim.AdamW(nn.Linear(3, 2).parameters()).defaults


@pytest.mark.parametrize(
    "name, kwargs",
    [("Adam", {}), ("Adam", {"decoupled_weight_decay": True}), ("AdamW", {})],
    ids=["Adam", "Adam-decoupled", "AdamW"],
)
def test_isinstance_of_torchs_classes_answers_as_for_torchs_own(name, kwargs):
    """Libraries tell optimizers apart so (accelerate sets DeepSpeed's CPU Adam to AdamW mode
    for ``isinstance(optimizer, torch.optim.AdamW)``); torch's own code must not run in ours."""
    ours = getattr(adam_triton, name)(nn.Linear(3, 2).parameters(), **kwargs)
    theirs = getattr(torch.optim, name)(nn.Linear(3, 2).parameters(), **kwargs)
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
        assert isinstance(ours, cls) == isinstance(theirs, cls), cls
    with pytest.raises(NotImplementedError, match="flat buffers"):
        ours._init_group(ours.param_groups[0], [], [], [], [], [], [])


def _torch_error_inputs():
    from torch.testing._internal.common_optimizers import optim_db

    cases = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in ("Adam", "AdamW"):
            continue
        for device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            for error in info.optim_error_inputs_func(device=device, dtype=torch.float32):
                cases.append(pytest.param(name, device, error, id=f"{name}-{device}-{error.optimizer_error_input.desc}"))
    return cases


@pytest.mark.parametrize("name, device, error", _torch_error_inputs())
def test_torch_error_database(name, device, error):
    """Every error input torch tests Adam/AdamW with raises (or warns) the same from ours."""
    optim_input = error.optimizer_error_input
    params = optim_input.params
    if params is None:
        params = [nn.Parameter(torch.randn(1, device=device))]
    cls = getattr(adam_triton, name)
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            cls(params, **optim_input.kwargs)
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            cls(params, **optim_input.kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
        (dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
        (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "Tensor lr must be 1-element"),
        (dict(differentiable=True), RuntimeError, "does not support differentiable=True"),
        (dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_raise_before_anything_changes(kwargs, error, message):
    model = nn.Linear(3, 2)
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(error, match=message):
        adam_triton.Adam(model.parameters(), **kwargs)
    assert [p.data_ptr() for p in model.parameters()] == before


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_differentiable_points_to_the_torch_class_of_the_same_name(name):
    with pytest.raises(RuntimeError, match=rf"Use torch\.optim\.{name}\(differentiable=True\)"):
        getattr(adam_triton, name)(nn.Linear(3, 2).parameters(), differentiable=True)


@pytest.mark.parametrize(
    "params, kwargs",
    [
        ([], dict(fused=True, foreach=True)),
        ([torch.randn(2)], dict(fused=True, foreach=True)),  # a tensor that is not a leaf
        ({"not": "iterable of tensors"}, dict(fused=True, differentiable=True)),
        ([{"params": [nn.Parameter(torch.randn(2))]}, {"params": []}], dict(fused=True, foreach=True)),
    ],
    ids=["empty list", "non-leaf", "a dict", "an empty group"],
)
def test_several_errors_at_once_raise_torchs_first(params, kwargs):
    """torch checks the parameters (in Optimizer.__init__) before fused/foreach/differentiable:
    with both wrong, code that catches torch's error gets the same one from ours."""
    with pytest.raises(Exception) as expected:
        torch.optim.Adam(params, **kwargs)
    with pytest.raises(expected.type, match=re.escape(str(expected.value))):
        adam_triton.Adam(params, **kwargs)


def test_lr_and_betas_as_tensors(target):
    model = OddModel().to(target.device)
    reference_model = OddModel().to(target.device)
    ours = adam_triton.Adam(model.parameters(), lr=torch.tensor(0.01), betas=(torch.tensor(0.8), torch.tensor([0.95])), backend=target.backend)
    reference = torch.optim.Adam(reference_model.parameters(), lr=torch.tensor(0.01), betas=(torch.tensor(0.8), torch.tensor([0.95])))
    for m, o in ((model, ours), (reference_model, reference)):
        train(m, o, steps=3)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_unsupported_parameters_raise_clearly():
    with pytest.raises(TypeError, match="dtype"):
        adam_triton.Adam([torch.zeros(3, dtype=torch.float8_e4m3fn, requires_grad=True)])
    with pytest.raises(ValueError, match="non-leaf"):
        adam_triton.Adam([torch.zeros(3, requires_grad=True) * 2])


@pytest.mark.parametrize("codes_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "float8"])
@pytest.mark.parametrize("added", [False, True], ids=["in the constructor", "in an added group"])
def test_quantized_parameters_are_accepted_and_left_alone_as_in_torch(target, codes_dtype, added):
    """Quantized models hand their frozen integer (or float8) weights to the optimizer along
    with ``model.parameters()``; torch's optimizer accepts them and, as integer ones can
    never have a gradient and float8 ones cannot be stepped, never updates them."""
    trained = []
    for make in (adam_triton.AdamW, torch.optim.AdamW):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(5, 3, device=target.device))
        values = torch.randint(-8, 8, (5, 3), device=target.device).to(codes_dtype)
        codes = torch.nn.Parameter(values, requires_grad=False)
        kwargs = {"backend": target.backend} if make is adam_triton.AdamW else {}
        optimizer = make([weight] if added else [weight, codes], lr=1e-2, **kwargs)
        if added:
            optimizer.add_param_group({"params": [codes]})
        for step in range(3):
            optimizer.zero_grad()
            x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step)).to(target.device)
            (x @ (weight * codes.float())).square().sum().backward()
            optimizer.step()
        trained.append((weight, codes, optimizer.state_dict()))
    (weight, codes, state), (expected_weight, expected_codes, expected_state) = trained
    torch.testing.assert_close(weight, expected_weight, rtol=2e-5, atol=2e-6)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))
    assert state["state"].keys() == expected_state["state"].keys() == {0}
    assert [g["params"] for g in state["param_groups"]] == [g["params"] for g in expected_state["param_groups"]]


@pytest.mark.parametrize(
    "how", ["in the constructor", "in the constructor, a group added after", "in an added group", "appended to a group's list"]
)
def test_a_frozen_float8_parameter_given_a_gradient_later_is_refused_before_anything_changes(target, how):
    """Left out of the buffers while frozen; unfrozen and given a gradient, torch's step
    raises for it (it cannot compute in float8). Ours must not leave it silently as it was."""
    weight = torch.nn.Parameter(torch.randn(5, 3, device=target.device))
    codes = torch.nn.Parameter(torch.randn(4, 4, device=target.device).to(torch.float8_e4m3fn), requires_grad=False)
    in_constructor = how.startswith("in the constructor")
    optimizer = adam_triton.AdamW([weight, codes] if in_constructor else [weight], lr=1e-2, backend=target.backend)
    weight.grad = torch.randn(5, 3, device=target.device)
    optimizer.step()
    if how == "in an added group":
        optimizer.add_param_group({"params": [codes]})
    elif how == "in the constructor, a group added after":  # with float8 codes of its own
        more = torch.randn(2, 2, device=target.device).to(torch.float8_e4m3fn)
        optimizer.add_param_group({"params": [torch.nn.Parameter(more, requires_grad=False)]})
    elif how == "appended to a group's list":
        optimizer.param_groups[0]["params"].append(codes)
    optimizer.step()
    codes.requires_grad_()
    optimizer.step()  # no gradient yet: skipped, as torch skips it
    weight.grad = torch.randn(5, 3, device=target.device)
    codes.grad = torch.ones(4, 4, device=target.device).to(torch.float8_e4m3fn)
    before = weight.detach().clone(), optimizer.state[weight]["exp_avg"].clone()
    with pytest.raises(TypeError, match="got a parameter of dtype torch.float8_e4m3fn"):
        optimizer.step()
    assert torch.equal(weight.detach(), before[0])
    assert torch.equal(optimizer.state[weight]["exp_avg"], before[1])
    assert float(optimizer.state[weight]["step"]) == 3.0


def test_a_bad_added_group_leaves_the_optimizer_as_it_was():
    model = OddModel()
    optimizer = adam_triton.Adam(model.parameters())
    groups_before = len(optimizer.param_groups)
    with pytest.raises(TypeError, match="dtype"):
        optimizer.add_param_group({"params": [torch.zeros(2, dtype=torch.float8_e5m2, requires_grad=True)]})
    assert len(optimizer.param_groups) == groups_before
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": [model.weights[0]]})
    with pytest.raises(TypeError, match="dense"):
        optimizer.add_param_group({"params": [torch.eye(3).to_sparse().requires_grad_()]})
    assert len(optimizer.param_groups) == groups_before
    train(model, optimizer, steps=1)


def test_sparse_gradients_raise_before_any_update(target):
    embedding = nn.Embedding(10, 3, sparse=True).to(target.device)
    dense = nn.Linear(3, 1).to(target.device)
    optimizer = adam_triton.Adam(list(dense.parameters()) + list(embedding.parameters()), backend=target.backend)
    dense(embedding(torch.tensor([1, 2], device=target.device))).sum().backward()
    before = [p.detach().clone() for p in dense.parameters()]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, dense.parameters()))
    assert not optimizer.state


def test_a_step_refused_for_a_sparse_gradient_leaves_the_others_gradient_tensors_alone(target):
    """After ``zero_grad(set_to_none=False)`` found no gradients, the first step moves the
    fresh ones into the flat gradient buffer (``p.grad`` becomes a view of it). A step that
    raises for a bad gradient does so before that: every ``p.grad`` is the tensor it was."""
    embedding = nn.Embedding(10, 3, sparse=True).to(target.device)
    dense = nn.Linear(3, 1).to(target.device)
    optimizer = adam_triton.Adam(list(dense.parameters()) + list(embedding.parameters()), backend=target.backend)
    optimizer.zero_grad(set_to_none=False)
    dense(embedding(torch.tensor([1, 2], device=target.device))).sum().backward()
    gradients = [p.grad for p in dense.parameters()]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    assert all(p.grad is g for p, g in zip(dense.parameters(), gradients))


def test_named_parameters_and_duplicates_behave_as_in_torch():
    model = OddModel()
    optimizer = adam_triton.AdamW(model.named_parameters())
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    parameter = nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        duplicated = adam_triton.Adam([parameter, parameter], lr=0.1)
    parameter.grad = torch.ones(3)
    duplicated.step()
    assert float(duplicated.state[parameter]["step"]) == 1


def test_step_hooks_global_hooks_and_profiler_name():
    model = OddModel()
    optimizer = adam_triton.Adam(model.parameters())
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append("global"))
    try:
        train(model, optimizer, steps=1)
    finally:
        handle.remove()
    assert calls == ["pre", "post", "global"]
    with torch.profiler.profile() as profile:
        train(model, optimizer, steps=1)
    names = {event.name for event in profile.events()}
    assert "Optimizer.step#Adam.step" in names


def test_state_is_views_of_the_flat_buffers(target):
    model = OddModel().to(target.device)
    optimizer = adam_triton.Adam(model.parameters(), backend=target.backend)
    assert not optimizer.state  # lazily created, as torch
    train(model, optimizer, steps=1)
    params = list(model.parameters())
    (buffer,) = optimizer._engine.buffers
    for segment, p in enumerate(params):
        if p.numel() == 0:
            continue
        # Parameters are their segments of the flat buffer (same memory), each with a storage
        # of its own that covers only its segment (what savers look at); the moments are
        # views of the state buffers (sharing one shares the whole buffer, which stays live).
        offset = int(buffer.starts[segment]) * p.element_size()
        assert p.data_ptr() == buffer.param.data_ptr() + offset
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
        for name in ("exp_avg", "exp_avg_sq"):
            moment = optimizer.state[p][name]
            assert moment.data_ptr() == getattr(buffer, name).data_ptr() + offset
            assert moment.untyped_storage().data_ptr() == getattr(buffer, name).untyped_storage().data_ptr()
        assert p.data_ptr() % 128 == 0, "segments are 128-byte aligned"
        # An in-place edit of the exposed state is what the next step uses.
    optimizer.state[params[0]]["exp_avg"].fill_(0.5)
    optimizer.state[params[0]]["step"].fill_(10.0)
    reference = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    train(model, optimizer, steps=1, seed=5)
    assert float(optimizer.state[params[0]]["step"]) == 11.0
    assert not torch.equal(optimizer.state[params[0]]["exp_avg"], reference["exp_avg"])


def test_triton_backend_on_cpu_without_the_interpreter_says_how(tmp_path):
    pytest.importorskip("triton")
    script = (
        "import torch, adam_triton\n"
        "try:\n"
        "    adam_triton.Adam([torch.nn.Parameter(torch.zeros(3))], backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("triton_here", ["not installed", "3.5.0", "3.6.0"])
def test_without_a_usable_triton_auto_warns_and_falls_back_and_triton_says_why(monkeypatch, triton_here):
    """An older torch brings an older triton (adam-triton does not make pip replace it): CUDA
    parameters then get the pure-PyTorch backend with a warning that says why, and an
    explicit backend="triton" refuses with the reason."""
    from types import SimpleNamespace

    from adam_triton import _backends

    fake = None if triton_here == "not installed" else SimpleNamespace(__version__=triton_here)
    monkeypatch.setitem(sys.modules, "triton", fake)  # None: importing it raises ImportError
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cuda = torch.device("cuda")
    if triton_here == "3.6.0":
        assert _backends.resolve_backend("auto", cuda) == "triton"
        assert _backends.resolve_backend("triton", cuda) == "triton"
        return
    reason = "cannot be imported" if triton_here == "not installed" else "3.5.0 is older than 3.6"
    with pytest.warns(RuntimeWarning, match=f"{reason}.*pure-PyTorch backend"):
        assert _backends.resolve_backend("auto", cuda) == "torch"
    for device in (cuda, torch.device("cpu")):
        with pytest.raises(RuntimeError, match=f"needs triton >= 3.6: .*{reason}"):
            _backends.resolve_backend("triton", device)
    # Without the interpreter's variable too, the missing triton is the reason given:
    # setting the variable would not help.
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match=f"needs triton >= 3.6: .*{reason}"):
        _backends.resolve_backend("triton", torch.device("cpu"))
    assert _backends.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_auto_backend_uses_the_fallback_on_cpu():
    optimizer = adam_triton.Adam(OddModel().parameters())
    assert set(optimizer.backends().values()) == {"torch"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(OddModel(), adam_triton.Adam(OddModel().parameters()), steps=1)


def test_optimizer_built_under_inference_mode_trains(target):
    """Code that builds its optimizer inside ``torch.inference_mode()`` (torch's allocate
    nothing until the first step) gets buffers it can train with afterwards."""
    from helpers import assert_close_params, optimizers, paired

    ours_model, reference_model = paired(OddModel, target.device)
    with torch.inference_mode():
        ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    assert not any(p.is_inference() for p in ours_model.parameters())
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)
    assert_close_params(ours_model, reference_model)


def test_a_default_device_reaches_nothing_the_optimizer_makes(target):
    """Code that builds and steps under a default device (``torch.set_default_device("cuda")``,
    ``with torch.device("cuda"):``) must not move the optimizer's host-side tables and scalars
    there: on a GPU that turns each asynchronous upload into a wait. The meta device stands in
    for it, as anything made there fails loudly: construction with gappy parameters (the
    shared-memory check), steps with fresh and kept gradients, a checkpoint whose steps are
    numbers (as torch before 1.12 saved them) loaded back, and ``last_step_skipped``."""
    generator = torch.Generator().manual_seed(0)
    trunk = torch.randn(3, 5, generator=generator)
    interleaved = torch.randn(6, 6, generator=generator)
    runs = []
    # torch's own optimizer makes its step counts on the default device: it runs outside.
    for make, default_device in (
        (partial(adam_triton.AdamW, backend=target.backend), torch.device("meta")),
        (partial(torch.optim.AdamW, foreach=False), contextlib.nullcontext()),
    ):
        trunk_param = torch.nn.Parameter(trunk.clone().to(target.device))
        columns = interleaved.clone().to(target.device)
        even, odd = torch.nn.Parameter(columns[:, 0::2]), torch.nn.Parameter(columns[:, 1::2])
        params = [trunk_param, even, odd]
        with default_device:
            optimizer = make(
                [{"params": [trunk_param]}, {"params": [even, odd], "lr": 3e-2}], lr=1e-2, weight_decay=0.1, amsgrad=True
            )
        data = torch.Generator().manual_seed(1)
        for step in range(5):
            x = torch.randn(5, generator=data).to(target.device)
            loss = (trunk_param @ x).sin().sum() + (even.square() * x[0]).sum() + odd.cos().sum() * x[1]
            with default_device:
                optimizer.zero_grad(set_to_none=step % 2 == 0)
            loss.backward()
            with default_device:
                optimizer.step()
            if step == 2:
                with default_device:
                    checkpoint = optimizer.state_dict()
                    for entry in checkpoint["state"].values():
                        entry["step"] = float(entry["step"])
                    optimizer.load_state_dict(checkpoint)
        runs.append((params, optimizer))
    (ours_params, ours), (reference_params, reference) = runs
    with torch.device("meta"):
        skipped = ours.last_step_skipped
    assert skipped.device.type == "cpu" and not skipped
    for a, b in zip(ours_params, reference_params):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
        for key, expected in reference.state[b].items():
            torch.testing.assert_close(ours.state[a][key].float(), expected.float(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "key, value",
    [
        ("lr", np.float32(0.01)),
        ("lr", np.array(0.01)),
        ("lr", Fraction(1, 100)),
        ("weight_decay", 1),
        ("lr", 1),
        ("betas", (0, 0)),
        ("eps", np.float64(1e-3)),
        ("betas", (np.float64(0.8), np.float32(0.99))),
    ],
    ids=[
        "lr numpy float32", "lr 0-d numpy array", "lr Fraction", "weight_decay int", "lr int", "betas int",
        "eps numpy", "betas numpy",
    ],
)
def test_hyperparameters_of_any_real_number_type_train_as_in_torch(target, key, value):
    """Schedulers and configuration files put numpy numbers, Fractions and ints in param
    groups; torch's arithmetic takes them all (torch's fused kernel alone does not take a
    numpy lr), and so must both our backends."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        optimizer.param_groups[0][key] = value
        train(model, optimizer, steps=3)
    assert_close_params(ours_model, reference_model)


@pytest.mark.parametrize(
    "key, value, column",
    [
        ("lr", "0.01", "lr"),
        ("eps", Decimal("1e-8"), "eps"),
        ("betas", ("0.9", 0.999), "beta1"),
        ("lr", 0.01j, "lr"),
        ("lr", torch.tensor([0.01, 0.02]), "lr"),
        ("betas", (0.9, torch.tensor(0.999, device="meta")), "beta2"),
        ("lr", torch.tensor(0.01 + 0j), "lr"),
        ("weight_decay", torch.tensor([0.01 + 5j]), "weight_decay"),
    ],
    ids=[
        "lr str", "eps Decimal", "beta1 str", "lr complex", "lr of two elements", "beta2 on the meta device",
        "lr a complex tensor", "weight_decay a complex tensor",
    ],
)
def test_a_hyperparameter_that_is_not_a_real_number_is_refused_before_anything_changes(target, key, value, column):
    """torch raises a TypeError at the step, after updating the groups before (for-loop,
    foreach) or counting the step (fused); we raise it before any buffer is updated or any
    step counted, and the next step after the value is fixed is the first."""
    device = target.device
    first = nn.Parameter(torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device))
    model = OddModel().to(device)
    optimizer = adam_triton.AdamW(
        [{"params": [first]}, {"params": model.parameters()}], lr=1e-2, backend=target.backend
    )
    optimizer.param_groups[1][key] = value
    first.grad = torch.ones_like(first)
    model(torch.randn(8, device=device)).backward()
    before = [p.detach().clone() for p in (first, *model.parameters())]
    with pytest.raises(TypeError, match=f"param group 1: {column} must be a real number"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip((first, *model.parameters()), before))
    assert not optimizer.state
    optimizer.param_groups[1][key] = (0.9, 0.999) if key == "betas" else 1e-2 if key == "lr" else 1e-8
    optimizer.step()
    assert {float(s["step"]) for s in optimizer.state.values()} == {1.0}


@pytest.mark.parametrize("master_weights", [False, True], ids=["plain", "master weights"])
def test_a_backward_through_values_the_step_overwrote_raises_as_in_torch(target, master_weights, monkeypatch):
    """torch's in-place update counts in each parameter's version, so autograd refuses a
    backward that needs values a step overwrote (a GAN's discriminator output reused after
    its optimizer's step) instead of using the new ones. Ours writes the flat buffer, whose
    writes a Parameter's ``.data`` view does not count: the step counts them itself, in the
    parameters it updated only."""
    dtype = torch.bfloat16 if master_weights else torch.float32
    reseeded = []
    monkeypatch.setattr(
        adam_triton._layout.FlatBuffer, "reseed_master",
        lambda self, segment, original=adam_triton._layout.FlatBuffer.reseed_master: (reseeded.append(segment), original(self, segment)),
    )
    for make in (torch.optim.AdamW, lambda params: adam_triton.AdamW(params, backend=target.backend, master_weights=master_weights)):
        generator = torch.Generator().manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(target.device, dtype)
        without_gradient = nn.Parameter(torch.randn(7, generator=generator).to(target.device, dtype))
        optimizer = make([*model.parameters(), without_gradient])
        x = torch.randn(9, 3, generator=generator).to(target.device, dtype).requires_grad_()
        out = model(x)
        out.square().mean().backward(retain_graph=True)
        versions = [p._version for p in model.parameters()], without_gradient._version
        optimizer.step()
        assert all(p._version > before for p, before in zip(model.parameters(), versions[0]))
        assert without_gradient._version == versions[1]  # not updated: not counted (as torch)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(out.sum(), x)
        optimizer.step()  # the counts the step made are not taken for edits of the weights
    assert reseeded == []


@pytest.mark.parametrize("master_weights", [False, True], ids=["plain", "master weights"])
def test_a_step_inside_allow_mutation_on_saved_tensors_leaves_the_backward_its_old_weights(target, master_weights):
    """Inside ``torch.autograd.graph.allow_mutation_on_saved_tensors()`` a step between a
    forward and its backward (gradients from an earlier micro-batch) is allowed: the weights
    saved for backward are copied before the step writes them, so the backward gives the
    gradient at the forward's weights, as with torch's optimizer."""
    dtype = torch.bfloat16 if master_weights else torch.float32
    gradients = []
    for make in (
        partial(torch.optim.AdamW, foreach=False),
        partial(adam_triton.AdamW, backend=target.backend, master_weights=master_weights),
    ):
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3)).to(target.device, dtype)
        optimizer = make(model.parameters(), lr=0.1)
        x, y = (torch.randn(11, n, generator=generator).to(target.device, dtype) for n in (7, 3))
        earlier = [torch.randn(p.shape, generator=generator).to(target.device, dtype) for p in model.parameters()]
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            loss = nn.functional.mse_loss(model(x), y)
            for param, gradient in zip(model.parameters(), earlier):
                param.grad = gradient
            optimizer.step()
            optimizer.zero_grad()
            loss.backward()
        gradients.append([p.grad.float() for p in model.parameters()])
    for ours, reference in zip(*reversed(gradients)):
        torch.testing.assert_close(ours, reference, rtol=2e-5, atol=2e-6)


def test_a_step_gradscaler_skipped_on_the_cpu_counts_nothing_in_the_parameters_versions():
    """torch's step is not run, or writes nothing (fused), when the gradients hold an inf:
    a backward through the weights after that step is no misuse. Ours knows the skip on
    the host where GradScaler's flag is a CPU tensor (on a GPU, reading it would wait)."""
    for make in (torch.optim.Adam, adam_triton.Adam):
        generator = torch.Generator().manual_seed(0)
        weight = nn.Parameter(torch.randn(5, generator=generator))
        optimizer = make([weight], lr=0.1, fused=True)
        scaler = torch.amp.GradScaler("cpu")
        x = torch.randn(5, generator=generator, requires_grad=True)
        out = (weight * x).sum()
        scaler.scale(weight.square().sum()).backward()
        weight.grad[2] = float("inf")
        version = weight._version
        scaler.step(optimizer)
        scaler.update()
        assert weight._version == version
        torch.autograd.grad(out, x)  # no "modified by an inplace operation"
        if make is adam_triton.Adam:  # (torch's fused kernel counts no step in them)
            weight.grad.fill_(1.0)
            scaler.step(optimizer)  # a step that is taken is counted
            assert weight._version > version

