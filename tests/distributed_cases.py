"""What every rank runs for tests/test_distributed.py.

Each case trains adam-triton and torch's own optimizer under the same distributed wrapper
(DistributedDataParallel, ZeroRedundancyOptimizer, FSDP2), from the same initial
parameters, on the same fresh random data (different on every rank, so the gradients
really are reduced across ranks), and compares the parameters after several steps.
Everything here runs inside the rank processes started by ``multiprocess.run_on_ranks``;
a failed assertion fails the test with the rank's traceback.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import OddModel, assert_close_params, train
from torch import nn
from torch.distributed.tensor import DTensor

import adam_triton

STEPS = 5
RTOL, ATOL = 2e-5, 2e-6  # float32, a few steps: as tests/test_training_parity.py

# One configuration per class, each with something that changes the update.
CONFIGS = {
    "AdamW": dict(lr=2e-2, betas=(0.8, 0.95), weight_decay=0.1),
    "Adam": dict(lr=2e-2, betas=(0.8, 0.95), weight_decay=0.05, amsgrad=True),
}


def assert_runs_on(optimizer, backend: str) -> None:
    """adam-triton updated every buffer with ``backend`` (no silent fallback)."""
    assert optimizer.backends() and set(optimizer.backends().values()) == {backend}, optimizer.backends()


def optimizer_pair(name: str, backend: str):
    """(adam-triton's class with ``backend`` bound, torch's class) for ``name``."""
    ours = getattr(adam_triton, name)

    def make_ours(params, **kwargs):
        return ours(params, backend=backend, **kwargs)

    return make_ours, getattr(torch.optim, name)


def rank_generator(rank: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + rank)


def assert_replicas_agree(model: nn.Module) -> None:
    """Every rank holds the same (replicated) parameters."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    for rank, other in enumerate(everyone):
        torch.testing.assert_close(flat, other, rtol=0, atol=0, msg=lambda m, rank=rank: f"rank {rank} differs: {m}")


# -- DistributedDataParallel and ZeroRedundancyOptimizer -------------------------------------
def _train_replicated(model, optimizer, rank, device, set_to_none=True, seed=1):
    """A real loop over OddModel: fresh data each step, zero_grad, backward, step."""
    generator = rank_generator(rank, seed)
    for _ in range(STEPS):
        x = torch.randn(8, generator=generator).to(device)
        optimizer.zero_grad(set_to_none=set_to_none)
        model(x).backward()
        optimizer.step()


def ddp_trains_like_torch(rank, world_size, device, backend, gradient_as_bucket_view):
    from torch.nn.parallel import DistributedDataParallel

    # zero_grad(set_to_none=False) keeps gradient tensors: ours become views of adam-triton's
    # gradient buffer, or stay views of DDP's buckets (zeroed in place) with bucket views.
    for set_to_none in (True, False):
        for name, kwargs in CONFIGS.items():
            trained = []
            for make_optimizer in optimizer_pair(name, backend):
                model = DistributedDataParallel(
                    OddModel(seed=0).to(device),
                    device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=gradient_as_bucket_view,
                )
                optimizer = make_optimizer(model.parameters(), **kwargs)
                _train_replicated(model, optimizer, rank, device, set_to_none=set_to_none)
                if gradient_as_bucket_view:
                    # What the optimizers read were views of DDP's buckets.
                    assert all(p.grad._base is not None for p in model.parameters())
                trained.append((model.module, optimizer))
            (ours, ours_optimizer), (reference, _) = trained
            assert_runs_on(ours_optimizer, backend)
            assert_close_params(ours, reference, rtol=RTOL, atol=ATOL)
            assert_replicas_agree(ours)


