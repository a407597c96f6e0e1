"""How far bfloat16 moments (``state_dtype=torch.bfloat16``) stray from float32 ones.

Rounding the second moment to bfloat16 every step loses any change smaller than half a
bfloat16 unit (2**-9 to 2**-8 of the value). With beta2 = 0.999 one step's decay is about
2**-10 of it, so the decay always rounds away, while a large enough g**2 still pushes it up: the moment
ratchets upward, and the update shrinks (at beta2 = 0.99 the decay, 2**-6.6, survives). This measures it on the CPU backend, against
torch's fused AdamW on a float32 copy fed the same gradients:

* phase 1, normal(0, 1) gradients: the mean of exp_avg_sq over the float32 reference's,
  and the distance travelled from the same start, for adam_triton with float32 masters and
  bfloat16 states, and for stock torch on a bfloat16 parameter (whose states are bfloat16
  too);
* phase 2, the gradients shrink to a tenth: the float32 moment decays toward 0.01, and the
  bfloat16 one does not.

    python -m benchmarks.experiments.bf16_state_drift [STEPS] [BETA2]
"""

import sys

import torch

import adam_triton

ELEMENTS = 4096
LR = 1e-4


def mean_ratio(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return (ours.double().mean() / reference.double().mean()).item()


def main(steps: int, beta2: float) -> None:
    bf16 = torch.bfloat16
    ours_param = torch.nn.Parameter(torch.zeros(ELEMENTS, dtype=bf16))
    torch_bf16_param = torch.nn.Parameter(torch.zeros(ELEMENTS, dtype=bf16))
    reference_param = torch.nn.Parameter(torch.zeros(ELEMENTS))
    hyper = dict(lr=LR, betas=(0.9, beta2), weight_decay=0.0)
    ours = adam_triton.AdamW([ours_param], master_weights=True, state_dtype=bf16, **hyper)
    torch_bf16 = torch.optim.AdamW([torch_bf16_param], fused=True, **hyper)
    reference = torch.optim.AdamW([reference_param], fused=True, **hyper)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}; {ELEMENTS} elements, lr {LR}, betas (0.9, {beta2}), gradients normal(0, scale)")
    print("step  scale  exp_avg_sq mean / float32's: adam_triton  torch-bf16 | float32's | distance moved / float32's")
    checkpoints = {steps // 4, steps // 2, steps, steps + steps // 2, 2 * steps}
    for step in range(1, 2 * steps + 1):
        scale = 1.0 if step <= steps else 0.1
        grad = (scale * torch.randn(ELEMENTS, generator=generator)).to(bf16)
        ours_param.grad, torch_bf16_param.grad, reference_param.grad = grad.clone(), grad.clone(), grad.float()
        ours.step()
        torch_bf16.step()
        reference.step()
        if step in checkpoints:
            reference_v = reference.state[reference_param]["exp_avg_sq"]
            moved = mean_ratio(ours.state[ours_param]["master_param"].abs(), reference_param.detach().abs())
            print(
                f"{step:5}  {scale:5}  {mean_ratio(ours.state[ours_param]['exp_avg_sq'], reference_v):24.3f}"
                f"  {mean_ratio(torch_bf16.state[torch_bf16_param]['exp_avg_sq'], reference_v):10.3f}"
                f" | {reference_v.double().mean().item():9.4f} | {moved:.3f}"
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000, float(sys.argv[2]) if len(sys.argv) > 2 else 0.999)
