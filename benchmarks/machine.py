"""What machine, software and code a result was measured on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device_type: str) -> str:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_model()


def last_level_cache_bytes(device_type: str) -> int | None:
    """L2 of the GPU, or the largest cache level of CPU 0 (per /sys), in bytes."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return None
        return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", None)
    best_level, best_size = -1, None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match and level > best_level:
            best_level = level
            best_size = int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]
    return best_size


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def git_commit() -> dict:
    """HEAD of the measured checkout, and whether tracked files differ from it."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"id": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        # A copy of the tree without git's metadata (what a lent GPU machine receives): the
        # sender names the commit in ADAM_TRITON_COMMIT (benchmarks/gpu_session.sh).
        return {"id": os.environ.get("ADAM_TRITON_COMMIT"), "dirty": None}


def describe(devices: list[str]) -> dict:
    """Everything a result needs to say where it comes from (goes into machine_info)."""
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "cuda_version": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "devices": devices,
        "device_names": {d: device_name(d) for d in devices},
        "last_level_cache_bytes": {d: last_level_cache_bytes(d) for d in devices},
        "measured_commit": git_commit(),
    }
    return info


def machine_slug(device_type: str, name: str) -> str:
    """A short file-name stem for a machine: ``cpu-amd-epyc``, ``cuda-h200``."""
    text = re.sub(r"\(r\)|\(tm\)|@.*$|\d+-core|\bcpu\b|\bprocessor\b|\bnvidia\b|\bgeforce\b", " ", name.lower())
    words = re.findall(r"[a-z0-9]+", text)
    return "-".join([device_type, *words[:4]])
