"""An exponential moving average of a model's weights, updated after each optimizer step of the
training loop; any task whose outputs come from averaged weights (diffusion, GANs) uses it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's weights, with ema-pytorch's warm-up schedule
    (the reference trains with ``ema_pytorch.EMA``).

    Each ``update()`` advances a step counter s. Updates happen when s % update_every == 0:
    up to ``update_after_step`` the EMA copies the model exactly; after it, each weight moves
    towards the model's by (1 - decay), decay = 1 - (1 + e / inv_gamma) ** -power clipped to
    [min_value, beta], e = s - update_after_step; the first such update starts from a fresh
    copy, as ema-pytorch's does. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, beta: float = 0.9999, update_after_step: int = 100,
                 update_every: int = 10, inv_gamma: float = 1.0, power: float = 2 / 3,
                 min_value: float = 0.0):
        if update_every < 1:
            raise ValueError(f"update_every must be at least 1, got {update_every}")
        self.model = model
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta, self.update_after_step, self.update_every = beta, update_after_step, \
            update_every
        self.inv_gamma, self.power, self.min_value = inv_gamma, power, min_value
        self.step = 0
        # ema-pytorch copies the model once more on the first averaging update.
        self.initted = False

    def current_decay(self, step: int | None = None) -> float:
        epoch = (self.step if step is None else step) - self.update_after_step
        if epoch <= 0:
            return 0.0
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        return min(max(value, self.min_value), self.beta)

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Fold the model's current weights in. ``step`` (the trainer's global step, counted
        from 0) replaces the internal counter, which keeps a resumed run in step."""
        if step is not None:
            self.step = step
        step, self.step = self.step, self.step + 1
        if step % self.update_every != 0:
            return
        if step <= self.update_after_step:
            self._copy_from_model()
            return
        if not self.initted:
            self._copy_from_model()
            self.initted = True
        weight = 1.0 - self.current_decay(step)
        for ema_p, p in zip(self.ema_model.parameters(), self.model.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), weight)
        for ema_b, b in zip(self.ema_model.buffers(), self.model.buffers(), strict=True):
            ema_b.copy_(b)

    @torch.no_grad()
    def _copy_from_model(self) -> None:
        for ema_t, t in zip(self.ema_model.state_dict().values(),
                            self.model.state_dict().values(), strict=True):
            ema_t.copy_(t)

    def state_dict(self) -> dict:
        return {"step": self.step, "initted": self.initted,
                "ema_model": self.ema_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"step", "ema_model"} - set(state)
        if missing:
            raise KeyError(f"EMA state is missing {sorted(missing)}; was it saved by EMA?")
        self.step = int(state["step"])
        self.initted = bool(state.get("initted", self.step > self.update_after_step))
        self.ema_model.load_state_dict(state["ema_model"])

    def to(self, *args, **kwargs) -> EMA:
        self.ema_model.to(*args, **kwargs)
        return self
