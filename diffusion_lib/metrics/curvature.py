"""Curvature of the loss landscape: the Hutchinson estimate of the Hessian trace.

tr(H) = E_v[vᵀ H v] for Rademacher v (Hutchinson 1989); each vᵀHv costs one Hessian-vector
product by double backward (Pearlmutter 1994), never the Hessian itself.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch


def hutchinson_trace(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    num_probes: int = 16,
    generator: Optional[torch.Generator] = None,
) -> tuple[float, float]:
    """(mean, standard error) of vᵀ ∇²L v over `num_probes` Rademacher probes v.

    `loss_fn()` must compute the same scalar loss every call (fixed batch, timesteps and noise);
    it is evaluated once and differentiated twice.
    """
    if num_probes < 2:
        raise ValueError("hutchinson_trace needs at least 2 probes for a standard error")
    params = [p for p in params if p.requires_grad]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    samples = []
    for i in range(num_probes):
        probes = [
            torch.randint(0, 2, p.shape, generator=generator, device=generator.device if generator else p.device)
            .to(device=p.device, dtype=p.dtype)
            .mul_(2)
            .sub_(1)
            for p in params
        ]
        hvps = torch.autograd.grad(grads, params, grad_outputs=probes, retain_graph=i < num_probes - 1)
        samples.append(sum((v * hv).sum() for v, hv in zip(probes, hvps)).item())
    values = torch.tensor(samples, dtype=torch.float64)
    return values.mean().item(), values.std(unbiased=True).item() / math.sqrt(num_probes)
