"""Would 2 MB pages make the CPU update faster? torch's CPU allocator asks for transparent
huge pages for allocations of 2 MB and more when ``THP_MEM_ALLOC_ENABLE=1`` is set (this
machine's kernel gives them only on request: ``transparent_hugepage`` is ``madvise``). A
streaming kernel over 7 x 64 MB could save TLB misses, which cost more under a hypervisor's
nested paging.

    python -m benchmarks.experiments.huge_pages_cpu [ROUNDS]
    THP_MEM_ALLOC_ENABLE=1 python -m benchmarks.experiments.huge_pages_cpu [ROUNDS]

Times torch's fused AdamW kernel alone on four sets of one 16M-element tensor each
(parameter, gradient, two moments), interleaved round by round: two sets allocated zeroed
and then written (as adam_triton's flat buffers are), two from ``torch.randn``. Prints each
set's median and how much of its memory lies on huge pages.
"""

import os
import statistics
import sys
import time

import torch

from .flat_copy_cpu import ADAMW

ELEMENTS = 16_000_000


def huge_page_kb(tensor: torch.Tensor) -> int:
    """AnonHugePages of the mapping that holds ``tensor``'s first element."""
    address, inside = tensor.data_ptr(), False
    with open(f"/proc/{os.getpid()}/smaps") as smaps:
        for line in smaps:
            field = line.split()
            if "-" in field[0] and not field[0].endswith(":"):
                first, end = (int(bound, 16) for bound in field[0].split("-"))
                inside = first <= address < end
            elif inside and field[0] == "AnonHugePages:":
                return int(field[1])
    return 0


def _zeroed_then_written() -> list[torch.Tensor]:
    tensors = [torch.zeros(ELEMENTS) for _ in range(4)]
    for tensor in tensors:
        tensor.normal_()
    return tensors


def main(rounds: int) -> None:
    sets = [(kind, make()) for kind, make in
            (("zeroed", _zeroed_then_written), ("randn", lambda: [torch.randn(ELEMENTS) for _ in range(4)])) * 2]
    for _, tensors in sets:
        tensors[3].abs_()
    step = torch.tensor(1.0)
    times = [[] for _ in sets]
    for round_index in range(rounds + 2):  # two warm-up rounds
        for index, (_, (param, grad, exp_avg, exp_avg_sq)) in enumerate(sets):
            start = time.perf_counter()
            torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [step], **ADAMW)
            if round_index >= 2:
                times[index].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    for (kind, tensors), samples in zip(sets, times):
        pages = sum(huge_page_kb(t) for t in tensors) // 1024
        print(f"  {kind:7s} median {statistics.median(samples) * 1e3:6.2f} ms   huge pages under its tensors {pages} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
