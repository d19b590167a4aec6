"""Training and sampling images/s of the default UNetCifar32, ours against a plain reference loop.

Ours: the Trainer's step (data set resident on the device, batches drawn there; bf16 autocast,
channels_last and fused Adam on CUDA), eager and with `train.compile`. Plain: the same model
trained the way home-made harnesses usually are: torchvision DataLoader with per-image PIL
transforms, fp32 eager. Model FLOP utilisation counts the network's forward and backward FLOPs
(torch.utils.flop_counter) against the device's dense bf16 peak.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--steps 20] [--batch-sizes 4 128]
        [--compile] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lib.build import create_diffusion, create_loss, create_model, create_trainer
from diffusion_lib.config import RunConfig
from diffusion_lib.data import load_dataset

# Dense bf16 peak TFLOP/s by device name (NVIDIA data sheets, SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
RUN_DIR = tempfile.mkdtemp(prefix="bench-")  # the trainers' logs; nothing here is kept


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_config(device: str) -> RunConfig:
    """The default run (E1's network, batch 4) on 2,048 procedural shapes, FID off."""
    config = RunConfig()
    config.data.name, config.data.num_images = "shapes", 2048
    config.train.device = device
    config.fid.num_samples = config.fid.final_num_samples = 0
    return config


class PerImageDataset(Dataset):
    """uint8 images through PIL and torchvision transforms, one image at a time."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.transform = T.Compose(
            [T.ToPILImage(), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def plain_loop_images_per_s(config: RunConfig, device: torch.device, batch_size: int, steps: int) -> float:
    images = load_dataset(config.data).images
    loader = DataLoader(PerImageDataset(images), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=2)
    model = create_model(config.model).to(device)  # no channels_last: the plain way
    loss_fn = create_loss(config.loss, create_diffusion(config.diffusion, device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    done, start = 0, None
    while done < steps + 3:
        for x0 in loader:
            if done == 3:
                sync(device)
                start = time.perf_counter()
            x0 = x0.to(device)
            t = torch.randint(1000, (batch_size,), device=device)
            loss = loss_fn.per_sample(model, x0, t, torch.randn_like(x0)).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss.item()  # the usual per-step logging sync
            done += 1
            if done == steps + 3:
                break
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def training_flops_per_image(config: RunConfig) -> float:
    """Forward + backward FLOPs of the network for one 32×32 image."""
    model = create_model(config.model)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)).sum().backward()
    return counter.get_total_flops()


def ours_images_per_s(config: RunConfig, device: torch.device, batch_size: int, steps: int) -> float:
    config.train.batch_size = batch_size
    trainer = create_trainer(config, RUN_DIR, progress=False)
    for _ in range(3):  # with train.compile, the first step compiles and the next record CUDA graphs
        trainer.train_step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def sampling_images_per_s(config: RunConfig, device: torch.device, sampler: str, batch_size: int) -> float:
    config.eval.sampler, config.eval.batch_size = sampler, batch_size
    trainer = create_trainer(config, RUN_DIR, progress=False)
    trainer.generate(min(batch_size, 8))
    sync(device)
    start = time.perf_counter()
    trainer.generate(batch_size)
    sync(device)
    return batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 128])
    parser.add_argument(
        "--sample-batch", type=int, default=None, help="sampling batch (default 500 on CUDA, 32 on CPU)"
    )
    parser.add_argument("--compile", action="store_true", help="also time the step with train.compile")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    def config() -> RunConfig:
        return bench_config(args.device)

    flops = training_flops_per_image(config())
    print(
        f"device: {device} ({name if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}; network forward+backward {flops / 1e9:.2f} GFLOP per image"
        + (f"; MFU against {peak:g} TFLOP/s" if peak else "")
    )
    print(f"{'training images/s':<20}{'ours':>9}{'compiled':>10}{'plain':>9}{'speed-up':>10}{'TFLOP/s':>9}{'MFU':>7}")
    for b in args.batch_sizes:
        ours = ours_images_per_s(config(), device, b, args.steps)
        compiled = None
        if args.compile:
            c = config()
            c.train.compile = True
            compiled = ours_images_per_s(c, device, b, args.steps)
        plain = plain_loop_images_per_s(config(), device, b, args.steps)
        best = max(ours, compiled or 0.0)
        tflops = best * flops / 1e12
        print(
            f"{'  batch ' + str(b):<20}{ours:>9.1f}{compiled or float('nan'):>10.1f}{plain:>9.1f}{best / plain:>9.2f}x"
            f"{tflops:>9.3f}{f'{tflops / peak:.1%}' if peak else '-':>7}"
        )
    sample_batch = args.sample_batch or (500 if device.type == "cuda" else 32)
    for sampler in ("ddpm", "ddim"):
        rate = sampling_images_per_s(config(), device, sampler, sample_batch)
        print(f"{'sampling 50-NFE ' + sampler + ' images/s':<28}{rate:>10.1f}   (batch {sample_batch})")


if __name__ == "__main__":
    main()
