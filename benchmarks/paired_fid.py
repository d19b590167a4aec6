"""Paired against unpaired FID comparisons of two trained models.

Every trial of a sweep samples its FID images from the same seeded noise (`eval.seed`), so two
trials' FIDs move together: the sampling noise they share cancels in their difference. This
measures how much, on two trainer checkpoints A and B (e.g. the `checkpoint_*/step_*.pt` of two
trials). For each sampling seed s = 0 … seeds−1 it samples `--num-samples` images from each
model's EMA network with `torch.Generator(device).manual_seed(s)` (as the trainer samples for
FID: seed 0 is the default `eval.seed`), takes their Inception features once, and their FID and
its delete-d jackknife against the reference. Then, for each pair:

- the FIDs per seed, and their correlation across seeds;
- the SD over seeds of FID_A(s) − FID_B(s) (same noise) and of FID_A(s) − FID_B(s+1 mod seeds)
  (different noise): the spread a paired and an unpaired comparison really have;
- the mean paired SE of the difference (`jackknife.paired_stderr`, from the differences of the
  two jackknifes' replicates) and the mean unpaired one, √(se_A² + se_B²);
- the mean gap FID_A − FID_B in paired and in unpaired SEs.

With --seed-pair it also trains a model C whose config is A's with `train.seed + 1` (to A's
step; FID and curvature off) into a temporary folder, and reports A–C too: a pair that differs
only by training seed. Sampler, NFE and η come from each checkpoint's config unless given; all
models sample in A's `eval.batch_size` (the noise an image gets depends on the batch it is in).
Each model's features per seed come from one Inception pass, reused for every pair.

    python benchmarks/paired_fid.py --checkpoints A.pt B.pt --reference REF.npz [--weights FILE]
        [--num-samples 250] [--seeds 4] [--sampler ddpm|ddim] [--nfe N] [--eta ETA]
        [--batch-size N] [--seed-pair] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from diffusion_lib.build import create_diffusion, create_model, create_trainer
from diffusion_lib.checkpoint import checkpoint_config, load_checkpoint
from diffusion_lib.config import SEED_KEY, TOTAL_STEPS_KEY, WEIGHTS_ENV, ConfigError, RunConfig
from diffusion_lib.diffusion import GaussianDiffusion
from diffusion_lib.jackknife import paired_stderr
from diffusion_lib.metrics.fid import FID_JACKKNIFE_GROUPS, FidReference, InceptionFeatures
from diffusion_lib.metrics.frechet import Jackknife, fid_jackknife
from diffusion_lib.samplers import sample_images

# Config keys that do not change what a model samples: left out when saying how two models differ.
NOT_THE_MODEL = ("fid.", "curvature.", "train.device", "train.compile", "data.root", "data.download")


@dataclass
class Model:
    label: str
    source: str  # the checkpoint, or how the model was made
    config: RunConfig
    step: int
    network: torch.nn.Module
    diffusion: GaussianDiffusion
    sampler: str
    nfe: int
    eta: float


class Timer:
    """Wall seconds by phase, the device synchronised at each end."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sampling_settings(config: RunConfig, args: argparse.Namespace) -> tuple[str, int, float]:
    sampler = args.sampler or config.eval.sampler
    nfe = args.nfe or config.eval.nfe
    eta = config.eval.eta if args.eta is None else args.eta
    if nfe > config.diffusion.num_timesteps:
        raise ConfigError(f"--nfe {nfe} exceeds the model's diffusion.num_timesteps={config.diffusion.num_timesteps}")
    return sampler, nfe, eta


def load_model(label: str, path: Path, args: argparse.Namespace, device: torch.device) -> Model:
    """The EMA network of a checkpoint, on `device` (channels-last on CUDA, as the trainer has it)."""
    state = load_checkpoint(path)
    config = checkpoint_config(state)
    network = create_model(config.model)
    network.load_state_dict(state["ema"])
    network.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    diffusion = create_diffusion(config.diffusion, device)
    return Model(
        label, str(path), config, int(state["step"]), network.eval(), diffusion, *sampling_settings(config, args)
    )


