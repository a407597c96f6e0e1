"""Installation layout: the Triton code installs as adam_triton.kernels, never as kernels."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_kernels_inside_the_package(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    # Without build isolation the environment's own build tools build the wheel; a setuptools
    # older than 70.1 without the wheel package cannot (a fresh venv's bundled one).
    if result.returncode != 0 and ("No module named" in result.stderr or "invalid command 'bdist_wheel'" in result.stderr):
        pytest.skip(f"this environment's build tools cannot build a wheel: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("adam_triton-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if not n.startswith("adam_triton-")]
    assert "adam_triton/kernels/_adam_kernel.py" in code
    assert "adam_triton/kernels/__init__.py" in code
    assert all(n.startswith("adam_triton/") for n in code), code


def test_kernels_resolve_beside_the_package_from_a_source_checkout():
    """Run from the repository root: adam_triton.kernels is the kernels/ directory of the
    same tree as the adam_triton that was imported (installed or not)."""
    script = (
        "import pathlib, adam_triton, adam_triton.kernels as k\n"
        "a = pathlib.Path(adam_triton.__file__).resolve().parent\n"
        "b = pathlib.Path(k.__file__).resolve().parent\n"
        "print(b == a / 'kernels' or b == a.parent / 'kernels')\n"
        "import importlib.util; print(importlib.util.find_spec('kernels') is None or 'site-packages' not in str(importlib.util.find_spec('kernels').origin) or 'adam' in str(importlib.util.find_spec('kernels').origin))\n"
    )
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.stdout.split() == ["True", "True"], result.stdout + result.stderr
