"""The first GPU session's one prepared check: everything built for CUDA and never measured there,
in one run of at most 8 minutes on one H100, printed as one table (a line per section as it ends,
then the table; the exit code is 1 if any section failed).

- the CUDA cases of the test suite (they skip without a CUDA device), by pytest in a subprocess;
- training images/s at batch 4 and 128: a plain PyTorch loop, the product's Trainer eager (bf16
  autocast, channels_last, fused Adam, data on the device) and with `train.compile` (CUDA graphs);
- bf16 against fp32: the training losses of the same 200 steps;
- Inception features/s; the FID jackknife on CUDA against the CPU and numpy (equal to 1e-9);
- four batch-4 trials packed on the one GPU, as separate processes: aggregate images/s against one;
- the notes' E1 run at a tenth of its size, and E1's wall time projected from it (notes: ≈ 3,600 s).

The GPU machine has no Ray, Optuna or pytorch-fid, no network and no ../shared (the Inception
weights are 84 MB): Inception is timed with a stand-in of pytorch-fid's network with random
weights (`StandInInceptionV3`), which correct features do not need (they are tested on a CPU).

    python benchmarks/gpu_check.py                               # on the GPU machine, from the repo root
    python benchmarks/gpu_check.py --device cpu --size small     # the same code paths in seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository is not pip-installed on the GPU machine

# pytorch-fid's InceptionV3 up to pool3: torchvision's Inception3 layers, in its blocks' order.
INCEPTION_LAYERS = (
    *("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "max_pool"),
    *("Conv2d_3b_1x1", "Conv2d_4a_3x3", "max_pool"),
    *("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    *("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


class StandInInceptionV3(nn.Module):
    """pytorch-fid's `InceptionV3` (the pool3 block, 2,048-d features) with random weights, built
    from torchvision's Inception3: the same layers, input resize and scaling, so the same work
    (pytorch-fid's FID blocks differ only in two pooling details). For timing only: its features
    are random."""

    BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}
    input_size = 299  # pytorch-fid's; --size small: Inception3's smallest, 75
    feature_dims = 2048  # --size small keeps 64 of them: a 2,048-d FID reference costs seconds on a CPU

    def __init__(self, output_blocks=(3,)):
        super().__init__()
        if list(output_blocks) != [3]:
            raise ValueError(f"the stand-in has the pool3 block (3) only, not {output_blocks}")
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
        layers = [nn.MaxPool2d(3, stride=2) if name == "max_pool" else getattr(net, name) for name in INCEPTION_LAYERS]
        self.pool3 = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        for module in self.modules():  # activations that neither vanish (denormals slow a CPU) nor overflow
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return [self.pool3(2 * x - 1)[:, : self.feature_dims]]


def install_stand_in_inception() -> None:
    """Make the stand-in the network `diffusion_lib.metrics.fid` loads (`pytorch_fid.inception.
    InceptionV3`, weights None): this process then imports diffusion_lib without pytorch-fid and
    runs the product's own Inception path. Packed trials (spawned processes) re-run this file's
    top level, so they get it too; the pytest subprocess does not."""
    inception = types.ModuleType("pytorch_fid.inception")
    inception.InceptionV3 = StandInInceptionV3
    inception.FID_WEIGHTS_URL = "stand-in:///pt_inception-2015-12-05-6726825d.pth"
    package = types.ModuleType("pytorch_fid")
    package.__path__ = []
    package.inception = inception
    sys.modules.update({"pytorch_fid": package, "pytorch_fid.inception": inception})


install_stand_in_inception()

from e1_end_to_end import E1_NOTES_S, E1_STEPS, e1_config, run_e1  # noqa: E402
from jackknife_device import TOLERANCE, numpy_jackknife, synthetic_features, time_route  # noqa: E402
from packing import aggregate  # noqa: E402
from train_throughput import bench_config, ours_images_per_s, plain_loop_images_per_s, sync  # noqa: E402

from diffusion_lib.build import create_trainer  # noqa: E402
from diffusion_lib.config import DataConfig, RunConfig  # noqa: E402
from diffusion_lib.data import load_dataset  # noqa: E402
from diffusion_lib.jackknife import replicate_stderr  # noqa: E402
from diffusion_lib.metrics.fid import InceptionFeatures  # noqa: E402
from diffusion_lib.metrics.frechet import FrechetReference  # noqa: E402

CUDA_TESTS = ("tests/test_fid_statistics.py",)  # the files with CUDA cases; `-k cuda` picks them
LOSS_AGREEMENT = 0.05  # bf16 and fp32 mean losses over the same steps, relative
EXPECTED_WARNINGS = ("ema.decay", "FID from", "the FID reference holds")  # of short, scaled runs: not shown


@dataclass(frozen=True)
class Size:
    batches: tuple[int, int]
    steps: tuple[int, int]  # timed training steps at each batch size
    agreement_steps: int
    inception_images: int
    inception_batch: int
    inception_input: int  # pixels: images are resized to it, 299 in pytorch-fid
    inception_dims: int  # the features kept, 2,048 in pytorch-fid
    jackknife: tuple[int, int, int, int]  # reference images, generated samples, groups, feature dims
    packed: int  # trials
    packed_seconds: float
    e1_scale: float
    budget_s: float  # sections that would start later are not run (and fail)
    small: bool  # a small network, sampler and milestone; nothing compiled (torch.compile takes minutes on a CPU)


SIZES = {
    "full": Size(
        batches=(4, 128),
        steps=(200, 50),
        agreement_steps=200,
        inception_images=5000,
        inception_batch=500,
        inception_input=299,
        inception_dims=2048,
        jackknife=(1085, 2000, 25, 2048),
        packed=4,
        packed_seconds=10.0,
        e1_scale=0.1,
        budget_s=400.0,
        small=False,
    ),
    "small": Size(
        batches=(4, 16),
        steps=(3, 2),
        agreement_steps=4,
        inception_images=4,
        inception_batch=2,
        inception_input=75,
        inception_dims=64,
        jackknife=(40, 24, 4, 64),
        packed=2,
        packed_seconds=0.5,
        e1_scale=0.0004,
        budget_s=600.0,  # a smoke run: however loaded the machine, every section runs
        small=True,
    ),
}


@dataclass
class Row:
    section: str
    status: str  # ok, skipped or FAILED
    result: str
    seconds: float


class Check:
    """Runs the sections one by one, each guarded: a section that raises fails its own row only."""

    def __init__(self, device: torch.device, size: Size):
        self.device, self.size = device, size
        self.rows: list[Row] = []
        self.eager: dict[int, float] = {}  # images/s of the eager Trainer by batch size
        self.started = time.perf_counter()
        StandInInceptionV3.input_size, StandInInceptionV3.feature_dims = size.inception_input, size.inception_dims
        self._features: InceptionFeatures | None = None
        self._pytest: subprocess.Popen | None = None
        self._pytest_dir = Path()
        self._pytest_error: Exception | None = None

    def section(self, name: str, run: Callable[[], tuple[str, str]]) -> None:
        begin = time.perf_counter()
        if begin - self.started > self.size.budget_s:
            status, result = "FAILED", f"not run: past the {self.size.budget_s:.0f} s budget"
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    status, result = run()
                except Exception as error:
                    traceback.print_exc()
                    status, result = "FAILED", f"{type(error).__name__}: {first_line(error)}"
            for message in sorted({first_line(w.message) for w in caught}):
                if not any(expected in message for expected in EXPECTED_WARNINGS):
                    print(f"  {name}: warning: {message}", file=sys.stderr)
        row = Row(name, status, result, time.perf_counter() - begin)
        self.rows.append(row)
        print(f"[{time.perf_counter() - self.started:6.1f} s] {name}: {status}, {result}", flush=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def features(self) -> InceptionFeatures:
        """The product's Inception feature extractor, with the stand-in network; built once."""
        if self._features is None:
            self._features = InceptionFeatures(None, self.device, self.size.inception_batch)
        return self._features

    def config(self) -> RunConfig:
        config = bench_config(str(self.device))
        return shrink(config) if self.size.small else config

    # ---- the sections -------------------------------------------------------------------------

    def start_cuda_tests(self) -> None:
        """Start pytest on the CUDA cases in the background; `cuda_tests` waits for it."""
        if importlib.util.find_spec("pytest") is None:
            return
        self._pytest_dir = Path(tempfile.mkdtemp(prefix="gpu-check-pytest-"))
        command = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider"]
        command += ["-p", "no:hypothesispytest", "-k", "cuda", f"--junitxml={self._pytest_dir / 'junit.xml'}"]
        with open(self._pytest_dir / "output.txt", "w") as output:
            self._pytest = subprocess.Popen([*command, *CUDA_TESTS], cwd=REPO, stdout=output, stderr=subprocess.STDOUT)

    def cuda_tests(self) -> tuple[str, str]:
        if self._pytest_error is not None:
            raise self._pytest_error
        if self._pytest is None:
            return "skipped", "pytest is not installed here (the FID jackknife row compares CUDA with numpy)"
        try:
            returncode = self._pytest.wait(timeout=180)
            output = (self._pytest_dir / "output.txt").read_text()
            junit = self._pytest_dir / "junit.xml"
            if not junit.is_file():
                print(output[-3000:], file=sys.stderr)
                raise RuntimeError(f"pytest exited {returncode} without a report: {tail(output)}")
            root = ElementTree.parse(junit).getroot()
        finally:
            self._pytest.kill()
            shutil.rmtree(self._pytest_dir, ignore_errors=True)
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
        failed = int(suite.get("failures")) + int(suite.get("errors"))
        result = f"{tests - failed - skipped} passed, {failed} failed, {skipped} skipped"
        result += f" (pytest {' '.join(CUDA_TESTS)} -k cuda)"
        reasons = {skip.get("message", "") for skip in root.iter("skipped")}
        result += f"; skipped: {'; '.join(sorted(reasons))}" if reasons else ""
        if failed or returncode != 0 or tests == 0:
            print(output[-3000:], file=sys.stderr)
            return "FAILED", result + f" (pytest exit code {returncode})"
        if skipped:  # without a CUDA device they should; with one, none should
            return ("FAILED" if self.device.type == "cuda" else "skipped"), result
        return "ok", result

    def training(self, batch: int, steps: int) -> tuple[str, str]:
        plain = plain_loop_images_per_s(self.config(), self.device, batch, steps)
        eager = self.eager[batch] = ours_images_per_s(self.config(), self.device, batch, steps)
        how = "bf16, channels_last, fused Adam, data on the GPU" if self.device.type == "cuda" else "fp32"
        return "ok", f"plain loop {plain:.1f}, Trainer eager {eager:.1f} ({eager / plain:.2f}x; {how}; {steps} steps)"

    def compiled(self, batch: int, steps: int) -> tuple[str, str]:
        config = self.config()
        config.train.compile = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.size.small:  # the same code path; torch.compile on a CPU would take minutes
                with torch.compiler.set_stance("force_eager"):
                    rate = ours_images_per_s(config, self.device, batch, steps)
            else:
                rate = ours_images_per_s(config, self.device, batch, steps)
        fallback = [first_line(w.message) for w in caught if "train.compile" in str(w.message)]
        if fallback:
            raise RuntimeError(fallback[0])
        how = "CUDA graphs" if self.device.type == "cuda" else "inductor"
        how = "--size small: force_eager, nothing compiled" if self.size.small else how
        eager = f", {rate / self.eager[batch]:.2f}x eager" if batch in self.eager else ""
        return "ok", f"Trainer compiled {rate:.1f}{eager} ({how}; first 3 steps untimed)"

    def loss_agreement(self) -> tuple[str, str]:
        steps, means = self.size.agreement_steps, {}
        for amp in (False, True):
            config = self.config()
            config.train.amp = amp
            trainer = create_trainer(config, tempfile.mkdtemp(prefix="gpu-check-"), progress=False)
            means[amp] = step_losses(trainer, steps)
        fp32, bf16 = means[False], means[True]
        if not (np.isfinite(fp32).all() and np.isfinite(bf16).all()):
            return "FAILED", f"non-finite losses: fp32 {fp32.mean():.4g}, bf16 {bf16.mean():.4g}"
        overall = abs(bf16.mean() - fp32.mean()) / fp32.mean()
        last = min(50, steps)
        late = abs(bf16[-last:].mean() - fp32[-last:].mean()) / fp32[-last:].mean()
        note = "" if self.device.type == "cuda" else " (amp is CUDA-only: both ran fp32 here)"
        result = (
            f"mean loss over the same {steps} steps: fp32 {fp32.mean():.4f}, bf16 {bf16.mean():.4f} "
            f"({overall:.2%} apart; last {last} steps {late:.2%}; tolerance {LOSS_AGREEMENT:.0%}){note}"
        )
        return ("ok" if max(overall, late) <= LOSS_AGREEMENT else "FAILED"), result

    def inception(self) -> tuple[str, str]:
        size = self.size
        images = load_dataset(DataConfig(name="shapes", num_images=size.inception_images)).images
        features = self.features()
        features(images[: size.inception_batch])  # warm-up: cuDNN autotuning, allocator
        sync(self.device)
        start = time.perf_counter()
        out = features(images)
        seconds = time.perf_counter() - start
        if out.shape != (len(images), size.inception_dims) or not np.isfinite(out).all():
            return "FAILED", f"features of shape {out.shape}, finite: {np.isfinite(out).all()}"
        return "ok", (
            f"{len(images) / seconds:.1f} images/s ({len(images)} images, batch {size.inception_batch}, fp32, "
            f"resized to {size.inception_input}², {size.inception_dims} features; "
            "pytorch-fid's InceptionV3 stand-in with random weights)"
        )

    def jackknife(self) -> tuple[str, str]:
        num_reference, num_samples, groups, dims = self.size.jackknife
        features = synthetic_features(num_reference + num_samples, dims)
        reference = FrechetReference.from_features(features[:num_reference])
        generated = features[num_reference:]
        start = time.perf_counter()
        expected = numpy_jackknife(reference, generated, groups, seed=0)
        numpy_s = time.perf_counter() - start
        expected_stderr = replicate_stderr(expected, num_samples)
        parts, worst = [f"numpy {numpy_s:.2f} s"], 0.0
        for device in dict.fromkeys([torch.device("cpu"), self.device]):
            seconds, replicates_rel, stderr_rel = time_route(
                reference, generated, groups, 0, device, expected, expected_stderr
            )
            worst = max(worst, replicates_rel, stderr_rel)
            parts.append(f"torch {device.type} {seconds:.2f} s (rel. diff. {max(replicates_rel, stderr_rel):.1e})")
        result = (
            f"N = {num_samples}, G = {groups}, D = {dims}, reference {num_reference}: {', '.join(parts)}; "
            f"tolerance {TOLERANCE:.0e}"
        )
        return ("ok" if worst <= TOLERANCE else "FAILED"), result

    def packing(self) -> tuple[str, str]:
        n, seconds, config = self.size.packed, self.size.packed_seconds, self.config()
        start_method = "spawn" if self.device.type == "cuda" else "fork"  # fork: seconds sooner
        one = aggregate(1, config, seconds, start_method)
        many = aggregate(n, config, seconds, start_method)
        return "ok", f"1 trial {one:.1f} images/s; {n} trials {many:.1f} images/s in all ({many / one:.2f}x)"

    def e1(self) -> tuple[str, str]:
        config = e1_config(self.size.e1_scale, device=str(self.device))
        if self.size.small:
            shrink(config)
            config.eval.every, config.fid.num_samples, config.fid.final_num_samples = 2, 4, 4
            config.fid.ref_num_images = 8
        timing = run_e1(config, self.features())
        steps = config.train.total_steps
        scale = steps / E1_STEPS
        steps_per_s = steps / max(timing.total_s - timing.milestone_s, 1e-9)
        projected = E1_STEPS / steps_per_s + timing.milestone_s / scale
        verdict = (
            "--size small: a smaller network, not a projection of E1"
            if self.size.small
            else f"the notes' E1 took ≈ {E1_NOTES_S:,} s: {E1_NOTES_S / projected:.1f}x faster"
        )
        return "ok", (
            f"{steps} steps, FID on {config.fid.num_samples} samples every {config.eval.every} steps and "
            f"{config.fid.final_num_samples} at the end: {steps_per_s:.1f} steps/s, {timing.total_s:.1f} s of which "
            f"milestones {timing.milestone_s:.1f} s (setup {timing.setup_s:.1f} s untimed); E1 projected "
            f"≤ {projected:,.0f} s, milestones scaled linearly ({verdict})"
        )

    def run(self) -> None:
        size = self.size
        try:
            self.start_cuda_tests()
        except Exception as error:  # reported in the row
            self._pytest_error = error
        # On a GPU the tests run alone, before anything is timed; on a CPU beside the rest (seconds sooner).
        beside = self.device.type == "cpu"
        if not beside:
            self.section("CUDA tests", self.cuda_tests)
        for batch, steps in zip(size.batches, size.steps):
            self.section(f"training images/s, batch {batch}", lambda b=batch, s=steps: self.training(b, s))
        self.section(f"bf16 vs fp32 loss, {size.agreement_steps} steps", self.loss_agreement)
        self.section("Inception features/s", self.inception)
        self.section("FID jackknife, CUDA vs CPU", self.jackknife)
        self.section(f"packing {size.packed} batch-4 trials", self.packing)
        self.section(f"E1 at scale {size.e1_scale:g}", self.e1)
        for batch, steps in zip(size.batches, size.steps):
            self.section(f"compiled images/s, batch {batch}", lambda b=batch, s=steps: self.compiled(b, s))
        if beside:
            self.section("CUDA tests", self.cuda_tests)


def shrink(config: RunConfig) -> RunConfig:
    """--size small: a network, sampler and milestone small enough for seconds on a CPU."""
    config.data.num_images = 256
    config.model.base_channels, config.model.channel_mults, config.model.num_res_blocks = 8, [1, 2], 1
    config.eval.nfe, config.eval.grid_size, config.eval.batch_size = 2, 4, 4
    config.curvature.probes, config.curvature.batch_size = 2, 2
    return config


def step_losses(trainer, steps: int) -> np.ndarray:
    """The mean training loss of each of `steps` steps of the Trainer."""
    losses = []
    forward_backward = trainer.forward_backward

    def recording(*args):
        per_sample = forward_backward(*args)
        losses.append(per_sample.detach().float().mean())
        return per_sample

    trainer.forward_backward = recording
    for _ in range(steps):
        trainer.train_step()
    return torch.stack(losses).double().cpu().numpy()


def first_line(message: object) -> str:
    return (str(message).strip().splitlines() or [""])[0][:300]


def tail(text: str) -> str:
    return " | ".join(text.strip().splitlines()[-3:])[-500:]


def print_table(rows: list[Row], header: str) -> None:
    width = max(len(row.section) for row in rows)
    print(f"\n{header}")
    print(f"{'section':<{width}}  {'status':<7}  {'time':>7}  result")
    for row in rows:
        print(f"{row.section:<{width}}  {row.status:<7}  {row.seconds:6.1f}s  {row.result}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.size == "small":  # a smoke run, not a measurement: one thread does not fight other work for the cores
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    header = (
        f"GPU check, size {args.size}: {device} ({name}), torch {torch.__version__}"
        f"{f' (CUDA {torch.version.cuda})' if device.type == 'cuda' else ''}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(header, flush=True)
    check = Check(device, SIZES[args.size])
    check.run()
    failed = [row.section for row in check.rows if row.status == "FAILED"]
    print_table(check.rows, header)
    total = time.perf_counter() - check.started
    print(f"total {total:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "no section failed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
