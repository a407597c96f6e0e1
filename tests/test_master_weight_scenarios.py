"""Random sequences of what users do around steps with ``master_weights=True``, against a
float32 twin: torch's fused AdamW on float32 copies of the bfloat16 model, fed the same
gradients.

With float32 states, the masters are the twin's parameters and the moments are its moments;
the model's bfloat16 parameters are the masters rounded to nearest. Each scenario draws
parameters of awkward sizes, Adam or AdamW, AMSGrad or not, and a sequence of steps with a
few of: gradients dropped, the model's weights edited in place or overwritten (as
``model.load_state_dict`` does), the optimizer replaced by a fresh one loaded from its
checkpoint, a parameter group added late. Weights written outside the optimizer become
the masters at the next step that updates their buffer, except where a written element
still equals its master rounded: it keeps the master (the README's rule). The seed fixes
all of it, so a failure names its seed and replays.
"""

from __future__ import annotations

import io
import os
import random

import pytest
import torch

import adam_triton

SCENARIOS = int(os.environ.get("ADAM_TRITON_SCENARIOS", "16"))
SHAPES = [(1,), (17,), (1023,), (1025,), (7, 13), (3, 5, 11), (33, 31)]
STEPS = 10
BF16 = torch.bfloat16
# The twin takes ours' masters and moments after each comparison, so each step is compared
# from equal state (as in test_random_scenarios.py): one step's float32 rounding, no more.
TOLERANCE = dict(rtol=1e-6, atol=1e-7)


class Scenario:
    def __init__(self, seed: int, target):
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.target = target
        count = self.rng.randint(2, 5)
        self.shapes = [self.rng.choice(SHAPES) for _ in range(count)]
        initial = [torch.randn(shape, generator=self.generator).to(BF16) for shape in self.shapes]
        self.ours = [torch.nn.Parameter(t.to(target.device)) for t in initial]
        self.twin = [torch.nn.Parameter(t.float()) for t in initial]
        self.cls_name = self.rng.choice(["Adam", "AdamW"])
        self.options = dict(
            lr=self.rng.choice([1e-2, 3e-3]), weight_decay=self.rng.choice([0.0, 0.1]), amsgrad=self.rng.random() < 0.3
        )
        # At times the last parameter joins later, in a group of its own.
        self.late_step = self.rng.choice([None, None, 3]) if count > 2 else None
        self.active = count - 1 if self.late_step is not None else count
        self.optimizer = self._ours_optimizer(self.ours[: self.active])
        self.reference = getattr(torch.optim, self.cls_name)(self.twin[: self.active], fused=True, **self.options)

    def _ours_optimizer(self, params):
        cls = getattr(adam_triton, self.cls_name)
        return cls(params, backend=self.target.backend, master_weights=True, **self.options)

    def _master(self, index: int):
        return self.optimizer.state.get(self.ours[index], {}).get("master_param")

    @torch.no_grad()
    def _write_weights(self, index: int, values: torch.Tensor) -> None:
        """Write the model's weights outside the optimizer, and the twin what the masters
        will be: the written values, but the master where an element rounds to it."""
        master = self._master(index)
        written = values.to(BF16)
        expected = written.float()
        if master is not None:
            master = master.cpu()
            expected = torch.where(written == master.to(BF16), master, expected)
        self.ours[index].copy_(written.to(self.target.device))
        self.twin[index].copy_(expected)

    def _reload_optimizer(self) -> None:
        """The user's resume: a fresh optimizer over the same model, loaded from a checkpoint."""
        saved = io.BytesIO()
        torch.save(self.optimizer.state_dict(), saved)
        saved.seek(0)
        groups = [group["params"] for group in self.optimizer.param_groups]
        self.optimizer = self._ours_optimizer(groups[0])
        for params in groups[1:]:
            self.optimizer.add_param_group({"params": params, "lr": 5e-3})
        self.optimizer.load_state_dict(torch.load(saved, weights_only=True))

    def step(self, number: int) -> list[str]:
        done = []
        if number == self.late_step:
            for optimizer, params in ((self.optimizer, self.ours), (self.reference, self.twin)):
                optimizer.add_param_group({"params": [params[-1]], "lr": 5e-3})
            self.active += 1
            done.append("add_param_group")
        with_gradient = [self.rng.random() > 0.15 for _ in range(self.active)]
        action = self.rng.random()
        if action < 0.3:
            index = self.rng.randrange(self.active)
            if action < 0.15:
                self._write_weights(index, self.ours[index].detach().cpu().float() * 0.5)
                done.append(f"edit {index} in place")
            else:
                self._write_weights(index, torch.randn(self.shapes[index], generator=self.generator))
                done.append(f"overwrite {index}")
            # The step must update the written parameter's buffer for the masters to take
            # the weights: give it a gradient (one buffer holds all bfloat16 parameters).
            with_gradient[index] = True
        elif action < 0.45:
            self._reload_optimizer()
            done.append("reload the optimizer from its checkpoint")
        if not any(with_gradient):
            with_gradient[0] = True
        for index in range(self.active):
            gradient = None
            if with_gradient[index]:
                gradient = torch.randn(self.shapes[index], generator=self.generator).to(BF16)
            self.ours[index].grad = None if gradient is None else gradient.to(self.target.device)
            self.twin[index].grad = None if gradient is None else gradient.float()
        done.append(f"step with gradients {with_gradient}")
        self.optimizer.step()
        self.reference.step()
        return done

    @torch.no_grad()
    def check(self, context: str) -> None:
        for index in range(self.active):
            state = self.optimizer.state.get(self.ours[index], {})
            expected = self.reference.state.get(self.twin[index], {})
            assert set(state) - {"master_param", "max_exp_avg_sq"} == set(expected) - {"max_exp_avg_sq"}, context
            if not expected:
                continue
            master = state["master_param"].cpu()
            where = f"{context}; parameter {index}"
            assert torch.equal(self.ours[index].detach().cpu(), master.to(BF16)), f"{where}: not its master rounded"
            torch.testing.assert_close(
                master, self.twin[index].detach(), **TOLERANCE, msg=lambda m, where=where: f"{where}: {m}"
            )
            assert float(state["step"]) == float(expected["step"]), where
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.options["amsgrad"] else ()):
                torch.testing.assert_close(
                    state[key].cpu(), expected[key], **TOLERANCE,
                    msg=lambda m, key=key, where=where: f"{where}, {key}: {m}",
                )
                expected[key].copy_(state[key].cpu())
            self.twin[index].copy_(master)


@pytest.mark.parametrize("seed", range(SCENARIOS))
def test_random_master_weight_scenario_follows_a_float32_twin(target, seed):
    scenario = Scenario(seed, target)
    history = []
    for number in range(STEPS):
        history += scenario.step(number)
        scenario.check(f"seed {seed}, after {history}")
