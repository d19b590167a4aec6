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

from .checkpoint import CHECKPOINT_DIR, checkpoint_name, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig
from .data import load_dataset, uint8_to_float
from .diffusion import GaussianDiffusion
from .ema import EMA
from .losses import DiffusionLoss
from .metrics import full_fp32
from .metrics.curvature import hutchinson_trace
from .metrics.fid import FeatureExtractor, FeatureStats, InceptionFeatures, frechet_distance, reference_stats
from .models import build_model
from .run_log import RunLog, make_grid
from .samplers import sample_images
from .schedules import make_schedule

NUM_T_BUCKETS = 10
CHECK_EVERY = 100  # steps between host syncs for the progress bar and the finite-loss check
# Keys that may change when a run is resumed; anything else changes the trajectory.
RESUMABLE_KEYS = ("train.total_steps", "train.device", "train.compile", "data.root", "data.download")
RESUMABLE_SECTIONS = ("eval.", "fid.", "curvature.")

MilestoneHook = Callable[[dict[str, Any], Path], None]


class NonFiniteLossError(RuntimeError):
    pass


def compile_network(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` under torch.compile, sharing its parameters. On CUDA with CUDA graphs
    ("reduce-overhead"): at batch 4 the forward and backward are ~1,400 tiny kernels, launch-bound."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
    return torch.device(name)


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        resume_from: Optional[Path] = None,
        checkpoint_dir: Optional[Path] = None,
        features: Optional[FeatureExtractor] = None,
        progress: bool = True,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else self.run_dir / CHECKPOINT_DIR
        self.progress = progress
        self.device = resolve_device(config.train.device)
        cuda = self.device.type == "cuda"
        torch.manual_seed(config.train.seed)  # model initialisation and dropout

        self.data = load_dataset(config.data).to(self.device)
        # FID is set up before any training step: missing weights fail now, not at step 2,000.
        self.fid_reference: Optional[FeatureStats] = None
        if config.fid.num_samples or config.fid.final_num_samples:
            self.features = features or InceptionFeatures(config.fid.weights, self.device, config.fid.batch_size)
            self.fid_reference = reference_stats(self.data, self.features, config.fid.ref_num_images, config.fid.cache_dir)

        self.diffusion = GaussianDiffusion(
            make_schedule(config.diffusion.beta_schedule, config.diffusion.num_timesteps),
            config.diffusion.prediction,
            self.device,
        )
        self.loss = DiffusionLoss(self.diffusion, config.loss.weighting, config.loss.minsnr_gamma)
        self.model = build_model(config.model)
        self.model.to(self.device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
        self.ema = EMA(self.model, config.ema.decay)
        # Only the training step runs compiled; curvature needs double backward, which compiled
        # graphs do not support, and checkpoints hold the plain module's state.
        self.train_model = compile_network(self.model, self.device) if config.train.compile else self.model
        leftover = config.ema.decay ** config.train.total_steps
        if leftover > 0.05:
            warnings.warn(
                f"ema.decay={config.ema.decay} over {config.train.total_steps} steps leaves {leftover:.0%} of the random "
                "initialisation in the EMA weights that samples and FID use; lower ema.decay for short runs",
                stacklevel=2,
            )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr, fused=cuda)
        self.generator = torch.Generator(self.device).manual_seed(config.train.seed)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and config.train.amp)

        self.step = 0
        self.wall_time_s = 0.0
        self.best: Optional[tuple[float, int]] = None  # (val/fid, step)
        self.final_fid: Optional[float] = None
        checkpoint = resume_from or latest_checkpoint(self.checkpoint_dir)
        if checkpoint is not None:
            self._restore(load_checkpoint(Path(checkpoint)))
        self.log = RunLog(self.run_dir, self.step)
        self._reset_accumulators()

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
            losses = self._forward_backward(x0, t, noise)
        except Exception as error:  # torch.compile's backends fail with many exception types
            if self.train_model is self.model:
                raise
            reason = (str(error).strip().splitlines() or [""])[0]
            warnings.warn(f"train.compile: torch.compile failed ({type(error).__name__}: {reason}); training eagerly", stacklevel=2)
            self.train_model = self.model
            losses = self._forward_backward(x0, t, noise)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.ema.update()
        # Accumulated on the device: no host sync in the hot loop.
        losses = losses.detach().double()
        self._loss_sum += losses.sum()
        self._loss_count += cfg.batch_size
        bucket = t * NUM_T_BUCKETS // self.diffusion.num_timesteps
        self._bucket_sum.index_add_(0, bucket, losses)
        self._bucket_count.index_add_(0, bucket, torch.ones_like(losses))

    def _forward_backward(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
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
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        last = time.perf_counter()
        self.model.train()
        try:
            while self.step < total:
                self.train_step()
                self.step += 1
                if self.step % CHECK_EVERY == 0:
                    bar.set_postfix(loss=f"{self._check_finite():.4f}")
                    bar.update(self.step - bar.n)
                if self.step % every == 0 or self.step == total:
                    self._check_finite()
                    row, grid = self.milestone(final=self.step == total)
                    now = time.perf_counter()
                    self.wall_time_s += now - last
                    last = now
                    row["wall_time_s"] = self.wall_time_s
                    self.log.milestone(row, grid)
                    path = self._save_checkpoint()
                    self._reset_accumulators()
                    if on_milestone is not None:
                        on_milestone(row, path)
            bar.update(self.step - bar.n)
            summary = self.summary()
            self.log.hparams(self.config.flat(), {"val/best_fid": summary["best_fid"], "val/final_fid": summary["final_fid"]})
            return summary
        finally:
            bar.close()
            self.log.close()

    def summary(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_fid": self.best[0] if self.best else None,
            "best_step": self.best[1] if self.best else None,
            "final_fid": self.final_fid,
        }

    # ---- milestones -----------------------------------------------------------------------

    def milestone(self, final: bool) -> tuple[dict[str, Any], torch.Tensor]:
        """The milestone's metrics and its sample grid; FID uses the final count after the last step."""
        cfg = self.config
        row: dict[str, Any] = {
            "step": self.step,
            "images_seen": self.step * cfg.train.batch_size,
            "train/loss": (self._loss_sum / max(self._loss_count, 1)).item(),
        }
        bucket_mean = (self._bucket_sum / self._bucket_count).tolist()  # NaN where no sample fell
        row.update({f"loss/t_bucket_{i}": v for i, v in enumerate(bucket_mean)})

        num_fid = cfg.fid.final_num_samples if final else cfg.fid.num_samples
        samples = self.generate(max(cfg.eval.grid_size, num_fid))
        grid = make_grid(samples[: cfg.eval.grid_size].cpu())
        if num_fid and self.fid_reference is not None:
            fid = frechet_distance(FeatureStats.from_features(self.features(samples[:num_fid])), self.fid_reference)
            row["val/fid"], row["val/fid_num_samples"] = fid, num_fid
            if self.best is None or fid < self.best[0]:
                self.best = (fid, self.step)
            if final:
                self.final_fid = fid
        if cfg.curvature.probes:
            mean, stderr = self.curvature()
            row["curvature/hutch_trace_mean"], row["curvature/hutch_trace_stderr"] = mean, stderr
        return row, grid

    @torch.no_grad()
    def generate(self, num_samples: int) -> torch.Tensor:
        """`num_samples` uint8 images from the EMA model, with the same noise at every milestone."""
        cfg = self.config.eval
        return sample_images(
            self.ema.model, self.diffusion, num_samples,
            sampler=cfg.sampler, nfe=cfg.nfe, eta=cfg.eta, batch_size=cfg.batch_size,
            generator=torch.Generator(self.device).manual_seed(self.config.train.seed + 1),
            device=self.device, autocast=self.autocast,
        )

    def curvature(self) -> tuple[float, float]:
        """Hutchinson trace of the loss Hessian on a fixed batch, timesteps, noise and probes, so
        values are comparable across milestones, trials and devices (dropout off, full fp32)."""
        n = min(self.config.curvature.batch_size, len(self.data))
        generator = torch.Generator(self.device).manual_seed(self.config.train.seed + 2)
        x0 = uint8_to_float(self.data.images[:n])
        t = torch.linspace(0, self.diffusion.num_timesteps - 1, n, device=self.device).long()
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        self.model.eval()
        try:
            with full_fp32():
                return hutchinson_trace(
                    lambda: self.loss.per_sample(self.model, x0, t, noise).mean(),
                    list(self.model.parameters()),
                    self.config.curvature.probes,
                    generator=generator,
                )
        finally:
            self.model.train()

    # ---- checkpoints ----------------------------------------------------------------------

    def _save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "wall_time_s": self.wall_time_s,
            "best": list(self.best) if self.best else None,
            "final_fid": self.final_fid,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "train": self.generator.get_state(),
            },
            "config": self.config.to_dict(),
        }
        path = self.checkpoint_dir / checkpoint_name(self.step)
        save_checkpoint(path, state)
        # Keep the newest (for resume) and the best-FID one (for analysis); drop the rest.
        keep = {self.step, self.best[1] if self.best else self.step}
        for step, old in list_checkpoints(self.checkpoint_dir).items():
            if step not in keep:
                old.unlink(missing_ok=True)
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        saved = RunConfig().flat()
        saved.update({f"{s}.{k}": v for s, sec in state["config"].items() for k, v in sec.items()})
        changed = [
            k for k, v in self.config.flat().items()
            if saved.get(k) != v and k not in RESUMABLE_KEYS and not k.startswith(RESUMABLE_SECTIONS)
        ]
        if changed:
            raise ConfigError(
                f"{self.run_dir}: cannot resume, the checkpoint was trained with different "
                + ", ".join(f"{k} ({saved.get(k)!r} -> {self.config.flat()[k]!r})" for k in changed)
                + "; use a new --out directory"
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.generator.set_state(state["rng"]["train"])
        self.step = state["step"]
        self.wall_time_s = state["wall_time_s"]
        self.best = tuple(state["best"]) if state["best"] else None
        self.final_fid = state["final_fid"]
