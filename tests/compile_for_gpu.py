"""Compile the Adam kernel for an NVIDIA target without a GPU and report what it became.

Run as a script (the tests start it in a process without TRITON_INTERPRET): prints one JSON
object per variant with the global load/store instructions of the generated PTX.
"""

import collections
import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adam_triton.kernels import _adam_kernel
from adam_triton.kernels.adam import ENABLE_FP_FUSION, NUM_WARPS, tile_constants

TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def compile_variant(dtype, amsgrad, maximize, decoupled, arch, master=False, stochastic_rounding=False, grad_scale=False):
    """``dtype`` is the parameters' (and gradients') dtype; with ``master`` the update runs on
    a float32 master and writes the rounded copy into the parameters."""
    import torch

    model_dtype = getattr(torch, TORCH_NAMES[dtype])
    updated = "fp32" if master else dtype
    compute = tl.float64 if dtype == "fp64" else tl.float32
    signature = {
        "param_ptr": f"*{updated}", "param_copy_ptr": f"*{dtype}", "grad_base_ptr": f"*{dtype}",
        "exp_avg_ptr": f"*{updated}", "exp_avg_sq_ptr": f"*{updated}", "max_exp_avg_sq_ptr": f"*{updated}",
        "grad_shift_ptr": "*i64", "param_shift_ptr": "*i64", "chunk_ptr": "*i64", "step_ptr": "*fp32", "hyper_ptr": "*fp64",
        "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "random_seed": "i64",
        "BLOCK": "constexpr", "VEC": "constexpr", "AMSGRAD": "constexpr", "MAXIMIZE": "constexpr",
        "DECOUPLED_WEIGHT_DECAY": "constexpr", "BUMP_STEPS": "constexpr", "COMPUTE_DTYPE": "constexpr",
        "HAS_GRAD_SCALE": "constexpr", "HAS_FOUND_INF": "constexpr", "WRITE_PARAM_COPY": "constexpr",
        "STOCHASTIC_ROUNDING": "constexpr",
    }
    constants = {
        # The launcher's own tile, so that what is checked is what it launches.
        **tile_constants(model_dtype), "AMSGRAD": amsgrad,
        "MAXIMIZE": maximize, "DECOUPLED_WEIGHT_DECAY": decoupled, "BUMP_STEPS": True, "COMPUTE_DTYPE": compute,
        "HAS_GRAD_SCALE": grad_scale, "HAS_FOUND_INF": grad_scale, "WRITE_PARAM_COPY": master,
        "STOCHASTIC_ROUNDING": stochastic_rounding,
    }
    # As the JIT does for 16-byte aligned pointers.
    attrs = {(index,): [["tt.divisibility", 16]] for index in range(13)}
    source = ASTSource(fn=_adam_kernel._adam_chunk_kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS, "enable_fp_fusion": ENABLE_FP_FUSION})
    ptx = compiled.asm["ptx"]
    memory = collections.Counter(re.findall(r"((?:ld|st)\.global[\.\w]*)", ptx))
    return {
        "dtype": dtype, "amsgrad": amsgrad, "maximize": maximize, "decoupled": decoupled, "master": master,
        "stochastic_rounding": stochastic_rounding, "grad_scale": grad_scale,
        "memory": dict(memory),
        "elements_per_thread": constants["BLOCK"] // (NUM_WARPS * 32),
        # Modifiers may stand between the rounding mode and the type (``sqrt.approx.ftz.f32``).
        "approximate_division": bool(re.search(r"\bdiv\.(?:approx|full)(?:\.\w+)*\.f32\b", ptx)),
        "approximate_sqrt": bool(re.search(r"\br?sqrt\.approx(?:\.\w+)*\.f32\b", ptx)),
        "barriers": len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)),
    }


if __name__ == "__main__":
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    variants = [
        dict(dtype="fp32", amsgrad=False, maximize=False, decoupled=True),
        dict(dtype="fp32", amsgrad=True, maximize=True, decoupled=False, grad_scale=True),
        dict(dtype="bf16", amsgrad=False, maximize=False, decoupled=True),
        dict(dtype="fp64", amsgrad=True, maximize=False, decoupled=False),
        dict(dtype="bf16", amsgrad=False, maximize=False, decoupled=True, master=True),
        dict(dtype="bf16", amsgrad=False, maximize=False, decoupled=True, stochastic_rounding=True),
    ]
    for variant in variants:
        print(json.dumps(compile_variant(arch=arch, **variant)), flush=True)
