"""Aggregate training throughput of N small trials sharing one device, against one alone: what
fractional `resources.gpu` (e.g. 0.25 for four trials per GPU) buys. Each trial is a separate
process running the Trainer's step at batch 4, as Ray runs trials.

    python benchmarks/packing.py [--trials 4] [--seconds 20] [--device cuda] [--compile]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time

import torch


def worker(device: str, batch_size: int, compiled: bool, seconds: float, start_at: float, out) -> None:
    from diffusion_lib.build import create_trainer
    from diffusion_lib.config import RunConfig

    if device == "cpu":
        torch.set_num_threads(1)  # as Ray gives a trial with resources.cpu = 1
    config = RunConfig()
    config.data.name, config.data.num_images = "shapes", 2048
    config.train.device, config.train.batch_size, config.train.compile = device, batch_size, compiled
    config.fid.num_samples = config.fid.final_num_samples = 0
    trainer = create_trainer(config, tempfile.mkdtemp(prefix="bench-"), progress=False)
    for _ in range(5):
        trainer.train_step()
    while time.time() < start_at:
        time.sleep(0.01)
    steps, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        trainer.train_step()
        steps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out.put(steps * batch_size / (time.perf_counter() - begin))


def aggregate(n: int, device: str, batch_size: int, compiled: bool, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 20 + 5 * n + (120 if compiled else 0)  # after every process has built its trainer
    procs = [ctx.Process(target=worker, args=(device, batch_size, compiled, seconds, start_at, out)) for _ in range(n)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="train.compile: true in every trial")
    args = parser.parse_args()
    one = aggregate(1, args.device, args.batch_size, args.compile, args.seconds)
    many = aggregate(args.trials, args.device, args.batch_size, args.compile, args.seconds)
    print(
        f"device {args.device}, batch {args.batch_size}: 1 trial {one:.1f} images/s; "
        f"{args.trials} trials {many:.1f} images/s in all ({many / one:.2f}x)"
    )


if __name__ == "__main__":
    main()
