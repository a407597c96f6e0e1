"""Memory an optimizer costs over a frozen pretrained model: what fine-tuning code builds
with ``AdamW(model.parameters())`` (NOTES idea 35).

The model: a frozen 64 MiB lookup table made with ``nn.Embedding.from_pretrained(vectors)``
(which shares ``vectors``, kept by the program as a vocabulary's vectors would be), a frozen
64 MiB linear trunk, and a small trainable head. Each optimizer runs in a process of its own
(so that each peak is its own): the process builds the model, builds the optimizer, trains
three steps, and reports what malloc holds beyond the model (glibc's ``mallinfo2``, after
``gc.collect()``), how far the process's peak resident size rose while the optimizer was
built, and whether the table still shares ``vectors``. Until 5f8fa51 adam_triton copied the
frozen parameters into a buffer of their own at construction. Self-contained, so that it can
measure another tree's code too:

    python -m benchmarks.experiments.frozen_trunk_memory
    PYTHONPATH=/path/to/other/tree python benchmarks/experiments/frozen_trunk_memory.py
"""

import ctypes
import gc
import os
import resource
import subprocess
import sys

OPTIMIZERS = ("torch fused AdamW", "torch for-loop AdamW", "adam_triton AdamW")


class _MallocInfo(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _heap_bytes() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallocInfo
    gc.collect()
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(name: str) -> None:
    import torch

    import adam_triton

    make = {
        "torch fused AdamW": lambda params: torch.optim.AdamW(params, fused=True),
        "torch for-loop AdamW": lambda params: torch.optim.AdamW(params, foreach=False),
        "adam_triton AdamW": lambda params: adam_triton.AdamW(params),
    }[name]
    torch.manual_seed(0)
    vectors = torch.randn(16384, 1024)
    lookup = torch.nn.Embedding.from_pretrained(vectors)
    trunk = torch.nn.Linear(4096, 4096).requires_grad_(False)
    head = torch.nn.Linear(1024, 8)
    model = torch.nn.ModuleDict(dict(lookup=lookup, trunk=trunk, head=head))
    frozen_bytes = sum(p.numel() * p.element_size() for p in (*lookup.parameters(), *trunk.parameters()))
    heap_before, peak_before = _heap_bytes(), _peak_bytes()
    optimizer = make(model.parameters())
    peak_rise = _peak_bytes() - peak_before
    for _ in range(3):
        optimizer.zero_grad()
        head(lookup(torch.randint(0, 16384, (4,)))).sum().backward()
        optimizer.step()
    held = _heap_bytes() - heap_before
    shares = lookup.weight.data_ptr() == vectors.data_ptr()
    print(
        f"{name:22s} frozen {frozen_bytes / 2**20:5.1f} MB; held beyond the model after 3 steps "
        f"{held / 2**20:6.1f} MB; peak rise while building {peak_rise / 2**20:6.1f} MB; "
        f"table still shares the vectors it was made from: {shares}"
    )


def main() -> None:
    import adam_triton
    import torch

    print(f"adam_triton from {adam_triton.__file__}; torch {torch.__version__}")
    # Each process imports the adam_triton this one did.
    tree = os.path.dirname(os.path.dirname(os.path.abspath(adam_triton.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
    for name in OPTIMIZERS:
        result = subprocess.run([sys.executable, os.path.abspath(__file__), name], capture_output=True, text=True, env=env)
        print(result.stdout.strip() or result.stderr.strip()[-2000:], flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _measure(sys.argv[1])
    else:
        main()
