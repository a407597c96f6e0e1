"""PNG plots of a summary (``summary.summarize``): step time and bandwidth against
parameter count, and adam_triton's time over each peer's, one panel per config."""

from __future__ import annotations

from pathlib import Path

from .implementations import IMPLEMENTATIONS, OURS

_COLORS = {
    OURS: "#d62728",
    "torch-fused": "#1f77b4",
    "torch-foreach": "#2ca02c",
    "torch-forloop": "#9467bd",
    "apex-fused": "#8c564b",
    "bnb-32bit": "#e377c2",
    "torchao-8bit": "#7f7f7f",
}
_MARKERS = "osD^vP*X"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(axis) -> None:
    """Log scale labelled 20, 50, 100 rather than 2x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _configs(summary: dict) -> list[str]:
    return list(dict.fromkeys(case["config"] for case in summary["cases"]))


def _grid(plt, count: int, title: str):
    columns = min(3, count)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    figure.suptitle(title)
    return figure, list(axes.flat)


def _shape_markers(summary: dict) -> dict[str, str]:
    shapes = list(dict.fromkeys(case["shapes"] for case in summary["cases"]))
    return {name: _MARKERS[i % len(_MARKERS)] for i, name in enumerate(shapes)}


def _scatter(summary: dict, out: Path, metric: str, ylabel: str, title: str, reference=None) -> Path:
    plt = _pyplot()
    configs = _configs(summary)
    figure, axes = _grid(plt, len(configs), title)
    markers = _shape_markers(summary)
    for ax, config in zip(axes, configs):
        cases = [c for c in summary["cases"] if c["config"] == config]
        for case in cases:
            for name, result in case["results"].items():
                ax.scatter(
                    case["parameters"], result[metric], marker=markers[case["shapes"]],
                    color=_COLORS.get(name, "black"), s=70 if name == OURS else 36,
                    edgecolors="black" if name == OURS else "none", zorder=3 if name == OURS else 2,
                )
        if reference:
            for label, value, style in reference(cases):
                ax.axhline(value, color="grey", linestyle=style, linewidth=1)
                ax.text(ax.get_xlim()[0], value, f" {label}", va="bottom", fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v / 1e6:g}M"))
        ax.xaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if str(v)[0] in "125" else ""))
        ax.set_title(config, fontsize=10)
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    implementations = [n for n in IMPLEMENTATIONS if any(n in c["results"] for c in summary["cases"])]
    handles = [plt.Line2D([], [], color=_COLORS[n], marker="o", linestyle="", label=n) for n in implementations]
    handles += [plt.Line2D([], [], color="black", marker=m, linestyle="", label=s, markerfacecolor="none")
                for s, m in markers.items()]
    figure.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 0.96))
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _reference_lines(cases: list[dict]):
    if not cases:
        return []
    first = cases[0]
    lines = [("copy", first["copy_gb_per_s"], "--")]
    if first["device"] == "cpu":
        lines.append(("in-place add", first["inplace_add_gb_per_s"], ":"))
    return lines


def step_time(summary: dict, out: Path) -> Path:
    return _scatter(summary, out, "median_ms", "median step time (ms)", "Optimizer step time (lower is faster)")


def bandwidth(summary: dict, out: Path) -> Path:
    return _scatter(summary, out, "gb_per_s", "GB/s (byte model / median time)",
                    "Achieved bandwidth (higher is better; grey: reference operations)", _reference_lines)


def ratios(summary: dict, out: Path) -> Path:
    """Bars of ours/peer time per case and peer; below the line at 1, adam_triton is faster."""
    plt = _pyplot()
    # Configurations with no peer (adam_triton's own precision options) have no ratio.
    configs = [c for c in _configs(summary) if any(case["ratios"] for case in summary["cases"] if case["config"] == c)]
    if not configs:
        configs = _configs(summary)[:1]
    figure, axes = _grid(plt, len(configs), f"{OURS} step time / peer step time (below 1: {OURS} faster)")
    peers = [n for n in IMPLEMENTATIONS if n != OURS and any(n in c["ratios"] for c in summary["cases"])]
    width = 0.8 / max(1, len(peers))
    for ax, config in zip(axes, configs):
        cases = sorted((c for c in summary["cases"] if c["config"] == config), key=lambda c: c["parameters"])
        for i, peer in enumerate(peers):
            xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(cases))]
            values = [c["ratios"].get(peer, float("nan")) for c in cases]
            # Bars grow from 1 (parity): down where adam_triton is faster, up where slower.
            ax.bar(xs, [v - 1 for v in values], bottom=1, width=width, color=_COLORS.get(peer, "black"), label=peer)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{c['shapes']}\n{c['tensors']} t" for c in cases], fontsize=7, rotation=20)
        ax.set_title(config, fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLORS.get(p, "black"), label=p) for p in peers]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 0.96))
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
