"""On a machine with a GPU the suite runs the compiled kernels; this runs the interpreter
tests too, in a process where triton is imported with TRITON_INTERPRET=1 and no GPU is
visible (the choice is made once per process, when triton is imported)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import INTERPRETER

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(INTERPRETER or not torch.cuda.is_available(), reason="this process already runs the interpreter tests")
def test_interpreter_suite_in_a_process_of_its_own():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests"), "-q", "-k", "cpu-triton", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
