"""What bounds adam_triton against torch's fused AdamW on 2,000 tensors of 8,000 elements, CPU.

Prints, as medians of 30 steps in one process: torch's fused kernel on one 16M tensor and on
the list of 2,000 (the floor a flat update cannot beat, and what torch's kernel pays for the
list), torch.optim.AdamW(fused=True).step() and adam_triton's step with kept gradients, then
an A/B of adam_triton's step with fresh gradients with the list updated on one thread and
on all (ideas 30 and 2 in benchmarks/NOTES.md; the gather of idea 3 is gone since).

    python -m benchmarks.experiments.many_small_floor_cpu [ROUNDS]
"""

import sys
import time

import torch

import adam_triton
from adam_triton import _backends

TENSORS, SIZE = 2000, 8000
ARGS = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)


def median_ms(step, rounds=30):
    step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[rounds // 2] * 1e3


def fresh_median_ms(params, optimizer, grads, rounds=25):
    def one():
        optimizer.zero_grad()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        start = time.perf_counter()
        optimizer.step()
        return time.perf_counter() - start

    one()
    return sorted(one() for _ in range(rounds))[rounds // 2] * 1e3


def kept_optimizer(cls, **kwargs):
    params = [torch.nn.Parameter(torch.randn(SIZE)) for _ in range(TENSORS)]
    optimizer = cls(params, lr=1e-3, **kwargs)
    for p in params:
        p.grad = torch.randn(SIZE)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    for p in params:
        p.grad.normal_()
    return optimizer


def main(rounds: int) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {TENSORS} x {SIZE} fp32 AdamW")
    flat = [torch.randn(TENSORS * SIZE) for _ in range(4)]
    listed = [[torch.randn(SIZE) for _ in range(TENSORS)] for _ in range(4)]
    flat_steps, list_steps = [torch.tensor(1.0)], [torch.tensor(1.0) for _ in range(TENSORS)]
    ours, theirs = kept_optimizer(adam_triton.AdamW), kept_optimizer(torch.optim.AdamW, fused=True)
    for _ in range(rounds):
        one = median_ms(lambda: torch._fused_adamw_(*[[t] for t in flat], [], flat_steps, **ARGS))
        many = median_ms(lambda: torch._fused_adamw_(*listed, [], list_steps, **ARGS))
        a, b = median_ms(ours.step), median_ms(theirs.step)
        print(f"kernel alone: one tensor {one:.2f} ms, list {many:.2f} ms | steps, kept gradients: "
              f"adam_triton {a:.2f} ms, torch fused {b:.2f} ms, ratio {a / b:.2f}")
    params = [torch.nn.Parameter(torch.randn(SIZE)) for _ in range(TENSORS)]
    reference = [torch.nn.Parameter(torch.randn(SIZE)) for _ in range(TENSORS)]
    grads = [torch.randn(SIZE) for _ in range(TENSORS)]
    ours, theirs = adam_triton.AdamW(params, lr=1e-3), torch.optim.AdamW(reference, lr=1e-3, fused=True)
    minimum = _backends.ONE_THREAD_MIN_TENSORS
    try:
        for _ in range(rounds):
            for label, value in (("one thread", minimum), ("all threads", 10**9)):
                _backends.ONE_THREAD_MIN_TENSORS = value
                a, b = fresh_median_ms(params, ours, grads), fresh_median_ms(reference, theirs, grads)
                print(f"fresh gradients, list on {label:11}: adam_triton {a:.2f} ms, torch fused {b:.2f} ms, ratio {a / b:.2f}")
    finally:
        _backends.ONE_THREAD_MIN_TENSORS = minimum


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
