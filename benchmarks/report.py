"""Benchmark JSON to a Markdown report, PNG plots and a summary JSON, per device measured.

    python -m benchmarks.report RESULTS.json [--out DIR] [--name NAME]

writes, for each device in RESULTS.json, ``NAME-report.md``, ``NAME-summary.json``,
``NAME-step-time.png``, ``NAME-bandwidth.png`` and ``NAME-ratios.png`` into DIR (default:
RESULTS.json's folder). NAME defaults to the device and its model, e.g. ``cpu-amd-epyc``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import plots
from .implementations import IMPLEMENTATIONS, OURS
from .machine import machine_slug
from .summary import load, summarize


def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.0f}K" if n >= 1e4 else str(n)


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _mib(n: int | None) -> str:
    return "unknown" if not n else f"{n / 2**20:.0f} MiB"


def for_device(summary: dict, device: str) -> dict:
    cases = [c for c in summary["cases"] if c["device"] == device]
    names = {c["case"] for c in cases}
    return summary | {
        "cases": cases,
        "targets": [t for t in summary["targets"] if t["case"] in names],
        "precision_ratios": [r for r in summary.get("precision_ratios", []) if r["device"] == device],
    }


def _header(summary: dict, device: str, name: str, source: str) -> list[str]:
    m, commit = summary["machine"], summary["commit"]
    device_name = (m.get("device_names") or {}).get(device, device)
    cache = (m.get("last_level_cache_bytes") or {}).get(device)
    reference = (m.get("reference_bandwidth_gb_per_s") or {}).get(device, {})
    load_start, load_end = m.get("load_average_at_start") or [None], m.get("load_average_at_end") or [None]
    state = "unknown" if commit.get("dirty") is None else ("with uncommitted changes" if commit["dirty"] else "clean")
    lines = [
        f"# Optimizer step benchmarks: {device_name} ({device})",
        "",
        f"- Device: **{device_name}**"
        + (f", {m.get('cpu_count')} CPU cores, torch threads {m.get('torch_threads')}" if device == "cpu" else "")
        + f", last-level cache {_mib(cache)}",
        f"- Software: torch {m.get('torch_version')}, triton {m.get('triton_version')}"
        + (f", CUDA {m.get('cuda_version')}" if device == "cuda" else ""),
        f"- Code measured: commit `{commit.get('id')}` ({state}); run {summary.get('datetime')}",
        f"- Load average (1 min) at start / end of the run: {load_start[0]:.1f} / {load_end[0]:.1f}"
        if load_start[0] is not None and load_end[0] is not None
        else "- Load average: not recorded",
    ]
    if reference:
        lines.append(
            f"- Reference bandwidth in this session: copy {reference['copy']:.1f} GB/s (bytes read + written), "
            f"in-place add {reference['inplace_add']:.1f} GB/s (a += b, 3 x size)"
        )
    missing = [n for n, ok in (m.get("implementations_importable") or {}).items() if not ok]
    if missing:
        lines.append(f"- Not installed here, so not measured: {', '.join(missing)}")
    lines += [
        f"- Raw data: `{source}`; summary: `{name}-summary.json`",
        "",
        "Each cell is the median step time in ms and the bandwidth it implies by the byte model "
        "(bytes the step must move, counted from each optimizer's own tensors: 28 B/parameter for "
        "fp32 Adam, 36 with AMSGrad, 14 for bf16). Ratio columns are "
        f"{OURS}'s median over the peer's, measured in the same run: below 1, {OURS} is faster. "
        "*fresh*: new gradient tensors every step (after `zero_grad()`); *kept*: the same tensors "
        "(after `zero_grad(set_to_none=False)`, for adam_triton views of its flat gradient buffer). "
        "GB/s can exceed the copy reference on CPUs: a copy also reads the lines it writes "
        "(write-allocate), which its byte count does not include; the in-place add is the comparable ceiling.",
        "",
    ]
    return lines


def _targets(summary: dict) -> list[str]:
    if not summary["targets"]:
        return []
    lines = [
        "## Speed targets (issue 4)",
        "",
        "Ratio: medians. Fastest-round ratio: each side's fastest round, a check on how much "
        "other processes moved the medians (not used to judge the target).",
        "",
        "| target | gradients | ratio | limit | met | fastest-round ratio |",
        "|---|---|---|---|---|---|",
    ]
    for t in summary["targets"]:
        ratio = "not measured" if t["ratio"] is None else f"{t['ratio']:.3f}"
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        fastest = "–" if t.get("ratio_of_fastest") is None else f"{t['ratio_of_fastest']:.3f}"
        lines.append(f"| {t['target']} | {t['grads']} | {ratio} | {t['limit']:g} | {met} | {fastest} |")
    return lines + [""]


def _precision(summary: dict) -> list[str]:
    rows = summary.get("precision_ratios") or []
    if not rows:
        return []
    lines = [
        "## bfloat16 options against adam_triton's own fp32 step (issue 3)",
        "",
        "Target (GPU): bf16 parameters with fp32 masters and bf16 states (20 B/param) at least 1.3x "
        "faster than the fp32 step (28 B/param), i.e. a ratio of at most 0.77. On the CPU these "
        "options run torch's fused kernel on float32 working copies (more passes over memory), so CPU ratios say "
        "nothing about the kernel.",
        "",
        "| parameter list | precision | B/param | median | fp32 median | ratio to fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shapes']} | {r['precision']} | {r['bytes_per_parameter']:g} | {_ms(r['median_ms'])} ms | "
            f"{_ms(r['fp32_median_ms'])} ms | {r['ratio_to_fp32']:.2f} |"
        )
    return lines + [""]


def _tables(summary: dict) -> list[str]:
    lines = []
    configs = list(dict.fromkeys(c["config"] for c in summary["cases"]))
    for config in configs:
        cases = [c for c in summary["cases"] if c["config"] == config]
        implementations = [n for n in IMPLEMENTATIONS if any(n in c["results"] for c in cases)]
        peers = [n for n in implementations if n != OURS]
        head = ["parameter list", "parameters", "tensors", "B/param", *implementations, *(f"ours / {p}" for p in peers)]
        lines += [f"## {config}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for case in cases:
            ours = case["results"].get(OURS)
            row = [case["shapes"], _count(case["parameters"]), str(case["tensors"]),
                   f"{(ours or next(iter(case['results'].values())))['bytes_per_parameter']:g}"]
            for name in implementations:
                r = case["results"].get(name)
                row.append("–" if r is None else f"{_ms(r['median_ms'])} ms, {r['gb_per_s']:.1f} GB/s")
            for peer in peers:
                ratio = case["ratios"].get(peer)
                row.append("–" if ratio is None else f"{ratio:.2f}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _host(summary: dict) -> list[str]:
    if not summary["host_overheads"]:
        return []
    lines = ["## Host-side gradient paths (adam_triton, CPU)", "", "| what | parameter list | tensors | median |",
             "|---|---|---|---|"]
    for h in summary["host_overheads"]:
        lines.append(f"| {h['what']} | {h['case']} | {h['tensors']} | {_ms(h['median_ms'])} ms |")
    return lines + [""]


def write(raw_path: Path, out: Path, name: str | None = None) -> list[Path]:
    raw = load(raw_path)
    summary_all = summarize(raw, source=raw_path.name)
    devices = list(dict.fromkeys(c["device"] for c in summary_all["cases"]))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for device in devices:
        summary = for_device(summary_all, device)
        if device != "cpu":
            summary["host_overheads"] = []
        device_name = (summary["machine"].get("device_names") or {}).get(device, device)
        stem = name if name and len(devices) == 1 else (f"{name}-{device}" if name else machine_slug(device, device_name))
        pngs = {
            "step time": plots.step_time(summary, out / f"{stem}-step-time.png"),
            "bandwidth": plots.bandwidth(summary, out / f"{stem}-bandwidth.png"),
            "ours / peer": plots.ratios(summary, out / f"{stem}-ratios.png"),
        }
        lines = _header(summary, device, stem, raw_path.name) + _targets(summary) + _precision(summary)
        lines += [f"![{label}]({path.name})" for label, path in pngs.items()] + [""]
        lines += _tables(summary) + _host(summary)
        report = out / f"{stem}-report.md"
        report.write_text("\n".join(lines))
        summary_path = out / f"{stem}-summary.json"
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        written += [report, summary_path, *pngs.values()]
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, help="output folder (default: the JSON's folder)")
    parser.add_argument("--name", help="file-name stem (default: device and model, e.g. cpu-amd-epyc)")
    args = parser.parse_args(argv)
    for path in write(args.results, args.out or args.results.parent, args.name):
        print(path)


if __name__ == "__main__":
    main()
