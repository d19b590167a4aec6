"""FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) with pytorch-fid's Inception network.

Images travel as uint8 tensors, in memory: generated samples are quantised exactly as a PNG
would store them (`data.float_to_uint8`), then fed to pytorch-fid's `InceptionV3` as
uint8/255, the same values its CLI gets from `ToTensor()` on the PNG. So a milestone FID
equals `python -m pytorch_fid` on the same images written to disk, without the disk; the
Fréchet distance itself is computed exactly by `frechet.FrechetReference` (tested against
pytorch-fid's `calculate_frechet_distance`), with a standard error, and KID from the same features.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..atomic import atomic_path
from ..config import WEIGHTS_ENV, ConfigError, FidConfig, RunConfig
from ..data import IMAGE_SUFFIXES, ImageDataset, held_out_images
from ..run_files import FidFloor, FloorPoint
from . import full_fp32
from .frechet import FrechetReference, Jackknife, fid_jackknife
from .kid import kernel_inception_distance

FEATURE_DIMS = 2048
CIFAR10_TRAIN_IMAGES = 50_000  # the reference every published CIFAR-10 FID uses
FID_JACKKNIFE_GROUPS = 25  # fewer with fewer samples; see frechet.fid_jackknife
KID_REFERENCE_IMAGES = (
    5_000  # reference features kept for KID: its subsets draw 1,000 at a time, and more cost time at every milestone
)

# uint8 images (N, 3, H, W) on any device -> float64 features (N, D)
FeatureExtractor = Callable[[torch.Tensor], np.ndarray]


def weights_help() -> str:
    return (
        "FID needs pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth). "
        f"Offline, point fid.weights (or the environment variable {WEIGHTS_ENV}) at a local copy, "
        "or place it in $TORCH_HOME/hub/checkpoints/; "
        "or set fid.num_samples=0 and fid.final_num_samples=0 to train without FID."
    )


def load_inception(weights: Optional[str] = None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """pytorch-fid's FID InceptionV3 (pool3 block), from a local weights file or, when `weights`
    is None, pytorch-fid's own download.

    Raises ConfigError with `weights_help()` when no weights can be had, so a run fails before
    training rather than at its first milestone.
    """
    # pytorch-fid imports torchvision, which loads torch._dynamo (seconds): only where FID is measured.
    from pytorch_fid import inception as pytorch_fid_inception

    block = [pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIMS]]
    try:
        if weights is None:
            model = pytorch_fid_inception.InceptionV3(block)
        else:
            if not Path(weights).is_file():
                raise ConfigError(f"fid.weights={weights}: no such file. {weights_help()}")
            with _torch_hub_holding(Path(weights)):
                model = pytorch_fid_inception.InceptionV3(block)
    except ConfigError:
        raise
    except Exception as err:  # network down, corrupt file, wrong state dict
        raise ConfigError(
            f"cannot load the FID Inception weights ({type(err).__name__}: {err}). {weights_help()}"
        ) from None
    return model.eval().to(device=device, memory_format=torch.channels_last)


def shared_inception(weights: Optional[str], device: torch.device) -> torch.nn.Module:
    """`load_inception`'s network from a weights file, loaded once per process: a sweep's worker
    runs trial after trial (Ray's `reuse_actors`), and the network is read-only in eval mode. A
    file changed on disk is loaded again; pytorch-fid's own download is not kept."""
    if weights is None or not Path(weights).is_file():
        return load_inception(weights, device)
    stat = Path(weights).stat()
    return _load_inception_once(str(Path(weights).resolve()), device, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_inception_once(weights: str, device: torch.device, mtime_ns: int, size: int) -> torch.nn.Module:
    return load_inception(weights, device)


@contextlib.contextmanager
def _torch_hub_holding(weights: Path) -> Iterator[None]:
    """pytorch-fid fetches its weights with torch.hub's `load_state_dict_from_url`, which first
    looks in `$TORCH_HOME/hub/checkpoints/` under the URL's file name: point TORCH_HOME at a
    temporary folder holding a link to the local file under that name, for the duration of the
    block, and put the variable back as it was."""
    previous = os.environ.get("TORCH_HOME")
    with tempfile.TemporaryDirectory(prefix="fid-weights-") as home:
        checkpoints = Path(home) / "hub" / "checkpoints"
        checkpoints.mkdir(parents=True)
        from pytorch_fid.inception import FID_WEIGHTS_URL

        name = Path(urllib.parse.urlsplit(FID_WEIGHTS_URL).path).name
        (checkpoints / name).symlink_to(weights.resolve())
        os.environ["TORCH_HOME"] = home
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TORCH_HOME"]
            else:
                os.environ["TORCH_HOME"] = previous


class InceptionFeatures:
    """pool3 features (2048-d, full fp32) of uint8 images, batched, under `inference_mode`; with
    `progress`, a progress bar over the batches (for a terminal)."""

    def __init__(
        self,
        weights: Optional[str] = None,
        device: torch.device | str = "cpu",
        batch_size: int = 200,
        progress: bool = False,
    ):
        self.device = torch.device(device)
        self.model = shared_inception(weights, self.device)
        self.batch_size = batch_size
        self.progress = progress

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = []
        starts = range(0, images.shape[0], self.batch_size)
        with full_fp32():
            for start in tqdm(starts, desc="Inception", unit="batch", disable=not self.progress, leave=False):
                batch = images[start : start + self.batch_size].to(self.device, non_blocking=True)
                batch = (batch.float() / 255.0).contiguous(memory_format=torch.channels_last)
                out.append(self.model(batch)[0].flatten(1))
        # One copy to the host at the end, so no batch waits for the previous one to finish.
        return torch.cat(out).double().cpu().numpy()


@dataclass
class FeatureStats:
    """Mean and covariance of features: the Gaussian FID compares."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        if features.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 images, got {features.shape[0]}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])

    def save(self, path: str | os.PathLike) -> None:
        """pytorch-fid's .npz layout (`mu`, `sigma`), so its CLI reads our files and vice versa."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma, num_images=self.num_images)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        try:
            with np.load(path) as f:
                num = int(f["num_images"]) if "num_images" in f else -1
                return cls(f["mu"], f["sigma"], num)
        except (OSError, KeyError, ValueError) as err:
            raise ConfigError(f"{path}: not a FID statistics file with 'mu' and 'sigma' ({err})") from None


@dataclass(frozen=True)
class FidReference:
    """What every FID and KID of a run is measured against: the real images' Fréchet statistics
    (with Σ^½ computed once) and up to KID_REFERENCE_IMAGES of their features for KID. Saved as
    an .npz that pytorch-fid's CLI also reads (`mu`, `sigma`)."""

    frechet: FrechetReference
    kid_features: np.ndarray  # (≤ KID_REFERENCE_IMAGES, D) float32
    name: str  # the statistics file's name: which reference an FID row was measured against

    @property
    def num_images(self) -> int:
        return self.frechet.num_images

    @classmethod
    def from_features(cls, features: np.ndarray, name: str) -> "FidReference":
        return cls(FrechetReference.from_features(features), features[:KID_REFERENCE_IMAGES].astype(np.float32), name)

    def save(self, path: str | os.PathLike) -> None:
        f = self.frechet
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as out:
                np.savez(
                    out,
                    mu=f.mu,
                    sigma=f.sigma,
                    sqrt_sigma=f.sqrt_sigma,
                    num_images=f.num_images,
                    kid_features=self.kid_features,
                )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FidReference":
        try:
            with np.load(path) as f:
                frechet = FrechetReference(f["mu"], f["sigma"], f["sqrt_sigma"], int(f["num_images"]))
                return cls(frechet, f["kid_features"], Path(path).name)
        except (OSError, KeyError, ValueError) as err:
            raise ConfigError(f"{path}: not a reference statistics file written by this product ({err})") from None


@dataclass(frozen=True)
class FidResult:
    fid: float
    jackknife: Optional[Jackknife]  # None below 4 samples, where a jackknife has nothing to delete
    kid: float
    kid_stderr: float

    @property
    def fid_stderr(self) -> float:
        return self.jackknife.stderr if self.jackknife else math.nan

    @property
    def fid_replicates(self) -> Optional[list[float]]:
        return self.jackknife.replicates.tolist() if self.jackknife else None


def evaluate_features(
    features: np.ndarray, reference: FidReference, device: torch.device | str | None = None
) -> FidResult:
    """FID and KID of generated features, each with its standard error, from one Inception pass.
    The FID's jackknife runs on `device` (default: the CPU): on a GPU machine, the GPU that
    sampled the images, whose float64 eigenvalue problems beat a CPU's."""
    n = features.shape[0]
    kid, kid_stderr = kernel_inception_distance(features, reference.kid_features) if n >= 4 else (math.nan, math.nan)
    num_groups = min(FID_JACKKNIFE_GROUPS, n - 2)
    jackknife = fid_jackknife(reference.frechet, features, num_groups=num_groups, device=device) if n >= 4 else None
    return FidResult(reference.frechet.fid(features), jackknife, kid, kid_stderr)


def reference_statistics(
    data: ImageDataset, features: FeatureExtractor, num_images: Optional[int], cache_dir: Optional[str | os.PathLike]
) -> FidReference:
    """The reference of the first `num_images` training images (all when None), cached on disk.

    The file name is the data set's name, a fingerprint of the images' bytes and the count, so
    a hit costs no Inception pass and changed data never reuse stale statistics.
    """
    subset = reference_images(data, num_images)
    path = Path(cache_dir or default_cache_dir()) / reference_file_name(subset)
    if path.is_file():
        return FidReference.load(path)
    reference = FidReference.from_features(features(subset.images), path.name)
    reference.save(path)
    return reference


def default_cache_dir() -> Path:
    """The machine's reference cache when `fid.cache_dir` is none: under $XDG_CACHE_HOME, the
    usual place for a user's caches (~/.cache when it is not set)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusion_sweeps" / "fid"


def reference_images(data: ImageDataset, num_images: Optional[int]) -> ImageDataset:
    return ImageDataset(data.name, data.images if num_images is None else data.images[:num_images])


def reference_file_name(subset: ImageDataset) -> str:
    return f"{subset.name}-{subset.fingerprint}-{len(subset)}.npz"


def fid_floor(
    config: RunConfig, data: ImageDataset, features: FeatureExtractor, reference: FidReference, folder: Path
) -> FidFloor:
    """The FID floor under a run's conditions: real images outside `reference` (the first images
    of `data`) scored against it at `fid.num_samples` and `fid.final_num_samples`, each with its
    jackknife standard error, as a milestone FID is. Written to `folder/fid_floor.json` and kept in
    the machine's cache (`fid.cache_dir`), as the reference is: a floor already in either for the
    same reference, held-out images and counts is reused, and costs no Inception pass."""
    counts = sorted({n for n in (config.fid.num_samples, config.fid.final_num_samples) if n})
    held_out, source = held_out_images(config.data, data, reference.num_images)

    def measured_here(floor: Optional[FidFloor]) -> bool:
        return (
            floor is not None
            and floor.reference == reference.name
            and floor.held_out_fingerprint == held_out.fingerprint
            and [p.num_samples for p in floor.points] == counts
        )

    stored = FidFloor.read(folder)
    if measured_here(stored):
        return stored
    cached = _floor_cache_folder(config.fid, reference, held_out, counts)
    floor = FidFloor.read(cached)
    if not measured_here(floor):
        floor = _measure_floor(features, reference, held_out, source, counts)
        cached.mkdir(parents=True, exist_ok=True)
        floor.write(cached)
    floor.write(folder)
    return floor


def _floor_cache_folder(config: FidConfig, reference: FidReference, held_out: ImageDataset, counts: list[int]) -> Path:
    """The cache's folder for one floor, named by what it depends on: the reference's statistics
    (its images and the Inception weights that saw them), the held-out images, the counts."""
    key = hashlib.sha256(reference.frechet.mu.tobytes())
    key.update(f"{reference.num_images} {held_out.fingerprint} {counts}".encode())
    return Path(config.cache_dir or default_cache_dir()) / "floors" / key.hexdigest()[:20]


def _measure_floor(
    features: FeatureExtractor, reference: FidReference, held_out: ImageDataset, source: str, counts: list[int]
) -> FidFloor:
    enough = [n for n in counts if 4 <= n <= len(held_out)]
    held_out_features = features(held_out.images[: max(enough)]) if enough else None
    points = []
    for n in counts:
        if n in enough:
            result = evaluate_features(held_out_features[:n], reference)
            points.append(FloorPoint(n, result.fid, result.fid_stderr))
        else:
            points.append(FloorPoint(n, None, None))
    return FidFloor(reference.name, reference.num_images, source, len(held_out), held_out.fingerprint, tuple(points))


class FidComparabilityWarning(UserWarning):
    """What limits an FID's comparability: said once per run, or once per sweep by its driver."""


def small_sample_note(num_samples: int) -> str:
    return (
        f"FID from {num_samples} samples, fewer than the {FEATURE_DIMS} Inception features: "
        "the sample covariance is singular and FID is biased upward, "
        "so FIDs are comparable only at equal sample counts (KID is unbiased)"
    )


def fid_comparability(config: FidConfig, reference_images: int, data_name: str) -> list[str]:
    """What limits the comparability of FIDs measured under `config` against a reference of
    `reference_images` images: a sample count below the feature dimension, a reference smaller
    than the one published CIFAR-10 FIDs use."""
    smallest = min(n for n in (config.num_samples, config.final_num_samples) if n)
    notes = [small_sample_note(smallest)] if smallest < FEATURE_DIMS else []
    if reference_images < CIFAR10_TRAIN_IMAGES:
        notes.append(
            f"the FID reference holds {reference_images} {data_name} images, "
            f"not the {CIFAR10_TRAIN_IMAGES:,} CIFAR-10 training images published FIDs use: "
            "compare these FIDs only with FIDs against the same reference"
        )
    return notes


# A covariance needs two images: FID of fewer is undefined (pytorch-fid fails on it with a traceback).
FID_MIN_IMAGES = 2


def load_image_folder(folder: str | os.PathLike) -> list[torch.Tensor]:
    """Every image file in a folder (not recursive, like pytorch-fid) as uint8 (3, H, W) tensors;
    fewer than FID_MIN_IMAGES is a ConfigError."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < FID_MIN_IMAGES:
        found = f"{len(files)} image file" if files else "no image files"
        raise ConfigError(
            f"{folder}: {found} ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            f"FID needs at least {FID_MIN_IMAGES} images, for their covariance"
        )
    images = []
    for path in files:
        with Image.open(path) as img:
            images.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
    return images


def features_of_images(images: list[torch.Tensor], features: FeatureExtractor) -> np.ndarray:
    """The features of a folder's images (`load_image_folder`), as `python -m pytorch_fid` reads them."""
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) == 1:
        return features(torch.stack(images))
    return np.concatenate([features(img[None]) for img in images])  # mixed sizes cannot share a batch


def read_source(source: str | os.PathLike) -> FeatureStats | list[torch.Tensor]:
    """A source of the `python -m pytorch_fid` interface, read without Inception: a `.npz`'s
    statistics, or an image folder's images. Reading every source before loading the network
    refuses one that FID cannot use at once."""
    source = Path(source)
    if source.suffix == ".npz":
        if not source.is_file():
            raise ConfigError(f"{source}: no such statistics file")
        return FeatureStats.load(source)
    if not source.is_dir():
        raise ConfigError(f"{source}: expected an image folder or a .npz statistics file")
    return load_image_folder(source)