def train_seed_twin(a: Model, args: argparse.Namespace, device: torch.device, run_dir: Path) -> Model:
    """A's config with train.seed + 1, trained to A's step with FID and curvature off."""
    seed = a.config.train.seed + 1
    config = a.config.with_overrides(
        {
            SEED_KEY: seed,
            TOTAL_STEPS_KEY: a.step,
            "eval.every": a.step,  # one milestone (its grid and checkpoint), after the last step
            "fid.num_samples": 0,
            "fid.final_num_samples": 0,
            "curvature.probes": 0,
            "train.device": str(device),
            "train.compile": a.config.train.compile and device.type == "cuda",
        }
    )
    trainer = create_trainer(config, run_dir, progress=False)
    trainer.fit()
    source = f"A's config with {SEED_KEY} {a.config.train.seed} -> {seed}, trained here to step {a.step}"
    return Model(
        "C", source, config, trainer.step, trainer.ema.model, trainer.diffusion, *sampling_settings(config, args)
    )


def config_differences(a: RunConfig, b: RunConfig) -> str:
    flat_a, flat_b = a.flat(), b.flat()
    keys = [k for k in flat_a if flat_a[k] != flat_b.get(k) and not k.startswith(NOT_THE_MODEL)]
    return ", ".join(f"{k} {flat_a[k]!r} -> {flat_b.get(k)!r}" for k in keys) or "nothing that changes the model"


def fmt(value: float, width: int = 9) -> str:
    return f"{value:{width}.2f}" if math.isfinite(value) else f"{'n/a':>{width}}"


