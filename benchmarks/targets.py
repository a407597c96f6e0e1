"""The speed targets of issue 4, as ratios of step times measured in one run.

A ratio is adam_triton's median step time over the peer's on the same case; below 1 is
faster. Targets are evaluated and reported, never asserted: timings on a shared machine
are evidence, not a pass/fail test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    device: str
    shapes: str
    peer: str
    limit: float  # the largest acceptable ours/peer time ratio
    # The config the target is about; it is evaluated for every gradient mode measured.
    dtype: str = "float32"
    optimizer: str = "AdamW"
    amsgrad: bool = False

    @property
    def name(self) -> str:
        return f"{self.device} {self.shapes}: ours <= {self.limit:g}x {self.peer}"

    def matches(self, case: dict) -> bool:
        """The targets are about one param group and the optimizer's own precision."""
        if case.get("precision") or case.get("groups"):
            return False
        return (case["device"], case["shapes"], case["dtype"], case["optimizer"], case["amsgrad"]) == (
            self.device, self.shapes, self.dtype, self.optimizer, self.amsgrad
        )


TARGETS = (
    # CPU (issue 4): flat buffers must not cost on one tensor, and must win on many.
    Target("cpu", "flat-16M", "torch-fused", 1.05),
    Target("cpu", "gpt2-narrow-148", "torch-fused", 1.0),
    Target("cpu", "small-2000x8000", "torch-fused", 0.4),
    Target("cpu", "flat-16M", "torch-foreach", 0.33),
    Target("cpu", "gpt2-narrow-148", "torch-foreach", 0.33),
    Target("cpu", "small-2000x8000", "torch-foreach", 0.33),
)

# GPU (H200) targets are still to be set, from the first GPU run.
OPEN_TARGETS = ("cuda (H200): to be set after the first GPU measurement",)


def evaluate(cases: list[dict]) -> list[dict]:
    """Each target against every matching case of a summary (one row per gradient mode)."""
    rows = []
    for target in TARGETS:
        for case in cases:
            if not target.matches(case):
                continue
            ratio = case["ratios"].get(target.peer)
            fastest = case.get("ratios_of_fastest", {}).get(target.peer)
            rows.append(
                {
                    "target": target.name,
                    "case": case["case"],
                    "grads": case["grads"],
                    "peer": target.peer,
                    "limit": target.limit,
                    "ratio": ratio,
                    "ratio_of_fastest": fastest,
                    "met": None if ratio is None else ratio <= target.limit,
                }
            )
    return rows
