"""Flat buffers and gradients: where things live, and what the step reads."""

import copy
import io
import os
import sys
import threading
import time

import pytest
import torch
from torch import nn
from helpers import OddModel, assert_close_params, optimizers, paired, train

import adam_triton
from adam_triton import _layout, _one_thread


def test_views_land_on_their_segments_when_the_buffer_is_not_at_its_storage_start(target, monkeypatch):
    """Buffers are aligned slices of a larger allocation; every view must count from the
    slice, not from the allocation (an off-by-offset here corrupts neighbours)."""

    def offset_zeros(numel, dtype, device):
        return torch.zeros(numel + 64, dtype=dtype, device=device)[64:]

    monkeypatch.setattr(_layout, "aligned_zeros", offset_zeros)
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2, amsgrad=True)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=3)
        train(model, optimizer, steps=2, seed=2, set_to_none=False)
    assert_close_params(ours_model, reference_model)


def test_parameters_keep_identity_and_live_in_one_buffer(target):
    model = OddModel().to(target.device)
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    optimizer = adam_triton.Adam(model.parameters(), backend=target.backend)
    assert list(model.parameters()) == params  # same Parameter objects
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    (buffer,) = optimizer._engine.buffers
    for segment, p in enumerate(params):
        assert p.data_ptr() == buffer.param.data_ptr() + int(buffer.starts[segment]) * 4
    with torch.no_grad():  # the same memory: a write through the buffer is the parameter's
        for segment in range(len(params)):
            buffer.segment_view(buffer.param, segment).add_(1.0)
    assert all(torch.equal(p, v + 1) for p, v in zip(params, values))


