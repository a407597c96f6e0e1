"""Parameters that adam-triton updates where they are, instead of in its flat buffer.

adam-triton normally moves every parameter into its flat buffer ("re-homes" it). Three kinds
of parameters must stay where they are, because someone else reads them there:

* DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism). This rank's values are
  the local shard, and FSDP2 all-gathers from the padded storage it allocated when it
  sharded the model (``FSDPParam._sharded_param_data``), not from ``param.data``: a shard
  moved into our buffer would never be gathered again.
* a parameter whose ``.data`` was re-pointed after the optimizer was built, to storage on
  the same device and dtype that someone else holds too: they read it there
  (``ZeroRedundancyOptimizer`` with ``parameters_as_bucket_view=True`` broadcasts from its
  buckets). Storage that only the parameter holds (``p.data = new_tensor``, as
  ``torch.nn.utils.prune.remove`` does) is nobody else's to read, so the parameter is
  re-homed: otherwise its segment of the flat buffer would sit unused beside it. So is a
  parameter moved to another device or dtype (``model.to``, ``model.double()``).
* a CPU parameter in shared memory (``model.share_memory()``, or one that another process
  sent): the other processes read and write it there (Hogwild training, as in PyTorch's
  multiprocessing examples). Moved into our buffer, this process would train a private copy.

Their moments and step counters stay in the flat buffers and the whole buffer is still one
update; only the parameter values are read and written in place. For DTensor parameters
``optimizer.state[p]`` holds DTensors (views of the flat buffers wrapped with the
parameter's mesh and placements), as torch's optimizer has, which is what
``torch.distributed.checkpoint`` expects.
"""

from __future__ import annotations

import sys

import torch


def _dtensor_class():
    # Importing torch.distributed.tensor costs ~0.8 s; until someone has, nothing is a DTensor.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


#: How many references a storage has (None where this torch cannot tell; torch's CUDA graph
#: trees count a storage's users so).
STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def held_elsewhere(values: torch.Tensor) -> bool:
    """Whether anything but this tensor holds its storage (a wrapper's bucket, a tensor the
    user kept); True where torch cannot tell."""
    if STORAGE_USE_COUNT is None:
        return True
    # The tensor holds one reference, and the storage's Python object (one per storage,
    # whoever asks for it) another.
    return STORAGE_USE_COUNT(values.untyped_storage()._cdata) > 2


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding this rank's values of ``tensor`` (``tensor`` unless a DTensor).

    ``_local_tensor`` rather than ``to_local()``: the latter records an autograd view when
    grad mode is on, and this is the very tensor FSDP2 itself updates and reads.
    """
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def in_shared_memory(param: torch.Tensor) -> bool:
    """A CPU parameter in shared memory. (``is_shared()`` is always true of CUDA tensors, which
    other processes reach only through explicit IPC handles, so those are re-homed.)"""
    values = local(param)
    return values.device.type == "cpu" and values.is_shared()


def local_grad(param: torch.Tensor):
    """``param.grad`` as a plain tensor laid out like ``local(param)``, or None."""
    grad = param.grad
    if grad is None or not is_dtensor(grad):
        return grad
    if grad.placements != param.placements:  # torch's optimizer would redistribute too
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad._local_tensor


class DTensorSpec:
    """What it takes to present a flat-buffer view as a DTensor like ``param``."""

    def __init__(self, param):
        self.mesh = param.device_mesh
        self.placements = param.placements
        self.shape = param.shape
        self.stride = param.stride()

    def wrap(self, view: torch.Tensor):
        return _dtensor_class().from_local(
            view, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )
