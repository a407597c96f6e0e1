"""The command line: ``python -m adam_triton demo`` and ``python -m adam_triton sweep``.

Every bad value is caught here or turned into a DemoError on its way up, and reported as
one line on stderr with exit status 2 (1 for failures that are not the command line's
fault, such as running out of GPU memory), never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

import adam_triton

from .comparison import compare
from .environment import resolve_device
from .errors import DemoError
from .plot import save_comparison_plot
from .report import comparison_table, sweep_table
from .settings import DTYPES, TORCH_IMPLEMENTATIONS, Hyperparameters, Settings
from .sizes import SIZES, default_size_for
from .sweep import grid, sweep
from .training import SCHEDULES

PROG = "python -m adam_triton"
DEFAULT_PLOT = "adam_triton_demo.png"
DEFAULT_SWEEP_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
HYPER = Hyperparameters()


# -- value checks (argparse turns ArgumentTypeError into "argument --x: message") -----------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def non_negative_number(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def beta(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# -- the parser ------------------------------------------------------------------------------
def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("what to train, and where")
    group.add_argument(
        "--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N or mps (default: auto)"
    )
    group.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="the parameters' dtype; optimizer states take the same dtype, as in torch (default: float32)",
    )
    group.add_argument(
        "--size",
        choices=["auto", *SIZES],
        default="auto",
        help="the model: small (0.4M parameters) on CPU and large (152M) on CUDA by default; "
        "tiny is for quick checks (default: auto)",
    )
    group.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps (default: 300 for small, 200 for large, 20 for tiny)",
    )
    group.add_argument("--batch-size", type=positive_int, default=None, help="sequences per batch (default: 16)")
    group.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of the data and the initial model: the same seed gives the same run (default: 0)",
    )
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning-rate schedule: cosine (5 %% linear warm-up, then cosine decay to 10 %% of "
        "--lr) or constant (default: cosine)",
    )
    group.add_argument(
        "--backend",
        choices=["auto", "triton", "torch"],
        default="auto",
        help="adam_triton's backend: auto is the Triton kernel on CUDA and torch's fused kernel over "
        "the flat buffers elsewhere (default: auto)",
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: 1 when training on the CPU, which keeps step times steady and "
        "avoids threads stalling on each other when other programs share the cores; torch's own choice otherwise)",
    )
    group.add_argument("--no-progress", dest="progress", action="store_false", help="do not draw progress bars")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="adam-triton's command line: a training demo and a hyperparameter sweep.",
    )
    parser.add_argument("--version", action="version", version=f"adam_triton {adam_triton.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()

    demo = commands.add_parser(
        "demo",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a small transformer with torch.optim.AdamW and adam_triton.AdamW and compare them",
        description=(
            "Train a small GPT-style transformer twice from the same initialisation on the same batches\n"
            "(a synthetic language generated here: nothing is downloaded), once with torch.optim.AdamW and\n"
            "once with adam_triton.AdamW, taking turns step by step. Print the final losses, the largest\n"
            "parameter difference and the median optimizer step time of each, and write a PNG with the\n"
            "loss curves and the step-time distributions."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} demo                               # best device present, default size\n"
            f"  {PROG} demo --device cpu --steps 100 --out results/demo.png\n"
            f"  {PROG} demo --dtype bfloat16 --torch-impl fused"
        ),
    )
    hyper = demo.add_argument_group("optimizer (both runs)")
    hyper.add_argument(
        "--lr", type=positive_number, default=HYPER.lr, help=f"peak learning rate (default: {HYPER.lr:g})"
    )
    hyper.add_argument("--beta1", type=beta, default=HYPER.beta1, help=f"default: {HYPER.beta1:g}")
    hyper.add_argument("--beta2", type=beta, default=HYPER.beta2, help=f"default: {HYPER.beta2:g}")
    hyper.add_argument("--eps", type=non_negative_number, default=HYPER.eps, help=f"default: {HYPER.eps:g}")
    hyper.add_argument(
        "--weight-decay",
        type=non_negative_number,
        default=HYPER.weight_decay,
        help=f"decoupled weight decay (default: {HYPER.weight_decay:g})",
    )
    hyper.add_argument("--amsgrad", action="store_true", help="use the AMSGrad variant")
    output = demo.add_argument_group("comparison and output")
    output.add_argument(
        "--torch-impl",
        choices=list(TORCH_IMPLEMENTATIONS),
        default="default",
        help="how torch.optim.AdamW runs: default lets torch choose (foreach on CUDA, for-loop on "
        "CPU), as in your own code (default: default)",
    )
    output.add_argument(
        "--out",
        default=DEFAULT_PLOT,
        help=f"where to write the PNG; a directory gets {DEFAULT_PLOT} inside (default: {DEFAULT_PLOT})",
    )
    demo.set_defaults(run=run_demo)

    sweep = commands.add_parser(
        "sweep",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train the demo's model with adam_triton.AdamW once per hyperparameter setting",
        description=(
            "Train the demo's model with adam_triton.AdamW once for every combination of the values\n"
            "given, from the same initialisation on the same batches, and print each final loss."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} sweep                                  # learning rates {' '.join(f'{v:g}' for v in DEFAULT_SWEEP_LRS)}\n"
            f"  {PROG} sweep --lr 1e-3 3e-3 --beta2 0.95 0.999"
        ),
    )
    grid = sweep.add_argument_group("values to sweep (every combination is trained)")
    grid.add_argument(
        "--lr",
        type=positive_number,
        nargs="+",
        default=DEFAULT_SWEEP_LRS,
        help="peak learning rates (default: %(default)s)",
    )
    grid.add_argument("--beta1", type=beta, nargs="+", default=[HYPER.beta1], help="default: %(default)s")
    grid.add_argument("--beta2", type=beta, nargs="+", default=[HYPER.beta2], help="default: %(default)s")
    grid.add_argument("--eps", type=non_negative_number, nargs="+", default=[HYPER.eps], help="default: %(default)s")
    grid.add_argument(
        "--weight-decay", type=non_negative_number, nargs="+", default=[HYPER.weight_decay], help="default: %(default)s"
    )
    grid.add_argument("--amsgrad", choices=["off", "on", "both"], default="off", help="default: off")
    sweep.set_defaults(run=run_sweep)
    return parser


# -- from options to settings ----------------------------------------------------------------
def settings_from(args: argparse.Namespace) -> Settings:
    device = resolve_device(args.device)
    set_threads(args.threads, device)
    size = default_size_for(device) if args.size == "auto" else SIZES[args.size]
    if args.batch_size is not None:
        size = dataclasses.replace(size, batch=args.batch_size)
    return Settings(
        device=device,
        dtype=DTYPES[args.dtype],
        size=size,
        steps=args.steps or size.steps,
        seed=args.seed,
        schedule=args.schedule,
        backend=args.backend,
        torch_implementation=getattr(args, "torch_impl", "default"),
        progress=args.progress,
    )


CPU_THREADS = 1


def set_threads(requested: int | None, device: torch.device) -> None:
    """Set torch's intra-op threads for this command.

    On a CPU the demo's tensors are small: a second thread gains little, and where another
    program holds a core every parallel operation waits for it (benchmarks/NOTES.md, on a
    busy 2-core machine: a step over 148 tensors took 1.8 s with two threads instead of
    15 to 40 ms).
    """
    if requested is not None:
        torch.set_num_threads(requested)
    elif device.type == "cpu":
        torch.set_num_threads(CPU_THREADS)


def plot_path_from(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", "\\")):
        path = path / DEFAULT_PLOT
    if path.suffix.lower() != ".png":
        raise DemoError(f"--out {text!r}: the plot is a PNG, so the file name must end in .png")
    if path.exists() and not path.is_file():
        raise DemoError(f"--out {text!r} exists and is not a file")
    # Checked now rather than after training: the nearest folder that exists must be writable.
    existing = path.parent.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise DemoError(f"--out {text!r}: cannot write into {str(existing)!r}")
    return path


def require(*modules: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise DemoError(
            f"the demo needs {' and '.join(missing)}: pip install 'adam-triton[demo]' "
            f"(or pip install {' '.join(missing)})",
            exit_code=1,
        )


def run_demo(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    plot_path = plot_path_from(args.out)
    require("tqdm", "matplotlib")
    hyper = Hyperparameters(
        lr=args.lr,
        beta1=args.beta1,
        beta2=args.beta2,
        eps=args.eps,
        weight_decay=args.weight_decay,
        amsgrad=args.amsgrad,
    )
    result = compare(settings, hyper)
    try:
        save_comparison_plot(result, plot_path)
    except OSError as error:
        print(comparison_table(result))
        raise DemoError(
            f"could not write the plot to {str(plot_path)!r}: {error.strerror or error}", exit_code=1
        ) from None
    print(comparison_table(result, str(plot_path)))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    require("tqdm")
    amsgrad = {"off": [False], "on": [True], "both": [False, True]}[args.amsgrad]
    points = grid(
        lr=args.lr, beta1=args.beta1, beta2=args.beta2, eps=args.eps, weight_decay=args.weight_decay, amsgrad=amsgrad
    )
    print(sweep_table(sweep(settings, points), settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad option exits here: usage, one-line message, status 2
    try:
        return args.run(args)
    except DemoError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except torch.cuda.OutOfMemoryError:
        print(
            f"{PROG} {args.command}: error: out of GPU memory; try --size small or a smaller --batch-size",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
