"""adam-triton under PyTorch's distributed engines, against torch's optimizer under the same one.

Two ranks (processes) per test, over gloo on loopback on any machine, and over NCCL where
there is one GPU per rank; see ``multiprocess.py`` for how they are started and bounded in
time, and ``distributed_cases.py`` for what each rank runs.

adam-triton's pure-PyTorch backend runs in every case. The Triton kernel (interpreted on
CPU, which is slow, so sparingly) runs where a wrapper's storage is involved: there it
reads gradients, or writes parameters, that live outside adam-triton's own buffers.
"""

import time

import pytest
import torch
import torch.distributed as dist

from helpers import INTERPRETER, OddModel, assert_close_params, assert_close_state, optimizers, paired, train
from multiprocess import run_on_ranks, transports

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch has no torch.distributed")

if dist.is_available():  # the cases import torch.distributed's engines
    import distributed_cases as cases

KERNEL_RUNS = INTERPRETER or torch.cuda.is_available()


def _case(*values, id, xfail=None):
    """One parameter set whose last value is the backend; the Triton one is skipped where
    the kernel cannot run, and ``xfail`` (a reason) marks a known failure, strictly."""
    marks = []
    if values[-1] == "triton":
        marks.append(pytest.mark.skipif(not KERNEL_RUNS, reason="the Triton kernel cannot run here"))
    if xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=xfail))
    return pytest.param(*values, id=id, marks=marks)


@pytest.fixture(params=transports())
def transport(request):
    return request.param


def _skip_unrunnable(transport, backend):
    if transport.device_type == "cpu" and backend == "triton" and not INTERPRETER:
        pytest.skip("the Triton kernel runs on CPU tensors only through TRITON_INTERPRET=1")


# -- DistributedDataParallel -------------------------------------------------------------------
@pytest.mark.parametrize(
    "gradient_as_bucket_view, backend",
    [
        _case(False, "torch", id="grads-own-torch"),
        _case(True, "torch", id="grads-in-ddp-buckets-torch"),
        _case(True, "triton", id="grads-in-ddp-buckets-triton"),
    ],
)
def test_ddp_trains_like_torch(transport, gradient_as_bucket_view, backend):
    _skip_unrunnable(transport, backend)
    run_on_ranks(cases.ddp_trains_like_torch, backend, gradient_as_bucket_view, transport=transport)


# -- ZeroRedundancyOptimizer -------------------------------------------------------------------
@pytest.mark.parametrize(
    "parameters_as_bucket_view, backend",
    [
        _case(False, "torch", id="params-own-torch"),
        _case(True, "torch", id="params-in-zero-buckets-torch"),
        _case(True, "triton", id="params-in-zero-buckets-triton"),
    ],
)
def test_zero_redundancy_optimizer_trains_like_torch(transport, parameters_as_bucket_view, backend):
    _skip_unrunnable(transport, backend)
    run_on_ranks(cases.zero_trains_like_torch, backend, parameters_as_bucket_view, transport=transport)


