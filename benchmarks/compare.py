"""Side by side: the speed-target ratios of several summaries (runs, machines, thread counts).

    python -m benchmarks.compare A-summary.json B-summary.json ...

Prints one row per target and gradient mode, one column per summary: the median ratio and,
in brackets, the fastest-round ratio. Used to check how stable a run's figures are.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .summary import load


def table(paths: list[Path]) -> str:
    summaries = [load(p) for p in paths]
    keys = list(dict.fromkeys((t["target"], t["grads"]) for s in summaries for t in s["targets"]))
    head = ["target", "gradients", *(p.name.removesuffix("-summary.json") for p in paths)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target, grads in keys:
        row = [target, grads]
        for s in summaries:
            match = [t for t in s["targets"] if (t["target"], t["grads"]) == (target, grads)]
            if not match or match[0]["ratio"] is None:
                row.append("–")
                continue
            t = match[0]
            fastest = t.get("ratio_of_fastest")
            row.append(f"{t['ratio']:.2f}" + ("" if fastest is None else f" ({fastest:.2f})"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table([Path(a) for a in sys.argv[1:]]))
