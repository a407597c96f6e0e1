#!/bin/bash
# The sweeps behind the README's "Tuning Adam" section, on the CPU, in the order the README
# quotes them; each command's output is written beside this file.
# Run from the repository root: bash benchmarks/results/sweep/commands.sh
set -e
out=benchmarks/results/sweep
run() {
    name=$1; shift
    { echo "\$ python -m adam_triton sweep $*"; echo "# commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%dT%H:%M:%SZ), load $(cut -d' ' -f1-3 /proc/loadavg)";
      python -m adam_triton sweep --no-progress "$@"; } > "$out/$name.txt" 2>&1
}
run lr-cosine-seed0
run lr-constant-seed0 --schedule constant
run lr-cosine-seed1 --lr 1e-3 3e-3 1e-2 --seed 1
run lr-cosine-seed2 --lr 1e-3 3e-3 1e-2 --seed 2
run long-cosine --lr 3e-3 --steps 1500
run long-constant --lr 3e-3 --steps 1500 --schedule constant
run beta2-seed0 --lr 3e-3 --beta2 0.95 0.98 0.999
run beta2-seed1 --lr 3e-3 --beta2 0.95 0.999 --seed 1
run eps-bfloat16 --lr 3e-3 --dtype bfloat16 --eps 1e-8 1e-6
run weight-decay-seed0 --lr 3e-3 --weight-decay 0 0.01 0.1
run weight-decay-seed1 --lr 3e-3 --weight-decay 0 0.1 --seed 1
run amsgrad --lr 3e-3 --amsgrad both
