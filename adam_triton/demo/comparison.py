"""The demo itself: one model trained twice from one initialisation, with torch's AdamW and
with adam_triton's, on the same batches, and what the two runs are compared on."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import adam_triton

from . import data
from .errors import DemoError
from .model import TinyGPT
from .settings import TORCH_IMPLEMENTATIONS, Hyperparameters, Settings
from .training import Run, make_scheduler, train_in_lockstep

REFERENCE_LABEL = "torch.optim.AdamW"
OURS_LABEL = "adam_triton.AdamW"


@dataclass
class Comparison:
    settings: Settings
    hyperparameters: Hyperparameters
    reference: Run
    ours: Run
    reference_implementation: str
    our_implementation: str
    parameter_count: int
    loss_floor: float
    largest_parameter_difference: float
    largest_parameter: float

    @property
    def speedup(self) -> float:
        """How many times faster our optimizer step is (median against median)."""
        return self.reference.median_step_seconds / self.ours.median_step_seconds


def initial_model(settings: Settings) -> nn.Module:
    """The model both runs start from, built from ``settings.seed`` alone.

    Built on the CPU in float32 and then converted, so that every device and dtype starts
    from the same numbers; the caller's random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = TinyGPT(settings.size)
    return model.to(device=settings.device, dtype=settings.dtype)


def reference_optimizer(model: nn.Module, settings: Settings, hyper: Hyperparameters) -> tuple[torch.optim.AdamW, str]:
    implementation = TORCH_IMPLEMENTATIONS[settings.torch_implementation]
    try:
        optimizer = torch.optim.AdamW(model.parameters(), **hyper.optimizer_kwargs(), **implementation)
    except (RuntimeError, ValueError) as error:
        raise DemoError(f"torch.optim.AdamW refused these settings: {error}") from None
    return optimizer, describe_torch_implementation(optimizer, settings.torch_implementation)


def describe_torch_implementation(optimizer: torch.optim.AdamW, requested: str) -> str:
    if requested != "default":
        return requested
    try:  # what torch picks when neither foreach nor fused is given: a private helper
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:
        return "torch's default"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fused, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return "fused" if fused else "foreach" if foreach else "for-loop"


def our_optimizer(model: nn.Module, settings: Settings, hyper: Hyperparameters) -> tuple[adam_triton.AdamW, str]:
    try:
        optimizer = adam_triton.AdamW(model.parameters(), **hyper.optimizer_kwargs(), backend=settings.backend)
    except (RuntimeError, ValueError) as error:
        raise DemoError(f"adam_triton.AdamW refused these settings: {error}") from None
    return optimizer, describe_our_implementation(optimizer)


def describe_our_implementation(optimizer: adam_triton.AdamW) -> str:
    backends = set(optimizer.backends().values())
    names = {"triton": "Triton kernel", "torch": "torch fused kernel"}
    return " + ".join(f"{names.get(b, b)}, flat buffers" for b in sorted(backends))


@torch.no_grad()
def largest_difference(first: nn.Module, second: nn.Module) -> float:
    differences = [(a.double() - b.double()).abs().max() for a, b in zip(first.parameters(), second.parameters())]
    return float(torch.stack(differences).max())


@torch.no_grad()
def largest_magnitude(model: nn.Module) -> float:
    return float(torch.stack([p.abs().max().double() for p in model.parameters()]).max())


def compare(settings: Settings, hyper: Hyperparameters | None = None) -> Comparison:
    hyper = hyper or Hyperparameters()
    batches = data.generate(
        settings.size.vocab, settings.steps, settings.size.batch, settings.size.seq_len, settings.seed
    )
    reference_model = initial_model(settings)
    our_model = copy.deepcopy(reference_model)
    reference_opt, reference_implementation = reference_optimizer(reference_model, settings, hyper)
    our_opt, our_implementation = our_optimizer(our_model, settings, hyper)
    runs = [
        Run(
            REFERENCE_LABEL,
            reference_model,
            reference_opt,
            make_scheduler(reference_opt, settings.schedule, settings.steps),
        ),
        Run(OURS_LABEL, our_model, our_opt, make_scheduler(our_opt, settings.schedule, settings.steps)),
    ]
    train_in_lockstep(runs, batches, settings.device, progress=settings.progress)
    return Comparison(
        settings=settings,
        hyperparameters=hyper,
        reference=runs[0],
        ours=runs[1],
        reference_implementation=reference_implementation,
        our_implementation=our_implementation,
        parameter_count=sum(p.numel() for p in our_model.parameters()),
        loss_floor=batches.loss_floor,
        largest_parameter_difference=largest_difference(reference_model, our_model),
        largest_parameter=largest_magnitude(reference_model),
    )
