"""The device the demo runs on, and the versions it reports."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

import adam_triton

from .errors import DemoError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(requested: str) -> torch.device:
    """``"auto"`` (CUDA if present, else CPU) or a device that exists here; else DemoError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise DemoError(f"--device {requested!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in DEVICE_TYPES:
        raise DemoError(f"--device {requested!r}: the demo runs on auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        _check_cuda(requested, device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DemoError(f"--device {requested!r}: MPS is not available on this machine; use --device cpu")
    return device


def _check_cuda(requested: str, device: torch.device) -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        raise DemoError(
            f"--device {requested!r}: this torch ({torch.__version__}) is a CPU-only build, so CUDA is not "
            "available. Use --device cpu, or install a CUDA build of torch (see the README)."
        )
    if not torch.cuda.is_available():
        raise DemoError(
            f"--device {requested!r}: torch {torch.__version__} supports CUDA, but finds no usable GPU "
            "(check the driver and CUDA_VISIBLE_DEVICES), so use --device cpu."
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DemoError(f"--device {requested!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def synchronize(device: torch.device) -> None:
    """Wait for the device to finish queued work (a no-op on the CPU, which runs in order)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        processor = platform.processor() or platform.machine()
        threads = torch.get_num_threads()
        return f"cpu ({processor}, {threads} thread{'' if threads == 1 else 's'} for torch)"
    return str(device)


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        # Read from the package metadata: importing triton here could fix its interpreter
        # mode before the user's environment asked for one.
        "triton": _installed_version("triton"),
        "adam_triton": adam_triton.__version__,
        "python": platform.python_version(),
    }
