"""The trainer's optimizer: AdamW or Adafactor, optionally stepped inside the backward pass.

Where the memory of a step goes (SmolLM2-135M fp32, 135 M parameters = 517 MB): AdamW keeps two moments per
parameter (1034 MB); Adafactor (transformers', with an absolute lr, no momentum) keeps a row and a column vector
per matrix (~1 MB). The gradients are another 517 MB, alive from the end of backward to ``optimizer.step()``.
Stepping in backward (``InBackwardOptimizer``, PyTorch's "optimizer step in backward" pattern: one optimizer per
parameter, stepped from ``register_post_accumulate_grad_hook`` and its gradient freed at once) keeps one
parameter's gradient alive at a time instead. It cannot clip the global gradient norm (no parameter waits for
the others), accumulate gradients over micro-batches, or run under DDP/FSDP (their gradient reduction runs after
the hook), so ``grpo_step`` refuses those combinations with the fix.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

from gym_plugin.errors import ConfigError, did_you_mean

OPTIMIZERS = ("adamw", "adafactor")

__all__ = ["OPTIMIZERS", "InBackwardOptimizer", "build_optimizer", "make_optimizer"]


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adamw``: torch's AdamW, fused where a kernel exists (CPU and CUDA float tensors: one pass per tensor, no
    model-sized temporaries). ``adafactor``: transformers' Adafactor with ``lr`` as an absolute step size (no
    relative step, no parameter scaling, no warmup), no first moment, updates clipped to RMS 1."""
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, beta1=None, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    if name != "adamw":
        raise ConfigError(f"optimizer {name!r} is not one of {list(OPTIMIZERS)}.{did_you_mean(str(name), OPTIMIZERS)}")
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # e.g. a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


class InBackwardOptimizer:
    """One ``make_optimizer(name)`` per parameter, stepped the moment that parameter's gradient is complete.

    Only inside ``stepping()`` (``grpo_step`` enters it around the backward of an update): any other backward
    leaves ``.grad`` as usual. ``step()`` is a no-op and ``zero_grad()`` frees leftover gradients, so code written
    for a plain optimizer runs unchanged. ``grad_norm()`` is the global L2 norm of the gradients stepped since
    ``stepping()`` was entered (reported, never clipped to)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.name = name
        self.optimizers = [make_optimizer([p], name, lr, weight_decay) for p in self.params]
        self._sq_norms: list[torch.Tensor] = []
        self.steps_taken = 0  # parameters stepped in the current stepping() block

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """Step each parameter from its post-accumulate-grad hook while the block runs."""
        self._sq_norms = []
        self.steps_taken = 0
        handles = [p.register_post_accumulate_grad_hook(self._hook(opt)) for p, opt in zip(self.params, self.optimizers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, opt: torch.optim.Optimizer):
        def step(param: torch.Tensor) -> None:
            grad = param.grad
            self._sq_norms.append(grad.detach().float().pow(2).sum())  # on the parameter's device: no sync
            opt.step()
            param.grad = None  # the memory this mode exists for
            self.steps_taken += 1
        return step

    def grad_norm(self) -> float:
        return float(torch.stack([n.double().cpu() for n in self._sq_norms]).sum().sqrt()) if self._sq_norms else 0.0

    def step(self, closure: Any = None) -> None:
        """No-op: the parameters were stepped during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"in_backward": self.name, "per_param": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        per_param = state.get("per_param") if isinstance(state, dict) else None
        if per_param is None or len(per_param) != len(self.optimizers):
            raise ConfigError("the saved optimizer state is not an in-backward state for this model "
                              f"({'no per-parameter states' if per_param is None else f'{len(per_param)} states'} for "
                              f"{len(self.optimizers)} parameters); resume with the train.optimizer / "
                              "train.optimizer_in_backward the run was started with, or delete optimizer.pt.")
        for opt, s in zip(self.optimizers, per_param):
            opt.load_state_dict(s)


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    in_backward: bool = False) -> torch.optim.Optimizer | InBackwardOptimizer:
    """The optimizer over ``model``'s trainable parameters (see the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if in_backward:
        return InBackwardOptimizer(params, name, lr, weight_decay)
    return make_optimizer(params, name, lr, weight_decay)
