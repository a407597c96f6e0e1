"""Random sequences of what users do around steps, ours against torch's optimizer doing
the same to an identical model.

The tests elsewhere take one user action at a time. Bugs hide in their combinations: a
gradient view swapped in one step and handed out again three steps later, a checkpoint
loaded after a group was added, a bucket gradient after a frozen parameter thawed. Each
scenario here draws a model of awkward sizes (mostly float32, at times a float64 or
bfloat16 parameter, which gets a buffer of its own), groups with their own hyperparameters
(floats, or tensors for lr and betas), and a sequence of steps, each with a few of those
actions: gradients assigned, dropped, swapped, clipped or moved into buckets; hyperparameters
edited; parameters re-pointed, frozen, thawed, added late or moved to another group; groups
reordered or taken out; the state offloaded and brought back; checkpoints loaded into new
optimizers, or rolled back in the same one; and, in some scenarios, a GradScaler, with
overflows that skip steps. The seed fixes all of it, so a failure names its seed and
replays. After every step the parameters, the state and the groups must agree with
``torch.optim.Adam``/``AdamW(fused=True)``. torch's fused kernel is the reference because
ours calls it (CPU backend) or follows its order of operations (Triton); the reference
gets contiguous copies of the gradients, as ours makes for itself, because torch 2.13's
CPU fused kernel reads a gradient with other strides in the wrong order.
"""

from __future__ import annotations

import io
import os
import random

import pytest
import torch

import adam_triton

# Each run of the suite plays these many seeds; set the variable higher to search wider.
# When this was written, 300 seeds of 20 steps on the CPU backend and 100 through the
# interpreter found nothing beyond the bug test_user_changes.py names. With the groups'
# restructuring and tensor betas added, 1,000 seeds on the CPU backend and 120 through the
# interpreter found nothing either; an engine that compares only its groups' lengths fails
# 9 of the first 50 seeds (test_user_changes.py's trade between groups catches it always).
SCENARIOS = int(os.environ.get("ADAM_TRITON_SCENARIOS", "16"))
DTYPES = {torch.float32: 8, torch.float64: 1, torch.bfloat16: 1}  # drawn with these weights
SHAPES = [(1,), (4,), (17,), (1023,), (1025,), (7, 13), (3, 5, 11), (2, 1031), (33, 31)]
STEPS = 14
MANY_SMALL, MANY_SMALL_SHARE = 80, 0.25  # tiny tensors, in a group of their own
# After each comparison the reference takes ours' values (parameters and moments), so that
# each step is compared from equal state: last-bit differences do not grow through the
# model's dynamics (they would, at lr 0.1), and the tolerances can be those of one step.
# Ours and torch's fused kernel agree to the last bit on a list of tensors; the CPU
# backend's flat span and the Triton kernel may differ in the last bit or two of a few
# elements. In bfloat16 such a float32 bit can round the other way: one bfloat16 unit.
# A wrong constant or a stale gradient moves whole tensors by a fraction of lr.
TOLERANCE = dict(rtol=1e-6, atol=1e-7)
BFLOAT16_TOLERANCE = dict(rtol=2**-7, atol=1e-6)


class Side:
    """One model's parameters and its optimizer: ours or torch's."""

    def __init__(self, name: str, cls_name: str, backend: str, initial: list):
        self.name, self.cls_name, self.backend = name, cls_name, backend
        self.params = [torch.nn.Parameter(t.clone()) for t in initial]
        self.optimizer = None
        self.scaler = None  # a GradScaler, in scenarios that train with one
        self.fused = None  # with fused=True, GradScaler hands the step its scale

    def make_optimizer(self, groups: list) -> torch.optim.Optimizer:
        if self.name == "ours":
            return getattr(adam_triton, self.cls_name)(groups, backend=self.backend, fused=self.fused)
        # torch's fused kernel, which ours matches to the bit, driven by GradScaler as torch's
        # optimizer with our fused flag is: by default unscaled first, not called on an inf.
        optimizer = getattr(torch.optim, self.cls_name)(groups, fused=True)
        optimizer._step_supports_amp_scaling = bool(self.fused)
        return optimizer


