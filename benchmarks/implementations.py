"""The optimizers timed: adam_triton and its peers.

torch's three AdamW/Adam implementations are always there. apex FusedAdam, bitsandbytes'
32-bit Adam and torchao's 8-bit Adam are included when they import, and skipped otherwise.
Each peer says which cases it cannot run, so that a skip names the reason instead of a
timing quietly measuring something else (bitsandbytes accepts ``amsgrad=True`` and ignores it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .cases import Case

OURS = "adam_triton"


def hyperparameters(case: Case) -> dict:
    """The same hyperparameters for every implementation: torch's defaults for the class."""
    return {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 1e-2 if case.config.optimizer == "AdamW" else 0.0,
    }


def _ours(params, case):
    import adam_triton

    from .cases import PRECISIONS

    options = PRECISIONS[case.config.precision]
    return getattr(adam_triton, case.config.optimizer)(params, amsgrad=case.config.amsgrad, **hyperparameters(case), **options)


def _torch(flags: dict):
    def build(params, case):
        cls = getattr(torch.optim, case.config.optimizer)
        return cls(params, amsgrad=case.config.amsgrad, **hyperparameters(case), **flags)

    return build


def _apex(params, case):
    from apex.optimizers import FusedAdam

    return FusedAdam(params, adam_w_mode=case.config.optimizer == "AdamW", **hyperparameters(case))


def _bitsandbytes(params, case):
    import bitsandbytes as bnb

    # optim_bits=32: fp32 moments, the same algorithm as torch's (bitsandbytes' Adam applies
    # weight decay the decoupled way, which is why only AdamW and weight-decay-free Adam,
    # torch's default, are comparable; both are what the cases use).
    return getattr(bnb.optim, case.config.optimizer)(params, optim_bits=32, **hyperparameters(case))


def _torchao(params, case):
    from torchao import optim

    cls = optim.AdamW8bit if case.config.optimizer == "AdamW" else optim.Adam8bit
    return cls(params, amsgrad=case.config.amsgrad, **hyperparameters(case))


@dataclass(frozen=True)
class Implementation:
    name: str
    build: Callable[[list, Case], torch.optim.Optimizer]
    requires: str | None = None  # module that must import, else the implementation is skipped
    # A peer found at run time: if it cannot build or step on a case, the case is skipped
    # with its error rather than failed (our own code and torch's must work everywhere).
    optional: bool = False
    not_on_cpu: str | None = None  # why it is not timed on CPU
    amsgrad: bool = True
    note: str = ""

    def skip_reason_everywhere(self) -> str | None:
        if self.requires is not None and not _importable(self.requires):
            return f"{self.requires} is not installed"
        return None

    def skip_reason(self, case: Case) -> str | None:
        if reason := self.skip_reason_everywhere():
            return reason
        if self.not_on_cpu and case.device == "cpu":
            return self.not_on_cpu
        if case.config.amsgrad and not self.amsgrad:
            return f"{self.name} has no AMSGrad"
        if case.config.precision and self.name != OURS:
            return f"{case.config.precision} is an adam_triton option"
        return None


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


IMPLEMENTATIONS = {
    impl.name: impl
    for impl in (
        Implementation(OURS, _ours),
        Implementation("torch-fused", _torch({"fused": True})),
        Implementation("torch-foreach", _torch({"foreach": True})),
        Implementation("torch-forloop", _torch({"foreach": False})),
        Implementation(
            "apex-fused", _apex, requires="apex.optimizers", optional=True, amsgrad=False,
            not_on_cpu="apex FusedAdam runs on CUDA only",
            note="fp32 moments for bf16 parameters",
        ),
        Implementation(
            "bnb-32bit", _bitsandbytes, requires="bitsandbytes", optional=True, amsgrad=False,
            note="fp32 moments for bf16 parameters",
        ),
        Implementation(
            "torchao-8bit", _torchao, requires="torchao.optim", optional=True,
            # Measured with torchao 0.18 and torch 2.13 on the 2-core CPU machine: 20-45 s per
            # step on 1,000 tensors (a compiled function called per tensor), after a minute of
            # compiling; minutes per case would make the CPU suite impractical.
            not_on_cpu="torchao's 8-bit Adam takes 20-45 s per CPU step on 1,000 tensors (per-tensor compiled calls)",
            note="8-bit block-quantized moments: a different algorithm, fewer bytes",
        ),
    )
}

PEERS = [name for name in IMPLEMENTATIONS if name != OURS]