def _packed_into_a_bucket(params: list) -> torch.Tensor:
    """Point each parameter's ``.data`` at its slice of one new tensor, packed without
    padding as ZeRO packs (most views are then not 16-byte aligned); the tensor."""
    bucket = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = bucket[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return bucket


def test_parameters_re_pointed_into_a_wrappers_bucket_are_updated_there(target):
    """What ZeRO's bucket views do, in one process: parameters pointed at a wrapper's packed
    bucket after the optimizer was built must be updated there, where the wrapper reads them."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "Adam", target.backend, lr=1e-2, amsgrad=True)
    buckets = []
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2)
        buckets.append(_packed_into_a_bucket(list(model.parameters())))
        train(model, optimizer, steps=3, seed=3)
    for bucket, model in zip(buckets, (ours_model, reference_model)):
        assert torch.equal(bucket, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


def test_parameters_leaving_a_wrappers_bucket_for_storage_of_their_own_are_re_homed(target):
    """The wrapper unwraps: its parameters get storage of their own (``p.data = clone``) and
    the bucket goes. They come back into the flat buffer, where the step updates them as one
    span (they stayed out, updated one by one, with their segments unused)."""
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=1)
        params = list(model.parameters())
        bucket = _packed_into_a_bucket(params)
        train(model, optimizer, steps=1, seed=3)
        for p in params:
            p.data = p.data.clone()
        del bucket
        train(model, optimizer, steps=2, seed=4)
    (buffer,) = ours._engine.buffers
    assert not buffer.in_place.any()
    start, end = buffer.param.data_ptr(), buffer.param.data_ptr() + buffer.param.numel() * buffer.param.element_size()
    assert all(start <= p.data_ptr() < end for p in ours_model.parameters())
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


# -- FSDP2 (fully_shard, DTensor parameters) ---------------------------------------------------
@pytest.mark.parametrize(
    "name, backend",
    [
        _case("AdamW", "torch", id="AdamW-torch"),
        _case("Adam", "torch", id="Adam-amsgrad-torch"),
        _case("AdamW", "triton", id="AdamW-triton"),
    ],
)
def test_fsdp2_trains_like_torch(transport, name, backend):
    _skip_unrunnable(transport, backend)
    run_on_ranks(cases.fsdp2_trains_like_torch, backend, name, transport=transport)


@pytest.mark.parametrize("backend", [_case("torch", id="torch"), _case("triton", id="triton")])
def test_fsdp2_with_a_mixed_precision_policy_trains_like_torch(transport, backend):
    """bfloat16 compute from the float32 shards the optimizer steps."""
    _skip_unrunnable(transport, backend)
    run_on_ranks(cases.fsdp2_trains_like_torch, backend, "AdamW", True, transport=transport)


@pytest.mark.parametrize("backend", [_case("torch", id="torch"), _case("triton", id="triton")])
def test_fsdp2_with_the_state_offloaded_and_back_trains_like_torch(transport, backend):
    """DTensor states replaced by copies on the CPU and back on the device, between steps."""
    _skip_unrunnable(transport, backend)
    run_on_ranks(cases.fsdp2_trains_like_torch, backend, "AdamW", False, True, transport=transport)


@pytest.mark.parametrize(
    "full_state_dict, backend",
    [
        _case(False, "torch", id="sharded-dcp-save-load-torch"),
        _case(True, "torch", id="full-state-dict-torch"),
    ],
)
def test_fsdp2_checkpoint_round_trip(transport, full_state_dict, backend, tmp_path):
    _skip_unrunnable(transport, backend)
    checkpoint_dir = str(tmp_path / "checkpoint")
    run_on_ranks(cases.fsdp2_checkpoint_round_trip, backend, checkpoint_dir, full_state_dict, transport=transport)


# -- tensor parallelism (DTensor parameters without FSDP2) --------------------------------------
@pytest.mark.parametrize("backend", [_case("torch", id="torch"), _case("triton", id="triton")])
def test_tensor_parallel_trains_like_torch(transport, backend):
    _skip_unrunnable(transport, backend)
    run_on_ranks(cases.tensor_parallel_trains_like_torch, backend, transport=transport)


# -- FSDP1 (FullyShardedDataParallel) ------------------------------------------------------------
@pytest.mark.parametrize(
    "use_orig_params, backend",
    [
        _case(False, "torch", id="flat-params-torch"),
        _case(True, "torch", id="orig-params-torch"),
        _case(False, "triton", id="flat-params-triton"),
    ],
)
def test_fsdp1_trains_and_resumes_like_torch(transport, use_orig_params, backend):
    _skip_unrunnable(transport, backend)
    run_on_ranks(cases.fsdp1_trains_and_resumes_like_torch, backend, use_orig_params, transport=transport)


def test_fsdp1_sharded_grad_scaler_skips_a_step_on_every_rank_as_with_torch(transport):
    """Only rank 0 sees the inf; ShardedGradScaler's unscale_ tells every rank."""
    run_on_ranks(cases.fsdp1_sharded_grad_scaler_skips_on_every_rank, "torch", transport=transport)


# -- mixed precision (master weights, bfloat16 states) under every engine ---------------------
@pytest.mark.parametrize(
    "engine, backend",
    [
        _case("ddp", "torch", id="ddp-torch"),
        _case("zero", "torch", id="zero-buckets-torch"),
        _case("fsdp2", "torch", id="fsdp2-torch"),
        _case("fsdp2", "triton", id="fsdp2-triton"),
    ],
)
def test_master_weights_under_each_engine(transport, engine, backend):
    _skip_unrunnable(transport, backend)
    run_on_ranks(cases.mixed_precision_under_each_engine, backend, engine, transport=transport)


# -- Hogwild (torch.multiprocessing, a model in shared memory) ----------------------------------
@pytest.mark.parametrize("backend", [_case("torch", id="torch"), _case("triton", id="triton")])
def test_a_model_in_shared_memory_is_trained_where_the_other_processes_see_it(backend):
    """As in PyTorch's Hogwild example: the model is put in shared memory, a worker process
    builds the optimizer and trains. Its updates must land in the shared parameters (not in
    a private flat buffer), and equal torch's Adam doing the same training here."""
    if backend == "triton" and not INTERPRETER:
        pytest.skip("the Triton kernel runs on CPU tensors only through TRITON_INTERPRET=1")
    shared, reference_model = paired(OddModel, "cpu")
    shared.share_memory()
    run_on_ranks(cases.train_shared_model, shared, "Adam", backend, 3, 5, world_size=1)
    train(reference_model, torch.optim.Adam(reference_model.parameters(), lr=1e-2), steps=3, seed=5)
    assert_close_params(shared, reference_model)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad()", "zero_grad(set_to_none=False)"])
def test_share_memory_after_the_optimizer_was_built_keeps_training_the_shared_parameters(target, set_to_none):
    """``model.share_memory()`` called later moves the parameters' storage into shared memory;
    the optimizer must go on updating them there. With kept gradients the CPU backend would
    update a group as one flat span of its buffer, which these parameters are no longer in."""
    if target.device != "cpu":
        pytest.skip("shared memory is for CPU tensors")
    ours_model, reference_model = paired(OddModel, target.device)
    ours, reference = optimizers(ours_model, reference_model, "AdamW", target.backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (reference_model, reference)):
        train(model, optimizer, steps=2, set_to_none=set_to_none)
        model.share_memory()
        train(model, optimizer, steps=3, seed=3, set_to_none=set_to_none)
    assert all(p.is_shared() for p in ours_model.parameters())
    assert_close_params(ours_model, reference_model)
    assert_close_state(ours, reference, ours_model, reference_model)


# -- the harness: a broken case fails in bounded time, and its processes are reaped -------------
def test_a_collective_waiting_for_a_missing_rank_times_out():
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="rank_one_never_arrives failed"):
        run_on_ranks(cases.rank_one_never_arrives, collective_timeout_s=2, deadline_s=60)
    assert time.monotonic() - started < 30


def test_ranks_past_the_deadline_are_killed():
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        run_on_ranks(cases.every_rank_hangs, deadline_s=2)
    assert time.monotonic() - started < 30