def test_zero_grad_keeps_gradients_in_the_flat_buffer_and_the_fallback_steps_it_flat(monkeypatch):
    """With zero_grad(set_to_none=False) backward accumulates into views of one gradient
    buffer, and the CPU fallback updates each group as one flat tensor."""
    model = OddModel()
    optimizer = adam_triton.Adam(model.parameters(), backend="torch")
    train(model, optimizer, steps=1)
    optimizer.zero_grad(set_to_none=False)
    (buffer,) = optimizer._engine.buffers
    for p, view in zip(model.parameters(), buffer.grad_views):
        assert p.grad is view
    calls = []
    real = torch._fused_adam_

    def recording(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", recording)
    train(model, optimizer, steps=2, seed=3, set_to_none=False)
    assert calls == [1, 1]
    calls.clear()
    train(model, optimizer, steps=1, seed=4, set_to_none=True)
    assert calls == [len(list(model.parameters()))]


def test_gradients_of_a_wrapper_stay_where_they_are(target):
    """A gradient that is a view of someone else's storage (DDP's buckets, for one) is
    zeroed in place by zero_grad(set_to_none=False), never replaced."""
    model = OddModel().to(target.device)
    optimizer = adam_triton.Adam(model.parameters(), backend=target.backend)
    bucket = torch.zeros(sum(p.numel() for p in model.parameters()), device=target.device)
    views, offset = [], 0
    for p in model.parameters():
        views.append(bucket[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
        p.grad = views[-1]
    bucket.normal_()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is v for p, v in zip(model.parameters(), views))
    assert not bucket.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_does_not_synchronise_with_the_device():
    model = OddModel().cuda()
    optimizer = adam_triton.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), backend="triton")
    train(model, optimizer, steps=2)
    loss = model(torch.randn(8, device="cuda"))
    optimizer.zero_grad()
    loss.backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_counts_written_into_the_state_are_taken_up_without_synchronising():
    """Loops that offload the state put each ``state[p]["step"]`` back before every step;
    spreading the written counts over every chunk of the parameter must not wait for the
    device (it read a pageable copy of the chunks' leaders)."""
    model = OddModel().cuda()
    optimizer = adam_triton.AdamW(model.parameters(), lr=1e-3, backend="triton")
    train(model, optimizer, steps=2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for count in (7.0, 11.0):
            loss = model(torch.randn(8, device="cuda"))
            optimizer.zero_grad()
            loss.backward()
            for p in model.parameters():
                optimizer.state[p]["step"].fill_(count)
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [float(optimizer.state[p]["step"]) for p in model.parameters()] == [12.0] * len(list(model.parameters()))


def record_fused_adamw_calls(monkeypatch) -> list:
    """From now on, each call of torch's fused AdamW kernel appends (its tensor count, the
    calling thread's torch thread count) to the list returned, and then runs."""
    calls = []
    real = torch._fused_adamw_

    def recording(params, *args, **kwargs):
        calls.append((len(params), torch.get_num_threads()))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", recording)
    return calls


def test_many_small_fresh_gradients_are_updated_as_a_list_on_one_thread(monkeypatch, two_torch_threads):
    """CPU fallback, several threads: a group of many small tensors with fresh gradients is
    one call of torch's fused kernel on the list, made with one thread (torch's CPU kernel
    would otherwise open a parallel region per tensor), after which torch's thread count is
    what it was. The gradients are read where they are: no gradient buffer is made. Same
    numbers as torch."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(1 + 37 * i % 300,) for i in range(80)]
    ours_params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = adam_triton.AdamW(ours_params, lr=1e-2, backend="torch")
    reference = torch.optim.AdamW(reference_params, lr=1e-2)
    calls = record_fused_adamw_calls(monkeypatch)
    for _ in range(3):
        for p, q in zip(ours_params, reference_params):
            grad = torch.randn(p.shape, generator=generator)
            p.grad, q.grad = grad, grad.clone()
        ours.step()
        reference.step()
        assert torch.get_num_threads() == 2
    assert calls == [(80, 1)] * 3
    assert ours._engine.buffers[0].grad is None
    for p, q in zip(ours_params, reference_params):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "count, size, threads",
    [(64, "cutoff", 1), (64, "above", 2), (63, 8, 2)],
    ids=["64-at-the-mean-cutoff", "64-just-above-it", "63-tiny"],
)
def test_which_lists_take_one_thread(monkeypatch, two_torch_threads, count, size, threads):
    """The one-thread list needs at least ONE_THREAD_MIN_TENSORS tensors averaging at most
    ONE_THREAD_MAX_MEAN_ELEMENTS (the boundaries, benchmarks/NOTES.md ideas 30 and 31)."""
    from adam_triton._backends import ONE_THREAD_MAX_MEAN_ELEMENTS

    size = {"cutoff": ONE_THREAD_MAX_MEAN_ELEMENTS, "above": ONE_THREAD_MAX_MEAN_ELEMENTS + 1}.get(size, size)
    params = [torch.nn.Parameter(torch.randn(size)) for _ in range(count)]
    optimizer = adam_triton.AdamW(params, backend="torch")
    for p in params:
        p.grad = torch.randn(size)
    calls = record_fused_adamw_calls(monkeypatch)
    optimizer.step()
    assert calls == [(count, threads)]


def test_a_list_of_many_small_tensors_leaves_its_large_ones_every_thread(monkeypatch, two_torch_threads):
    """CPU fallback, several threads, fresh gradients, AMSGrad: in a list that takes one
    thread (ONE_THREAD_MIN_TENSORS or more tensors with gradients, small on average), the
    tensors above ONE_THREAD_MAX_ELEMENTS get a call of their own on every thread; what
    counts is the tensors updated in the step, not the group. The bits of torch's fused
    AdamW."""
    from adam_triton._backends import ONE_THREAD_MAX_ELEMENTS, ONE_THREAD_MIN_TENSORS

    generator = torch.Generator().manual_seed(0)
    small = [(1 + 37 * i % 300,) for i in range(ONE_THREAD_MIN_TENSORS + 6)]
    small[10] = (ONE_THREAD_MAX_ELEMENTS,)
    large = [(ONE_THREAD_MAX_ELEMENTS + 1,), (190, 181), (ONE_THREAD_MAX_ELEMENTS + 77,)]
    shapes = small[:20] + large[:1] + small[20:50] + large[1:] + small[50:]
    is_large = [shape in large for shape in shapes]
    ours_params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = adam_triton.AdamW(ours_params, lr=1e-2, amsgrad=True, backend="torch")
    reference = torch.optim.AdamW(reference_params, lr=1e-2, amsgrad=True, fused=True)
    # Step 2: four small tensors and a large one skip; step 3: ten small ones do, which
    # leaves fewer than ONE_THREAD_MIN_TENSORS in the list: one call on every thread.
    without = [set(), {3, 7, 20, 40, 66}, set(range(30, 40)), set()]
    expected = []
    for step_without in without:
        stepped = [(p.numel(), big) for i, (p, big) in enumerate(zip(ours_params, is_large)) if i not in step_without]
        if len(stepped) >= ONE_THREAD_MIN_TENSORS:
            expected += [(sum(not big for _, big in stepped), 1), (sum(big for _, big in stepped), 2)]
        else:
            expected.append((len(stepped), 2))
    assert expected[2:4] == [(66, 1), (2, 2)] and expected[4] == (63, 2)
    for step_without in without:
        for index, (p, q) in enumerate(zip(ours_params, reference_params)):
            grad = None if index in step_without else torch.randn(p.shape, generator=generator)
            p.grad, q.grad = grad, None if grad is None else grad.clone()
        calls = record_fused_adamw_calls(monkeypatch)
        ours.step()
        monkeypatch.undo()
        reference.step()
        assert calls == expected[: len(calls)]
        expected = expected[len(calls) :]
        assert torch.get_num_threads() == 2
    assert expected == []
    for p, q in zip(ours_params, reference_params):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["max_exp_avg_sq"], reference.state[q]["max_exp_avg_sq"])
        assert torch.equal(ours.state[p]["step"], reference.state[q]["step"])


def test_one_thread_is_decided_on_the_tensors_with_gradients(monkeypatch, two_torch_threads):
    """A group of many tiny tensors, most of them without a gradient this step (frozen or
    unused), and one large one with: the step's list is a few tensors, on every thread."""
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(200)] + [torch.nn.Parameter(torch.randn(50_000))]
    optimizer = adam_triton.AdamW(params, backend="torch")
    for p in params[-3:]:
        p.grad = torch.randn(p.shape)
    calls = record_fused_adamw_calls(monkeypatch)
    optimizer.step()
    assert calls == [(3, 2)]


