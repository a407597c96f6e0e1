"""The demo's PNG: the two loss curves, and the distribution of optimizer step times."""

from __future__ import annotations

from pathlib import Path

from .comparison import Comparison
from .report import dtype_name, format_seconds

REFERENCE_COLOR, OURS_COLOR = "tab:blue", "tab:orange"


def save_comparison_plot(result: Comparison, path: Path) -> None:
    # The object-oriented API with the Agg canvas, not pyplot: no global backend switch,
    # no window, and nothing changed for a caller who uses pyplot themselves.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    losses, times = figure.subplots(1, 2)
    settings = result.settings

    steps = range(1, len(result.reference.losses) + 1)
    losses.plot(
        steps,
        result.reference.losses,
        color=REFERENCE_COLOR,
        linewidth=2.5,
        alpha=0.6,
        label=f"{result.reference.label} ({result.reference_implementation})",
    )
    losses.plot(
        steps,
        result.ours.losses,
        color=OURS_COLOR,
        linewidth=1,
        linestyle="--",
        label=f"{result.ours.label} ({result.our_implementation})",
    )
    losses.axhline(result.loss_floor, color="gray", linestyle=":", label="best possible loss on this data")
    losses.set(
        xlabel="step",
        ylabel="training loss",
        title=f"Loss: the same curve from both optimizers\nlargest parameter difference at the end: "
        f"{result.largest_parameter_difference:.2g}",
    )
    losses.legend()

    reference_ms = [s * 1e3 for s in result.reference.timed_step_seconds]
    ours_ms = [s * 1e3 for s in result.ours.timed_step_seconds]
    low, high = min(reference_ms + ours_ms), max(reference_ms + ours_ms)
    bins = _log_bins(low, high) if high > 10 * low else 40
    times.hist(reference_ms, bins=bins, color=REFERENCE_COLOR, alpha=0.6, label=result.reference.label)
    times.hist(ours_ms, bins=bins, color=OURS_COLOR, alpha=0.6, label=result.ours.label)
    if high > 10 * low:
        times.set_xscale("log")
    for run, color in ((result.reference, REFERENCE_COLOR), (result.ours, OURS_COLOR)):
        median = run.median_step_seconds
        times.axvline(median * 1e3, color=color, linestyle="--", label=f"median {format_seconds(median)}")
    times.set(
        xlabel="optimizer step time (ms)",
        ylabel="steps",
        title=f"Optimizer step: {result.speedup:.2f}x faster (median)",
    )
    times.legend()

    figure.suptitle(
        f"adam-triton demo: {result.parameter_count:,} parameters, {dtype_name(settings.dtype)} on {settings.device}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _log_bins(low: float, high: float, count: int = 40) -> list[float]:
    ratio = (high / low) ** (1 / count)
    return [low * ratio**index for index in range(count + 1)]
