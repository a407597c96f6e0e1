"""The kernel compiles for a real GPU (sm_90, the H200) with the triton installed here.

The interpreter accepts code the compiler rejects (a masked load's ``other`` without a
mask, for one), and it cannot show whether accesses are vectorised. Triton ships ptxas,
so the kernel can be compiled to PTX without a GPU; this test does that in a process
without TRITON_INTERPRET and checks what came out.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled_variants():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("compile_for_gpu.py")), "90"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if result.returncode != 0 and ("ptxas" in result.stderr and "not found" in result.stderr.lower()):
        pytest.skip("this triton has no ptxas to compile for NVIDIA targets")
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_variant_compiles_for_sm90(compiled_variants):
    assert len(compiled_variants) == 6


_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
_VECTOR_OPS = ("v4.b32", "v2.b64")  # the 16-byte accesses (v2.b32 is 8 bytes)


def test_whole_tiles_use_16_byte_accesses(compiled_variants):
    """Every array of a whole tile moves in 16-byte vectors only: each thread's elements of
    an array take ``elements * itemsize / 16`` vector instructions, and the kernel must have
    at least that many for every array together (a masked tail may add scalar ones). One
    array read element by element (its offsets not known to be aligned) falls short."""
    for variant in compiled_variants:
        memory = variant["memory"]
        vector_loads = sum(n for op, n in memory.items() if op.startswith("ld.global.") and op.endswith(_VECTOR_OPS))
        vector_stores = sum(n for op, n in memory.items() if op.startswith("st.global.") and op.endswith(_VECTOR_OPS))
        model = _ITEMSIZE[variant["dtype"]]
        updated = 4 if variant["master"] else model  # the parameter (or its float32 master) and moments
        moments = 2 + variant["amsgrad"]
        read = [updated, model] + [updated] * moments
        # The gradient is written back only when unscaled in place; the model's own copy only
        # under master weights.
        written = [updated] * (1 + moments) + [model] * (variant["grad_scale"] + variant["master"])
        per_thread = variant["elements_per_thread"]
        assert vector_loads >= sum(per_thread * size // 16 for size in read), variant
        assert vector_stores >= sum(per_thread * size // 16 for size in written), variant


def test_float32_math_is_correctly_rounded(compiled_variants):
    for variant in compiled_variants:
        assert not variant["approximate_division"], variant
        assert not variant["approximate_sqrt"], variant


def test_the_step_counter_is_advanced_only_after_every_warp_has_read_it(compiled_variants):
    """Each chunk's warps read its step count at the start and one thread stores the next
    count at the end; nothing else synchronises the warps, so without a barrier a warp
    that starts late could compute its bias corrections from the advanced count."""
    for variant in compiled_variants:
        assert variant["barriers"] >= 1, variant
