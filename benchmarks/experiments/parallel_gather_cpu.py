"""Can the CPU backend's gather of fresh gradients use both cores?

With fresh gradients (the default ``zero_grad()``), a group of many small tensors was
updated (until NOTES idea 30 replaced it) by copying its gradients into the flat gradient buffer and then running torch's
fused kernel once over the group (``_backends._gather_small_gradients``). The copy is
``torch._foreach_copy_``: a loop of per-tensor copies, each too short for
``at::parallel_for`` to split, so it runs on one core. On the 2-core Intel Xeon of the
seventeenth session it costs more than the update it feeds, which is why the 0.4x target on
2,000 tensors of 8,000 elements is met with kept gradients and not with fresh ones.

No torch operation copies a list of tensors with one parallel region (``torch.cat`` copies
input by input too). The remaining way is Python threads: torch releases the GIL inside an
operation, so two threads can each copy half of the list. This times, per round (medians
of 20 calls):

* the gather on one thread (``_foreach_copy_``, as the backend does) and ``torch.cat``;
* the gather split between the calling thread and one worker thread, started with the
  machine idle, and started right after a parallel region (a 16M-element in-place multiply,
  untimed), as a step is after backward: OpenMP's worker thread then keeps spinning on the
  second core for a while, waiting for the next region;
* for scale: torch's fused kernel on the 2,000-tensor list (what torch's fused AdamW runs)
  and on one flat span of 16M elements (what follows the gather).

    python -m benchmarks.experiments.parallel_gather_cpu [ROUNDS]
"""

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

TENSORS, SIZE = 2000, 8000
REPEATS = 20
ARGS = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)


def median_ms(call, before=None) -> float:
    """Median of ``REPEATS`` timed calls after two untimed ones; ``before`` runs untimed
    ahead of each."""
    times = []
    for index in range(REPEATS + 2):
        if before is not None:
            before()
        start = time.perf_counter()
        call()
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(rounds: int) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {TENSORS} x {SIZE} fp32 gradients")
    gradients = [torch.randn(SIZE) for _ in range(TENSORS)]
    buffer = torch.empty(TENSORS * SIZE)
    views = list(buffer.split(SIZE))
    half = TENSORS // 2
    worker = ThreadPoolExecutor(1)

    def gather_on_two_threads():
        other = worker.submit(torch._foreach_copy_, views[:half], gradients[:half])
        torch._foreach_copy_(views[half:], gradients[half:])
        other.result()

    region = torch.randn(TENSORS * SIZE)

    def parallel_region():
        region.mul_(1.0)

    def idle():
        time.sleep(0.05)

    states = [[torch.randn(SIZE) for _ in range(TENSORS)] for _ in range(3)]
    steps = [torch.tensor(1.0) for _ in range(TENSORS)]
    flat = [torch.randn(TENSORS * SIZE) for _ in range(3)]

    def update_list():
        torch._fused_adamw_(states[0], gradients, states[1], states[2], [], steps, **ARGS)

    def update_flat():
        torch._fused_adamw_([flat[0]], [buffer], [flat[1]], [flat[2]], [], steps[:1], **ARGS)

    for _ in range(rounds):
        print(
            f"gather: one thread {median_ms(lambda: torch._foreach_copy_(views, gradients)):.2f} ms, "
            f"torch.cat {median_ms(lambda: torch.cat(gradients, out=buffer)):.2f} ms, "
            f"two threads from idle {median_ms(gather_on_two_threads, idle):.2f} ms, "
            f"two threads after a parallel region {median_ms(gather_on_two_threads, parallel_region):.2f} ms "
            f"| fused kernel: list {median_ms(update_list):.2f} ms, one flat span {median_ms(update_flat):.2f} ms"
        )
    worker.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
