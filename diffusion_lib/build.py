"""Build a run's parts from its config (after improved-diffusion's `create_model_and_diffusion`):
the network, the diffusion and the loss, then a Trainer that is handed them.

The Trainer, the analysis grids and the benchmarks all build their parts here, so a part is
built one way everywhere; tests hand the Trainer small or instrumented parts of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, DiffusionConfig, LossConfig, ModelConfig, RunConfig
from .data import load_dataset
from .diffusion import GaussianDiffusion
from .losses import DiffusionLoss
from .metrics.fid import FeatureExtractor, FidReference, InceptionFeatures, reference_statistics
from .models.unet import UNetCifar32
from .schedules import make_schedule
from .trainer import Trainer


def resolve_device(name: str) -> torch.device:
    """`train.device` as a torch device; "auto" picks CUDA when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
    return torch.device(name)


def create_model(config: ModelConfig) -> UNetCifar32:
    return UNetCifar32(
        config.base_channels, config.channel_mults, config.num_res_blocks, config.attention_resolutions, config.dropout
    )


def create_diffusion(config: DiffusionConfig, device: torch.device | str = "cpu") -> GaussianDiffusion:
    return GaussianDiffusion(make_schedule(config.beta_schedule, config.num_timesteps), config.prediction, device)


def create_loss(config: LossConfig, diffusion: GaussianDiffusion) -> DiffusionLoss:
    return DiffusionLoss(diffusion, config.weighting, config.minsnr_gamma)


def create_model_and_diffusion(
    config: RunConfig, device: torch.device
) -> tuple[UNetCifar32, GaussianDiffusion, DiffusionLoss]:
    """The network (on `device`, channels-last on CUDA), its diffusion and its training loss."""
    model = create_model(config.model)
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    diffusion = create_diffusion(config.diffusion, device)
    return model, diffusion, create_loss(config.loss, diffusion)


def create_trainer(
    config: RunConfig,
    run_dir: str | Path,
    *,
    features: Optional[FeatureExtractor] = None,
    fid_reference: Optional[FidReference] = None,
    checkpoint_dir: Optional[Path] = None,
    resume_from: Optional[Path] = None,
    progress: bool = True,
) -> Trainer:
    """A Trainer with every part built from `config`: data on the device, the FID feature
    extractor and reference statistics (unless handed in: `fid.reference` names a file a sweep
    computed once for all its trials; else the per-machine cache), network, diffusion and loss."""
    device = resolve_device(config.train.device)
    data = load_dataset(config.data).to(device)
    # FID is set up before any training step: missing weights fail now, not at step 2,000.
    if config.fid.enabled:
        features = features or InceptionFeatures(config.fid.weights, device, config.fid.batch_size)
        if fid_reference is None:
            fid_reference = (
                FidReference.load(config.fid.reference)
                if config.fid.reference
                else reference_statistics(data, features, config.fid.ref_num_images, config.fid.cache_dir)
            )
    # Model initialisation and dropout, seeded after the FID setup: building Inception draws from
    # torch's global stream, and a sweep's worker builds it for its first trial only.
    torch.manual_seed(config.train.seed)
    model, diffusion, loss = create_model_and_diffusion(config, device)
    return Trainer(
        config,
        run_dir,
        model=model,
        diffusion=diffusion,
        loss=loss,
        data=data,
        features=features,
        fid_reference=fid_reference,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        progress=progress,
    )
