"""The printed tables: the demo's comparison and the sweep's results."""

from __future__ import annotations

from .comparison import OURS_LABEL, REFERENCE_LABEL, Comparison
from .environment import describe_device, versions
from .settings import Settings
from .sweep import SweepResult, varying
from .training import timing_warmup


def format_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def comparison_table(result: Comparison, plot_path: str | None = None) -> str:
    settings, reference, ours = result.settings, result.reference, result.ours
    size = settings.size
    warmup = timing_warmup(settings.steps)
    left, column = 30, 34
    rows = [
        ("", REFERENCE_LABEL, OURS_LABEL),
        ("implementation", result.reference_implementation, result.our_implementation),
        ("final loss", f"{reference.final_loss:.4f}", f"{ours.final_loss:.4f}"),
        (
            "median optimizer step",
            format_seconds(reference.median_step_seconds),
            format_seconds(ours.median_step_seconds),
        ),
        ("speedup", "", f"{result.speedup:.2f}x"),
    ]
    lines = [
        (
            f"adam-triton demo: {result.parameter_count:,}-parameter transformer ({plural(size.layers, 'layer')}, "
            f"width {size.width}), {settings.steps} steps of {size.batch} x {size.seq_len} tokens, "
            f"{dtype_name(settings.dtype)} on {settings.device}"
        ),
        "",
    ]
    lines += [f"  {name:<{left}}{first:<{column}}{second}".rstrip() for name, first, second in rows]
    lines += [
        (
            f"  {'largest parameter difference':<{left}}{result.largest_parameter_difference:.3g}"
            f"   (largest parameter magnitude {result.largest_parameter:.3g})"
        ),
        "",
        f"  final loss: mean over the last 10 % of steps; best possible on this data {result.loss_floor:.4f}",
        f"  step time: the optimizer step alone, device synchronised before and after, median of steps "
        f"{warmup + 1}-{settings.steps}"
        + (f" (the first {warmup} allocate state and compile kernels)" if warmup else ""),
        f"  device: {describe_device(settings.device)}",
        "  versions: " + ", ".join(f"{name} {version}" for name, version in versions().items()),
    ]
    if plot_path is not None:
        lines.append(f"  plot: {plot_path}")
    return "\n".join(lines)


def sweep_table(result: SweepResult, settings: Settings) -> str:
    points = result.points
    names = varying([point.hyperparameters for point in points])
    finite = [point for point in points if not point.diverged]
    best = min(finite, key=lambda point: point.final_loss) if finite else None
    size = settings.size
    lines = [
        (
            f"adam_triton.AdamW sweep: {size.layers}-layer transformer (width {size.width}), {settings.steps} steps, "
            f"{settings.schedule} schedule, {dtype_name(settings.dtype)} on {settings.device}"
        ),
        "",
        "  " + "".join(f"{name:<14}" for name in names) + "final loss",
    ]
    for point in points:
        values = "".join(f"{_format_value(getattr(point.hyperparameters, name)):<14}" for name in names)
        loss = "diverged" if point.diverged else f"{point.final_loss:.4f}"
        lines.append(f"  {values}{loss}" + ("   <- best" if point is best else ""))
    lines += [
        "",
        f"  final loss: mean over the last 10 % of steps; best possible on this data {result.loss_floor:.4f}",
        "  every setting started from the same initialisation and saw the same batches",
    ]
    return "\n".join(lines)


def _format_value(value) -> str:
    return str(value) if isinstance(value, bool) else f"{value:g}"
