"""Fresh gradients of many small tensors: gather them, or update the list on one thread?

On the CPU torch's fused kernel opens a parallel region per tensor. For many small tensors
those regions cost about what the work in them does, which is why the CPU backend copied
such a group's fresh gradients into the flat gradient buffer and updated the group as one
tensor (NOTES idea 3; replaced by idea 30, which this measured). The copy writes and reads back a
full-size gradient buffer, and on the Intel Xeon it costs about as much as the update.

With one thread, ``at::parallel_for`` runs inline: no region is opened at all. This times,
per round, the implementations taking turns, each call right after a parallel region (as a
step follows backward), two pools of gradients used alternately (fresh gradients land in
new memory), medians of ``REPEATS`` calls:

* torch's fused kernel on the list, all threads (what torch's fused AdamW runs);
* the same list with ``torch.set_num_threads(1)`` around the call (and the count put back);
* gather everything, then one flat update on all threads (what the backend does now);
* for scale: one flat update from gradients already flat (kept gradients);
* the thread-count switch alone.

    python -m benchmarks.experiments.one_thread_list_cpu [ROUNDS] [TENSORS] [SIZE]
"""

import statistics
import sys
import time

import torch

REPEATS = 15
ARGS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01, "eps": 1e-8, "amsgrad": False, "maximize": False}


def main(rounds: int, tensors: int, size: int) -> None:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; {tensors} x {size} fp32 tensors")
    total = tensors * size
    pools = [[torch.randn(size) for _ in range(tensors)] for _ in range(2)]
    param, exp_avg, exp_avg_sq = (torch.randn(total) for _ in range(3))
    exp_avg_sq.abs_()
    grad = torch.empty(total)
    grad_views = list(grad.split(size))
    lists = [list(t.split(size)) for t in (param, exp_avg, exp_avg_sq)]
    steps = [torch.tensor(1.0) for _ in range(tensors)]
    region = torch.randn(total)
    turn = [0]

    def fresh() -> list[torch.Tensor]:
        turn[0] += 1
        return pools[turn[0] % 2]

    def update_list():
        torch._fused_adamw_(lists[0], fresh(), lists[1], lists[2], [], steps, **ARGS)

    def update_list_one_thread():
        torch.set_num_threads(1)
        try:
            update_list()
        finally:
            torch.set_num_threads(threads)

    def gather_then_flat():
        torch._foreach_copy_(grad_views, fresh())
        torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], steps[:1], **ARGS)

    def kept_flat():
        torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], steps[:1], **ARGS)

    def switch_only():
        torch.set_num_threads(1)
        torch.set_num_threads(threads)

    cases = {
        "list": update_list,
        "list, 1 thread": update_list_one_thread,
        "gather+flat": gather_then_flat,
        "kept flat": kept_flat,
        "switch only": switch_only,
    }

    def median_ms(call) -> float:
        times = []
        for index in range(REPEATS + 2):
            region.mul_(1.0)  # a parallel region just before, as backward's last
            start = time.perf_counter()
            call()
            if index >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    for _ in range(rounds):
        print(", ".join(f"{name} {median_ms(call):.3f}" for name, call in cases.items()) + " (ms)")


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:]]
    main(*(arguments + [3, 2000, 8000][len(arguments):]))
