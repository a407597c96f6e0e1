"""Test targets: every (device, backend) this machine can run.

Triton chooses between compiled and interpreted kernels when it is first imported, and
torch imports it early (a torch optimizer step does), so the choice is made here, before
any test module runs: without a GPU the Triton kernels run through the interpreter.
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import INTERPRETER, TRITON, Target  # noqa: E402


def _targets():
    targets = [pytest.param(Target("cpu", "torch"), id="cpu-torch")]
    if INTERPRETER:
        targets.append(pytest.param(Target("cpu", "triton"), id="cpu-triton"))
    if CUDA and TRITON:
        targets.append(pytest.param(Target("cuda", "triton"), id="cuda-triton"))
    if CUDA:
        targets.append(pytest.param(Target("cuda", "torch"), id="cuda-torch"))
    return targets


def _kernel_targets():
    targets = []
    if INTERPRETER:
        targets.append(pytest.param("cpu", id="cpu-triton"))
    if CUDA and TRITON:
        targets.append(pytest.param("cuda", id="cuda-triton"))
    return targets or [pytest.param(None, marks=pytest.mark.skip(reason="no triton"), id="no-triton")]


@pytest.fixture(params=_targets())
def target(request):
    """A (device, backend) pair: the fallback and the Triton kernel on CPU and CUDA."""
    return request.param


@pytest.fixture(params=_kernel_targets())
def kernel_device(request):
    """A device the Triton kernel runs on here: the interpreter on CPU, or a real GPU."""
    return request.param


@pytest.fixture
def two_torch_threads():
    """torch on two intra-op threads for the test (the CPU backend's choices between one
    thread and all of them show only with several), and the suite's own count back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
