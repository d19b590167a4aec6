"""Aggregate training throughput of N small trials sharing one device, against one alone: what
fractional `resources.gpu` (e.g. 0.25 for four trials per GPU) buys. Each trial is a separate
process running the Trainer's step at batch 4, as Ray runs trials.

    python benchmarks/packing.py [--trials 4] [--seconds 20] [--device cuda] [--compile]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import tempfile
import time

import torch
from train_throughput import bench_config

from diffusion_lib.build import create_trainer
from diffusion_lib.config import RunConfig

WORKER_TIMEOUT_S = 600  # a trial that has not reported by then has died (or hangs)


def worker(config: RunConfig, seconds: float, barrier, out) -> None:
    device = config.train.device
    if device == "cpu":
        torch.set_num_threads(1)  # as Ray gives a trial with resources.cpu = 1
    trainer = create_trainer(config, tempfile.mkdtemp(prefix="bench-"), progress=False)
    for _ in range(5):
        trainer.train_step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    barrier.wait(WORKER_TIMEOUT_S)  # every trial has built its trainer and warmed up: start together
    steps, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        trainer.train_step()
        steps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out.put(steps * config.train.batch_size / (time.perf_counter() - begin))


def aggregate(n: int, config: RunConfig, seconds: float, start_method: str = "spawn") -> float:
    """The images/s of `n` trials of `config` training side by side for `seconds`, summed. Each
    trial is a new process ("spawn", as Ray's workers; "fork" starts faster, on a CPU only)."""
    ctx = mp.get_context(start_method)
    out, barrier = ctx.Queue(), ctx.Barrier(n)
    procs = [ctx.Process(target=worker, args=(config, seconds, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    rates, deadline = [], time.monotonic() + WORKER_TIMEOUT_S
    try:
        while len(rates) < n:
            try:
                rates.append(out.get(timeout=1))
            except queue.Empty:
                died = [p.exitcode for p in procs if p.exitcode]
                if died or time.monotonic() > deadline:
                    why = f"exit codes {died}" if died else f"nothing reported in {WORKER_TIMEOUT_S} s"
                    raise RuntimeError(f"{n - len(rates)} of {n} packed trials failed ({why})") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="train.compile: true in every trial")
    args = parser.parse_args()
    config = bench_config(args.device)
    config.train.batch_size, config.train.compile = args.batch_size, args.compile
    one = aggregate(1, config, args.seconds)
    many = aggregate(args.trials, config, args.seconds)
    print(
        f"device {args.device}, batch {args.batch_size}: 1 trial {one:.1f} images/s; "
        f"{args.trials} trials {many:.1f} images/s in all ({many / one:.2f}x)"
    )


if __name__ == "__main__":
    main()
