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
    pytest.importorskip("triton")
    script = (
        "import pathlib, adam_triton, adam_triton.kernels as k\n"
        "a = pathlib.Path(adam_triton.__file__).resolve().parent\n"
        "b = pathlib.Path(k.__file__).resolve().parent\n"
        "print(b == a / 'kernels' or b == a.parent / 'kernels')\n"
    )
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.stdout.split() == ["True"], result.stdout + result.stderr


def test_the_checkouts_kernels_folder_is_inert_under_the_top_level_name():
    """From a checkout's root, ``import kernels`` finds our folder, not PyPI's ``kernels``
    (transformers imports that name to read its version). There it must define and import
    nothing: no triton, no second copy of the kernel."""
    script = "import sys, kernels\nprint(kernels.__all__, 'triton' in sys.modules, 'kernels.adam' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["[]", "False", "False"], result.stdout + result.stderr


def test_the_sdist_carries_what_its_tests_need(tmp_path):
    """Packagers test from the sdist: the tests' helpers, the benchmarks' tooling they import,
    the README and CI script they check, and the license text must all be in it."""
    import shutil
    import tarfile

    # A copy of what git tracks, with bytecode beside it as any used tree has: setuptools
    # adds whatever an old egg-info's SOURCES.txt lists, so the checkout itself won't do.
    source = tmp_path / "source"
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    tracked = listed.stdout.split()
    if listed.returncode != 0 or not tracked:  # a copy of the tree without .git (the GPU machine's)
        pytest.skip("not a git checkout")
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    (source / "tests" / "__pycache__").mkdir()
    (source / "tests" / "__pycache__" / "helpers.cpython-311.pyc").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=source, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sdist,) = tmp_path.glob("adam_triton-*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    needed = {"LICENSE", "README.md", ".ci/run", "tests/conftest.py", "tests/helpers.py", "benchmarks/__init__.py",
              "kernels/_adam_kernel.py", "setup.py"}
    assert needed <= names, needed - names
    assert not any("__pycache__" in name for name in names)
