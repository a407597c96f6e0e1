"""What one demo or sweep run is configured with, validated once by the command line."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sizes import ModelSize

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

# How torch.optim.AdamW may be asked to run; "default" lets torch choose, as a user's code does.
TORCH_IMPLEMENTATIONS = {
    "default": {},
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


@dataclass(frozen=True)
class Hyperparameters:
    """AdamW's arguments. The defaults are torch's, except the learning rate, which the
    demo's learning-rate sweep chose for its model (see the README)."""

    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    amsgrad: bool = False

    def optimizer_kwargs(self) -> dict:
        return {
            "lr": self.lr,
            "betas": (self.beta1, self.beta2),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "amsgrad": self.amsgrad,
        }


@dataclass(frozen=True)
class Settings:
    """Everything but the optimizer's hyperparameters."""

    device: torch.device
    dtype: torch.dtype
    size: ModelSize
    steps: int
    seed: int = 0
    schedule: str = "cosine"
    backend: str = "auto"  # adam_triton's backend
    torch_implementation: str = "default"
    progress: bool = True
