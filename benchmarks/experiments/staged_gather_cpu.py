"""Fresh gradients of many small tensors: gather them all, or a cache-sized run at a time?

With fresh gradients (the default ``zero_grad()``), the CPU backend updated a group of many
small tensors (until NOTES idea 30 replaced it) by copying every gradient into the flat gradient buffer and then running
torch's fused kernel once over the group (``_backends._gather_small_gradients``, NOTES
idea 3). That writes a full-size copy of the gradients to memory and reads it back, and it
keeps a full-size gradient buffer alive between steps only to gather into.

The alternative timed here copies a run of consecutive gradients into a small staging
tensor (a few MiB, so it stays in the cache) and updates that run's span of the flat
parameter and state buffers from it, run after run: the copy's stores and the update's
gradient loads then hit the cache instead of memory. Per round, with the implementations
taking turns, each call right after a parallel region (as a step follows backward), two
pools of gradients used alternately (as fresh gradients land in new memory), medians of
``REPEATS`` calls:

* torch's fused kernel on the list (what torch's fused AdamW runs);
* gather everything, then one flat update (what the backend does now);
* staged runs of at most ``budget`` elements, for several budgets;
* for scale: one flat update from gradients already flat (kept gradients).

    python -m benchmarks.experiments.staged_gather_cpu [ROUNDS] [TENSORS] [SIZE]
"""

import sys

import torch

from benchmarks.experiments.small_tensor_lists import ADAMW, SmallTensorGroup

REPEATS = 15
BUDGETS = (128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024)


def runs(lengths: list[int], budget: int) -> list[tuple[int, int, int, int]]:
    """(first tensor, end tensor, first element, end element) of consecutive tensors whose
    lengths add up to at most ``budget`` (or one tensor longer than it)."""
    out, first, start, total = [], 0, 0, 0
    for index, length in enumerate(lengths):
        if total and total + length > budget:
            out.append((first, index, start, start + total))
            first, start, total = index, start + total, 0
        total += length
    out.append((first, len(lengths), start, start + total))
    return out


def main(rounds: int, tensors: int, size: int) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {tensors} x {size} fp32 tensors")
    group = SmallTensorGroup(tensors, size)
    param, exp_avg, exp_avg_sq, steps = group.param, group.exp_avg, group.exp_avg_sq, group.steps

    def gather_then_flat():
        torch._foreach_copy_(group.grad_views, group.fresh())
        group.update_flat()

    def staged(budget: int):
        plan = runs([size] * tensors, budget)
        stage = torch.empty(max(end - start for _, _, start, end in plan))
        stage_views = list(stage.split(size))

        def call():
            gradients = group.fresh()
            for first, end, start, stop in plan:
                torch._foreach_copy_(stage_views[: end - first], gradients[first:end])
                torch._fused_adamw_(
                    [param[start:stop]], [stage[: stop - start]], [exp_avg[start:stop]],
                    [exp_avg_sq[start:stop]], [], steps[:1], **ADAMW,
                )

        return call

    cases = {"list": lambda: group.update_list(group.fresh()), "gather+flat": gather_then_flat}
    cases.update({f"staged {b // 1024}K": staged(b) for b in BUDGETS})
    cases["kept flat"] = group.update_flat
    for _ in range(rounds):
        print(", ".join(f"{name} {group.median_ms(call, REPEATS):.2f}" for name, call in cases.items()) + " (ms)")


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:]]
    main(*(arguments + [3, 2000, 8000][len(arguments):]))