class Scenario:
    def __init__(self, seed: int, target):
        self.seed, self.device = seed, target.device
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.log: list[str] = []
        count = self.rng.randint(3, 7)
        self.shapes = self.rng.sample(SHAPES, count)
        # Mostly float32; a float64 or bfloat16 parameter puts a buffer of its own beside it.
        self.dtypes = self.rng.choices(list(DTYPES), weights=list(DTYPES.values()), k=count)
        # Some scenarios add many tiny float32 tensors in a group of their own, which every
        # backward reaches and no single-parameter action picks: a group of at least
        # ONE_THREAD_MIN_TENSORS with equal step counts, whose fresh gradients the CPU
        # backend updates as a list on one thread, and whose kept ones it updates in one
        # flat span; the only action on them trades two of their gradients. Drawn apart,
        # so that the other seeds' scenarios stay as they were.
        self.regular = count
        many = random.Random(-1 - seed).random() < MANY_SMALL_SHARE
        if many:
            self.shapes += [(1 + i % 9,) for i in range(MANY_SMALL)]
            self.dtypes += [torch.float32] * MANY_SMALL
        initial = [self.randn(shape, dtype) * 0.5 for shape, dtype in zip(self.shapes, self.dtypes)]
        self.mixes = [self.randn(shape, dtype) for shape, dtype in zip(self.shapes, self.dtypes)]
        cls_name = self.rng.choice(["Adam", "AdamW"])
        self.sides = [Side(name, cls_name, target.backend, initial) for name in ("ours", "reference")]
        self.late = self.rng.sample(range(count), self.rng.randint(0, 2))  # added by add_param_group
        early = [i for i in range(count) if i not in self.late]
        self.rng.shuffle(early)
        group_count = self.rng.randint(1, min(3, len(early)))
        groups = [(early[g::group_count], self.hyperparameters()) for g in range(group_count)]
        if many:
            groups.append((list(range(count, len(self.shapes))), self.hyperparameters()))
        scaled = self.rng.random() < 0.25  # mixed-precision style: scaled losses, skipped steps
        # GradScaler goes either way: unscale_ and no step() on an inf, or (ours with
        # fused=True) the scale and the inf check handed to the step.
        fused = True if scaled and self.rng.random() < 0.5 else None
        for side in self.sides:
            side.fused = fused
        for side in self.sides:
            side.optimizer = side.make_optimizer(
                [dict(params=[side.params[i] for i in members], **_own(hyper)) for members, hyper in groups]
            )
            if scaled:
                side.scaler = torch.amp.GradScaler(torch.device(self.device).type, init_scale=2.0**10, growth_interval=3)
        self.snapshot = None  # for a rollback: (step number, each side's saved state)
        self.note(f"{cls_name}, shapes {self.shapes}, groups {groups}, added later {self.late}")
        if scaled:
            self.note(f"  with a GradScaler{', fused=True' if fused else ''}")

    def hyperparameters(self) -> dict:
        choice = self.rng.choice
        lr = choice([1e-3, 3e-2, 0.1])
        betas = (choice([0.9, 0.8, 0.0]), choice([0.999, 0.95, 0.5]))
        return dict(
            # A tensor lr, as torch.compile users keep it so that schedulers edit it in place.
            lr=torch.tensor(lr) if self.rng.random() < 0.2 else lr,
            betas=tuple(map(torch.tensor, betas)) if self.rng.random() < 0.15 else betas,
            eps=choice([1e-8, 1e-3]),
            weight_decay=choice([0.0, 0.01, 0.5]),
            amsgrad=self.rng.random() < 0.3,
            maximize=self.rng.random() < 0.2,
        )

    def note(self, line: str) -> None:
        self.log.append(line)

    def both(self, action) -> None:
        for side in self.sides:
            action(side)

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.device, dtype)

    # -- one step ---------------------------------------------------------------------------

    def step(self, number: int) -> None:
        set_to_none = self.rng.choices([True, False, None], weights=[0.5, 0.35, 0.15])[0]
        if set_to_none is not None:  # None: gradients accumulate across steps
            self.both(lambda side: side.optimizer.zero_grad(set_to_none=set_to_none))
        used = [i for i in range(self.regular) if self.rng.random() < 0.85] + list(range(self.regular, len(self.shapes)))
        x = self.randn(3)
        zeroed = "no zero_grad" if set_to_none is None else f"zero_grad(set_to_none={set_to_none})"
        self.note(f"step {number}: {zeroed}, backward through {used}")
        self.both(lambda side: self.backward(side, used, x))
        self.change_gradients()
        self.change_parameters_or_groups()
        if self.late and self.rng.random() < 0.25:
            self.add_late_parameter()
        # (GradScaler takes no closure, and needs a gradient in the optimizer to check.)
        scaled = self.sides[0].scaler is not None and bool(self.stepped_with_gradients())
        if scaled and self.rng.random() < 0.2:
            self.overflow()
        if self.rng.random() < 0.1:
            self.note(f"  {'unscale_, ' if scaled else ''}clip_grad_norm_(all parameters, 0.5)")
            for side in self.sides:
                if scaled:
                    side.scaler.unscale_(side.optimizer)
                torch.nn.utils.clip_grad_norm_(side.params, 0.5)
        if scaled:
            self.note("  scaler.step(optimizer), scaler.update()")
            for side in self.sides:
                side.scaler.step(side.optimizer)
                side.scaler.update()
            assert self.sides[0].scaler.get_scale() == self.sides[1].scaler.get_scale()
        else:
            with_closure = self.rng.random() < 0.3
            self.note(f"  step({'closure' if with_closure else ''})")
            self.both(lambda side: side.optimizer.step((lambda: None) if with_closure else None))
        self.check(f"step {number}")
        self.maybe_reload(number)
        self.maybe_roll_back(number)

    def backward(self, side: Side, used: list, x: torch.Tensor) -> None:
        terms = [
            ((side.params[i] * self.mixes[i]).sin() * x[i % 3]).sum() + (side.params[i] ** 2).mean()
            for i in used
            if side.params[i].requires_grad
        ]
        if terms:
            loss = sum(terms)
            (loss if side.scaler is None else side.scaler.scale(loss)).backward()

    def stepped_with_gradients(self) -> list[int]:
        """The parameters in the optimizer that have a gradient now."""
        members = {id(p) for group in self.sides[0].optimizer.param_groups for p in group["params"]}
        return [i for i, p in enumerate(self.sides[0].params) if id(p) in members and p.grad is not None]

    def overflow(self) -> None:
        """An inf in one gradient: GradScaler skips the step (nothing updated or counted).
        Only in the optimizer's parameters: zero_grad never clears another's gradient, and
        clipping would spread its inf as NaN into every gradient."""
        present = [i for i in self.stepped_with_gradients() if self.sides[0].params[i].numel()]
        if not present:
            return
        index = self.rng.choice(present)
        self.note(f"  an inf in p[{index}].grad")
        for side in self.sides:
            grad = side.params[index].grad
            grad[(0,) * grad.dim()] = float("inf")

    def change_gradients(self) -> None:
        roll, index = self.rng.random(), self.rng.randrange(self.regular)
        shape = self.shapes[index]
        if roll < 0.15:
            transposed = len(shape) == 2 and self.rng.random() < 0.5
            dtype = self.dtypes[index]
            values = self.randn(shape[::-1], dtype).t() if transposed else self.randn(shape, dtype)
            self.note(f"  p[{index}].grad = {'a transposed' if transposed else 'a'} tensor")
            for side in self.sides:
                side.params[index].grad = values.clone() if side.name == "ours" else values.contiguous()
        elif roll < 0.25:
            self.note(f"  p[{index}].grad = None")
            self.both(lambda side: setattr(side.params[index], "grad", None))
        elif roll < 0.33 and self.sides[0].params[index].grad is not None:
            values = self.randn(shape, self.dtypes[index])
            self.note(f"  p[{index}].grad.data = another tensor")
            self.both(lambda side: setattr(side.params[index].grad, "data", values.clone()))
        elif roll < 0.41:
            self.gradients_into_a_bucket()
        elif roll < 0.46 and len(self.shapes) > self.regular:
            self.trade_small_gradients()

    def trade_small_gradients(self) -> None:
        """Two of the tiny tensors, of one shape, trade gradients: kept ones are views of our
        gradient buffer at each other's place, which the gather must not copy over each other."""
        first = self.rng.randrange(self.regular, len(self.shapes) - 9)
        second = first + 9  # the tiny shapes repeat every 9
        self.note(f"  p[{first}].grad, p[{second}].grad = p[{second}].grad, p[{first}].grad")
        for side in self.sides:
            a, b = side.params[first], side.params[second]
            a.grad, b.grad = b.grad, a.grad

    def add_late_parameter(self) -> None:
        """A parameter joins after training began: through add_param_group, or appended to
        an existing group's list, as progressive unfreezing code does."""
        index = self.late.pop()
        self.snapshot = None  # a checkpoint from before no longer fits the groups
        if self.rng.random() < 0.3:
            group = self.rng.randrange(len(self.sides[0].optimizer.param_groups))
            self.note(f"  param_groups[{group}]['params'].append(p[{index}])")
            self.both(lambda side: side.optimizer.param_groups[group]["params"].append(side.params[index]))
            return
        hyper = self.hyperparameters()
        self.note(f"  add_param_group([{index}], {hyper})")
        self.both(lambda side: side.optimizer.add_param_group(dict(params=[side.params[index]], **_own(hyper))))

    def gradients_into_a_bucket(self) -> None:
        """Gradients as views of one flat tensor someone else owns (DDP's buckets), at
        times off the vector alignment."""
        ours = self.sides[0]
        present = [
            i for i, p in enumerate(ours.params) if p.grad is not None and p.grad.is_contiguous() and p.dtype == torch.float32
        ]
        if not present:
            return
        start = self.rng.choice([0, 0, 3])
        self.note(f"  gradients of {present} moved into a bucket, from element {start}")
        for side in self.sides:
            bucket = torch.empty(start + sum(side.params[i].numel() for i in present), device=self.device)
            offset = start
            for i in present:
                grad = side.params[i].grad
                view = bucket[offset : offset + grad.numel()].view(grad.shape)
                view.copy_(grad)
                side.params[i].grad = view
                offset += grad.numel()

    def change_parameters_or_groups(self) -> None:
        roll, index = self.rng.random(), self.rng.randrange(self.regular)
        if roll < 0.12:
            self.change_hyperparameter()
        elif roll < 0.19:
            self.note(f"  p[{index}].data = a clone")
            self.both(lambda side: setattr(side.params[index], "data", side.params[index].data.clone()))
        elif roll < 0.26:
            flag = not self.sides[0].params[index].requires_grad
            self.note(f"  p[{index}].requires_grad_({flag})")
            self.both(lambda side: side.params[index].requires_grad_(flag))
        elif roll < 0.32 and all(side.params[index] in side.optimizer.state for side in self.sides):
            self.note(f"  state of p[{index}] dropped")
            self.both(lambda side: side.optimizer.state.pop(side.params[index]))
        elif roll < 0.38:
            self.note(f"  p[{index}] halved in place")
            with torch.no_grad():
                self.both(lambda side: side.params[index].mul_(0.5))
        elif roll < 0.44:
            through_data = self.rng.random() < 0.5
            self.note(f"  state offloaded to the CPU and back {'through .data' if through_data else 'by assignment'}")
            self.both(lambda side: self.offload(side, through_data))
        elif roll < 0.56:
            self.restructure_groups()

    def restructure_groups(self) -> None:
        """The groups edited as torch lets users edit them between steps: the list reversed,
        a parameter moved to another group or two groups trading one each (a parameter keeps
        its state and takes its new group's hyperparameters; a trade leaves every group's
        length as it was), or a group taken out. A parameter taken out leaves its state behind
        in torch, where ``state_dict()`` then fails on it: such code drops that state too, and
        the gradient, which no ``zero_grad`` of the optimizer clears any more (one holding an
        injected inf would turn every gradient into NaN at the next clipping)."""
        groups = self.sides[0].optimizer.param_groups
        if len(groups) < 2:
            return
        self.snapshot = None  # a checkpoint from before no longer fits the groups
        roll = self.rng.random()
        source, destination = self.rng.sample(range(len(groups)), 2)
        members = [groups[source]["params"], groups[destination]["params"]]
        # (Into an AMSGrad group from one without, torch raises KeyError on the moment it
        # lacks; ours starts it at zero, as a switch of the group's flag does.)
        amsgrad = [groups[source]["amsgrad"], groups[destination]["amsgrad"]]
        if roll < 0.25:
            self.note("  param_groups reversed")
            self.both(lambda side: side.optimizer.param_groups.reverse())
        elif roll < 0.5 and members[0] and amsgrad[1] <= amsgrad[0]:
            position = self.rng.randrange(len(members[0]))
            index = _positions([members[0][position]], self.sides[0].params)[0]
            self.note(f"  p[{index}] moved from group {source} to the end of group {destination}")
            for side in self.sides:
                moved = side.optimizer.param_groups[source]["params"].pop(position)
                side.optimizer.param_groups[destination]["params"].append(moved)
        elif roll < 0.8 and all(members) and amsgrad[0] == amsgrad[1]:
            positions = [self.rng.randrange(len(m)) for m in members]
            indices = [_positions([m[i]], self.sides[0].params)[0] for m, i in zip(members, positions)]
            self.note(f"  p[{indices[0]}] of group {source} and p[{indices[1]}] of group {destination} trade places")
            for side in self.sides:
                a, b = side.optimizer.param_groups[source]["params"], side.optimizer.param_groups[destination]["params"]
                a[positions[0]], b[positions[1]] = b[positions[1]], a[positions[0]]
        elif roll >= 0.8:
            number = self.rng.randrange(len(groups))
            self.note(f"  group {number} taken out, its parameters' state and gradients dropped")
            for side in self.sides:
                for param in side.optimizer.param_groups.pop(number)["params"]:
                    side.optimizer.state.pop(param, None)
                    param.grad = None

    def offload(self, side: Side, through_data: bool) -> None:
        """Every state tensor moved to the CPU and back, as trainers that free device memory
        between phases do: replaced in its entry, or given new ``.data``."""
        for where in ("cpu", self.device):
            for entry in side.optimizer.state.values():
                for key, value in entry.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    if through_data:
                        value.data = value.data.to(where, copy=True)
                    else:
                        entry[key] = value.to(where, copy=True)

    def change_hyperparameter(self) -> None:
        groups = self.sides[0].optimizer.param_groups
        group = self.rng.randrange(len(groups))
        key = self.rng.choice(["lr", "weight_decay", "betas", "eps", "maximize"])
        value = {
            "lr": self.rng.choice([1e-3, 5e-2]),
            "weight_decay": self.rng.choice([0.0, 0.2]),
            "betas": (0.7, 0.9),
            "eps": 1e-6,
            "maximize": not groups[group]["maximize"],
        }[key]
        if key == "lr" and isinstance(groups[group]["lr"], torch.Tensor):
            self.note(f"  param_groups[{group}]['lr'].fill_({value})")
            self.both(lambda side: side.optimizer.param_groups[group]["lr"].fill_(value))
            return
        if key == "betas" and isinstance(groups[group]["betas"][0], torch.Tensor) and self.rng.random() < 0.5:
            self.note(f"  param_groups[{group}]['betas'] filled in place with {value}")
            for side in self.sides:
                for beta, new in zip(side.optimizer.param_groups[group]["betas"], value):
                    beta.fill_(new)
            return
        self.note(f"  param_groups[{group}][{key!r}] = {value}")
        self.both(lambda side: side.optimizer.param_groups[group].__setitem__(key, value))

    def maybe_reload(self, number: int) -> None:
        """A checkpoint round trip into a new optimizer over the same parameters: ours from
        its own (through torch.save, weights_only), ours from torch's, or torch's from ours."""
        roll = self.rng.random()
        if roll >= 0.25:
            return
        ours, reference = self.sides
        source, into = (reference, ours) if 0.12 <= roll < 0.2 else (ours, reference if roll >= 0.2 else ours)
        self.note(f"  {into.name} reloaded from {source.name}'s state_dict")
        buffer = io.BytesIO()
        torch.save(source.optimizer.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        fresh = into.make_optimizer([dict(params=list(group["params"])) for group in into.optimizer.param_groups])
        fresh.load_state_dict(saved)
        if into is reference:  # ours saves fused=None (it accepts the flag and ignores it)
            for group in fresh.param_groups:
                group["fused"] = True
        into.optimizer = fresh
        self.check(f"reload after step {number}")

    def maybe_roll_back(self, number: int) -> None:
        """Training goes back to an earlier checkpoint in the same optimizer, with the model's
        weights restored in place (as model.load_state_dict does), after a loss spike, say.
        The state between is discarded, also for parameters that had none back then."""
        if self.snapshot is None:
            if self.rng.random() < 0.15:
                self.note("  checkpoint kept for a rollback")
                self.snapshot = (number, [self.saved(side) for side in self.sides])
            return
        if self.rng.random() >= 0.2:
            return
        taken, saved = self.snapshot
        self.snapshot = None
        self.note(f"  rolled back to the checkpoint kept after step {taken}")
        for side, (weights, state) in zip(self.sides, saved):
            with torch.no_grad():
                for param, weight in zip(side.params, weights):
                    param.copy_(weight)
            side.optimizer.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
        self.check(f"rollback after step {number}")

    @staticmethod
    def saved(side: Side) -> tuple:
        """A side's weights and its optimizer's state_dict, serialised: a state_dict holds the
        live state tensors, which later steps would change."""
        buffer = io.BytesIO()
        torch.save(side.optimizer.state_dict(), buffer)
        return [p.detach().clone() for p in side.params], buffer.getvalue()

    # -- the comparison ---------------------------------------------------------------------

    def check(self, when: str) -> None:
        ours, reference = self.sides
        history = "\n".join(self.log)
        for number, (mine, theirs) in enumerate(zip(ours.optimizer.param_groups, reference.optimizer.param_groups, strict=True)):
            for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
                assert _plain(mine[key]) == _plain(theirs[key]), f"seed {self.seed}, {when}, group {number} {key}\n{history}"
            assert _positions(mine["params"], ours.params) == _positions(theirs["params"], reference.params), (
                f"seed {self.seed}, {when}, group {number} params\n{history}"
            )
        for index, (a, b) in enumerate(zip(ours.params, reference.params)):
            where = f"seed {self.seed}, {when}, p[{index}] {tuple(a.shape)} {a.dtype}"
            tolerance = BFLOAT16_TOLERANCE if a.dtype == torch.bfloat16 else TOLERANCE
            torch.testing.assert_close(a.detach(), b.detach(), **tolerance, msg=lambda m: f"{where}: {m}\n{history}")
            ours_state, reference_state = ours.optimizer.state.get(a, {}), reference.optimizer.state.get(b, {})
            assert set(ours_state) == set(reference_state), f"{where}: state keys\n{history}"
            for key, expected in reference_state.items():
                if key == "step":
                    assert float(ours_state[key]) == float(expected), f"{where}: step\n{history}"
                else:
                    torch.testing.assert_close(
                        ours_state[key], expected, **tolerance, msg=lambda m: f"{where}, {key}: {m}\n{history}"
                    )
        with torch.no_grad():
            for a, b in zip(ours.params, reference.params):
                b.copy_(a)
                for key, value in reference.optimizer.state.get(b, {}).items():
                    if key != "step":
                        value.copy_(ours.optimizer.state[a][key])


def _own(hyper: dict) -> dict:
    """Hyperparameters for one side: a tensor lr or betas of its own, which only its optimizer
    edits."""
    def own(value):
        if isinstance(value, tuple):
            return tuple(map(own, value))
        return value.clone() if isinstance(value, torch.Tensor) else value

    return {key: own(value) for key, value in hyper.items()}


def _plain(value):
    """A hyperparameter as a number or tuple of numbers, whether a float or a tensor."""
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value.item() if isinstance(value, torch.Tensor) else value


def _positions(members: list, params: list) -> list:
    """Which of the model's parameters a group holds, in its order."""
    where = {id(p): i for i, p in enumerate(params)}
    return [where[id(p)] for p in members]


@pytest.mark.parametrize("seed", range(SCENARIOS))
def test_random_scenario_trains_like_torch(target, seed):
    scenario = Scenario(seed, target)
    for number in range(STEPS):
        scenario.step(number)
