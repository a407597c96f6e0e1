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
from adam_triton.kernels.adam import block_size

TRITON_DTYPES = {"fp32": (tl.float32, 4), "bf16": (tl.float32, 2), "fp16": (tl.float32, 2), "fp64": (tl.float64, 8)}


def compile_variant(dtype, amsgrad, maximize, decoupled, arch):
    import torch

    compute, itemsize = TRITON_DTYPES[dtype]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[dtype]
    pointer = f"*{dtype}"
    signature = {
        "param_ptr": pointer, "grad_base_ptr": pointer, "exp_avg_ptr": pointer, "exp_avg_sq_ptr": pointer,
        "max_exp_avg_sq_ptr": pointer, "grad_shift_ptr": "*i64", "chunk_ptr": "*i64", "step_ptr": "*fp32",
        "hyper_ptr": "*fp64",
        "BLOCK": "constexpr", "VEC": "constexpr", "AMSGRAD": "constexpr", "MAXIMIZE": "constexpr",
        "DECOUPLED_WEIGHT_DECAY": "constexpr", "BUMP_STEPS": "constexpr", "COMPUTE_DTYPE": "constexpr",
    }
    constants = {
        "BLOCK": block_size(torch_dtype), "VEC": 16 // itemsize, "AMSGRAD": amsgrad, "MAXIMIZE": maximize,
        "DECOUPLED_WEIGHT_DECAY": decoupled, "BUMP_STEPS": True, "COMPUTE_DTYPE": compute,
    }
    # As the JIT does for 16-byte aligned pointers.
    attrs = {(index,): [["tt.divisibility", 16]] for index in range(9)}
    source = ASTSource(fn=_adam_kernel._adam_chunk_kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    memory = collections.Counter(re.findall(r"((?:ld|st)\.global[\.\w]*)", ptx))
    return {
        "dtype": dtype, "amsgrad": amsgrad, "maximize": maximize, "decoupled": decoupled,
        "memory": dict(memory),
        "approximate_division": "div.full.f32" in ptx or "div.approx.f32" in ptx,
        "approximate_sqrt": "sqrt.approx.f32" in ptx,
    }


if __name__ == "__main__":
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    variants = [
        ("fp32", False, False, True),
        ("fp32", True, True, False),
        ("bf16", False, False, True),
        ("fp64", True, False, False),
    ]
    for variant in variants:
        print(json.dumps(compile_variant(*variant, arch)), flush=True)
