"""``Adam`` and ``AdamW``: drop-in replacements for ``torch.optim.Adam`` / ``AdamW``.

The classes keep torch's whole public surface (constructor, validation, ``param_groups``,
``state``, ``state_dict`` format, hooks, schedulers). The work is done by ``_engine``: the
parameters live in flat buffers and every step is one fused update per buffer.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.optim import Optimizer

from . import _checkpoint
from ._engine import Engine
from ._layout import PRECISION_KEYS
from ._validation import check_backend, check_hyperparameters, check_implementation_flags, check_precision_options

__all__ = ["Adam", "AdamW"]

# What torch.optim.Adam assumes for group keys an old checkpoint lacks.
_GROUP_DEFAULTS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "decoupled_weight_decay": False,
    "fused": None,
}


class _FlatAdam(Optimizer):
    """Everything Adam and AdamW share; the public classes only fix their signatures.

    The public classes also derive from ``torch.optim.Adam`` / ``AdamW``, so that code
    that checks ``isinstance(optimizer, torch.optim.AdamW)`` treats them as what they are
    (accelerate picks DeepSpeed's CPU Adam mode so). None of torch's Adam code runs: every
    method torch's classes define is defined here, and the base calls name ``Optimizer``.
    """

    def __init__(
        self,
        params,
        lr,
        betas,
        eps,
        weight_decay,
        amsgrad,
        *,
        foreach,
        maximize,
        capturable,
        differentiable,
        fused,
        decoupled_weight_decay,
        backend,
        master_weights,
        state_dtype,
        stochastic_rounding,
        stochastic_rounding_seed,
    ) -> None:
        betas = check_hyperparameters(lr, betas, eps, weight_decay, foreach=foreach, capturable=capturable)
        check_backend(backend)
        check_precision_options(master_weights, state_dtype, stochastic_rounding, stochastic_rounding_seed)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        # Precision options are the optimizer's, not group fields, so that state_dict() keeps
        # torch's exact group layout; a group dict may still override any of them.
        self._precision = {
            "master_weights": master_weights,
            "state_dtype": state_dtype,
            "stochastic_rounding": stochastic_rounding,
            "stochastic_rounding_seed": stochastic_rounding_seed,
        }
        self._backend = backend
        self._engine = None  # add_param_group below must not re-home before we are ready
        Optimizer.__init__(self, params, defaults)  # checks the parameters; moves nothing yet
        torch_class = "AdamW" if isinstance(self, torch.optim.AdamW) else "Adam"
        check_implementation_flags(foreach=foreach, fused=fused, differentiable=differentiable, torch_class=torch_class)
        self._engine = Engine(type(self).__name__, backend, self._precision)
        self._engine.rebuild(self.param_groups, self.state)

    @property
    def backend(self) -> str:
        """The ``backend`` this optimizer was built with: ``"auto"``, ``"triton"`` or ``"torch"``."""
        return self._backend

    def backends(self) -> dict[tuple[torch.device, torch.dtype], str]:
        """Which implementation updates each flat buffer, keyed by (device, parameter dtype)."""
        return {(b.device, b.param_dtype): self._engine.backend_of[id(b)] for b in self._engine.buffers}

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """As in torch, only with ``fused=True`` does ``torch.amp.GradScaler`` hand ``step()``
        its scale and inf check (the update then unscales, and skips on the device, with no
        host sync). Otherwise GradScaler unscales and checks first, and does not call
        ``step()`` at all on an inf, which other libraries build on: FSDP's
        ShardedGradScaler agrees on the check across ranks in ``unscale_``, Lightning clips
        after it, accelerate and transformers count the skipped steps."""
        return bool(self.defaults.get("fused"))

    @property
    def last_step_skipped(self) -> torch.Tensor:
        """With ``fused=True``, whether ``torch.amp.GradScaler`` skipped the last step (inf or
        nan gradients): a boolean tensor on the scaler's device, so checking it waits only
        when you read it (``if not optimizer.last_step_skipped: scheduler.step()``). ``False``
        without a scaler, and without ``fused=True``, where GradScaler skips by not calling
        ``step()``."""
        return self._engine.last_step_skipped()

    # -- torch.optim.Optimizer surface --------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        Optimizer.add_param_group(self, param_group)
        if self._engine is None:
            return
        try:
            self._engine.add_group(self.param_groups, self.state)
        except Exception:
            self.param_groups.pop()  # nothing was re-homed: leave the optimizer as it was
            raise

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step: one fused update per flat buffer.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._engine.step(
            self.param_groups,
            self.state,
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
        )
        return loss

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all optimized tensors.

        ``set_to_none=True`` (the default) sets them to ``None``, exactly as torch does.
        ``set_to_none=False`` zeroes them, as torch does, but in one operation per flat buffer:
        each gradient becomes a view of the buffer's gradient buffer (the tensor object changes
        once, on the first call; gradients that are views of someone else's storage, such as
        DistributedDataParallel's buckets, are zeroed in place instead). Backward then
        accumulates straight into the flat buffer.
        """
        if set_to_none:
            Optimizer.zero_grad(self, set_to_none=True)
            self._engine.forget_gradients()
            return
        if not hasattr(self, "_zero_grad_profile_name"):
            self._patch_step_function()
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            # Parameters moved since the last step (model.double(), model.to(...)) are re-homed
            # first, so that their gradients are zeroed into a buffer of their new kind.
            self._engine.ensure_current(self.param_groups, self.state, strides=False)
            self._engine.zero_grad_into_buffers()

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict()``; a param group's ``state_dtype`` is saved by name
        (``"bfloat16"``), which ``load_state_dict`` reads back. Hooks run as in torch: the
        post-hooks see the names, and what the last of them returns is returned, whatever its
        shape."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        # torch's packing, with the hooks out of the way: the names go in before any post-hook
        # sees the checkpoint (one may return a dict of another shape, a flat one for a saver).
        pre_hooks, post_hooks = self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        try:
            state_dict = Optimizer.state_dict(self)
        finally:
            self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = pre_hooks, post_hooks
        _checkpoint.dtype_names(state_dict["param_groups"])
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint saved by this class or by ``torch.optim.Adam`` / ``AdamW``.

        The whole checkpoint is checked first (group count and sizes, every state tensor's
        shape and type, every step count); a bad one raises ``ValueError`` and leaves the
        optimizer as it was. States are copied into the flat buffers (cast to the buffer's
        dtype and device) and ``state[p]`` become views of them again.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        new_groups, new_state = _checkpoint.validated(self.param_groups, state_dict)
        self._engine.check(new_groups, new_state)  # precision options the buffers can take
        # As torch's load_state_dict: through __setstate__, where subclasses fill in what
        # older checkpoints lack.
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._engine.load(self.param_groups, self.state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _init_group(self, *args, **kwargs):
        # torch's Adam gathers each group's tensors here for its step; ours has none of that
        # (the state lives in flat buffers), and torch's would put state of its own in ours.
        raise NotImplementedError(f"{type(self).__name__} keeps its state in flat buffers: it has no _init_group")

    def _complete_group(self, group: dict) -> None:
        for key, value in _GROUP_DEFAULTS.items():
            group.setdefault(key, value)

    def __getstate__(self) -> dict[str, Any]:
        state = Optimizer.__getstate__(self)
        state["_backend"] = self._backend
        state["_precision"] = self._precision
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_backend" not in state and getattr(self, "_engine", None) is not None:
            # load_state_dict's call on a live optimizer (new groups and state; it then
            # copies the state into the buffers).
            Optimizer.__setstate__(self, state)
            for group in self.param_groups:
                self._complete_group(group)
            return
        # Unpickling and deepcopy: rebuild the flat buffers around the restored parameters.
        # (A subclass's own __getstate__ may leave out ours: the constructor's defaults then.)
        backend = state.pop("_backend", "auto")
        precision = state.pop("_precision", None) or _precision_defaults()
        Optimizer.__setstate__(self, state)
        for group in self.param_groups:
            self._complete_group(group)
        self._backend = backend
        self._precision = precision
        self._engine = Engine(type(self).__name__, backend, precision)
        self._engine.rebuild(self.param_groups, self.state)


_MATH = r"""
    With :math:`g_t` the gradient (negated if ``maximize``), :math:`\gamma` the learning
    rate, :math:`\lambda` the weight decay and :math:`t` the parameter's step count:

    .. math::
        \begin{aligned}
        &\text{L2 (Adam):}\quad g_t \leftarrow g_t + \lambda\theta_{t-1}
            \qquad \text{decoupled (AdamW):}\quad \theta_{t-1} \leftarrow (1 - \gamma\lambda)\,\theta_{t-1} \\
        &m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \qquad
         v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        &\hat v_t = \max(\hat v_{t-1}, v_t) \text{ with AMSGrad, else } v_t \\
        &\theta_t = \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{\hat v_t}\,/\sqrt{1-\beta_2^t} + \epsilon}
        \end{aligned}

    The update is computed in float32 (float64 for float64 parameters) whatever the storage
    dtype, with torch's order of operations, so one step from equal state agrees with
    ``torch.optim.Adam`` to float32 rounding. A parameter whose ``.grad`` is ``None`` is neither
    updated nor counted, as in torch.
"""

_ARGS = r"""
    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups,
            as for any torch optimizer. The parameters of each (device, dtype) are moved into
            one flat buffer; each keeps its identity and its ``.data`` becomes its segment of
            the buffer (a tensor with a storage of its own, over the buffer's memory).
            Frozen parameters stay where they are until they train.
        lr (float, Tensor, optional): learning rate (default: {lr}).
        betas (tuple[float | Tensor, float | Tensor], optional): decay rates of the first and
            second moment averages (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator for stability (default: 1e-8). In
            float16/bfloat16 it is applied in float32, so it cannot underflow.
        weight_decay (float, optional): {weight_decay_doc}
        amsgrad (bool, optional): use the AMSGrad variant, which normalises by the largest
            second moment seen so far (default: False).
{decoupled_doc}        foreach (bool, optional): accepted for compatibility and validated as torch does;
            it changes nothing in the update (already fused: one launch per buffer and
            kernel variant with Triton, torch's fused kernel per param group with the
            pure-PyTorch backend). ``foreach=True`` with ``fused=True``, or with a Tensor lr
            or betas and ``capturable=False``, raises as in torch.
        maximize (bool, optional): maximize the objective instead of minimizing (default: False).
        capturable (bool, optional): accepted and stored in the param groups as in torch; the
            Triton backend's step never synchronises with the device either way (the
            pure-PyTorch backend on CUDA reads betas, eps and weight decay held in device
            tensors on the host, as torch's fused Adam does) (default: False).
        differentiable (bool, optional): not supported; ``True`` raises ``RuntimeError``.
        fused (bool, optional): the update is always fused; as in torch, ``True`` makes
            ``torch.amp.GradScaler`` hand the step its scale and inf check (unscaled and
            skipped on the device, no host sync) instead of unscaling first and not calling
            ``step()`` on an inf (default: None).
        backend (str, optional): ``"auto"`` (Triton kernel for CUDA parameters, pure PyTorch
            elsewhere), ``"triton"`` (always the kernel; CPU parameters need
            ``TRITON_INTERPRET=1`` set before triton is imported), or ``"torch"`` (always the
            pure-PyTorch implementation) (default: "auto").
        master_weights (bool, optional): keep a float32 master copy of each float16/bfloat16
            parameter, updated in place of it; the parameter receives the master rounded to
            nearest (default: False).
        state_dtype (torch.dtype, optional): the dtype of ``exp_avg``, ``exp_avg_sq`` and
            ``max_exp_avg_sq`` whatever the real parameters' (default: None, the parameter's
            dtype, or float32 with master weights). Complex parameters keep complex state of
            their own precision: another ``state_dtype`` in their group raises ``ValueError``.
        stochastic_rounding (bool, optional): round every bfloat16 value the step stores
            (parameters without masters, bfloat16 states) up or down at random, in
            proportion to the distance; a model's copy of a master stays rounded to nearest
            (default: False).
        stochastic_rounding_seed (int, optional): seeds the random bits, with the step count
            (default: 0).
        A param group dict may override any of these four.

    ``state_dict()`` has torch's exact layout, so checkpoints move freely between this class
    and ``torch.optim.{torch_name}``.
"""


class Adam(_FlatAdam, torch.optim.Adam):
    __doc__ = (
        """Adam over flat parameter buffers: ``torch.optim.Adam`` with one fused update per buffer.
"""
        + _MATH
        + _ARGS.format(
            lr="1e-3",
            weight_decay_doc="L2 penalty added to the gradient, or decoupled weight decay\n"
            "            with ``decoupled_weight_decay=True`` (default: 0).",
            decoupled_doc="        decoupled_weight_decay (bool, optional): decay the weights directly, as AdamW\n"
            "            (default: False).\n",
            torch_name="Adam",
        )
    )

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        stochastic_rounding_seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            backend=backend,
            master_weights=master_weights,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            stochastic_rounding_seed=stochastic_rounding_seed,
        )


class AdamW(Adam, torch.optim.AdamW):
    __doc__ = (
        """AdamW over flat parameter buffers: ``torch.optim.AdamW`` with one fused update per buffer.
"""
        + _MATH
        + _ARGS.format(
            lr="1e-3",
            weight_decay_doc="decoupled weight decay coefficient (default: 1e-2).",
            decoupled_doc="",
            torch_name="AdamW",
        )
    )

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        stochastic_rounding_seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            backend=backend,
            master_weights=master_weights,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            stochastic_rounding_seed=stochastic_rounding_seed,
        )

    def _complete_group(self, group: dict) -> None:
        super()._complete_group(group)
        group["decoupled_weight_decay"] = True


def _precision_defaults() -> dict:
    """The precision options as the public constructors default them."""
    parameters = inspect.signature(Adam.__init__).parameters
    return {key: parameters[key].default for key in PRECISION_KEYS}
