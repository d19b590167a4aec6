"""Shared fixtures and helpers: the ../shared material (skipping where absent), tiny configs
and spec files, a stand-in feature extractor for FID plumbing tests, trainer factories that
hand the Trainer parts of the test's choosing, and the runs TensorBoard's HParams Status filter
lists, as its own plugin answers."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

# One BLAS thread per process: tests run beside Ray workers and subprocesses on 2 cores, where
# OpenBLAS's default of a thread per core, oversubscribed, slows the FID linear algebra 10×.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The suite runs in two pytest-xdist workers (pyproject's addopts) on two cores: one torch thread
# each, in this process and in the sweeps it starts, or four threads fight for two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The machine's FID reference cache (fid.cache_dir's default, under $XDG_CACHE_HOME) is the
# suite's own, in this process and every sweep and worker it starts: references of the stand-in
# extractor must never reach a user's cache, where a real run with the same data would load them.
# matplotlib keeps its font cache where it was (rebuilding it costs every process seconds).
_user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
os.environ.setdefault("MPLCONFIGDIR", str(_user_cache / "matplotlib"))
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sweep-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

import pytest  # noqa: E402
import yaml  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

# torch and what imports it load where a helper needs them: pytest-xdist's controller loads this
# file too, and runs no test (5 s of imports there delay both workers' start).
from diffusion_lib.config import TOTAL_STEPS_KEY, RunConfig  # noqa: E402
from diffusion_lib.run_files import METRICS_FILE, FidFloor, metrics_line  # noqa: E402
from record.files import RAY_ERROR_FILE, Summary, SweepFile, TrialFile, TrialOutcome  # noqa: E402

if TYPE_CHECKING:
    import numpy as np
    import torch

    from diffusion_lib.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SWEEP_SHARED_DIR", REPO.parent / "shared"))
CIFAR_ROOT = SHARED / "data"
FID_WEIGHTS = SHARED / "fid" / "pt_inception-2015-12-05-6726825d.pth"

needs_cifar = pytest.mark.skipif(
    not (CIFAR_ROOT / "cifar-10-batches-py" / "data_batch_1").is_file(),
    reason=f"the CIFAR-10 subset is not at {CIFAR_ROOT} (../shared is absent)",
)
needs_fid_weights = pytest.mark.skipif(
    not FID_WEIGHTS.is_file(), reason=f"the FID Inception weights are not at {FID_WEIGHTS} (../shared is absent)"
)


# A run small enough to train in seconds on a CPU.
TINY_RUN = {
    "data": {"name": "shapes", "num_images": 64},
    "model": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1},
    "diffusion": {"num_timesteps": 100},
    "train": {"total_steps": 20, "batch_size": 8},
    "ema": {"decay": 0.8},
    "eval": {"every": 10, "nfe": 5, "grid_size": 4, "batch_size": 16},
    "fid": {"num_samples": 0, "final_num_samples": 0},
    "curvature": {"probes": 0, "batch_size": 4},
}


def tiny_run(**sections) -> dict:
    """TINY_RUN with the keys of `sections` overriding its own, e.g. train={"total_steps": 30}."""
    raw = {name: dict(values) for name, values in TINY_RUN.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def tiny_config(**sections) -> RunConfig:
    return RunConfig.from_dict(tiny_run(**sections))


def write_spec(tmp_path: Path, **fields) -> Path:
    """A sweep spec over TINY_RUN, stored under tmp_path/runs, with `fields` set."""
    spec = {"base": TINY_RUN, "metric": "train/loss", "storage": str(tmp_path / "runs"), "name": "tiny", **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trainer_with_parts(
    config: RunConfig, run_dir: Path, *, trainer_class: type | None = None, loss_class: type | None = None, **kwargs
) -> Trainer:
    """A CPU Trainer built the way `create_trainer` builds one, with a Trainer subclass or a loss
    class of the test's choosing; FID is handed the stand-in feature extractor."""
    import torch

    from diffusion_lib.build import create_model_and_diffusion
    from diffusion_lib.data import load_dataset
    from diffusion_lib.trainer import Trainer

    data = load_dataset(config.data)
    if config.fid.num_samples or config.fid.final_num_samples:
        from diffusion_lib.metrics.fid import reference_statistics

        kwargs.setdefault("features", StandInFeatures())
        kwargs.setdefault(
            "fid_reference",
            reference_statistics(data, kwargs["features"], config.fid.ref_num_images, config.fid.cache_dir),
        )
    torch.manual_seed(config.train.seed)
    model, diffusion, default_loss = create_model_and_diffusion(config, torch.device("cpu"))
    loss = loss_class(diffusion, config.loss.weighting, config.loss.minsnr_gamma) if loss_class else default_loss
    return (trainer_class or Trainer)(config, run_dir, model=model, diffusion=diffusion, loss=loss, data=data, **kwargs)


class StandInFeatures:
    """A fixed random projection of 8×8-pooled pixels: cheap, deterministic features for tests
    about FID plumbing rather than about the Inception network."""

    def __init__(self, dims: int = 16):
        import torch

        self.projection = torch.randn(3 * 8 * 8, dims, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        import torch

        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.cpu().double() / 255, 8).flatten(1)
        return (pooled @ self.projection).numpy()


def trainer_with_standin_fid(config: RunConfig, run_dir: Path, **kwargs) -> Trainer:
    """The product's trainer, handed the stand-in feature extractor in place of Inception."""
    from diffusion_lib.build import create_trainer

    return create_trainer(config, run_dir, features=StandInFeatures(), **kwargs)


def start_test_ray() -> None:
    """A local Ray in the test process, its workers set up as `sweep run` sets up its own, their
    console kept out of the test's output."""
    import ray

    from sweeps import worker_setup

    worker_setup.skip_prestarted_workers()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=worker_setup.RUNTIME_ENV)


