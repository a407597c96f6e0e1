"""Memory held between steps by a model whose one small gradient has other strides than
its parameter on a dimension of size 1 (NOTES idea 34).

A ``(1, D)`` query used through ``einsum`` gets a gradient with strides ``(1, 1)``; the
parameter has ``(D, 1)``. Both put the elements in the same order. Until c88a6a5 such a
gradient was copied into place, into a gradient buffer as large as every parameter of its
buffer, which the optimizer kept while such gradients kept coming. This trains a 4-layer
MLP with such a query for a few steps under torch's fused AdamW, its for-loop AdamW and
adam_triton's, calls ``zero_grad()`` and reports the bytes malloc holds (glibc's
``mallinfo2``, after ``gc.collect()``) against the parameters' bytes. Self-contained, so that
it can measure another tree's code too:

    python -m benchmarks.experiments.size_one_stride_memory
    PYTHONPATH=/path/to/other/tree python benchmarks/experiments/size_one_stride_memory.py
"""

import ctypes
import gc

import torch

import adam_triton


class _MallocInfo(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallocInfo


def _heap_bytes() -> int:
    gc.collect()
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _GatedMLP(torch.nn.Module):
    def __init__(self, width: int = 1024, layers: int = 4):
        super().__init__()
        self.body = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        self.query = torch.nn.Parameter(torch.randn(1, width) * 0.01)

    def forward(self, x):
        h = self.body(x)
        return h + torch.einsum("bd,qd->bq", h, self.query)


OPTIMIZERS = {
    "torch fused AdamW": lambda params: torch.optim.AdamW(params, fused=True),
    "torch for-loop AdamW": lambda params: torch.optim.AdamW(params, foreach=False),
    "adam_triton AdamW": lambda params: adam_triton.AdamW(params),
}


def main() -> None:
    print(f"adam_triton from {adam_triton.__file__}; torch {torch.__version__}")
    x = torch.randn(8, 1024)
    for name, make in OPTIMIZERS.items():
        start = _heap_bytes()
        torch.manual_seed(0)
        model = _GatedMLP()
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        optimizer = make(model.parameters())
        for _ in range(5):
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
        strides = (tuple(model.query.stride()), tuple(model.query.grad.stride()))
        optimizer.zero_grad()
        held = _heap_bytes() - start
        print(
            f"{name:22s} query strides {strides[0]}, its gradient's {strides[1]}; held after zero_grad(): "
            f"{held / 2**20:6.2f} MB = {held / parameter_bytes:4.2f} x the parameters"
        )
        del optimizer, model


if __name__ == "__main__":
    main()