def report_pair(a: Model, b: Model, fids: dict, jackknifes: dict, num_samples: int, seeds: int) -> None:
    fa, fb = np.array(fids[a.label]), np.array(fids[b.label])
    se_a = np.array([j.stderr for j in jackknifes[a.label]])
    se_b = np.array([j.stderr for j in jackknifes[b.label]])
    paired = np.array(
        [
            paired_stderr(ja.replicates, jb.replicates, num_samples)
            for ja, jb in zip(jackknifes[a.label], jackknifes[b.label])
        ]
    )
    unpaired = np.sqrt(se_a**2 + se_b**2)
    same = fa - fb
    different = fa - np.roll(fb, -1)  # FID_A(s) − FID_B(s+1 mod seeds)
    corr = float(np.corrcoef(fa, fb)[0, 1]) if fa.std() > 0 and fb.std() > 0 else math.nan
    gap = float(same.mean())

    print(f"\n{a.label}–{b.label}: {b.label} differs from {a.label} in {config_differences(a.config, b.config)}")
    if (a.sampler, a.nfe, a.eta) != (b.sampler, b.nfe, b.eta):
        print(f"  note: {a.label} and {b.label} sample differently, so they share only the starting noise x_T")
    print(f"  {'seed':>4} {'FID ' + a.label:>9} {'± SE':>7} {'FID ' + b.label:>9} {'± SE':>7} "
          f"{a.label + ' − ' + b.label:>9} {'paired SE':>10} {'unpaired SE':>12}")  # fmt: skip
    for s in range(seeds):
        print(f"  {s:>4} {fmt(fa[s])} {fmt(se_a[s], 7)} {fmt(fb[s])} {fmt(se_b[s], 7)} "
              f"{fmt(same[s])} {fmt(paired[s], 10)} {fmt(unpaired[s], 12)}")  # fmt: skip
    note = " (2 seeds: ±1 whenever the FIDs differ)" if seeds == 2 else ""
    print(f"  correlation of FID {a.label} and FID {b.label} over seeds:  {corr:.2f}{note}")
    print(f"  SD over seeds of {a.label} − {b.label}, same noise:       {same.std(ddof=1):.2f}")
    print(f"  SD over seeds of {a.label} − {b.label}, different noise:  {different.std(ddof=1):.2f}"
          f"   (FID_{a.label}(s) − FID_{b.label}(s+1 mod {seeds}))")  # fmt: skip
    print(f"  mean SE of {a.label} − {b.label}:  paired {paired.mean():.2f}, unpaired {unpaired.mean():.2f}"
          f"  (paired/unpaired {paired.mean() / unpaired.mean():.2f})")  # fmt: skip
    print(f"  mean gap {a.label} − {b.label}:    {gap:.2f} = {gap / paired.mean():.1f} paired SEs "
          f"= {gap / unpaired.mean():.1f} unpaired SEs")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    device = torch.device(args.device)
    timer = Timer(device)
    with timer("load"):
        reference = FidReference.load(args.reference)
        models = [load_model(label, Path(p), args, device) for label, p in zip("AB", args.checkpoints)]
        features = InceptionFeatures(
            args.weights, device, args.fid_batch_size or (200 if device.type == "cuda" else 50)
        )
    a = models[0]
    batch = args.batch_size or a.config.eval.batch_size
    with tempfile.TemporaryDirectory(prefix="paired-fid-") as tmp:
        if args.seed_pair:
            with timer("train C"):
                models.append(train_seed_twin(a, args, device, Path(tmp)))

        groups = min(FID_JACKKNIFE_GROUPS, args.num_samples - 2)
        fids: dict[str, list[float]] = {m.label: [] for m in models}
        jackknifes: dict[str, list[Jackknife]] = {m.label: [] for m in models}
        for m in models:
            # The trainer's sampling autocast: bf16 on CUDA when the run trained with AMP.
            autocast = torch.autocast(
                "cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and m.config.train.amp
            )
            for s in range(args.seeds):
                with timer("sample"):
                    images = sample_images(
                        m.network, m.diffusion, args.num_samples,
                        sampler=m.sampler, nfe=m.nfe, eta=m.eta, batch_size=batch,
                        generator=torch.Generator(device).manual_seed(s), device=device, autocast=autocast,
                    )  # fmt: skip
                with timer("inception"):
                    feats = features(images)
                with timer("fid"):
                    fids[m.label].append(reference.frechet.fid(feats))
                    jackknifes[m.label].append(
                        fid_jackknife(reference.frechet, feats, num_groups=groups, device=device)
                    )

    print(f"device: {device}, torch {torch.__version__}; {args.num_samples} samples per FID (jackknife over "
          f"{groups} groups), sampling seeds 0–{args.seeds - 1}, sampling batch {batch}")  # fmt: skip
    print(f"reference: {args.reference} ({reference.num_images} images)")
    for m in models:
        print(f"{m.label}: {m.source}  (step {m.step}, {m.sampler} {m.nfe} NFE, η {m.eta:g})")
    pairs = [(models[0], models[1])] + ([(models[0], models[2])] if args.seed_pair else [])
    for x, y in pairs:
        report_pair(x, y, fids, jackknifes, args.num_samples, args.seeds)

    total = time.perf_counter() - start
    sec = timer.seconds
    print(f"\nInception passes: {len(models)} models × {args.seeds} seeds = {len(models) * args.seeds} "
          f"of {args.num_samples} images, each used by every pair")  # fmt: skip
    phases = ", ".join(
        f"{name} {sec[key]:.1f} s"
        for key, name in [("load", "loading"), ("train C", "training C"), ("sample", "sampling"),
                          ("inception", "Inception"), ("fid", "FID and jackknife")]
        if key in sec
    )  # fmt: skip
    print(f"wall time: {total:.1f} s ({phases})")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs=2, required=True, metavar=("A.pt", "B.pt"), help="trainer checkpoints")
    parser.add_argument("--reference", required=True, help="statistics .npz, e.g. a sweep's fid_reference/*.npz")
    parser.add_argument(
        "--weights", default=os.environ.get(WEIGHTS_ENV), help=f"Inception weights; default ${WEIGHTS_ENV}"
    )
    parser.add_argument("--num-samples", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=4, help="sampling seeds 0 … SEEDS−1")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), help="default: each checkpoint's eval.sampler")
    parser.add_argument("--nfe", type=int, default=None, help="default: each checkpoint's eval.nfe")
    parser.add_argument("--eta", type=float, default=None, help="DDIM η; default: each checkpoint's eval.eta")
    parser.add_argument("--batch-size", type=int, default=None, help="sampling batch; default: A's eval.batch_size")
    parser.add_argument("--fid-batch-size", type=int, help="Inception batch; default 200 on CUDA, 50 on CPU")
    parser.add_argument("--seed-pair", action="store_true", help="also train C = A with train.seed + 1 and compare A–C")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.num_samples < 4:
        parser.error("--num-samples must be at least 4 (the jackknife deletes groups of them)")
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (an SD over seeds needs two)")
    if args.nfe is not None and args.nfe < 1:
        parser.error("--nfe must be at least 1")
    try:
        run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
