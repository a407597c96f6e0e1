"""The byte model: the memory traffic an optimizer step cannot avoid.

Adam is memory-bound, so a step's floor is the bytes it must move divided by the memory
bandwidth. Per parameter, a step reads the gradient, reads and writes the parameter and
reads and writes every elementwise state (exp_avg, exp_avg_sq, and max_exp_avg_sq with
AMSGrad). With fp32 everything that is 4 + 2*4 + 2*2*4 = 28 bytes (36 with AMSGrad); with
bf16 parameters, gradients and states 14 (18). See /work/shared/FIELD-NOTES.md for the table.

The bytes are counted from each optimizer's own tensors after a step, not assumed, because
peers keep states in different dtypes (apex FusedAdam and bitsandbytes keep fp32 moments
for bf16 parameters: 22 bytes per parameter; torchao's 8-bit states are one byte plus a
scale per block). Counting is of logical elements: padding is not traffic the step needs.
"""

from __future__ import annotations

import torch

# Inner tensors of quantized state subclasses that are lookup tables shared by every
# element, read from cache, not streamed (torchao's OptimState8bit/4bit "qmap").
_TABLE_ATTRIBUTES = frozenset({"qmap"})


def bytes_per_parameter(param: int, grad: int, state: int, states: int, master: int = 0) -> int:
    """Bytes moved per parameter, from element sizes in bytes.

    ``states`` elementwise states of ``state`` bytes are each read and written; a master
    copy of ``master`` bytes (0: none) is read and written, and then the parameter is only
    written (the update reads the master), else it is read and written.
    """
    param_traffic = param if master else 2 * param
    return param_traffic + grad + 2 * states * state + 2 * master


def state_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of one state tensor, looking inside quantized tensor subclasses."""
    if type(tensor) is torch.Tensor or isinstance(tensor, torch.nn.Parameter):
        return tensor.numel() * tensor.element_size()
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(state_bytes(getattr(tensor, name)) for name in names if name not in _TABLE_ATTRIBUTES)


def elementwise_states(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's state tensors of ``param`` that hold one value per element."""
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() == param.numel() and v.dim() > 0]


def bytes_per_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Bytes a step of ``optimizer`` must move over ``params`` (those with a gradient)."""
    total = 0
    for param in params:
        if param.grad is None:
            continue
        states = elementwise_states(optimizer, param)
        # With a master copy among the states the update reads the master, and the
        # parameter is only written.
        has_master = "master_param" in optimizer.state.get(param, {})
        total += (1 if has_master else 2) * state_bytes(param) + state_bytes(param.grad)
        total += 2 * sum(state_bytes(s) for s in states)
    return total


def working_set_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Distinct bytes a step touches: each tensor once. Compared with the last-level cache
    to check that repeated steps stream from memory."""
    total = 0
    for param in params:
        if param.grad is None:
            continue
        total += state_bytes(param) + state_bytes(param.grad)
        total += sum(state_bytes(s) for s in elementwise_states(optimizer, param))
    return total