def zero_trains_like_torch(rank, world_size, device, backend, parameters_as_bucket_view):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    for name, kwargs in CONFIGS.items():
        trained = []
        # As users write it: the class, and its keywords (ours with `backend`) for ZeRO to pass on.
        for optimizer_class, extra in ((getattr(adam_triton, name), {"backend": backend}), (getattr(torch.optim, name), {})):
            model = DistributedDataParallel(
                OddModel(seed=0).to(device), device_ids=[device.index] if device.type == "cuda" else None
            )
            optimizer = ZeroRedundancyOptimizer(
                model.parameters(),
                optimizer_class=optimizer_class,
                parameters_as_bucket_view=parameters_as_bucket_view,
                **kwargs,
                **extra,
            )
            assert type(optimizer.optim) is optimizer_class  # each rank steps its shard with it
            _train_replicated(model, optimizer, rank, device)
            optimizer.consolidate_state_dict(to=0)  # every rank's shard of the state, on rank 0
            consolidated = optimizer.state_dict() if rank == 0 else None
            trained.append((model.module, optimizer.optim, consolidated))
        (ours, ours_optimizer, ours_state), (reference, _, reference_state) = trained
        assert_runs_on(ours_optimizer, backend)
        assert_close_params(ours, reference, rtol=RTOL, atol=ATOL)
        assert_replicas_agree(ours)
        if rank == 0:
            assert ours_state["state"].keys() == reference_state["state"].keys()
            for index, expected in reference_state["state"].items():
                assert ours_state["state"][index].keys() == expected.keys(), index
                for key, value in expected.items():
                    torch.testing.assert_close(ours_state["state"][index][key], value, rtol=RTOL, atol=ATOL)


# -- FSDP2 ------------------------------------------------------------------------------------
class ShardedNet(nn.Module):
    """Sizes that shard unevenly over two ranks, and a one-row parameter that leaves one
    rank an empty shard."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(13, 31)  # 31 rows: 16 and 15 per rank
        self.mid = nn.Linear(31, 31)
        self.scale = nn.Parameter(torch.ones(1, 31))  # 1 row: rank 1 holds nothing
        self.out = nn.Linear(31, 3)

    def forward(self, x):
        hidden = torch.tanh(self.inp(x))
        hidden = torch.tanh(self.mid(hidden)) * self.scale
        return self.out(hidden)


def sharded_net(device, mixed_precision: bool = False) -> nn.Module:
    """ShardedNet under FSDP2; with ``mixed_precision``, FSDP2 computes in bfloat16 from the
    float32 shards the optimizer steps (``MixedPrecisionPolicy``), and reduces in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    options = {"mp_policy": policy} if policy else {}
    torch.manual_seed(0)  # the same initial parameters on every rank and in every run
    model = ShardedNet().to(device)
    fully_shard(model.inp, **options)
    fully_shard(model.mid, **options)
    fully_shard(model, **options)  # the root: scale and out
    return model


