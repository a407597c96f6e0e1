"""Running one test body on several processes that form a ``torch.distributed`` process group.

``run_on_ranks(body, ...)`` starts ``world_size`` fresh processes (ranks) that join one
process group over loopback and each call ``body(rank, world_size, device, *args)``. An
exception on any rank fails the calling test with that rank's traceback.

Nothing can hang a test run:

* every collective times out after ``collective_timeout_s`` (the process group's timeout),
  so a rank waiting for a rank that died raises instead of waiting for ever;
* the whole run has a deadline (``deadline_s``); past it the ranks are killed and the test
  fails with ``TimeoutError``;
* whatever happens, every process is killed if still alive and reaped before the call returns.

The rendezvous is a ``TCPStore`` served by the calling (test) process on a port the OS
picks, so no port is guessed and two runs can never collide. Ranks come from a forkserver
that imports torch, triton and torch.distributed's engines once for the whole test session:
a spawned process would spend several seconds per run on those imports, and a plain fork
of the test process could inherit its OpenMP thread pool and deadlock.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

LOOPBACK = "127.0.0.1"

# Imported once by the forkserver; the ranks it forks start with them loaded.
_PRELOAD = [
    "torch",
    "torch._dynamo",  # adam_triton's optimizer imports it (torch.compiler.disable): ~3 s
    "triton",
    "torch.nn.parallel",
    "torch.distributed.optim",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "torch.distributed.tensor",
]


@dataclass(frozen=True)
class Transport:
    """A process-group backend and the device each rank computes on."""

    backend: str  # "gloo" or "nccl"
    device_type: str  # "cpu" or "cuda"

    def device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.device_type == "cuda" else torch.device("cpu")

    def __str__(self) -> str:
        return f"{self.backend}-{self.device_type}"


GLOO_CPU = Transport("gloo", "cpu")
NCCL_CUDA = Transport("nccl", "cuda")


def transports(world_size: int = 2) -> list:
    """gloo on CPU everywhere; NCCL on GPUs where there is one GPU per rank."""
    enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    nccl = dist.is_available() and dist.is_nccl_available() and enough_gpus
    return [
        pytest.param(GLOO_CPU, id=str(GLOO_CPU)),
        pytest.param(
            NCCL_CUDA,
            id=str(NCCL_CUDA),
            marks=pytest.mark.skipif(not nccl, reason=f"NCCL needs {world_size} GPUs (one per rank)"),
        ),
    ]


_preload_requested = False


def _start_method() -> str:
    global _preload_requested
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    if not _preload_requested:
        # Takes effect when the forkserver starts, i.e. on the first run of the session.
        multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
        _preload_requested = True
    return "forkserver"


def run_on_ranks(
    body,
    *args,
    transport: Transport = GLOO_CPU,
    world_size: int = 2,
    deadline_s: float = 120.0,
    collective_timeout_s: float = 60.0,
) -> None:
    """Run ``body(rank, world_size, device, *args)`` on ``world_size`` ranks; raise if any fails.

    ``body`` and ``args`` must be picklable: define ``body`` at the top level of a module
    the ranks can import.
    """
    store = dist.TCPStore(
        LOOPBACK,
        0,  # the OS picks a free port: no guessing, no collisions
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    context = torch.multiprocessing.start_processes(
        _rank_main,
        args=(body, args, store.port, world_size, transport, collective_timeout_s),
        nprocs=world_size,
        join=False,
        daemon=True,  # never outlive the test process
        start_method=_start_method(),
    )
    failure = None
    try:
        deadline = time.monotonic() + deadline_s
        # join() raises as soon as one rank fails (and stops the others).
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{body.__name__} did not finish on {world_size} ranks within {deadline_s} s")
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException) as error:
        failure = str(error)  # holds the failed rank's own traceback; the launcher's is noise
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
        del store
    if failure is not None:
        pytest.fail(f"{body.__name__} failed on {world_size} ranks:{failure}", pytrace=False)


def _rank_main(rank, body, args, port, world_size, transport, collective_timeout_s):
    if sys.platform.startswith("linux"):
        # gloo connects the ranks over the interface its host name resolves to; a CI
        # container's host name may resolve to nothing usable. Loopback always works here.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # One intra-op thread per rank: ranks share the machine's cores, and OpenMP threads
    # spinning in every rank at once make each small op take milliseconds.
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    device = transport.device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timeout)
    dist.init_process_group(transport.backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        body(rank, world_size, device, *args)
    finally:
        dist.destroy_process_group()
