"""``python -m adam_triton demo`` and ``sweep``: every code path at the tiny size, on the CPU."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import INTERPRETER

from adam_triton.demo import Hyperparameters, Settings, compare, data, grid, sweep
from adam_triton.demo.cli import main
from adam_triton.demo.model import parameter_count
from adam_triton.demo.sizes import SIZES, default_size_for
from adam_triton.demo.sweep import SweepPoint
from adam_triton.demo.training import Run, time_call, timing_warmup

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The command line sets torch's thread count for its process; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny(dtype=torch.float32, steps=12, **options) -> Settings:
    return Settings(CPU, dtype, SIZES["tiny"], steps=steps, progress=False, **options)


# -- the comparison ----------------------------------------------------------------------------
def test_same_start_same_batches_and_torch_fused_gives_identical_runs():
    # On the CPU adam_triton updates its flat buffers with torch's own fused kernel, so
    # against torch's fused AdamW the two runs must agree bit for bit: any difference would
    # mean the demo gave them different models, batches or hyperparameters.
    result = compare(tiny(torch_implementation="fused"))
    assert result.reference_implementation == "fused"
    assert result.largest_parameter_difference == 0.0
    assert result.reference.losses == result.ours.losses
    assert len(result.ours.losses) == 12


def test_against_torch_default_the_runs_agree_to_rounding():
    result = compare(tiny())
    assert result.reference_implementation == "for-loop"  # torch's default on the CPU
    assert "flat buffers" in result.our_implementation
    assert result.reference.losses[0] == result.ours.losses[0]  # same model, same first batch
    assert result.largest_parameter_difference < 1e-3 * result.largest_parameter
    assert result.ours.final_loss == pytest.approx(result.reference.final_loss, rel=1e-5)


def test_float64_agrees_to_float64_rounding():
    result = compare(tiny(torch.float64))
    assert result.ours.model.head.weight.dtype == torch.float64
    assert result.largest_parameter_difference < 1e-10


def test_bfloat16_parameters_and_states():
    result = compare(tiny(torch.bfloat16))
    for run in (result.reference, result.ours):
        assert {p.dtype for p in run.model.parameters()} == {torch.bfloat16}
        state = run.optimizer.state[run.model.head.weight]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert all(math.isfinite(loss) for loss in run.losses)
    assert result.reference.losses[0] == result.ours.losses[0]


@pytest.mark.skipif(not INTERPRETER, reason="needs triton's interpreter (TRITON_INTERPRET=1, set by conftest on CPU)")
def test_triton_backend_through_the_interpreter():
    result = compare(tiny(backend="triton", steps=6))
    assert result.our_implementation == "Triton kernel, flat buffers"
    assert result.largest_parameter_difference < 1e-3 * result.largest_parameter


def test_the_model_learns():
    result = compare(tiny(steps=60), Hyperparameters(lr=1e-2))
    assert result.ours.final_loss < result.ours.losses[0] - 0.3
    assert result.loss_floor < result.ours.final_loss


def test_step_times_leave_out_the_warm_up_steps():
    result = compare(tiny(steps=30))
    for run in (result.reference, result.ours):
        assert len(run.step_seconds) == 30 and all(s > 0 for s in run.step_seconds)
        assert run.timed_step_seconds == run.step_seconds[timing_warmup(30) :]
    assert timing_warmup(30) == 3 and timing_warmup(1000) == 10 and timing_warmup(5) == 0
    assert result.speedup == result.reference.median_step_seconds / result.ours.median_step_seconds


def test_final_loss_is_the_mean_of_the_last_tenth():
    run = Run("r", None, None, None, losses=[9.0] * 18 + [1.0, 3.0])
    assert run.final_loss == 2.0


def test_step_timer_synchronises_the_gpu_inside_the_timed_region(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))
    time_call(lambda: events.append("step"), torch.device("cuda"))
    assert events == ["synchronize", "step", "synchronize"]


# -- data and sizes ----------------------------------------------------------------------------
def test_data_depends_on_the_seed_only():
    first, again, other = (data.generate(16, 3, 4, 8, seed) for seed in (0, 0, 1))
    assert torch.equal(first.tokens, again.tokens) and first.loss_floor == again.loss_floor
    assert not torch.equal(first.tokens, other.tokens)
    assert first.tokens.shape == (3, 4, 9) and 0 <= first.tokens.min() and first.tokens.max() < 16
    assert 0 < first.loss_floor < math.log(16)


def test_gpu_model_is_large_enough_for_the_step_to_matter():
    assert default_size_for(torch.device("cpu")).name == "small"
    large = default_size_for(torch.device("cuda"))
    assert large.name == "large"
    assert parameter_count(large) > 100_000_000  # an fp32 step moves > 2.8 GB
    assert parameter_count(SIZES["small"]) < 1_000_000  # two CPU runs within two minutes


# -- the sweep ---------------------------------------------------------------------------------
def test_grid_is_every_combination():
    points = grid(lr=[1e-3, 3e-3], amsgrad=[False, True])
    assert [(p.lr, p.amsgrad) for p in points] == [(1e-3, False), (1e-3, True), (3e-3, False), (3e-3, True)]
    with pytest.raises(ValueError, match="cannot sweep"):
        grid(momentum=[0.9])


def test_sweep_trains_each_point_from_the_same_start():
    result = sweep(tiny(steps=8), grid(lr=[1e-3, 1e-3, 1e-2]))
    points = result.points
    assert 0 < result.loss_floor < points[0].final_loss
    assert points[0].losses == points[1].losses  # same start, same batches, same settings
    assert points[0].losses[0] == points[2].losses[0]
    assert points[0].losses != points[2].losses
    assert SweepPoint(Hyperparameters(), float("nan"), []).diverged


# -- the command line, in process ---------------------------------------------------------------
def test_demo_command_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--device",
                "cpu",
                "--size",
                "tiny",
                "--steps",
                "6",
                "--no-progress",
                "--out",
                f"{tmp_path}/plots/",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for row in (
        "torch.optim.AdamW",
        "adam_triton.AdamW",
        "final loss",
        "median optimizer step",
        "speedup",
        "largest parameter difference",
        "device: cpu",
        "versions: torch",
    ):
        assert row in out
    plot = tmp_path / "plots" / "adam_triton_demo.png"
    assert f"plot: {plot}" in out
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(plot).shape
    assert width > 1000 and height > 400


@pytest.mark.parametrize("options, expected", [([], "1 thread for torch"), (["--threads", "2"], "2 threads for torch")])
def test_cpu_threads_default_to_one(options, expected, tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--device",
                "cpu",
                "--size",
                "tiny",
                "--steps",
                "3",
                "--no-progress",
                "--out",
                str(tmp_path),
                *options,
            ]
        )
        == 0
    )
    assert expected in capsys.readouterr().out


def test_sweep_command_prints_one_row_per_point(capsys):
    assert (
        main(
            [
                "sweep",
                "--device",
                "cpu",
                "--size",
                "tiny",
                "--steps",
                "6",
                "--no-progress",
                "--lr",
                "1e-3",
                "1e-2",
                "--amsgrad",
                "both",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith(("0.001", "0.01"))]
    assert len(rows) == 4
    assert out.count("<- best") == 1
    assert "best possible on this data" in out


BAD_OPTIONS = [
    (["demo", "--device", "banana"], "not a device name"),
    (["demo", "--device", "meta"], "the demo runs on"),
    (["demo", "--steps", "0"], "argument --steps: must be at least 1"),
    (["demo", "--steps", "ten"], "argument --steps: expected a whole number"),
    (["demo", "--dtype", "float16"], "argument --dtype: invalid choice"),
    (["demo", "--size", "huge"], "argument --size: invalid choice"),
    (["demo", "--lr", "-1"], "argument --lr: must be greater than 0"),
    (["demo", "--lr", "nan"], "argument --lr: expected a finite number"),
    (["demo", "--beta2", "1"], "argument --beta2: must be in [0, 1)"),
    (["demo", "--weight-decay", "-0.1"], "argument --weight-decay: must be 0 or more"),
    (["demo", "--seed", "-3"], "argument --seed: must be between 0"),
    (["demo", "--threads", "0"], "argument --threads: must be at least 1"),
    (["demo", "--out", "plot.jpg"], "must end in .png"),
    (["demo", "--torch-impl", "apex"], "argument --torch-impl: invalid choice"),
    (["sweep", "--lr"], "argument --lr: expected at least one argument"),
    (["sweep", "--amsgrad", "maybe"], "argument --amsgrad: invalid choice"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[" ".join(a) or "no-command" for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_message_and_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        status = main(argv)
        raise SystemExit(status)  # errors found after parsing are returned, not raised
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_out_inside_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    assert main(["demo", "--size", "tiny", "--out", str(tmp_path / "notes.txt" / "plot.png")]) == 2
    assert "cannot write into" in capsys.readouterr().err


def test_triton_backend_on_cpu_without_the_interpreter_is_explained(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert (
        main(["demo", "--size", "tiny", "--steps", "2", "--no-progress", "--backend", "triton", "--device", "cpu"]) == 2
    )
    err = capsys.readouterr().err
    assert "adam_triton.AdamW refused these settings" in err and "TRITON_INTERPRET=1" in err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in (
        "--device",
        "--dtype",
        "--size",
        "--steps",
        "--batch-size",
        "--seed",
        "--schedule",
        "--backend",
        "--no-progress",
        "--lr",
        "--beta1",
        "--beta2",
        "--eps",
        "--weight-decay",
        "--amsgrad",
        "--torch-impl",
        "--out",
    ):
        assert option in help_text


# -- the command line, as a user runs it ---------------------------------------------------------
def _run_module(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "adam_triton", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_message_not_a_traceback():
    result = _run_module("demo", "--device", "cuda", "--size", "tiny")
    assert result.returncode == 2
    assert "python -m adam_triton demo: error: --device 'cuda'" in result.stderr
    assert "use --device cpu" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_module_runs_the_demo_end_to_end(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # as a user runs it
    result = _run_module("demo", "--size", "tiny", "--steps", "5", "--out", str(tmp_path / "demo.png"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "speedup" in result.stdout
    assert "5/5" in result.stderr  # the progress bars
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
