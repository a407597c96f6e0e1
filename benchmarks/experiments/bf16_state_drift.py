"""How far bfloat16 moments stray from float32 ones, rounded to nearest and at random.

Rounding the second moment to bfloat16 every step loses any change smaller than half a
bfloat16 unit (2**-9 to 2**-8 of the value). With beta2 = 0.999 one step's decay is about
2**-10 of it, so the decay always rounds away, while a large enough g**2 still pushes it up:
the moment ratchets upward, and the update shrinks (at beta2 = 0.99 the decay, 2**-6.6,
survives). Rounded at random (``stochastic_rounding=True``) the decay survives in
expectation. This measures it on the CPU backend, against torch's fused AdamW on a float32
copy fed the same gradients (``v``: the mean of exp_avg_sq over the reference's;
``moved``: the mean distance travelled from the same start over the reference's), for:

* ``masters``: adam_triton with float32 masters and bfloat16 states, rounded to nearest;
* ``masters+sr``: the same, its states rounded at random;
* ``sr``: bfloat16 parameters and states, no masters, all rounded at random (14 B);
* ``torch-bf16``: stock torch on a bfloat16 parameter (its states are bfloat16 too).

Phase 1, normal(0, 1) gradients; phase 2, the gradients shrink to a tenth and the float32
moment (``float32-v``) decays toward 0.01.

    python -m benchmarks.experiments.bf16_state_drift [STEPS] [BETA2]
"""

import sys

import torch

import adam_triton

ELEMENTS = 4096
LR = 1e-4
BF16 = torch.bfloat16
RUNS = {  # adam_triton configurations: name -> precision options
    "masters": dict(master_weights=True, state_dtype=BF16),
    "masters+sr": dict(master_weights=True, state_dtype=BF16, stochastic_rounding=True),
    "sr": dict(stochastic_rounding=True),
}


def mean_ratio(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return (ours.double().mean() / reference.double().mean()).item()


def main(steps: int, beta2: float) -> None:
    hyper = dict(lr=LR, betas=(0.9, beta2), weight_decay=0.0)
    params = {name: torch.nn.Parameter(torch.zeros(ELEMENTS, dtype=BF16)) for name in (*RUNS, "torch-bf16")}
    optimizers = {name: adam_triton.AdamW([params[name]], **options, **hyper) for name, options in RUNS.items()}
    optimizers["torch-bf16"] = torch.optim.AdamW([params["torch-bf16"]], fused=True, **hyper)
    reference_param = torch.nn.Parameter(torch.zeros(ELEMENTS))
    reference = torch.optim.AdamW([reference_param], fused=True, **hyper)
    generator = torch.Generator().manual_seed(0)
    names = list(optimizers)
    print(f"torch {torch.__version__}; {ELEMENTS} elements, lr {LR}, betas (0.9, {beta2}), gradients normal(0, scale)")
    print("step  scale  float32-v  " + " ".join(f"{'v:' + name:>13}" for name in names)
          + "  " + " ".join(f"{'moved:' + name:>16}" for name in names))
    checkpoints = {steps // 4, steps // 2, steps, steps + steps // 2, 2 * steps}
    for step in range(1, 2 * steps + 1):
        scale = 1.0 if step <= steps else 0.1
        grad = (scale * torch.randn(ELEMENTS, generator=generator)).to(BF16)
        for name in names:
            params[name].grad = grad.clone()
            optimizers[name].step()
        reference_param.grad = grad.float()
        reference.step()
        if step in checkpoints:
            reference_v = reference.state[reference_param]["exp_avg_sq"]
            drift, moved = [], []
            for name in names:
                state = optimizers[name].state[params[name]]
                drift.append(mean_ratio(state["exp_avg_sq"], reference_v))
                position = state.get("master_param", params[name].detach())
                moved.append(mean_ratio(position.abs(), reference_param.detach().abs()))
            print(f"{step:5}  {scale:5}  {reference_v.double().mean().item():9.4f}  "
                  + " ".join(f"{value:13.3f}" for value in drift) + "  "
                  + " ".join(f"{value:16.3f}" for value in moved))

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000, float(sys.argv[2]) if len(sys.argv) > 2 else 0.999)
