"""The CPU speed targets, measured so that the machine's noise is visible next to the ratio.

The suite (``benchmarks/test_step_speed.py``) builds one instance of each implementation per
case and times their rounds one implementation after the other. On this 2-core machine
two things move such a ratio by several percent, with no change in the code:

* load that changes between one implementation's rounds and the next one's;
* memory placement: two instances of the *same* optimizer, built the same way, differ by up
  to about 10% in step time for as long as they live (which physical pages their buffers
  got), while the rounds of one instance agree within a few percent.

Here each case builds INSTANCES instances of adam_triton and of the peer, all of them take
turns round by round (in alternating order), and the ratio is the mean of adam_triton's
per-instance medians over the mean of the peer's. The spread is each implementation's
slowest instance median over its fastest: a target closer to the ratio than that spread
cannot be settled on this machine. The cases are built exactly as the suite builds them
(``benchmarks.workload.prepare``): same shapes, hyperparameters and gradient modes.

Against torch's fused optimizer, the time spent outside torch's fused kernel (which both
call: adam_triton's CPU backend is that kernel on its flat buffers) is printed too, as the
median per step: the host work each optimizer adds around the same kernel.

    python -m benchmarks.experiments.targets_interleaved [ROUNDS] [INSTANCES] [NAME]

NAME, if given, keeps the targets whose name contains it (e.g. "2000x8000: ours <= 0.4x").
"""

import sys
import time

import numpy as np
import torch

from benchmarks.cases import Case, Config
from benchmarks.implementations import IMPLEMENTATIONS, OURS
from benchmarks.targets import TARGETS
from benchmarks.workload import prepare, release


_kernel_seconds = [0.0]


def _timing_kernel(kernel):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        kernel(*args, **kwargs)
        _kernel_seconds[0] += time.perf_counter() - start

    return timed


def _timed(workload) -> tuple[float, float]:
    """(step time, of which inside torch's fused kernel)."""
    if workload.setup is not None:
        workload.setup()
    _kernel_seconds[0] = 0.0
    start = time.perf_counter()
    workload.step()
    return time.perf_counter() - start, _kernel_seconds[0]


def instance_medians(case: Case, names: tuple[str, ...], instances: int, rounds: int) -> tuple[dict, dict]:
    """Median step time of every instance, and its median time outside torch's fused
    kernel, by implementation name."""
    built = [(name, prepare(case, IMPLEMENTATIONS[name])) for _ in range(instances) for name in names]
    times = [[] for _ in built]
    for round_index in range(rounds + 2):  # the first two rounds warm up, untimed
        order = range(len(built)) if round_index % 2 else reversed(range(len(built)))
        for index in order:
            elapsed = _timed(built[index][1])
            if round_index >= 2:
                times[index].append(elapsed)
    medians: dict[str, list[float]] = {name: [] for name in names}
    outside: dict[str, list[float]] = {name: [] for name in names}
    for (name, _), samples in zip(built, times):
        steps, kernels = np.array(samples).T
        medians[name].append(float(np.median(steps)))
        outside[name].append(float(np.median(steps - kernels)))
    del built
    release(case.device)
    return medians, outside


def main(rounds: int, instances: int, name: str = "") -> None:
    chosen = [target for target in TARGETS if target.device == "cpu" and name in target.name]
    if not chosen:
        names = "; ".join(target.name for target in TARGETS if target.device == "cpu")
        raise SystemExit(f"no CPU target's name contains {name!r}; the names are: {names}")
    torch._fused_adam_ = _timing_kernel(torch._fused_adam_)
    torch._fused_adamw_ = _timing_kernel(torch._fused_adamw_)
    with open("/proc/loadavg") as load:
        load_average = load.read().split()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {instances} instances of each "
        f"implementation per case, {rounds} interleaved rounds, load average at start {load_average}"
    )
    for target in chosen:
        for grads in ("fresh", "kept"):
            case = Case("cpu", target.shapes, Config(torch.float32, target.optimizer, target.amsgrad, grads))
            medians, outside = instance_medians(case, (OURS, target.peer), instances, rounds)
            ours, peer = np.array(medians[OURS]), np.array(medians[target.peer])
            ratio = ours.mean() / peer.mean()
            verdict = "met" if ratio <= target.limit else "NOT met"
            print(
                f"{target.name:48} {grads:5} | ratio {ratio:.3f} {verdict:7} | instance spread ours "
                f"{ours.max() / ours.min():.3f}, peer {peer.max() / peer.min():.3f} | instance medians (ms) "
                f"ours {' '.join(f'{m * 1e3:.2f}' for m in ours)}; peer {' '.join(f'{m * 1e3:.2f}' for m in peer)}"
                + (
                    f" | outside the fused kernel (ms) ours {np.median(outside[OURS]) * 1e3:.2f}, "
                    f"peer {np.median(outside[target.peer]) * 1e3:.2f}"
                    if target.peer == "torch-fused"
                    else ""
                )
            )


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 30,
        int(sys.argv[2]) if len(sys.argv) > 2 else 3,
        sys.argv[3] if len(sys.argv) > 3 else "",
    )
