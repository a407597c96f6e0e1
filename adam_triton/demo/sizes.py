"""How big the demo's model is, chosen by device.

On a CPU the default must train twice within a couple of minutes on two cores. On a GPU
the model must be large enough that the optimizer step is a visible part of a training
step: adam-triton's gain is on the step, and on a tiny model a GPU spends the step
launching kernels rather than moving bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSize:
    name: str
    vocab: int
    width: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    steps: int  # the default number of training steps at this size


SIZES = {
    # For tests: a few seconds, even through Triton's interpreter.
    "tiny": ModelSize("tiny", vocab=16, width=32, layers=1, heads=2, seq_len=16, batch=8, steps=20),
    # The CPU default: about 0.42M parameters in 30 tensors.
    "small": ModelSize("small", vocab=64, width=128, layers=2, heads=4, seq_len=64, batch=16, steps=300),
    # The GPU default: about 152M parameters in 150 tensors, so an fp32 AdamW step moves
    # about 4 GB (28 bytes per parameter), and per-tensor overheads are visible too.
    "large": ModelSize("large", vocab=64, width=1024, layers=12, heads=16, seq_len=256, batch=16, steps=200),
}


def default_size_for(device: torch.device) -> ModelSize:
    return SIZES["large"] if device.type == "cuda" else SIZES["small"]
