"""One case made ready to time: parameters, gradients, an optimizer with state, and the
call that one timed round runs."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable

import torch

from .cases import LAYERWISE_DECAY, Case
from .implementations import Implementation, hyperparameters
from .timing import synchronize, synchronized


@dataclass
class Workload:
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]  # one optimizer step, synchronised with the device
    setup: Callable[[], None] | None  # run before each round, untimed: fresh gradients


def _random(shape, case: Case, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=case.device, dtype=case.config.dtype)


def _zero_grad_keeping_tensors(optimizer: torch.optim.Optimizer, params: list) -> None:
    """``zero_grad(set_to_none=False)``; apex's ``zero_grad`` takes no argument, so zero by hand."""
    try:
        optimizer.zero_grad(set_to_none=False)
    except TypeError:
        for param in params:
            param.grad.zero_()


def param_groups(params: list, case: Case) -> list:
    """What the optimizer is built with: the parameters, or a group per tensor with its
    own learning rate (``cases.GROUPINGS``)."""
    if not case.config.groups:
        return params
    lr = hyperparameters(case)["lr"]
    return [{"params": [param], "lr": lr * LAYERWISE_DECAY**index} for index, param in enumerate(params)]


def prepare(case: Case, implementation: Implementation) -> Workload:
    """Build the case for ``implementation`` and take one step, so that state exists (and
    kernels are compiled) before anything is timed."""
    device = torch.device(case.device)
    generator = torch.Generator(device).manual_seed(0)
    params = [torch.nn.Parameter(_random(shape, case, generator)) for shape in case.shapes]
    # Two sets of gradients, alternated in "fresh" mode: new tensor objects every step, as
    # autograd makes after zero_grad(), without timing their allocation and filling.
    pool = [[_random(shape, case, generator) for shape in case.shapes] for _ in range(2)]
    for param, grad in zip(params, pool[0]):
        param.grad = grad
    optimizer = implementation.build(param_groups(params, case), case)
    optimizer.step()
    synchronize(device)

    if case.config.grads == "kept":
        # The same gradient tensors every step, as after zero_grad(set_to_none=False) and
        # backward (for adam_triton: views of its flat gradient buffer).
        _zero_grad_keeping_tensors(optimizer, params)
        for param, grad in zip(params, pool[1]):
            param.grad.copy_(grad)
        del pool
        setup = None
    else:
        turn = [0]

        def setup():
            turn[0] ^= 1
            for param, grad in zip(params, pool[turn[0]]):
                param.grad = grad

    synchronize(device)
    return Workload(params, optimizer, synchronized(optimizer.step, device), setup)


def release(device_type: str) -> None:
    """Give a finished case's memory back (up to several GB on GPU) before the next is built."""
    gc.collect()  # optimizers can hold reference cycles
    if device_type == "cuda":
        torch.cuda.empty_cache()
