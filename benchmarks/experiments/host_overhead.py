"""What one adam_triton step costs the host, apart from the update itself.

On a GPU the update of a small or medium model takes well under a millisecond, so the
Python work of ``step()`` (finding the gradients, checking that nobody moved a parameter or
reset its state, counting steps) can decide the step time. This measures that work on the
CPU: the update is replaced by a no-op (torch's fused kernel for ``backend="torch"``, the
Triton launcher for ``backend="triton"``, which runs here through the interpreter), the
tensors are tiny, and the median of many steps is printed per parameter count:

* kept: ``zero_grad(set_to_none=False)`` gradients, the same tensors every step;
* fresh (Triton only): a new gradient tensor per parameter every step, as after the default
  ``zero_grad()``; the CPU fallback would copy these into its flat buffer, real work that is
  not host overhead, so it is left out.

    TRITON_INTERPRET=1 python -m benchmarks.experiments.host_overhead [ROUNDS]
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

import adam_triton
from adam_triton import _backends
from benchmarks.timing import median_seconds

_CPU = torch.device("cpu")
COUNTS = (148, 500, 2000)
ELEMENTS = 64


def _no_op(*args, **kwargs):
    return None


def median_us(step, rounds):
    return median_seconds(step, _CPU, rounds) * 1e6


def host_us(backend: str, count: int, gradients: str, rounds: int) -> float:
    params = [torch.nn.Parameter(torch.randn(ELEMENTS)) for _ in range(count)]
    optimizer = adam_triton.AdamW(params, lr=1e-3, weight_decay=0.01, backend=backend)
    for p in params:
        p.grad = torch.randn(ELEMENTS)
    optimizer.step()
    if gradients == "kept":
        optimizer.zero_grad(set_to_none=False)
        for p in params:
            p.grad.normal_()
        return median_us(optimizer.step, rounds)
    grads = [[torch.randn(ELEMENTS) for _ in params] for _ in range(2)]
    turn = [0]

    def fresh_step():
        # Two sets of gradient tensors in turn: every step sees new tensors at new places.
        turn[0] ^= 1
        for p, g in zip(params, grads[turn[0]]):
            p.grad = g
        optimizer.step()

    # The gradient assignment is timed too; measured alone it is subtracted.
    def assign_only():
        turn[0] ^= 1
        for p, g in zip(params, grads[turn[0]]):
            p.grad = g

    return median_us(fresh_step, rounds) - median_us(assign_only, rounds)


def main(rounds: int) -> None:
    kernels = _backends.kernels()
    torch._fused_adamw_ = _no_op
    kernels.adam_chunked_update = _no_op
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; host time per step, update replaced by a no-op")
    for count in COUNTS:
        torch_kept = host_us("torch", count, "kept", rounds)
        triton_kept = host_us("triton", count, "kept", rounds)
        triton_fresh = host_us("triton", count, "fresh", rounds)
        print(
            f"{count:5} tensors: torch backend kept {torch_kept:7.1f} us | "
            f"triton backend kept {triton_kept:7.1f} us, fresh {triton_fresh:7.1f} us"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
