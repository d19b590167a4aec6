"""The DDPM training loop, with milestone evaluation and exact resume.

Every `eval.every` steps (and after the last step) a milestone: the mean training loss since
the last one, split into 10 timestep buckets; a sample grid from the EMA model; FID; Hutchinson
curvature on a fixed probe batch. Then a checkpoint. Milestone work draws on its own seeded
generators, so a run resumed from a checkpoint continues bit for bit as if never stopped.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import RunProgress, latest_checkpoint, prune_checkpoints, restore_checkpoint, save_checkpoint
from .config import EMA_INITIALISATION_WARN_SHARE, RunConfig
from .data import ImageDataset, uint8_to_float
from .diffusion import GaussianDiffusion
from .ema import EMA
from .losses import DiffusionLoss, eps_mse
from .metrics import full_fp32
from .metrics.curvature import hutchinson_trace
from .metrics.fid import (
    FeatureExtractor,
    FidComparabilityWarning,
    FidReference,
    evaluate_features,
    fid_comparability,
)
from .milestone import (
    BEST_FID,
    CURVATURE,
    CURVATURE_STDERR,
    FID,
    FID_NUM_SAMPLES,
    FID_REF_NUM_IMAGES,
    FID_REFERENCE,
    FID_REPLICATES,
    FID_STDERR,
    FINAL_FID,
    FINAL_FID_NUM_SAMPLES,
    FINAL_FID_STDERR,
    FINAL_KID,
    FINAL_KID_STDERR,
    IMAGES_SEEN,
    KID,
    KID_STDERR,
    NUM_T_BUCKETS,
    STEP,
    T_BUCKETS,
    TRAIN_LOSS,
    WALL_TIME,
    t_bucket,
)
from .run_files import CHECKPOINT_DIR
from .run_log import RunLog, make_grid
from .samplers import sample_images

CHECK_EVERY = 100  # steps between host syncs for the progress bar and the finite-loss check

MilestoneHook = Callable[[dict[str, Any], Path], None]


class NonFiniteLossError(RuntimeError):
    pass


def compile_network(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` under torch.compile, sharing its parameters. On CUDA with CUDA graphs
    ("reduce-overhead"): at batch 4 a training step is many tiny kernels, launch-bound."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


class Trainer:
    """The training loop, handed its parts (build them with `build.create_trainer`).

    `model`, `diffusion`, `loss` and `data` live on one device; `features` and `fid_reference`
    are needed only when FID is on; `train_model` is the network the training step calls
    (default: `model`, or its compiled form with `train.compile`).
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        model: torch.nn.Module,
        diffusion: GaussianDiffusion,
        loss: DiffusionLoss,
        data: ImageDataset,
        features: Optional[FeatureExtractor] = None,
        fid_reference: Optional[FidReference] = None,
        train_model: Optional[torch.nn.Module] = None,
        checkpoint_dir: Optional[Path] = None,
        resume_from: Optional[Path] = None,
        progress: bool = True,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else self.run_dir / CHECKPOINT_DIR
        self.progress_bar = progress
        self.model, self.diffusion, self.loss, self.data = model, diffusion, loss, data
        self.device = data.images.device
        cuda = self.device.type == "cuda"
        if config.fid.enabled and (features is None or fid_reference is None):
            raise ValueError(
                "FID is on (fid.num_samples or fid.final_num_samples > 0): hand in features and fid_reference"
            )
        self.features, self.fid_reference = features, fid_reference
        if config.fid.enabled:
            self._warn_about_fid_comparability()

        self.ema = EMA(self.model, config.ema.decay)
        # Only the training step runs compiled; curvature needs double backward, which compiled
        # graphs do not support, and checkpoints hold the plain module's state.
        self.train_model = train_model or (
            compile_network(self.model, self.device) if config.train.compile else self.model
        )
        leftover = config.ema.initialisation_left(config.train.total_steps)
        if leftover > EMA_INITIALISATION_WARN_SHARE:
            warnings.warn(
                f"ema.decay={config.ema.decay} over {config.train.total_steps} steps leaves {leftover:.0%} "
                "of the random initialisation in the EMA weights that samples and FID use; "
                "lower ema.decay for short runs",
                stacklevel=2,
            )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr, fused=cuda)
        self.generator = torch.Generator(self.device).manual_seed(config.train.seed)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and config.train.amp)

        self.progress = RunProgress()
        checkpoint = resume_from or latest_checkpoint(self.checkpoint_dir)
        if checkpoint is not None:
            self.progress = restore_checkpoint(
                Path(checkpoint),
                model=self.model,
                ema=self.ema,
                optimizer=self.optimizer,
                generator=self.generator,
                config=config,
            )
        self._reset_accumulators()

    @property
    def step(self) -> int:
        return self.progress.step

    def _warn_about_fid_comparability(self) -> None:
        """Say once per run what limits the FIDs' comparability (every FID row records both)."""
        for note in fid_comparability(self.config.fid, self.fid_reference.num_images, self.data.name):
            warnings.warn(note, FidComparabilityWarning, stacklevel=3)

    # ---- training -------------------------------------------------------------------------

    def _reset_accumulators(self) -> None:
        zeros = lambda n: torch.zeros(n, device=self.device, dtype=torch.float64)  # noqa: E731
        self._loss_sum, self._loss_count = zeros(()), 0
        self._bucket_sum, self._bucket_count = zeros(NUM_T_BUCKETS), zeros(NUM_T_BUCKETS)

    def train_step(self) -> None:
        cfg = self.config.train
        x0 = self.data.sample_batch(cfg.batch_size, self.generator)
        t = torch.randint(self.diffusion.num_timesteps, (cfg.batch_size,), generator=self.generator, device=self.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        try:
            losses = self.forward_backward(x0, t, noise)
        except Exception as error:  # torch.compile's backends fail with many exception types
            if self.train_model is self.model:
                raise
            reason = (str(error).strip().splitlines() or [""])[0]
            warnings.warn(
                f"train.compile: torch.compile failed ({type(error).__name__}: {reason}); training eagerly",
                stacklevel=2,
            )
            self.train_model = self.model
            losses = self.forward_backward(x0, t, noise)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.ema.update()
        # Accumulated on the device: no host sync in the hot loop.
        losses = losses.detach().double()
        self._loss_sum += losses.sum()
        self._loss_count += cfg.batch_size
        bucket = t_bucket(t, self.diffusion.num_timesteps)
        self._bucket_sum.index_add_(0, bucket, losses)
        self._bucket_count.index_add_(0, bucket, torch.ones_like(losses))

    def forward_backward(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample losses, with their mean's gradients in the parameters' `.grad`."""
        # Gradients are dropped before the forward pass: CUDA graphs reuse their output memory.
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            losses = self.loss.per_sample(self.train_model, x0, t, noise)
        losses.mean().backward()
        return losses

    def _check_finite(self) -> float:
        mean = (self._loss_sum / max(self._loss_count, 1)).item()
        if not math.isfinite(mean):
            raise NonFiniteLossError(f"non-finite training loss ({mean}) at or before step {self.step}")
        return mean

    def fit(self, on_milestone: Optional[MilestoneHook] = None) -> dict[str, Any]:
        """Train to `train.total_steps`, evaluating and checkpointing at each milestone."""
        total, every = self.config.train.total_steps, self.config.eval.every
        progress = self.progress
        log = RunLog.open(self.run_dir, progress.step, hparams=self.config.hparams())
        bar = tqdm(total=total, initial=progress.step, disable=not self.progress_bar, unit="step", dynamic_ncols=True)
        last = time.perf_counter()
        self.model.train()
        try:
            while progress.step < total:
                self.train_step()
                progress.step += 1
                if progress.step % CHECK_EVERY == 0:
                    bar.set_postfix(loss=f"{self._check_finite():.4f}")
                    bar.update(progress.step - bar.n)
                if progress.step % every == 0 or progress.step == total:
                    self._check_finite()
                    row, grid = self.milestone(final=progress.step == total)
                    now = time.perf_counter()
                    progress.wall_time_s += now - last
                    last = now
                    row[WALL_TIME.name] = progress.wall_time_s
                    # A milestone recorded before this run resumed from an older checkpoint keeps
                    # its row; the clock goes on from its time, so wall_time_s grows along the record.
                    row = log.milestone(row, grid)
                    progress.wall_time_s = row.get(WALL_TIME.name) or progress.wall_time_s
                    path = self.save_checkpoint()
                    self._reset_accumulators()
                    if on_milestone is not None:
                        on_milestone(row, path)
            bar.update(progress.step - bar.n)
            return self.summary()
        finally:
            bar.close()
            log.close()

    def summary(self) -> dict[str, Any]:
        best = self.progress.best
        return {
            "step": self.step,
            "best_fid": best[0] if best else None,
            "best_step": best[1] if best else None,
            "final_fid": self.progress.final_fid,
        }

    # ---- milestones -----------------------------------------------------------------------

    def milestone(self, final: bool) -> tuple[dict[str, Any], torch.Tensor]:
        """The milestone's metrics (see `milestone.MILESTONE_METRICS`) and its sample grid.

        `val/fid` is always measured on `fid.num_samples` samples, so every milestone's FID (and
        the best of them) compares like with like; after the last step the larger final count is
        reported separately as `val/final_fid`. Both come from one Inception pass: the samples
        start from the same seeded noise at every milestone, the smaller count being a prefix.
        """
        cfg = self.config
        row: dict[str, Any] = {
            STEP.name: self.step,
            IMAGES_SEEN.name: self.step * cfg.train.batch_size,
            TRAIN_LOSS.name: (self._loss_sum / max(self._loss_count, 1)).item(),
        }
        bucket_mean = (self._bucket_sum / self._bucket_count).tolist()  # NaN where no sample fell
        row.update({metric.name: value for metric, value in zip(T_BUCKETS, bucket_mean)})

        num_milestone, num_final = cfg.fid.num_samples, cfg.fid.final_num_samples if final else 0
        samples = self.generate(max(cfg.eval.grid_size, num_milestone, num_final))
        grid = make_grid(samples[: cfg.eval.grid_size].cpu())
        if num_milestone or num_final:
            features = self.features(samples[: max(num_milestone, num_final)])
            row[FID_REFERENCE.name], row[FID_REF_NUM_IMAGES.name] = (
                self.fid_reference.name,
                self.fid_reference.num_images,
            )
        if num_milestone:
            result = evaluate_features(features[:num_milestone], self.fid_reference, self.device)
            row.update(
                {
                    FID.name: result.fid,
                    FID_STDERR.name: result.fid_stderr,
                    FID_REPLICATES.name: result.fid_replicates,
                    FID_NUM_SAMPLES.name: num_milestone,
                    KID.name: result.kid,
                    KID_STDERR.name: result.kid_stderr,
                }
            )
            if self.progress.best is None or result.fid < self.progress.best[0]:
                self.progress.best = (result.fid, self.step)
            row[BEST_FID.name] = self.progress.best[0]
        if num_final:
            result = evaluate_features(features[:num_final], self.fid_reference, self.device)
            row.update(
                {
                    FINAL_FID.name: result.fid,
                    FINAL_FID_STDERR.name: result.fid_stderr,
                    FINAL_FID_NUM_SAMPLES.name: num_final,
                    FINAL_KID.name: result.kid,
                    FINAL_KID_STDERR.name: result.kid_stderr,
                }
            )
            self.progress.final_fid = result.fid
        if cfg.curvature.probes:
            row[CURVATURE.name], row[CURVATURE_STDERR.name] = self.curvature()
        return row, grid

    @torch.no_grad()
    def generate(self, num_samples: int) -> torch.Tensor:
        """`num_samples` uint8 images from the EMA model, from the same noise (`eval.seed`) at every
        milestone and in every run that shares the seed, so their FIDs are paired."""
        cfg = self.config.eval
        return sample_images(
            self.ema.model,
            self.diffusion,
            num_samples,
            sampler=cfg.sampler,
            nfe=cfg.nfe,
            eta=cfg.eta,
            batch_size=cfg.batch_size,
            generator=torch.Generator(self.device).manual_seed(cfg.seed),
            device=self.device,
            autocast=self.autocast,
        )

    def curvature(self) -> tuple[float, float]:
        """Hutchinson trace of the Hessian of the unweighted ε-space MSE (`losses.eps_mse`, not the
        training loss: Min-SNR and constant-weight runs measure the same objective) with respect
        to the trained (not EMA) weights, on a fixed batch — the first `curvature.batch_size`
        training images, t evenly spaced over [0, T−1], seeded noise and probes — with dropout
        off and full fp32, so values are comparable across milestones, trials and devices."""
        n = min(self.config.curvature.batch_size, len(self.data))
        generator = torch.Generator(self.device).manual_seed(self.config.train.seed + 2)
        x0 = uint8_to_float(self.data.images[:n])
        t = torch.linspace(0, self.diffusion.num_timesteps - 1, n, device=self.device).long()
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        self.model.eval()
        try:
            with full_fp32():
                return hutchinson_trace(
                    lambda: eps_mse(self.model, self.diffusion, x0, t, noise).mean(),
                    list(self.model.parameters()),
                    self.config.curvature.probes,
                    generator=generator,
                )
        finally:
            self.model.train()

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step, keeping only what `prune_checkpoints` keeps."""
        path = save_checkpoint(
            self.checkpoint_dir,
            self.progress,
            model=self.model,
            ema=self.ema,
            optimizer=self.optimizer,
            generator=self.generator,
            config=self.config,
        )
        prune_checkpoints(self.checkpoint_dir, self.progress)
        return path
