"""Milestone metrics: FID (`fid`) and the curvature of the loss (`curvature`)."""

from __future__ import annotations

import contextlib

import torch


def full_fp32() -> contextlib.AbstractContextManager:
    """A context in which fp32 convolutions are fp32: cuDNN computes them as TF32 (10-bit
    mantissa) by default on recent GPUs, and metrics compared across devices must not depend on it."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    )