def run_sweep_with_standin_fid(spec, *test_modules):
    """A real Ray sweep in this process with the stand-in extractor in the launcher (the sweep's one
    reference pass: asserted) and in every trial; `test_modules` ship to the workers by value."""
    import ray

    from sweeps.runner import run_sweep

    started = not ray.is_initialized()
    if started:
        start_test_ray()
    # An empty machine cache (fid.cache_dir's default), so that the launcher's one reference pass
    # is there to count whatever sweeps this process ran before.
    machine_cache = os.environ["XDG_CACHE_HOME"]
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(dir=machine_cache)
    try:
        for module in (sys.modules[__name__], *test_modules):
            ray.cloudpickle.register_pickle_by_value(module)  # workers cannot import tests
        driver_features = StandInFeatures()
        results = run_sweep(spec, make_trainer=trainer_with_standin_fid, features=driver_features)
    finally:
        os.environ["XDG_CACHE_HOME"] = machine_cache
        if started:
            ray.shutdown()
    assert not results.errors
    floor = FidFloor.read(Path(spec.experiment_path))
    held_out_pass = floor is not None and any(point.fid is not None for point in floor.points)
    assert driver_features.calls == 1 + held_out_pass  # one reference pass (and the floor's), in the launcher
    return results


def as_from_a_terminal() -> None:
    """`preexec_fn` for a child that a test will Ctrl-C: SIGINT at its default disposition, as in
    a terminal's foreground job (a test run started in the background inherits it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---- experiment folders, written with the record's own writers (no Ray) -----------------------


def write_trial(
    experiment: Path,
    name: str,
    rows=(),
    *,
    searched: dict,
    total_steps: int = 30,
    torn: str = "",
    error: str | None = None,
    metrics: bool = True,
    config: dict | None = None,
) -> Path:
    """A trial folder as a sweep leaves it: trial.json, metrics.jsonl (with `torn` appended, as a
    run killed mid-write leaves it) and Ray's error.txt when `error` is given."""
    folder = experiment / name
    TrialFile(searched, {TOTAL_STEPS_KEY: total_steps, **(config or {}), **searched}, "node-1").write(folder)
    if metrics:
        (folder / METRICS_FILE).write_text("".join(metrics_line(r) for r in rows) + torn)
    if error is not None:
        (folder / RAY_ERROR_FILE).write_text(error)
    return folder


def write_sweep_file(experiment: Path, search: dict, metric: str = "val/fid") -> None:
    SweepFile(metric, "min", search).write(str(experiment))


def write_summary(
    experiment: Path, states: dict[str, str], error: str = "NonFiniteLossError: non-finite training loss at step 14"
) -> None:
    Summary({name: TrialOutcome(state, error if state == "errored" else None) for name, state in states.items()}).write(
        str(experiment)
    )


def write_ray_state(experiment: Path, trials: dict[str, str], *, age_s: float = 0.0) -> Path:
    """Ray Tune's experiment_state-*.json as Ray 2.x writes it (Ray's file, not ours: written the
    way Ray writes it): trial_data holds, per trial, its state as a JSON string (status,
    trial_id, relative_logdir, config, …) and its run metadata."""
    import json
    import time

    data = [
        [
            json.dumps(
                {
                    "trial_id": name.split("_")[0],
                    "status": status,
                    "relative_logdir": name,
                    "config": {"optim.lr": 5e-4},
                    "stub": False,
                    "storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": "80"},
                }
            ),
            json.dumps({"num_failures": 0, "error_filename": None}),
        ]
        for name, status in trials.items()
    ]
    path = experiment / "experiment_state-2026-01-01_00-00-00.json"
    path.write_text(json.dumps({"trial_data": data, "runner_data": {}, "stats": {"start_time": 0}}))
    past = time.time() - age_s
    os.utime(path, (past, past))
    if age_s and (experiment / "sweep.json").exists():
        os.utime(experiment / "sweep.json", (past, past))
    return path


def train_into_experiment(experiment: Path, name: str, config: RunConfig, searched: dict, reference=None) -> Path:
    """A trial folder holding a real tiny run, trained here without Ray (FID by the stand-in
    extractor against `reference`), its checkpoints where Ray keeps a trial's."""
    folder = experiment / name
    TrialFile(searched, config.flat(), "node-1").write(folder)
    trainer_with_parts(
        config,
        folder,
        checkpoint_dir=folder / "checkpoint_000000",
        progress=False,
        **({"fid_reference": reference} if reference is not None else {}),
    ).fit()
    return folder


@pytest.fixture
def standin_features() -> StandInFeatures:
    return StandInFeatures()


@pytest.fixture(autouse=True)
def _no_weights_from_the_environment(monkeypatch):
    """Tests say which FID weights they use; a SWEEP_FID_WEIGHTS in the shell must not leak in."""
    monkeypatch.delenv("SWEEP_FID_WEIGHTS", raising=False)


def sessions_by_status(logdir: Path) -> dict[str, set[str]]:
    """The sessions (runs) that TensorBoard's HParams tab lists under each Status filter, as its
    plugin answers the request of the filter's checkbox."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    tensorboard = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))
    listed = {}
    for name in ("Success", "Failure", "Unknown"):
        request = api_pb2.ListSessionGroupsRequest(
            allowed_statuses=[api_pb2.Status.Value(f"STATUS_{name.upper()}")], start_index=0, slice_size=10_000
        )
        response = list_session_groups.Handler(context.RequestContext(), tensorboard, "", request).run()
        listed[name] = {session.name for group in response.session_groups for session in group.sessions}
    return listed
