"""An allocation that fails half-way (out of memory, as batch-size finders provoke and catch,
or a KeyboardInterrupt in a notebook) leaves the optimizer able to try again: the retried
call and the steps after it train as if nothing had failed."""

import pytest
import torch
from helpers import OddModel, assert_close_params, assert_close_state, optimizers, paired, train

import adam_triton
from adam_triton import _layout


def _fail_allocation(monkeypatch, which: int, interrupt_after: bool = False) -> list:
    """The ``which``-th flat-buffer allocation from now raises torch's out-of-memory error,
    once; or, with ``interrupt_after``, succeeds and a KeyboardInterrupt comes at the next
    view made of a buffer (Ctrl-C while the buffer is being set up). Returns the list of
    allocations seen."""
    seen = []
    armed = []

    def allocate(numel, dtype, device, original=_layout.aligned_zeros):
        seen.append(dtype)
        if len(seen) == which:
            if not interrupt_after:
                raise torch.OutOfMemoryError("out of memory (injected)")
            armed.append(True)
        return original(numel, dtype, device)

    def segment_view(self, flat, segment, original=_layout.FlatBuffer.segment_view):
        if armed:
            armed.clear()
            raise KeyboardInterrupt
        return original(self, flat, segment)

    monkeypatch.setattr(_layout, "aligned_zeros", allocate)
    monkeypatch.setattr(_layout.FlatBuffer, "segment_view", segment_view)
    return seen


FAILURES = [
    pytest.param(False, torch.OutOfMemoryError, id="out of memory"),
    pytest.param(True, KeyboardInterrupt, id="interrupted after"),
]


@pytest.mark.parametrize("interrupt_after, error", FAILURES)
@pytest.mark.parametrize("which", [1, 2, 3], ids=["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_a_first_step_failing_in_the_moments_can_be_retried(target, which, interrupt_after, error, monkeypatch):
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, amsgrad=True)
    ours_model(torch.randn(8, generator=torch.Generator().manual_seed(1)).to(target.device)).backward()
    before = [p.detach().clone() for p in ours_model.parameters()]
    seen = _fail_allocation(monkeypatch, which, interrupt_after)
    with pytest.raises(error):
        ours.step()
    assert len(seen) == which or interrupt_after  # an interrupt comes at the next view made
    assert all(torch.equal(p, b) for p, b in zip(ours_model.parameters(), before))
    ours.zero_grad()
    monkeypatch.undo()
    train(ours_model, ours, steps=3)
    train(reference_model, reference, steps=3)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


@pytest.mark.parametrize("interrupt_after, error", FAILURES)
@pytest.mark.parametrize("which", [1, 2, 3], ids=["exp_avg", "exp_avg_sq", "master"])
def test_a_first_step_failing_with_master_weights_keeps_them(target, which, interrupt_after, error, monkeypatch):
    """The masters are made with the moments: one that fails must not leave a buffer that
    trains on without masters, or with masters never taken from the parameters."""
    runs = []
    for fail in (False, True):
        model = OddModel().to(target.device, torch.bfloat16)
        optimizer = adam_triton.AdamW(model.parameters(), lr=1e-2, backend=target.backend, master_weights=True)
        if fail:
            x = torch.randn(8, generator=torch.Generator().manual_seed(1))
            model(x.to(target.device, torch.bfloat16)).backward()
            _fail_allocation(monkeypatch, which, interrupt_after)
            with pytest.raises(error):
                optimizer.step()
            optimizer.zero_grad()
            monkeypatch.undo()
        train(model, optimizer, steps=3)
        assert all("master_param" in entry for entry in optimizer.state.values())
        runs.append(model)
    for clean, retried in zip(*(run.parameters() for run in runs)):
        assert torch.equal(clean, retried)


@pytest.mark.parametrize("interrupt_after, error", FAILURES)
def test_a_failure_making_the_gradient_buffer_can_be_retried(target, interrupt_after, error, monkeypatch):
    """``zero_grad(set_to_none=False)`` makes the flat gradient buffer the first time: when
    that fails, the next call makes it, and training goes on as torch's."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
    seen = _fail_allocation(monkeypatch, 1, interrupt_after)
    with pytest.raises(error):
        ours.zero_grad(set_to_none=False)
    assert seen == [torch.float32]
    monkeypatch.undo()
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3, seed=2, set_to_none=False)
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)
