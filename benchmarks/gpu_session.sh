#!/usr/bin/env bash
# What a session lent a GPU runs there, in few calls (a lent machine gives a session about
# 30 minutes in all, at most 10 per command; see benchmarks/NOTES.md, "On a lent GPU").
#
#   bash benchmarks/gpu_session.sh tests [PYTEST ARGS]   the tests that need the GPU
#   bash benchmarks/gpu_session.sh bench [PYTEST ARGS]   the benchmark suite's CUDA cases
#
# Run from the repository root. Everything it writes goes under $OUT (the device tool's
# folder that comes back; benchmarks/results/gpu-session here when unset). The machine's
# copy of the tree has no git metadata: name the commit in ADAM_TRITON_COMMIT. Packages its
# image lacks (expecttest, for torch's optimizer test database) travel as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?"usage: $0 tests|bench [pytest args]"}
shift
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    echo "phase: $phase, commit: ${ADAM_TRITON_COMMIT:-unnamed}, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| devices', torch.cuda.device_count())"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1
    # Every CUDA step uploads its small tables through pinned host memory.
    "$PYTHON" -c "import torch; torch.empty(8, pin_memory=True); print('pinned memory: ok')" 2>&1
} > "$OUT/$phase-machine.txt" 2>&1
cat "$OUT/$phase-machine.txt"

case "$phase" in
    tests)
        # The tests that need the GPU's compiled kernel: the cuda-triton target of every
        # parametrized test, the sync and CUDA-graph checks, the README's CUDA examples, the
        # kernel's compiles (a second call with `-k cuda-torch` runs the pure-PyTorch backend
        # on CUDA). The CPU targets and the interpreter (which the suite would re-run in a
        # process of its own here) are CI's, and the whole suite takes longer than one
        # command may (about 13 minutes on 2 CPU cores). The packaging tests need the git
        # checkout this copy lacks. Leaves a minute of the command's 10 for the transfers;
        # stops after 25 failures, with their tracebacks in the log.
        timeout 540 "$PYTHON" -m pytest tests -q -p no:cacheprovider -rs --maxfail=25 \
            --ignore=tests/test_interpreter_on_gpu_machines.py --ignore=tests/test_packaging.py \
            -k "cuda-triton or cuda_graph or synchronise or readme or compiles" \
            --junitxml="$OUT/tests-junit.xml" "$@" 2>&1 | tee "$OUT/tests.log"
        ;;
    bench)
        timeout 540 "$PYTHON" -m pytest benchmarks --bench-device=cuda -q -p no:cacheprovider \
            --benchmark-json="$OUT/cuda.json" "$@" 2>&1 | tee "$OUT/bench.log"
        # The report needs no GPU: make it from cuda.json once it is back (fewer files to return).
        ;;
    *)
        echo "unknown phase: $phase (tests or bench)" >&2
        exit 2
        ;;
esac
