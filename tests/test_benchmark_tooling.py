"""The benchmark suite's own logic (byte model, case matrix, summary, report), without
timing anything: benchmark timings are never asserted."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed

import adam_triton  # noqa: E402
from benchmarks.byte_model import bytes_per_parameter, bytes_per_step, working_set_bytes  # noqa: E402
from benchmarks.cases import DEFAULT_CONFIGS, FULL_CONFIGS, select_cases, shape_sets  # noqa: E402
from benchmarks import machine  # noqa: E402
from benchmarks.machine import machine_slug  # noqa: E402
from benchmarks.summary import summarize  # noqa: E402
from benchmarks.timing import RoundsPolicy  # noqa: E402


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ((4, 4, 4, 2), 28),  # fp32 Adam/AdamW
        ((4, 4, 4, 3), 36),  # + AMSGrad
        ((2, 2, 2, 2), 14),  # all bf16
        ((2, 2, 2, 3), 18),  # all bf16 + AMSGrad
        ((2, 2, 4, 2, 4), 28),  # bf16 p and g, fp32 master and moments
        ((2, 2, 2, 2, 4), 20),  # bf16 p, g and moments, fp32 master
    ],
)
def test_byte_model_table(sizes, expected):
    assert bytes_per_parameter(*sizes) == expected


@pytest.mark.parametrize("make", ["torch", "adam_triton"])
@pytest.mark.parametrize("dtype, amsgrad, expected", [(torch.float32, False, 28), (torch.float32, True, 36),
                                                      (torch.bfloat16, False, 14), (torch.bfloat16, True, 18)])
def test_bytes_counted_from_the_optimizers_tensors(make, dtype, amsgrad, expected):
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in [(33, 7), (5,), (1000,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    cls = torch.optim.AdamW if make == "torch" else adam_triton.AdamW
    optimizer = cls(params, amsgrad=amsgrad)
    optimizer.step()
    count = sum(p.numel() for p in params)
    assert bytes_per_step(optimizer, params) == expected * count
    # Each tensor once: parameter, gradient, and 2 or 3 moments.
    assert working_set_bytes(optimizer, params) == (4 + amsgrad) * count * params[0].element_size()


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(master_weights=True), 28),  # read g 2 + master 4 + m 4 + v 4; write master, m, v, p 2
        (dict(master_weights=True, state_dtype=torch.bfloat16), 20),
        (dict(stochastic_rounding=True), 14),
    ],
)
def test_bytes_of_adam_tritons_bfloat16_options(options, expected):
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.bfloat16)) for shape in [(33, 7), (1000,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = adam_triton.AdamW(params, **options)
    optimizer.step()
    assert bytes_per_step(optimizer, params) == expected * sum(p.numel() for p in params)


def test_bytes_skip_parameters_without_gradients():
    params = [torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))]
    params[0].grad = torch.randn(10)
    optimizer = torch.optim.AdamW(params)
    optimizer.step()
    assert bytes_per_step(optimizer, params) == 28 * 10


def test_case_matrix():
    for device in ("cpu", "cuda"):
        cases = select_cases((device,))
        lists = shape_sets(device)
        several = [name for name, shapes in lists.items() if len(shapes) > 1]
        grouped = [config for config in DEFAULT_CONFIGS if config.groups]
        assert len(cases) == (len(DEFAULT_CONFIGS) - len(grouped)) * len(lists) + len(grouped) * len(several)
        assert sorted(c.shapes_name for c in cases if c.config.groups) == sorted(several)
        assert len({c.name for c in cases}) == len(cases)
        assert len(select_cases((device,), full_matrix=True)) == len(FULL_CONFIGS) * len(shape_sets(device))
    cpu, cuda = shape_sets("cpu"), shape_sets("cuda")
    assert len(cuda["gpt2-small-148"]) == len(cpu["gpt2-narrow-148"]) == 148
    assert sum(torch.Size(s).numel() for s in cuda["gpt2-small-148"]) == 124_439_808
    assert len(cpu["resnet50-161"]) == 161
    assert sum(torch.Size(s).numel() for s in cpu["resnet50-161"]) == 25_557_032
    assert cuda["flat-256M"] == [(256 * 2**20,)] and cpu["flat-16M"] == [(16 * 2**20,)]
    assert len(cpu["small-2000x8000"]) == 2000 and len(cpu["small-1000x8192"]) == 1000
    assert sum(torch.Size(s).numel() for s in cpu["mlp-4"]) == 385  # the README's model
    assert sum(torch.Size(s).numel() for s in cuda["mlp-mnist-6"]) == 669_706


def test_rounds_policy_bounds():
    policy = RoundsPolicy(budget_s=2.0, min_rounds=5, max_rounds=25, warmup_rounds=1)
    assert policy.rounds(3.0) == 5  # slow peers: the minimum
    assert policy.rounds(0.001) == 25  # fast steps: the maximum
    assert policy.rounds(0.2) == 10


def test_machine_slug():
    assert machine_slug("cpu", "AMD EPYC") == "cpu-amd-epyc"
    assert machine_slug("cuda", "NVIDIA H200") == "cuda-h200"
    assert machine_slug("cpu", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == "cpu-intel-xeon-platinum-8375c"


def _bench(case, shapes, implementation, median_s, grads="fresh", parameters=16_000_000, tensors=2000):
    bytes_per_step = 28 * parameters
    return {
        "stats": {"median": median_s, "iqr": 0.0, "min": median_s, "rounds": 5},
        "extra_info": {
            "kind": "step", "case": case, "device": "cpu", "shapes": shapes, "config": f"fp32-AdamW-{grads}",
            "dtype": "float32", "optimizer": "AdamW", "amsgrad": False, "grads": grads,
            "implementation": implementation, "parameters": parameters, "tensors": tensors,
            "bytes_per_step": bytes_per_step, "bytes_per_parameter": 28.0,
            "copy_gb_per_s": 10.0, "inplace_add_gb_per_s": 14.0,
        },
    }


def _raw():
    case = "cpu-small-2000x8000-fp32-AdamW-fresh"
    return {
        "machine_info": {"device_names": {"cpu": "Test CPU"}, "measured_commit": {"id": "abc", "dirty": False}},
        "datetime": "2026-01-01T00:00:00",
        "benchmarks": [
            _bench(case, "small-2000x8000", "torch-foreach", 0.500),
            _bench(case, "small-2000x8000", "adam_triton", 0.050),
            _bench(case, "small-2000x8000", "torch-fused", 0.200),
            {"stats": {"median": 0.001}, "extra_info": {"kind": "host-overhead", "what": "lookup",
                                                        "case": "small-2000x8000", "tensors": 2000}},
        ],
    }


def test_summary_ratios_and_targets():
    summary = summarize(_raw(), source="raw.json")
    (case,) = summary["cases"]
    assert list(case["results"]) == ["adam_triton", "torch-fused", "torch-foreach"]  # ours first, then peers
    assert case["ratios"] == pytest.approx({"torch-fused": 0.25, "torch-foreach": 0.1})
    assert case["results"]["adam_triton"]["gb_per_s"] == pytest.approx(28 * 16e6 / 0.05 / 1e9)
    targets = {t["peer"]: t for t in summary["targets"]}
    assert targets["torch-fused"]["limit"] == 0.4 and targets["torch-fused"]["met"] is True
    assert targets["torch-foreach"]["met"] is True
    assert summary["commit"]["id"] == "abc"
    assert summary["host_overheads"][0]["median_ms"] == pytest.approx(1.0)


def test_a_group_per_tensor_case_builds_its_groups_and_stays_out_of_the_targets():
    """The layer-wise case gives every implementation a group per tensor, each with its
    own learning rate; it is reported as its own config, not as the one-group targets' case
    or as the fp32 reference of the precision ratios."""
    from types import SimpleNamespace

    from benchmarks.implementations import IMPLEMENTATIONS
    from benchmarks.workload import prepare

    (config,) = [config for config in DEFAULT_CONFIGS if config.groups == "group-per-tensor"]
    assert config.name == "fp32-AdamW-group-per-tensor-fresh"
    case = SimpleNamespace(device="cpu", config=config, shapes=[(3,), (5, 2), (7,)])  # a Case, but small
    for name in ("adam_triton", "torch-fused"):
        optimizer = prepare(case, IMPLEMENTATIONS[name]).optimizer
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 0.99e-3, 0.99**2 * 1e-3])
        assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1, 1]

    raw = _raw()
    grouped = _bench("cpu-small-2000x8000-fp32-AdamW-group-per-tensor-fresh", "small-2000x8000", "adam_triton", 0.5)
    grouped["extra_info"].update(config="fp32-AdamW-group-per-tensor-fresh", groups="group-per-tensor")
    peer = copy.deepcopy(grouped)
    peer["extra_info"]["implementation"], peer["stats"]["median"] = "torch-fused", 1.0
    raw["benchmarks"] += [grouped, peer]
    summary = summarize(raw)
    assert {c["groups"] for c in summary["cases"]} == {"", "group-per-tensor"}
    assert [t["case"] for t in summary["targets"]] == ["cpu-small-2000x8000-fp32-AdamW-fresh"] * 2


def test_report_writes_markdown_summary_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.report import write

    raw_path = tmp_path / "raw.json"
    raw_path.write_text(json.dumps(_raw()))
    written = {p.name for p in write(raw_path, tmp_path / "out")}
    assert written == {f"cpu-test-{suffix}" for suffix in
                       ("report.md", "summary.json", "step-time.png", "bandwidth.png", "ratios.png")}
    report = (tmp_path / "out" / "cpu-test-report.md").read_text()
    assert "| small-2000x8000 | 16.0M | 2000 | 28 | 50.0 ms, 9.0 GB/s |" in report
    assert "ours <= 0.4x torch-fused | fresh | 0.250 | 0.4 | yes | 0.250 |" in report


def test_the_host_overhead_experiment_runs():
    """The experiment behind idea 13 of benchmarks/NOTES.md stays runnable (2 rounds: its
    numbers mean nothing here). It replaces kernels by no-ops, so it runs in its own process."""
    import subprocess

    pytest.importorskip("triton")  # it times the Triton backend's host work too

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.experiments.host_overhead", "2"],
        cwd=root, capture_output=True, text=True, timeout=300, check=True,
    )
    rows = [line for line in result.stdout.splitlines() if "tensors:" in line]
    assert [row.split()[0] for row in rows] == ["148", "500", "2000"]
    assert all("triton backend kept" in row and "fresh" in row for row in rows)


def test_bf16_state_drift_experiment_runs():
    """The measurement behind the README's note on bfloat16 states stays runnable (a few
    steps: its numbers mean little here); torch's bfloat16 column is read from the same
    gradients, so it agrees with ours rounded to nearest (masters, bfloat16 states)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.experiments.bf16_state_drift", "40"],
        cwd=root, capture_output=True, text=True, timeout=300, check=True,
    )
    rows = [line.split() for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [10, 20, 40, 60, 80]
    for row in rows:  # step, scale, float32-v, then v for masters, masters+sr, sr, torch-bf16, then moved
        assert row[3] == row[6]


@pytest.mark.parametrize("sizes, count", [
    ([16_000_000], 2),  # one tensor, cut in two
    ([8000] * 2000, 2),
    ([5, 17, 1000, 3], 3),  # fewer elements than the alignment in some tensors
    ([1, 4099, 70_000, 33, 65_537, 2], 4),
])
def test_split_list_experiment_shares_cover_every_element_once(sizes, count):
    """The shares of benchmarks/experiments/split_list_cpu.py (idea 14 of benchmarks/NOTES.md):
    every element of every tensor in exactly one share, the shares equal within the alignment,
    and cuts inside a tensor on aligned elements of that tensor."""
    from benchmarks.experiments.split_list_cpu import ALIGNMENT, shares

    runs = shares(sizes, count)
    assert len(runs) == count
    covered = {index: [] for index in range(len(sizes))}
    for run in runs:
        for index, first, end in run:
            assert 0 <= first < end <= sizes[index]
            covered[index].append((first, end))
    for index, pieces in covered.items():
        pieces.sort()
        assert pieces[0][0] == 0 and pieces[-1][1] == sizes[index]
        assert all(a_end == b_first for (_, a_end), (b_first, _) in zip(pieces, pieces[1:]))
        assert all(first % ALIGNMENT == 0 for first, _ in pieces)
    lengths = [sum(end - first for _, first, end in run) for run in runs]
    assert max(lengths) - min(lengths) <= 2 * ALIGNMENT


def test_a_tree_without_git_metadata_records_the_commit_its_sender_names(tmp_path, monkeypatch):
    """A lent GPU machine receives a copy of the tree without .git: results made there must
    still name the commit measured (benchmarks/gpu_session.sh passes it)."""
    monkeypatch.setattr(machine, "REPOSITORY", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("ADAM_TRITON_COMMIT", raising=False)
    assert machine.git_commit() == {"id": None, "dirty": None}
    monkeypatch.setenv("ADAM_TRITON_COMMIT", "0123abc")
    assert machine.git_commit() == {"id": "0123abc", "dirty": None}
    monkeypatch.setattr(machine, "REPOSITORY", Path(__file__).resolve().parents[1])
    if (machine.REPOSITORY / ".git").exists():  # a checkout's own metadata wins
        assert machine.git_commit()["id"] != "0123abc"
