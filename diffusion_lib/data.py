"""Image data sets held whole as one uint8 tensor (N, 3, 32, 32) on the training device.

Batches are drawn on that device with one randint and one flip mask: no per-image Python work
in the training loop (CIFAR-10 is 150 MB as uint8, a trivial fraction of a GPU).
"""

from __future__ import annotations

import hashlib
import pickle
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import ConfigError, DataConfig

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_FILE = "test_batch"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".pgm", ".ppm", ".tif", ".tiff"}  # as pytorch-fid
SHAPES_DEFAULT_COUNT = 10_000


class ImageDataset:
    def __init__(self, name: str, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError(f"expected uint8 images of shape (N, 3, 32, 32), got {tuple(images.shape)} {images.dtype}")
        self.name = name
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the image bytes: identifies the content for the FID statistics cache."""
        return hashlib.sha256(self.images.cpu().numpy().tobytes()).hexdigest()[:16]

    def to(self, device: torch.device | str) -> "ImageDataset":
        return ImageDataset(self.name, self.images.to(device))

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A random batch in [-1, 1] with random horizontal flips, drawn on the images' device."""
        index = torch.randint(len(self), (batch_size,), generator=generator, device=self.images.device)
        flip = torch.rand(batch_size, generator=generator, device=self.images.device) < 0.5
        x = self.images[index]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return uint8_to_float(x)


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 exactly as torchvision's `save_image` writes a PNG: (x+1)/2·255 + 0.5, floored."""
    return ((x.float() + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


class CifarBatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch, refusing any global the official files don't use.

    A pickle runs code on load: every global it names can be called with arguments of its choice.
    The official batches hold only dicts, lists, str/bytes, ints and numpy uint8 arrays, whose only
    globals are the three that rebuild an array; anything else is a ConfigError naming the file.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # as the official files (numpy < 2) name it
        ("numpy._core.multiarray", "_reconstruct"),  # the same function, pickled by numpy >= 2
    }

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the dict keys stay bytes: b"data", b"labels"
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ConfigError(
                f"{self.path}: refused to load: "
                f"the pickle references {module}.{name}, which a CIFAR-10 batch never holds"
            )
        return super().find_class(module, name)


def load_cifar10(root: Path, download: bool) -> torch.Tensor:
    folder = root / CIFAR_FOLDER
    if download and not all((folder / f).is_file() for f in CIFAR_TRAIN_FILES):
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    for fname in CIFAR_TRAIN_FILES:
        if not (folder / fname).is_file():
            batches = f"{root}/{CIFAR_FOLDER}/data_batch_1 … data_batch_5"
            raise ConfigError(
                f"data.root={root}: missing {folder / fname}; "
                f"expected the CIFAR-10 python batches {batches} (set data.download: true to fetch them)"
            )
    return torch.cat([_read_cifar_batch(folder / fname, root) for fname in CIFAR_TRAIN_FILES])


def _read_cifar_batch(path: Path, root: Path) -> torch.Tensor:
    try:
        with open(path, "rb") as f:
            entry = CifarBatchUnpickler(f, path).load()
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    except ConfigError:
        raise
    except Exception as err:  # a truncated or foreign file: name it, don't trace back
        raise ConfigError(f"data.root={root}: {path} is not a CIFAR-10 python batch ({err})") from None
    return torch.from_numpy(data)


def load_folder(root: Path) -> torch.Tensor:
    if not root.is_dir():
        raise ConfigError(f"data.root={root}: not a folder; the folder data set reads the image files inside it")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"data.root={root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                side = min(img.size)
                left, top = (img.width - side) // 2, (img.height - side) // 2
                img = img.crop((left, top, left + side, top + side))
                if img.size != (32, 32):
                    img = img.resize((32, 32), Image.BICUBIC)
                images.append(np.asarray(img))
        except OSError as err:
            raise ConfigError(f"data.root={root}: cannot read image {path} ({err})") from None
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def make_shapes(num_images: int, seed: int = 0) -> torch.Tensor:
    """Deterministic coloured discs, squares and triangles on two-colour gradient backgrounds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31.0
    n = num_images
    bg_a, bg_b, fg = (rng.uniform(0, 1, (n, 3, 1, 1)).astype(np.float32) for _ in range(3))
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.5).clip(0, 1)[:, None]
    images = bg_a * (1 - ramp) + bg_b * ramp
    cx, cy = (rng.uniform(0.3, 0.7, (n, 1, 1)) for _ in range(2))
    size = rng.uniform(0.12, 0.3, (n, 1, 1))
    kind = rng.integers(0, 3, (n, 1, 1))
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < size**2
    square = (np.abs(xx - cx) < size) & (np.abs(yy - cy) < size)
    triangle = (yy - cy < size) & (np.abs(xx - cx) < (yy - cy + size) / 2)
    mask = np.where(kind == 0, disc, np.where(kind == 1, square, triangle))[:, None]
    images = np.where(mask, fg, images)
    return torch.from_numpy((images * 255 + 0.5).astype(np.uint8))


def load_dataset(config: DataConfig, seed: int = 0) -> ImageDataset:
    """Load the configured data set on the CPU; `ConfigError` names what is wrong with it."""
    if config.name == "shapes":
        images = make_shapes(config.num_images or SHAPES_DEFAULT_COUNT, seed=seed)
    elif config.name == "cifar10":
        images = load_cifar10(Path(config.root), config.download)
    else:
        images = load_folder(Path(config.root))
    if config.num_images is not None:
        available = images.shape[0]
        if config.num_images > available:
            raise ConfigError(
                f"data.num_images={config.num_images} but {config.name} at {config.root} has only {available} images"
            )
        images = images[: config.num_images]
    return ImageDataset(config.name, images.contiguous())


def held_out_images(config: DataConfig, data: ImageDataset, num_reference: int) -> tuple[ImageDataset, str]:
    """Real images outside the FID reference (the first `num_reference` of `data`), and where they
    come from in words: the CIFAR-10 test split where the data has one, else the training images
    after the reference (none when the reference holds them all)."""
    test_batch = Path(config.root) / CIFAR_FOLDER / CIFAR_TEST_FILE
    if config.name == "cifar10" and test_batch.is_file():
        return ImageDataset(data.name, _read_cifar_batch(test_batch, Path(config.root))), "the CIFAR-10 test split"
    return ImageDataset(data.name, data.images[num_reference:].cpu()), "training images outside the reference"
