"""Is torch's fused kernel slower on adam_triton's buffers than on torch's own tensors?

A check behind the flat-16M kept-gradient ratio (benchmarks/NOTES.md, "Interleaved rounds"):
both optimizers are built as the suite builds them (``benchmarks.workload.prepare``), then
``torch._fused_adamw_`` alone is timed, in turns, on four sets of the same sizes:
adam_triton's flat buffers; the same with the gradient buffer replaced by a fresh copy;
torch's own tensors; torch's tensors with adam_triton's gradient buffer. The optimizers'
``step()`` (host work included) are timed in the same turns.

    python -m benchmarks.experiments.kept_buffers_kernel_cpu [ROUNDS]
"""

import sys
import time

import numpy as np
import torch

from benchmarks.cases import Case, Config
from benchmarks.implementations import IMPLEMENTATIONS, OURS
from benchmarks.workload import prepare

ARGS = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=False, maximize=False)


def main(rounds: int) -> None:
    case = Case("cpu", "flat-16M", Config(torch.float32, "AdamW", False, "kept"))
    ours, theirs = prepare(case, IMPLEMENTATIONS[OURS]), prepare(case, IMPLEMENTATIONS["torch-fused"])
    ours.step()  # the flat update needs one step with the gradients in the flat buffer
    (buffer,) = ours.optimizer._engine.buffers
    param = theirs.params[0]
    state = theirs.optimizer.state[param]
    grad_copy = buffer.grad.clone()
    step = torch.tensor(5.0)
    kernel_sets = {
        "kernel on adam_triton's buffers": (buffer.param, buffer.grad, buffer.exp_avg, buffer.exp_avg_sq),
        "kernel on adam_triton's, gradient copied": (buffer.param, grad_copy, buffer.exp_avg, buffer.exp_avg_sq),
        "kernel on torch's tensors": (param.data, param.grad, state["exp_avg"], state["exp_avg_sq"]),
        "kernel on torch's, adam_triton's gradient": (param.data, buffer.grad, state["exp_avg"], state["exp_avg_sq"]),
    }
    calls = {
        name: (lambda tensors=tensors: torch._fused_adamw_(*[[t] for t in tensors], [], [step], **ARGS))
        for name, tensors in kernel_sets.items()
    }
    calls["adam_triton step()"] = ours.step
    calls["torch fused step()"] = theirs.step
    times = {name: [] for name in calls}
    names = list(calls)
    for round_index in range(rounds + 2):  # two untimed warm-up rounds
        for name in names if round_index % 2 else reversed(names):
            start = time.perf_counter()
            calls[name]()
            if round_index >= 2:
                times[name].append(time.perf_counter() - start)
    with open("/proc/loadavg") as load:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds, load average {load.read().split()[0]}")
    for name in names:
        print(f"{name:45} median {np.median(times[name]) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
