"""Does torch's CPU fused kernel use both cores on a list of small tensors?

The 0.4x target on 2,000 tensors of 8,000 elements rests on what torch's kernel does with
the list. This times, with 2 threads and with 1 in turn (medians of 20 calls):

* ``torch._fused_adamw_`` on the list of 2,000 and on one tensor of the same 16M elements;
* the gather of 2,000 gradients into one flat buffer (``torch._foreach_copy_``, as the
  CPU backend does for fresh gradients) and one copy of a 16M tensor.

If the list takes as long with 2 threads as with 1, each small tensor runs on one core:
its range is too short for ``at::parallel_for`` to split, so the list is one core's work
while one flat span is both cores'.

    python -m benchmarks.experiments.list_threads_cpu [ROUNDS]
"""

import sys

import torch

from benchmarks.timing import median_seconds

TENSORS, SIZE = 2000, 8000
ARGS = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)


def median_ms(call, repeats=20):
    return median_seconds(call, torch.device("cpu"), repeats) * 1e3


def adam_tensors(sizes):
    tensors = [[torch.randn(n) for n in sizes] for _ in range(4)]
    steps = [torch.tensor(1.0) for _ in sizes]
    return lambda: torch._fused_adamw_(*tensors, [], steps, **ARGS)


def main(rounds: int) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}; {TENSORS} x {SIZE} fp32 against one tensor of {TENSORS * SIZE}")
    listed, flat = adam_tensors([SIZE] * TENSORS), adam_tensors([TENSORS * SIZE])
    gradients = [torch.randn(SIZE) for _ in range(TENSORS)]
    buffer = torch.empty(TENSORS * SIZE)
    views = list(buffer.split(SIZE))
    whole = torch.randn(TENSORS * SIZE)
    threads = torch.get_num_threads()
    for _ in range(rounds):
        for count in (threads, 1):
            torch.set_num_threads(count)
            print(
                f"{count} thread(s): fused kernel, list {median_ms(listed):.2f} ms, one tensor {median_ms(flat):.2f} ms"
                f" | gather into the flat buffer {median_ms(lambda: torch._foreach_copy_(views, gradients)):.2f} ms,"
                f" one 16M copy {median_ms(lambda: buffer.copy_(whole)):.2f} ms"
            )
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
