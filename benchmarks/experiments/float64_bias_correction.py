"""How far a float64 Adam update lies from an exact one, step by step (README, "The math").

The kernel forms ``beta**t`` by repeated multiplication, torch by the C library's ``pow``;
``1 - beta**t`` magnifies either's rounding by up to ``1 / (1 - beta**t)``. For each step
count ``t`` this runs one float64 step from the same random state through the Triton
kernel (under the interpreter: ``TRITON_INTERPRET=1`` must be set before anything imports
triton), through torch's fused kernel (adam_triton's torch backend) and through torch's
for-loop Adam, and compares each update with one computed in 200-bit arithmetic (mpmath)
from the same double hyperparameters and the moments that step produced. Errors are the
largest over 64 elements, in units of 2**-52 of the exact update.

    TRITON_INTERPRET=1 python -m benchmarks.experiments.float64_bias_correction
"""

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("set TRITON_INTERPRET=1 (before triton is imported) to run the kernel on the CPU")

import mpmath
import torch
from torch.optim.adam import adam as torch_adam

from adam_triton.functional import adam

ELEMENTS = 64
LR, BETA1, EPS = 1e-3, 0.9, 1e-8
STEPS = list(range(1, 21)) + [100, 1000, 2000, 5000, 10000]
mpmath.mp.prec = 200


def _torch_for_loop(param, grad, exp_avg, exp_avg_sq, step, beta2):
    torch_adam(
        [param], [grad], [exp_avg], [exp_avg_sq], [], [step],
        foreach=False, amsgrad=False, beta1=BETA1, beta2=beta2, lr=LR, weight_decay=0.0, eps=EPS, maximize=False,
    )


def _ours(backend):
    def run(param, grad, exp_avg, exp_avg_sq, step, beta2):
        adam(param, grad, exp_avg, exp_avg_sq, step, lr=LR, beta1=BETA1, beta2=beta2, eps=EPS, backend=backend)

    return run


IMPLEMENTATIONS = {"kernel": _ours("triton"), "torch fused": _ours("torch"), "torch for-loop": _torch_for_loop}


def _error(update, exp_avg, exp_avg_sq, t, beta2) -> float:
    """The largest error of ``update`` against the exact one, in units of 2**-52 of it."""
    correction1 = 1 - mpmath.mpf(BETA1) ** t
    root_correction2 = mpmath.sqrt(1 - mpmath.mpf(beta2) ** t)
    worst = 0.0
    for u, m, v in zip(update.tolist(), exp_avg.tolist(), exp_avg_sq.tolist()):
        exact = mpmath.mpf(LR) / correction1 * m / (mpmath.sqrt(v) / root_correction2 + mpmath.mpf(EPS))
        worst = max(worst, float(abs(u - exact) / abs(exact) * 2**52))
    return worst


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(ELEMENTS, dtype=torch.float64, generator=generator)
    exp_avg = torch.randn(ELEMENTS, dtype=torch.float64, generator=generator) * 0.1
    exp_avg_sq = torch.rand(ELEMENTS, dtype=torch.float64, generator=generator) * 0.01
    print(f"torch {torch.__version__}; float64, {ELEMENTS} elements, lr {LR}, beta1 {BETA1}, eps {EPS}")
    for beta2 in (0.999, 0.9999):
        print(f"\nbeta2 {beta2}: largest error of the update, units of 2**-52 of it")
        print(f"{'step':>6} " + " ".join(f"{name:>15}" for name in IMPLEMENTATIONS))
        for t in STEPS:
            errors = []
            for run in IMPLEMENTATIONS.values():
                param, m, v = torch.zeros(ELEMENTS, dtype=torch.float64), exp_avg.clone(), exp_avg_sq.clone()
                run(param, grad.clone(), m, v, torch.tensor(float(t - 1)), beta2)
                errors.append(_error(-param, m, v, t, beta2))
            print(f"{t:>6} " + " ".join(f"{error:>15.1f}" for error in errors))


if __name__ == "__main__":
    main()
