"""Which tensors should torch's CPU fused kernel update on one thread: a rule per group
(many tensors, small on average) or per tensor (small ones)?

Idea 30 runs a group's list on one thread when it has at least 64 tensors averaging at
most 64K elements: with one thread ``at::parallel_for`` opens no parallel region, and a
region per small tensor costs about what its work does (far more when another process
holds a core). The 64K came with the gather it replaced and was not measured. This
measures, right after a parallel region, with fresh gradients (two pools in turn), the
kernel alone (medians of ``REPEATS`` calls per round, implementations taking turns):

* lists of one size, from 256 to 256K elements (about 8M elements a list, at least 64
  tensors): all threads against one thread, per size;
* mixed lists (ResNet-50's 161 tensors, a MobileNet-like list of small convolutions with
  a few large ones, GPT-2's 148): all threads, one thread, and the tensors of at most
  ``SPLIT`` elements on one thread with the rest on all threads (two calls).

    python -m benchmarks.experiments.one_thread_by_size_cpu [ROUNDS] [SPLIT]
"""

import statistics
import sys
import time

import torch

from benchmarks.experiments.small_tensor_lists import ADAMW
from benchmarks.shapes import gpt2_small, resnet50

REPEATS = 9
UNIFORM_ELEMENTS = 8 * 2**20


def mobilenet_like() -> list[tuple[int, ...]]:
    """Depthwise-separable blocks as in MobileNetV2 (expansion 6), with each block's
    batch-norm pairs: many tensors of a few hundred to a few thousand elements, and
    pointwise convolutions of up to 400K elements."""
    shapes: list[tuple[int, ...]] = [(32, 3, 3, 3), (32,), (32,)]
    channels = 32
    for out, repeats in ((16, 1), (24, 2), (32, 3), (64, 4), (96, 3), (160, 3), (320, 1)):
        for _ in range(repeats):
            hidden = channels * 6
            shapes += [(hidden, channels, 1, 1), (hidden,), (hidden,)]
            shapes += [(hidden, 1, 3, 3), (hidden,), (hidden,)]
            shapes += [(out, hidden, 1, 1), (out,), (out,)]
            channels = out
    return shapes + [(1280, 320, 1, 1), (1280,), (1280,), (1000, 1280), (1000,)]


class ListUpdate:
    """One group's tensors as separate tensors, fresh gradients from two pools in turn."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.tensors = [[torch.randn(n) for n in sizes] for _ in range(3)]
        self.tensors[2] = [t.abs_() for t in self.tensors[2]]
        self.pools = [[torch.randn(n) for n in sizes] for _ in range(2)]
        self.steps = [torch.tensor(1.0) for _ in sizes]
        self.turn = 0
        self.region = torch.randn(max(sum(sizes), 2**20))

    def run(self, indices: list[int], one_thread: bool) -> None:
        grads = self.pools[self.turn % 2]
        params, exp_avgs, exp_avg_sqs = ([t[i] for i in indices] for t in self.tensors)
        picked = ([grads[i] for i in indices], [self.steps[i] for i in indices])
        threads = torch.get_num_threads()
        if one_thread:
            torch.set_num_threads(1)
        try:
            torch._fused_adamw_(params, picked[0], exp_avgs, exp_avg_sqs, [], picked[1], **ADAMW)
        finally:
            torch.set_num_threads(threads)

    def median_ms(self, calls) -> float:
        times = []
        for index in range(REPEATS + 2):
            self.turn += 1
            self.region.mul_(1.0)  # a parallel region just before, as backward's last
            start = time.perf_counter()
            for indices, one_thread in calls:
                self.run(indices, one_thread)
            if index >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3


def uniform(rounds: int) -> None:
    for size in (256, 1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144):
        count = max(64, UNIFORM_ELEMENTS // size)
        group = ListUpdate([size] * count)
        every = list(range(count))
        cases = {"all threads": [(every, False)], "one thread": [(every, True)]}
        rows = [[group.median_ms(calls) for calls in cases.values()] for _ in range(rounds)]
        print(
            f"{count:5} x {size:6}: "
            + " | ".join(f"{name} {' '.join(f'{row[i]:7.3f}' for row in rows)}" for i, name in enumerate(cases))
            + " | one/all " + " ".join(f"{row[1] / row[0]:.2f}" for row in rows)
        )
        del group


def mixed(rounds: int, split: int) -> None:
    for name, shapes in (("resnet50", resnet50()), ("mobilenet-like", mobilenet_like()), ("gpt2", gpt2_small())):
        sizes = [int(torch.Size(shape).numel()) for shape in shapes]
        group = ListUpdate(sizes)
        every = list(range(len(sizes)))
        small = [i for i in every if sizes[i] <= split]
        large = [i for i in every if sizes[i] > split]
        cases = {
            "all threads": [(every, False)],
            "one thread": [(every, True)],
            f"<= {split} on one": [(small, True), (large, False)],
        }
        rows = [[group.median_ms(calls) for calls in cases.values()] for _ in range(rounds)]
        print(
            f"{name} ({len(sizes)} tensors, mean {sum(sizes) // len(sizes)}, {len(small)} of at most {split}): "
            + " | ".join(f"{case} {' '.join(f'{row[i]:7.3f}' for row in rows)}" for i, case in enumerate(cases))
        )
        del group


def main(rounds: int, split: int) -> None:
    torch.manual_seed(0)
    with open("/proc/loadavg") as load:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load.read().split()[0]}")
    uniform(rounds)
    mixed(rounds, split)


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:]]
    main(*(arguments + [3, 16384][len(arguments):]))
