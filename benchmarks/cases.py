"""The benchmark matrix: which parameter lists, dtypes and optimizer variants are timed.

A *case* is one device, one parameter list (a shape set) and one *config* (dtype, Adam or
AdamW, AMSGrad or not, how gradients arrive, adam_triton's precision options, how the
parameters are grouped). Every implementation is timed on every case.

The default matrix varies one factor at a time around a core config (fp32 AdamW, no
AMSGrad): the core with both gradient modes, then bf16, AMSGrad and Adam (L2 weight decay)
with fresh gradients, each on every shape set; adam_triton's precision options; and a
group per tensor on every list of several. That keeps the CPU suite within minutes on two
cores, where torch's for-loop takes seconds per step on thousands of tensors;
``--full-matrix`` times the whole cross product (of one group and no precision option).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .shapes import gpt2_small, many_small, numel, resnet50

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

# Gradient modes. "fresh": new gradient tensors before every step, as after zero_grad()
# (set_to_none=True, torch's default) and backward. "kept": the same gradient tensors every
# step, as after zero_grad(set_to_none=False); for adam_triton these are views of its flat
# gradient buffer, which lets its CPU backend update each buffer as one flat tensor.
GRADIENT_MODES = ("fresh", "kept")


def shape_sets(device_type: str) -> dict[str, list[tuple[int, ...]]]:
    """The parameter lists timed on ``device_type``, by name.

    Sizes are per device so that every list's working set (parameters, gradients and
    moments) is several times the last-level cache (32 MiB L3 on the CPU machine measured,
    50 MiB L2 on an H100/H200): repeated steps must stream from memory, not from cache.
    But for one small model per device, whose update takes microseconds: there the host's
    work around it is the step (its bandwidth figures say little).
    """
    if device_type == "cuda":
        return {
            "mlp-mnist-6": [(512, 784), (512,), (512, 512), (512,), (10, 512), (10,)],  # 670K
            "flat-256M": [(256 * 1024 * 1024,)],
            "gpt2-small-148": gpt2_small(),  # 124M parameters
            "resnet50-161": resnet50(),  # 25.6M
            "small-1000x16384": many_small(1000, 16384),
            "small-2000x8000": many_small(2000, 8000),
        }
    return {
        "mlp-4": [(32, 10), (32,), (1, 32), (1,)],  # the README's model: 385 parameters
        "flat-16M": [(16 * 1024 * 1024,)],
        "gpt2-narrow-148": gpt2_small(width=192),  # GPT-2 small's 148 tensors at width 192: 15.2M
        "resnet50-161": resnet50(),
        "small-1000x8192": many_small(1000, 8192),
        # The core issue's CPU target: 16M parameters in 2,000 tensors.
        "small-2000x8000": many_small(2000, 8000),
    }


# adam_triton's precision options (issue 3), timed for adam_triton alone: no peer has them.
PRECISIONS = {
    "": {},
    "master": {"master_weights": True},  # fp32 masters and states: 28 B/param for bf16
    "master-bf16states": {"master_weights": True, "state_dtype": torch.bfloat16},  # 20 B/param
    # The same bytes; the README recommends rounding the bf16 moments at random (more integer work).
    "master-bf16states-sr": {"master_weights": True, "state_dtype": torch.bfloat16, "stochastic_rounding": True},
    "stochastic-rounding": {"stochastic_rounding": True},  # bf16 everything: 14 B/param
}


# How the parameters are grouped. "": one param group. "group-per-tensor": a group per
# tensor with its own learning rate (layer-wise learning-rate decay, 0.99 per tensor), as
# fine-tuning recipes build them: torch's fused AdamW then calls its kernel once per group,
# adam_triton still launches once per buffer (its CPU backend calls torch's kernel per group).
GROUPINGS = ("", "group-per-tensor")
LAYERWISE_DECAY = 0.99


@dataclass(frozen=True)
class Config:
    dtype: torch.dtype
    optimizer: str  # "Adam" or "AdamW"
    amsgrad: bool
    grads: str  # one of GRADIENT_MODES
    precision: str = ""  # a key of PRECISIONS
    groups: str = ""  # one of GROUPINGS

    @property
    def name(self) -> str:
        parts = [DTYPE_NAMES[self.dtype], self.optimizer]
        if self.amsgrad:
            parts.append("amsgrad")
        if self.precision:
            parts.append(self.precision)
        if self.groups:
            parts.append(self.groups)
        parts.append(self.grads)
        return "-".join(parts)


CORE = Config(torch.float32, "AdamW", False, "fresh")

DEFAULT_CONFIGS = (
    CORE,
    Config(torch.float32, "AdamW", False, "kept"),
    Config(torch.bfloat16, "AdamW", False, "fresh"),
    Config(torch.float32, "AdamW", True, "fresh"),
    Config(torch.float32, "Adam", False, "fresh"),
    Config(torch.bfloat16, "AdamW", False, "fresh", "master"),
    Config(torch.bfloat16, "AdamW", False, "fresh", "master-bf16states"),
    Config(torch.bfloat16, "AdamW", False, "fresh", "master-bf16states-sr"),
    Config(torch.bfloat16, "AdamW", False, "fresh", "stochastic-rounding"),
    Config(torch.float32, "AdamW", False, "fresh", groups="group-per-tensor"),
)

FULL_CONFIGS = tuple(
    Config(dtype, optimizer, amsgrad, grads)
    for dtype, optimizer, amsgrad, grads in itertools.product(
        DTYPE_NAMES, ("AdamW", "Adam"), (False, True), GRADIENT_MODES
    )
)


@dataclass(frozen=True)
class Case:
    device: str  # "cpu" or "cuda"
    shapes_name: str
    config: Config

    @property
    def name(self) -> str:
        return f"{self.device}-{self.shapes_name}-{self.config.name}"

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return shape_sets(self.device)[self.shapes_name]

    @property
    def parameters(self) -> int:
        return numel(self.shapes)

    def __str__(self) -> str:  # the pytest id
        return self.name


def select_cases(devices: tuple[str, ...] = ("cpu", "cuda"), full_matrix: bool = False) -> list[Case]:
    """Every config on every parameter list, but groupings on lists of one tensor (the same
    case as one group)."""
    configs = FULL_CONFIGS if full_matrix else DEFAULT_CONFIGS
    return [
        Case(device, shapes_name, config)
        for device in devices
        for config in configs
        for shapes_name, shapes in shape_sets(device).items()
        if not (config.groups and len(shapes) < 2)
    ]