def test_a_failing_update_on_one_thread_gives_torch_its_thread_count_back(monkeypatch, two_torch_threads):
    """The kernel's error propagates, and torch's thread count is put back on the way."""
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(70)]
    optimizer = adam_triton.AdamW(params, backend="torch")
    for p in params:
        p.grad = torch.randn(5)

    def failing(*args, **kwargs):
        raise RuntimeError("the kernel failed")

    monkeypatch.setattr(torch, "_fused_adamw_", failing)
    with pytest.raises(RuntimeError, match="the kernel failed"):
        optimizer.step()
    assert torch.get_num_threads() == 2


def test_a_thread_starting_during_an_update_on_one_thread_keeps_torchs_thread_count(monkeypatch, two_torch_threads):
    """The one-thread call lowers the count of the stepping thread alone (through the
    OpenMP runtime torch reads, found on Linux): another thread whose first parallel torch
    operation falls inside it still gets torch's count. (``torch.set_num_threads`` would
    also lower torch's process-wide default, which that thread would adopt for good.)"""
    if _one_thread._openmp_runtime() is None:
        assert sys.platform != "linux", "torch's OpenMP runtime should be found on Linux"
        pytest.skip("no OpenMP runtime found: the process-wide fallback is documented")
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(70)]
    optimizer = adam_triton.AdamW(params, backend="torch")
    for p in params:
        p.grad = torch.randn(5)
    seen = {}
    real = torch._fused_adamw_

    def starting_a_thread(*args, **kwargs):
        seen["stepping"] = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.setdefault("other", torch.get_num_threads()))
        other.start()
        other.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", starting_a_thread)
    optimizer.step()
    assert seen == {"stepping": 1, "other": 2}
    assert torch.get_num_threads() == 2


