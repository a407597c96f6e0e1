"""What the CPU experiments on many small tensors share: one group's flat buffers and their
per-tensor views, fresh gradients, and timing right after a parallel region.

Fresh gradients come from two pools used in turn, as a new backward's land in new memory;
each timed call follows a parallel region, as a step follows backward's last.
"""

import statistics
import time

import torch

ADAMW = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01, "eps": 1e-8, "amsgrad": False, "maximize": False}


class SmallTensorGroup:
    """``tensors`` fp32 tensors of ``size`` elements, homed in flat buffers as adam_triton
    homes them: ``param``, ``exp_avg``, ``exp_avg_sq`` and the gradient buffer ``grad``,
    with ``lists`` (the first three as per-tensor views) and ``grad_views``."""

    def __init__(self, tensors: int, size: int):
        total = tensors * size
        self._pools = [[torch.randn(size) for _ in range(tensors)] for _ in range(2)]
        self.param, self.exp_avg, self.exp_avg_sq = (torch.randn(total) for _ in range(3))
        self.exp_avg_sq.abs_()
        self.grad = torch.empty(total)
        self.grad_views = list(self.grad.split(size))
        self.lists = [list(t.split(size)) for t in (self.param, self.exp_avg, self.exp_avg_sq)]
        self.steps = [torch.tensor(1.0) for _ in range(tensors)]
        self._region = torch.randn(total)
        self._turn = 0

    def fresh(self) -> list[torch.Tensor]:
        """This step's gradients: the other pool than last time."""
        self._turn += 1
        return self._pools[self._turn % 2]

    def update_list(self, gradients) -> None:
        torch._fused_adamw_(self.lists[0], gradients, self.lists[1], self.lists[2], [], self.steps, **ADAMW)

    def update_flat(self) -> None:
        """One update of the whole group from the gradient buffer."""
        torch._fused_adamw_([self.param], [self.grad], [self.exp_avg], [self.exp_avg_sq], [], self.steps[:1], **ADAMW)

    def median_ms(self, call, repeats: int) -> float:
        """Median of ``repeats`` calls (after two untimed), each right after a parallel region."""
        times = []
        for index in range(repeats + 2):
            self._region.mul_(1.0)
            start = time.perf_counter()
            call()
            if index >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
