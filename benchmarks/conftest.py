"""Options, machine description and shared measurements for the benchmark suite.

    python -m pytest benchmarks --benchmark-json=out.json          # every device here
    python -m pytest benchmarks --bench-device=cuda --full-matrix   # the whole matrix on GPU
"""

from __future__ import annotations

import os

import pytest
import torch

from .cases import select_cases
from .implementations import IMPLEMENTATIONS
from .machine import describe, git_commit
from .timing import reference_bandwidths

_LOAD_AT_START = pytest.StashKey[tuple]()
_COMMIT_AT_START = pytest.StashKey[dict]()
_REFERENCE_BANDWIDTHS = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("adam-triton benchmarks")
    group.addoption(
        "--bench-device",
        choices=("all", "cpu", "cuda"),
        default="all",
        help="time cases on this device only (default: all; CUDA cases skip without a GPU)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch CPU threads for the session (default: torch's, one per core). On a shared "
        "machine 1 avoids waiting at every per-tensor parallel region for a thread that "
        "another process has preempted, which otherwise dominates many-tensor timings",
    )
    group.addoption(
        "--full-matrix",
        action="store_true",
        help="time every dtype x Adam/AdamW x AMSGrad x gradient-mode combination on every "
        "parameter list, instead of varying one factor at a time around fp32 AdamW",
    )


def _devices(config) -> tuple[str, ...]:
    choice = config.getoption("--bench-device")
    return ("cpu", "cuda") if choice == "all" else (choice,)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = select_cases(_devices(metafunc.config), metafunc.config.getoption("--full-matrix"))
        metafunc.parametrize("case", cases, ids=str)
    if "implementation" in metafunc.fixturenames:
        # Parametrized after "case", so it varies fastest: every implementation of one case
        # runs back to back, under the same machine conditions.
        metafunc.parametrize("implementation", list(IMPLEMENTATIONS))


def pytest_configure(config):
    if config.getoption("--bench-threads", None):
        torch.set_num_threads(config.getoption("--bench-threads"))
    config.stash[_REFERENCE_BANDWIDTHS] = {}
    config.stash[_LOAD_AT_START] = os.getloadavg() if hasattr(os, "getloadavg") else ()
    # The code measured is the checkout as the session starts, whatever is committed meanwhile.
    config.stash[_COMMIT_AT_START] = git_commit()


class ReferenceBandwidths:
    """Bandwidth of a large copy and in-place add per device type (``timing.reference_bandwidths``),
    measured once per session, on first use, so every result compares with the same figures."""

    def __init__(self, store: dict):
        self._store = store

    def get(self, device: torch.device) -> dict[str, float]:
        if device.type not in self._store:
            self._store[device.type] = reference_bandwidths(device)
        return self._store[device.type]


@pytest.fixture(scope="session")
def reference_bandwidth(request) -> ReferenceBandwidths:
    return ReferenceBandwidths(request.config.stash[_REFERENCE_BANDWIDTHS])


@pytest.fixture
def cpu_selected(request) -> None:
    """For CPU-only measurements: skip them when --bench-device=cuda."""
    if "cpu" not in _devices(request.config):
        pytest.skip("--bench-device excludes the CPU")


def pytest_benchmark_update_machine_info(config, machine_info):
    measured = [d for d in _devices(config) if d != "cuda" or torch.cuda.is_available()]
    machine_info.update(describe(measured))
    machine_info["measured_commit"] = config.stash[_COMMIT_AT_START]
    machine_info["reference_bandwidth_gb_per_s"] = dict(config.stash[_REFERENCE_BANDWIDTHS])
    machine_info["load_average_at_start"] = list(config.stash[_LOAD_AT_START])
    machine_info["implementations_importable"] = {
        name: impl.skip_reason_everywhere() is None for name, impl in IMPLEMENTATIONS.items()
    }
    machine_info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
