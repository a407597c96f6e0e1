"""``python -m adam_triton sweep``: the demo's model trained once per hyperparameter setting.

Every setting starts from the same initialisation and sees the same batches, so the final
losses differ only because of the hyperparameters. Only adam_triton.AdamW is trained: the
demo already shows that torch's AdamW would give the same curves.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, fields

from . import data
from .comparison import initial_model, our_optimizer
from .settings import Hyperparameters, Settings
from .training import Run, make_scheduler, train_in_lockstep

SWEPT = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad")


@dataclass(frozen=True)
class SweepPoint:
    hyperparameters: Hyperparameters
    final_loss: float
    losses: list[float]

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.final_loss)


@dataclass(frozen=True)
class SweepResult:
    points: list[SweepPoint]
    loss_floor: float  # the best loss any model can reach on the sweep's data


def grid(**values: list) -> list[Hyperparameters]:
    """Every combination of the given values, e.g. ``grid(lr=[1e-3, 3e-3], amsgrad=[False, True])``."""
    unknown = set(values) - set(SWEPT)
    if unknown:
        raise ValueError(f"cannot sweep {sorted(unknown)}; choose from {SWEPT}")
    names = [name for name in SWEPT if name in values]
    return [
        Hyperparameters(**dict(zip(names, combination)))
        for combination in itertools.product(*(values[n] for n in names))
    ]


def varying(points: list[Hyperparameters]) -> list[str]:
    """The hyperparameters that differ between points (the learning rate always shows)."""
    return [f.name for f in fields(Hyperparameters) if f.name == "lr" or len({getattr(p, f.name) for p in points}) > 1]


def label(hyper: Hyperparameters, names: list[str]) -> str:
    return " ".join(
        f"{name}={getattr(hyper, name):g}"
        if not isinstance(getattr(hyper, name), bool)
        else f"{name}={getattr(hyper, name)}"
        for name in names
    )


def sweep(settings: Settings, points: list[Hyperparameters]) -> SweepResult:
    batches = data.generate(
        settings.size.vocab, settings.steps, settings.size.batch, settings.size.seq_len, settings.seed
    )
    initial = initial_model(settings)
    names = varying(points)
    results = []
    for hyper in points:
        model = copy.deepcopy(initial)
        optimizer, _ = our_optimizer(model, settings, hyper)
        run = Run(label(hyper, names), model, optimizer, make_scheduler(optimizer, settings.schedule, settings.steps))
        train_in_lockstep([run], batches, settings.device, progress=settings.progress)
        results.append(SweepPoint(hyper, run.final_loss, run.losses))
    return SweepResult(results, batches.loss_floor)
