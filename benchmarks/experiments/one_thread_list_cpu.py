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

import sys

import torch

from benchmarks.experiments.small_tensor_lists import SmallTensorGroup

REPEATS = 15


def main(rounds: int, tensors: int, size: int) -> None:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; {tensors} x {size} fp32 tensors")
    group = SmallTensorGroup(tensors, size)

    def update_list_one_thread():
        torch.set_num_threads(1)
        try:
            group.update_list(group.fresh())
        finally:
            torch.set_num_threads(threads)

    def gather_then_flat():
        torch._foreach_copy_(group.grad_views, group.fresh())
        group.update_flat()

    def switch_only():
        torch.set_num_threads(1)
        torch.set_num_threads(threads)

    cases = {
        "list": lambda: group.update_list(group.fresh()),
        "list, 1 thread": update_list_one_thread,
        "gather+flat": gather_then_flat,
        "kept flat": group.update_flat,
        "switch only": switch_only,
    }
    for _ in range(rounds):
        print(", ".join(f"{name} {group.median_ms(call, REPEATS):.3f}" for name, call in cases.items()) + " (ms)")


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:]]
    main(*(arguments + [3, 2000, 8000][len(arguments):]))