def _train_sharded(model, optimizer, rank, device, steps=STEPS, seed=1, start=0):
    """Step ``start`` to ``start + steps`` of a fixed data stream (so a resumed run sees
    the same batches as an uninterrupted one)."""
    for index in range(start, start + steps):
        generator = rank_generator(rank, 100 * seed + index)
        x = torch.randn(8, 13, generator=generator).to(device)
        y = torch.randn(8, 3, generator=generator).to(device)
        # Both kinds of zero_grad: with set_to_none=False FSDP2 accumulates into the zeroed
        # DTensor gradients it finds.
        optimizer.zero_grad(set_to_none=index % 2 == 0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def assert_close_sharded(ours: nn.Module, reference: nn.Module, rtol=RTOL, atol=ATOL) -> None:
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        assert isinstance(a, DTensor) and a.placements == b.placements, name
        torch.testing.assert_close(a.to_local(), b.to_local(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        # The local shards are what FSDP2 all-gathers: the full parameters agree too.
        torch.testing.assert_close(a.full_tensor(), b.full_tensor(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def _offload_state(optimizer, device) -> None:
    """The optimizer state moved to the CPU and back, each tensor replaced in its entry, as
    RLHF trainers (verl) free device memory between phases."""
    for where in ("cpu", device):
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizer.state[param]
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        state[key] = value.to(where, copy=True)


def fsdp2_trains_like_torch(rank, world_size, device, backend, name, mixed_precision=False, offload=False):
    from torch.distributed.tensor.debug import CommDebugMode

    trained = []
    for make_optimizer in optimizer_pair(name, backend):
        model = sharded_net(device, mixed_precision)
        optimizer = make_optimizer(model.parameters(), **CONFIGS[name])
        if offload:
            _train_sharded(model, optimizer, rank, device, steps=2)
            _offload_state(optimizer, device)
            _train_sharded(model, optimizer, rank, device, steps=STEPS - 3, start=2)
        else:
            _train_sharded(model, optimizer, rank, device, steps=STEPS - 1)
        # One more step by hand, to watch the optimizer's part of it alone.
        generator = rank_generator(rank, 999)
        x, y = torch.randn(8, 13, generator=generator).to(device), torch.randn(8, 3, generator=generator).to(device)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        with CommDebugMode() as comm:
            optimizer.step()
        # The update works on the local shards: it never gathers (or sends) anything.
        assert comm.get_total_counts() == 0, comm.get_comm_counts()
        trained.append((model, optimizer))
    (ours, ours_optimizer), (reference, reference_optimizer) = trained
    assert_close_sharded(ours, reference)
    # The local shards of each (device, dtype) make one flat buffer, updated by `backend`.
    assert ours_optimizer.backends() == {(device, torch.float32): backend}
    for (name_, p), q in zip(ours.named_parameters(), reference.parameters()):
        expected_state, state = reference_optimizer.state[q], ours_optimizer.state[p]
        assert set(state) == set(expected_state), name_
        for key, expected in expected_state.items():
            actual = state[key]
            # DTensor moments for DTensor parameters (what distributed checkpoints expect).
            assert type(actual) is type(expected), (name_, key, type(actual))
            if key == "step":
                assert float(actual) == float(expected), name_
            else:
                assert actual.placements == expected.placements and actual.shape == expected.shape, (name_, key)
                torch.testing.assert_close(actual.to_local(), expected.to_local(), rtol=RTOL, atol=ATOL)


def _snapshot(optimizer_state_dict: dict) -> dict:
    """Local copies of every state tensor: optimizers update their state in place, and a
    state dict holds references to it."""
    return {
        key: {field: (v.to_local() if isinstance(v, DTensor) else v).detach().clone() for field, v in state.items()}
        for key, state in optimizer_state_dict["state"].items()
    }


def fsdp2_checkpoint_round_trip(rank, world_size, device, backend, checkpoint_dir, full_state_dict):
    """Save model and optimizer mid-run through torch.distributed.checkpoint's state-dict
    API, load them into a fresh model and optimizer (ours, then torch's), and finish the
    run: ours resumes bit for bit, torch's within rounding, from adam-triton's checkpoint."""
    import copy

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    name = "AdamW"
    make_ours, make_reference = optimizer_pair(name, backend)
    options = StateDictOptions(full_state_dict=full_state_dict)
    first, second = 3, 3

    model = sharded_net(device)
    optimizer = make_ours(model.parameters(), **CONFIGS[name])
    _train_sharded(model, optimizer, rank, device, steps=first)
    saved = {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }
    saved_state = _snapshot(saved["optimizer"])
    moments = [v for s in saved["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
    if full_state_dict:
        # Whole (gathered) tensors, as a single-process checkpoint holds them; kept in memory.
        assert moments and all(type(v) is torch.Tensor for v in moments)
        saved = copy.deepcopy(saved)
    else:
        assert moments and all(isinstance(v, DTensor) for v in moments)
        dcp.save(saved, checkpoint_id=checkpoint_dir)
    _train_sharded(model, optimizer, rank, device, steps=second, start=first)
    uninterrupted = model

    for make_optimizer in (make_ours, make_reference):
        model = sharded_net(device)
        optimizer = make_optimizer(model.parameters(), **CONFIGS[name])
        if full_state_dict:
            loaded = copy.deepcopy(saved)
        else:
            loaded = {
                "model": get_model_state_dict(model, options=options),
                "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
            }
            dcp.load(loaded, checkpoint_id=checkpoint_dir)
        set_model_state_dict(model, loaded["model"], options=options)
        set_optimizer_state_dict(model, optimizer, loaded["optimizer"], options=options)
        # What was saved is what is loaded, exactly.
        reloaded = _snapshot(get_optimizer_state_dict(model, optimizer, options=options))
        assert reloaded.keys() == saved_state.keys()
        for key, state in saved_state.items():
            assert reloaded[key].keys() == state.keys(), key
            for field, value in state.items():
                assert torch.equal(reloaded[key][field], value), (key, field)
        _train_sharded(model, optimizer, rank, device, steps=second, start=first)
        exact = make_optimizer is make_ours
        assert_close_sharded(model, uninterrupted, rtol=0 if exact else RTOL, atol=0 if exact else ATOL)


# -- tensor parallelism (DTensor parameters without FSDP2) ------------------------------------
def tensor_parallel_trains_like_torch(rank, world_size, device, backend):
    """A column-parallel then row-parallel MLP (Megatron-style), on the same batches on every
    rank, as tensor parallelism runs: every rank steps its own slices of the weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh(device.type, (world_size,))
    trained = []
    for make_optimizer in optimizer_pair("AdamW", backend):
        torch.manual_seed(0)
        # 30 hidden units: 15 per rank, an odd length for every local slice.
        model = nn.Sequential(nn.Linear(13, 30), nn.Tanh(), nn.Linear(30, 3)).to(device)
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        assert all(isinstance(p, DTensor) for p in model.parameters())
        optimizer = make_optimizer(model.parameters(), **CONFIGS["AdamW"])
        for index in range(STEPS):
            generator = torch.Generator().manual_seed(index)  # the same batch on every rank
            x, y = torch.randn(8, 13, generator=generator).to(device), torch.randn(8, 3, generator=generator).to(device)
            optimizer.zero_grad(set_to_none=index % 2 == 0)
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        trained.append((model, optimizer))
    (ours, ours_optimizer), (reference, reference_optimizer) = trained
    assert_runs_on(ours_optimizer, backend)
    assert_close_sharded(ours, reference)
    for p, q in zip(ours.parameters(), reference.parameters()):
        for key, expected in reference_optimizer.state[q].items():
            actual = ours_optimizer.state[p][key]
            assert type(actual) is type(expected), (key, type(actual))
            if key != "step":
                assert actual.placements == expected.placements, key
                torch.testing.assert_close(actual.to_local(), expected.to_local(), rtol=RTOL, atol=ATOL)


# -- FSDP1 (FullyShardedDataParallel) -----------------------------------------------------------
def _fsdp1_net(device, use_orig_params):
    """ShardedNet under FSDP1, computing in bfloat16 from float32 shards (``MixedPrecision``),
    after one forward pass: FSDP1 initialises lazily, and from then on it keeps each flat
    parameter's shard in its own storage and points ``.data`` back at it after every
    forward and backward, wherever an optimizer built later put the parameter."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

    torch.manual_seed(0)
    model = FullyShardedDataParallel(
        ShardedNet().to(device),
        use_orig_params=use_orig_params,
        device_id=device,
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    )
    with torch.no_grad():
        model(torch.zeros(1, 13, device=device))
    return model


def _fsdp1_outputs(model, device):
    """What the wrapped model computes now: FSDP1 gathers it from the shards it keeps."""
    with torch.no_grad():
        return model(torch.randn(8, 13, generator=torch.Generator().manual_seed(4242)).to(device)).float()


def fsdp1_trains_and_resumes_like_torch(rank, world_size, device, backend, use_orig_params):
    """FSDP1 with flat parameters (``use_orig_params=False``: the optimizer steps FSDP1's
    FlatParameter shards) or with the original ones (views of them): training, then a save
    and load through FSDP1's own optimizer-state API (``FSDP.optim_state_dict`` /
    ``optim_state_dict_to_load``), against torch's optimizer under the same wrapper."""
    import copy

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    def train_steps(model, optimizer, start, steps):
        for index in range(start, start + steps):
            generator = rank_generator(rank, index)
            x, y = torch.randn(8, 13, generator=generator).to(device), torch.randn(8, 3, generator=generator).to(device)
            optimizer.zero_grad(set_to_none=index % 2 == 0)
            torch.nn.functional.mse_loss(model(x).float(), y).backward()
            optimizer.step()

    def assert_same_training(ours, reference, rtol=RTOL, atol=ATOL):
        for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        # Computed in bfloat16: parameters a rounding apart may round to neighbouring values.
        exact = rtol == 0 and atol == 0
        outputs = dict(rtol=0, atol=0) if exact else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(_fsdp1_outputs(ours, device), _fsdp1_outputs(reference, device), **outputs)

    first, second = 3, 2
    make_ours, make_reference = optimizer_pair("AdamW", backend)
    trained = []
    for make_optimizer in (make_ours, make_reference):
        model = _fsdp1_net(device, use_orig_params)
        optimizer = make_optimizer(model.parameters(), **CONFIGS["AdamW"])
        train_steps(model, optimizer, 0, first)
        trained.append((model, optimizer))
    (ours, ours_optimizer), (reference, reference_optimizer) = trained
    assert_runs_on(ours_optimizer, backend)
    assert_same_training(ours, reference)

    # FSDP1 gathers each optimizer's state into whole tensors, keyed by parameter name.
    saved_optimizer = copy.deepcopy(FSDP.optim_state_dict(ours, ours_optimizer))
    expected = FSDP.optim_state_dict(reference, reference_optimizer)
    assert saved_optimizer["state"].keys() == expected["state"].keys()
    for key, state in expected["state"].items():
        assert saved_optimizer["state"][key].keys() == state.keys(), key
        for field, value in state.items():
            torch.testing.assert_close(saved_optimizer["state"][key][field], value, rtol=RTOL, atol=ATOL)
    with FSDP.state_dict_type(ours, StateDictType.FULL_STATE_DICT):
        saved_model = copy.deepcopy(ours.state_dict())
    train_steps(ours, ours_optimizer, first, second)
    uninterrupted = ours

    resumed = []
    for make_optimizer in (make_ours, make_reference):
        model = _fsdp1_net(device, use_orig_params)
        optimizer = make_optimizer(model.parameters(), **CONFIGS["AdamW"])
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT):
            model.load_state_dict(saved_model)
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, copy.deepcopy(saved_optimizer)))
        train_steps(model, optimizer, first, second)
        resumed.append(model)
    ours_resumed, reference_resumed = resumed
    # torch's optimizer resumes from adam-triton's checkpoint as adam-triton does.
    assert_same_training(ours_resumed, reference_resumed)
    if not use_orig_params:
        # And exactly where the uninterrupted run went. (With use_orig_params=True, torch
        # 2.13's FSDP1 does not resume torch's own optimizer onto its uninterrupted run
        # either: seen with torch.optim.AdamW, so that comparison is left out.)
        assert_same_training(ours_resumed, uninterrupted, rtol=0, atol=0)


def fsdp1_sharded_grad_scaler_skips_on_every_rank(rank, world_size, device, backend):
    """FSDP1's ShardedGradScaler agrees across ranks on whether a step saw an inf, inside
    ``unscale_``: an inf in rank 0's gradient shard alone must skip the step on every rank,
    as with torch's optimizer. (With ``fused=True``, as with torch's fused Adam, GradScaler
    hands the step the local check instead; then ranks may disagree, under torch too.)"""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    make_ours, make_reference = optimizer_pair("AdamW", backend)
    trained = []
    for make_optimizer in (make_ours, make_reference):
        model = _fsdp1_net(device, use_orig_params=False)
        optimizer = make_optimizer(model.parameters(), **CONFIGS["AdamW"])
        scaler = ShardedGradScaler(device=device.type, init_scale=2.0**10, growth_interval=2)
        for index in range(4):
            generator = rank_generator(rank, index)
            x, y = torch.randn(8, 13, generator=generator).to(device), torch.randn(8, 3, generator=generator).to(device)
            optimizer.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x).float(), y)).backward()
            if index == 1 and rank == 0:
                next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
        trained.append((model, optimizer, scaler))
    (ours, ours_optimizer, ours_scaler), (reference, reference_optimizer, reference_scaler) = trained
    assert_runs_on(ours_optimizer, backend)
    assert ours_scaler.get_scale() == reference_scaler.get_scale()
    scales = [None] * world_size
    dist.all_gather_object(scales, ours_scaler.get_scale())
    assert len(set(scales)) == 1, scales
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert float(ours_optimizer.state[a]["step"]) == float(reference_optimizer.state[b]["step"]) == 3
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# -- mixed precision under each engine ---------------------------------------------------------
def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def mixed_precision_under_each_engine(rank, world_size, device, backend, engine):
    """A bfloat16 model with float32 master weights under DDP, ZeRO or FSDP2: on every rank,
    for the parameters it steps, the masters follow torch's float32 AdamW fed with the very
    (reduced) gradients the rank saw, the model's parameters are the masters rounded, and
    replicated parameters agree across ranks. Then the 20-byte configuration (bfloat16
    states) keeps those invariants too."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    for state_dtype in (None, torch.bfloat16):
        options = dict(lr=2e-2, weight_decay=0.1, backend=backend, master_weights=True, state_dtype=state_dtype)
        torch.manual_seed(0)
        if engine == "fsdp2":
            model = ShardedNet().to(device, torch.bfloat16)
            fully_shard(model.inp)
            fully_shard(model)
            optimizer = adam_triton.AdamW(model.parameters(), **options)
            stepped = list(model.parameters())
        else:
            model = DistributedDataParallel(
                ShardedNet().to(device, torch.bfloat16), device_ids=[device.index] if device.type == "cuda" else None
            )
            if engine == "zero":
                optimizer = ZeroRedundancyOptimizer(
                    model.parameters(), optimizer_class=adam_triton.AdamW, parameters_as_bucket_view=True, **options
                )
                ours = optimizer.optim
                stepped = [p for group in ours.param_groups for p in group["params"]]
            else:
                optimizer = adam_triton.AdamW(model.parameters(), **options)
                stepped = list(model.parameters())
        ours = getattr(optimizer, "optim", optimizer)
        masters = [torch.nn.Parameter(_local(p).detach().float().clone()) for p in stepped]
        reference = torch.optim.AdamW(masters, lr=2e-2, weight_decay=0.1)
        for index in range(STEPS):
            generator = rank_generator(rank, 50 + index)
            x = torch.randn(8, 13, generator=generator).to(device, torch.bfloat16)
            y = torch.randn(8, 3, generator=generator).to(device, torch.bfloat16)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            for p, master in zip(stepped, masters):
                master.grad = _local(p.grad).detach().float().clone()
            optimizer.step()
            reference.step()
        assert_runs_on(ours, backend)
        for p, master in zip(stepped, masters):
            state = ours.state[p]
            assert _local(state["exp_avg"]).dtype == (state_dtype or torch.float32)
            ours_master = _local(state["master_param"])
            assert torch.equal(_local(p).detach(), ours_master.to(torch.bfloat16)), "parameter != master rounded"
            tolerance = dict(rtol=RTOL, atol=ATOL) if state_dtype is None else dict(rtol=2e-2, atol=2e-3)
            torch.testing.assert_close(ours_master, master.detach(), **tolerance)
        if engine != "fsdp2":
            assert_replicas_agree(model.module)
        # Weights edited outside the optimizer (through a DTensor, which counts in its own
        # version, or through its local shard) are the truth at the next step: the masters
        # take them, instead of writing the old values back over them.
        with torch.no_grad():
            for index, p in enumerate(model.parameters()):
                if index % 2:
                    _local(p).add_(0.25)
                else:
                    p.mul_(0.5)
        edited = [_local(p).detach().clone() for p in stepped]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
        for p, values in zip(stepped, edited):
            assert torch.equal(_local(p).detach(), values), "an edit of the weights was undone by the masters"


# -- Hogwild: a model in shared memory, trained by another process ------------------------------
def train_shared_model(rank, world_size, device, model, name, backend, steps, seed):
    """PyTorch's multiprocessing (Hogwild) pattern: the worker receives the model in shared
    memory, builds its own optimizer over it and trains; the caller reads the result."""
    assert all(p.is_shared() for p in model.parameters())
    optimizer = getattr(adam_triton, name)(model.parameters(), lr=1e-2, backend=backend)
    train(model, optimizer, steps=steps, seed=seed)
    assert all(p.is_shared() for p in model.parameters())


# -- the harness itself ---------------------------------------------------------------------------
def rank_one_never_arrives(rank, world_size, device):
    """Rank 0 waits in a collective for a rank that never comes."""
    import time

    if rank == 0:
        dist.barrier()
    else:
        time.sleep(3600)


def every_rank_hangs(rank, world_size, device):
    import time

    time.sleep(3600)
