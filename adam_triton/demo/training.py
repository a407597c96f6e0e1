"""The training loop, its learning-rate schedule, and the optimizer-step timer."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .data import TokenBatches
from .environment import synchronize
from .model import next_token_loss

SCHEDULES = ("cosine", "constant")
FINAL_LR_FRACTION = 0.1  # the cosine schedule decays to this fraction of the peak


def warmup_cosine(steps: int):
    """A linear warm-up over the first 5 % of steps, then cosine decay to 10 % of the peak."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, steps: int) -> LambdaLR:
    if schedule == "cosine":
        return LambdaLR(optimizer, warmup_cosine(steps))
    if schedule == "constant":
        return LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def time_call(function, device: torch.device) -> float:
    """Seconds ``function()`` takes to finish on ``device``.

    GPU work is asynchronous: without the first synchronisation the clock would also count
    the backward pass still queued before the step, and without the second it would stop
    when the step's kernels are queued rather than done.
    """
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def timing_warmup(steps: int) -> int:
    """Steps left out of the timing statistics: the first steps allocate optimizer state
    and compile kernels (Triton compiles its kernel on the first step on a GPU)."""
    return min(10, steps // 10)


@dataclass
class Run:
    """One model being trained with one optimizer, and what was measured."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """The mean loss over the last 10 % of steps: one batch's loss is noisy."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)

    @property
    def timed_step_seconds(self) -> list[float]:
        return self.step_seconds[timing_warmup(len(self.step_seconds)) :]

    @property
    def median_step_seconds(self) -> float:
        return statistics.median(self.timed_step_seconds)


def _train_step(run: Run, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device) -> torch.Tensor:
    run.optimizer.zero_grad(set_to_none=True)
    loss = next_token_loss(run.model(inputs), targets)
    loss.backward()
    run.step_seconds.append(time_call(run.optimizer.step, device))
    run.scheduler.step()
    return loss.detach()


def train_in_lockstep(runs: list[Run], batches: TokenBatches, device: torch.device, progress: bool = True) -> None:
    """Train every run on the same batches, one step of each in turn.

    Taking turns means anything else the machine is doing slows every run alike, so their
    step times stay comparable.
    """
    from tqdm import tqdm  # imported here: the library itself does not need it

    tokens = batches.tokens.to(device)
    bars = [
        tqdm(
            total=batches.steps,
            desc=run.label,
            unit="step",
            position=index,
            leave=True,
            disable=not progress,
            dynamic_ncols=True,
        )
        for index, run in enumerate(runs)
    ]
    losses: list[list[torch.Tensor]] = [[] for _ in runs]
    refresh_every = max(1, batches.steps // 50)  # reading the loss waits for the device
    try:
        for step in range(batches.steps):
            inputs, targets = tokens[step, :, :-1], tokens[step, :, 1:]
            for run, run_losses, bar in zip(runs, losses, bars):
                run_losses.append(_train_step(run, inputs, targets, device))
                if step % refresh_every == 0 or step == batches.steps - 1:
                    bar.set_postfix(loss=f"{run_losses[-1].item():.4f}", refresh=False)
                bar.update(1)
    finally:
        for bar in bars:
            bar.close()
    for run, run_losses in zip(runs, losses):
        run.losses = torch.stack(run_losses).double().tolist()
