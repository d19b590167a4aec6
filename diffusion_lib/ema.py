"""Exponential moving average of model weights: θ_ema ← decay·θ_ema + (1 − decay)·θ."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = list(self.model.parameters())
        self._live = list(model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        # One fused multi-tensor kernel for all parameters instead of one per tensor.
        torch._foreach_lerp_(self._ema, self._live, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
