"""Is torch's fused AdamW kernel, on one flat span, already at this CPU's memory bandwidth?

adam_triton's CPU backend updates a flat buffer with torch's fused kernel, so that kernel on
one span is the floor of every CPU step. This times it (28 bytes per element: parameter,
gradient and both moments read, three of them written) on one 16M-element tensor set,
interleaved round by round with the in-place add that ``benchmarks.timing`` uses as the
CPU's bandwidth ceiling (``a.add_(b)``, 12 bytes per element), and prints both rates and the
kernel's fraction of the add's rate per round. A fraction near 1 means no CPU code, torch's
or ours, can update those bytes much faster on this machine.

    python -m benchmarks.experiments.fused_at_bandwidth_cpu [ROUNDS]
"""

import sys

import torch

from benchmarks.timing import median_seconds

from .flat_copy_cpu import ADAMW

ELEMENTS = 16_000_000
ADAM_BYTES = 28  # fp32: read p, g, m, v; write p, m, v
ADD_BYTES = 12  # read a, b; write a


def main(rounds: int = 3, repeats: int = 15) -> None:
    cpu = torch.device("cpu")
    param, grad, exp_avg = (torch.randn(ELEMENTS) for _ in range(3))
    exp_avg_sq = torch.rand(ELEMENTS)
    step = torch.tensor(3.0)
    a, b = torch.randn(ELEMENTS), torch.randn(ELEMENTS)

    def fused():
        torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [step], **ADAMW)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {ELEMENTS:,} fp32 elements, "
          f"median of {repeats} per round")
    for round_index in range(rounds):
        add_s = median_seconds(lambda: a.add_(b), cpu, repeats)
        fused_s = median_seconds(fused, cpu, repeats)
        add_rate = ADD_BYTES * ELEMENTS / add_s / 1e9
        fused_rate = ADAM_BYTES * ELEMENTS / fused_s / 1e9
        print(f"round {round_index + 1}: in-place add {add_s * 1e3:.2f} ms = {add_rate:.1f} GB/s | "
              f"fused AdamW {fused_s * 1e3:.2f} ms = {fused_rate:.1f} GB/s | fraction {fused_rate / add_rate:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