def test_an_openmp_runtime_torch_does_not_read_is_not_used(monkeypatch, two_torch_threads):
    """A runtime whose count torch does not see (another library's copy) is refused, and
    with none found the call still runs on one thread, through torch's own setting."""

    class Unrelated:
        def omp_get_max_threads(self):
            return torch.get_num_threads()

        def omp_set_num_threads(self, count):
            pass

    assert not _one_thread._is_torchs(Unrelated())
    monkeypatch.setattr(_one_thread, "_runtime", None)
    counts = []
    _one_thread.run_on_one_thread(lambda: counts.append(torch.get_num_threads()))
    assert counts == [1] and torch.get_num_threads() == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_while_the_openmp_runtime_is_looked_for_can_look_for_it(monkeypatch, two_torch_threads):
    """A fork while another thread is finding the OpenMP runtime (the first one-thread
    step) leaves the child able to find it: nothing the search holds (a lock, say) is
    inherited half-way."""
    import time

    monkeypatch.setattr(_one_thread, "_runtime", _one_thread._UNRESOLVED)
    searching, release = threading.Event(), threading.Event()
    real_paths = _one_thread._candidate_paths

    def slow_in_the_searching_thread():
        if threading.current_thread().name == "searching":
            searching.set()
            release.wait(30)
        return real_paths()

    monkeypatch.setattr(_one_thread, "_candidate_paths", slow_in_the_searching_thread)
    searcher = threading.Thread(target=_one_thread._openmp_runtime, name="searching")
    searcher.start()
    try:
        assert searching.wait(30)
        child = os.fork()
        if child == 0:  # the child: find the runtime, then leave at once
            try:
                found = _one_thread._openmp_runtime() is not None or sys.platform != "linux"
            finally:
                os._exit(0 if found else 1)
        deadline = time.monotonic() + 30
        while (status := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if status[0] == 0:
            os.kill(child, 9)
            os.waitpid(child, 0)
            pytest.fail("the forked child hung looking for the OpenMP runtime")
        assert os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        release.set()
        searcher.join()


def test_openmp_runtimes_are_tried_torchs_own_first(monkeypatch):
    """Of the OpenMP runtimes mapped into the process (another package may vendor its own
    libgomp), torch's comes first, then the others once each, then the process's global
    symbols; other libraries and anonymous mappings are not candidates."""
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    vendored = "/site-packages/scikit_learn.libs/libgomp-a34b3233.so.1.0.0"
    maps = "\n".join(
        [
            f"7f0000000000-7f0000001000 r-xp 00000000 08:01 11 {vendored}",
            "7f0000001000-7f0000002000 rw-p 00000000 00:00 0 ",
            f"7f0000002000-7f0000003000 r-xp 00000000 08:01 12 {torch_lib}",
            f"7f0000003000-7f0000004000 r--p 00001000 08:01 12 {torch_lib}",
            "7f0000004000-7f0000005000 r-xp 00000000 08:01 13 /usr/lib/libc.so.6",
            f"7f0000005000-7f0000006000 r-xp 00000000 08:01 11 {vendored}",
            "7f0000006000-7f0000007000 r-xp 00000000 08:01 14 [vdso]",
        ]
    )
    monkeypatch.setattr(_one_thread, "open", lambda path: io.StringIO(maps), raising=False)
    assert _one_thread._candidate_paths() == [torch_lib, vendored, None]


def test_many_small_parameters_train_like_torch_after_the_gradient_buffer_was_let_go():
    """A loop mixing ``zero_grad(set_to_none=False)`` and ``zero_grad()`` on a group of many
    small tensors: the second lets the gradient buffer go (the gradients lived in it), and
    kept gradients later need a new one. (Fresh gradients were once gathered into views of
    the released buffer, and every later step read zeros, silently.) Trained as torch trains."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(39)], nn.Linear(6, 1))
    reference_model = copy.deepcopy(model)
    assert len(list(model.parameters())) >= 64  # a group updated on one thread when fresh
    ours = adam_triton.AdamW(model.parameters(), lr=1e-2, backend="torch")
    reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for set_to_none in (True, False, True, True, False, False, True, True):
        x = torch.randn(7, 6, generator=generator)
        for net, optimizer in ((model, ours), (reference_model, reference)):
            optimizer.zero_grad(set_to_none=set_to_none)
            net(x).pow(2).mean().backward()
            optimizer.step()
        for p, q in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
