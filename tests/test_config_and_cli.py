"""Run configs: defaults, overrides, and bad input rejected with exit 2 before any work."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from cli.entry import exit_code
from cli.main import app
from diffusion_lib.config import ConfigError, DataConfig, RunConfig, load_config
from diffusion_lib.data import load_dataset

from conftest import CIFAR_ROOT, needs_cifar, sessions_by_status, write_spec

runner = CliRunner()


def test_defaults_reproduce_the_e1_baseline():
    c = RunConfig()
    assert (c.data.name, c.model.base_channels, c.model.dropout) == ("cifar10", 32, 0.1)
    assert (c.diffusion.beta_schedule, c.diffusion.num_timesteps, c.diffusion.prediction) == ("linear", 1000, "eps")
    assert (c.loss.weighting, c.train.batch_size, c.optim.lr, c.train.grad_clip) == ("constant", 4, 1e-4, 1.0)
    assert (c.ema.decay, c.eval.sampler, c.eval.nfe, c.train.seed, c.train.total_steps) == (
        0.999,
        "ddpm",
        50,
        1077,
        10_000,
    )


def test_overrides_are_typed_and_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": 4}, "data": {"root": "somewhere"}}))
    c = load_config(path, ["train.batch_size=128", "loss.weighting=min_snr", "loss.minsnr_gamma=5"])
    assert c.train.batch_size == 128 and c.loss.weighting == "min_snr" and c.loss.minsnr_gamma == 5.0
    assert c.data.root == str(tmp_path / "somewhere")


BAD = [
    ({"train": {"batch_sise": 4}}, "train.batch_sise"),
    ({"trian": {"batch_size": 4}}, "trian"),
    ({"train": {"batch_size": "four"}}, "train.batch_size"),
    ({"train": {"total_steps": -5}}, "train.total_steps"),
    ({"loss": {"minsnr_gamma": 0}}, "loss.minsnr_gamma"),
    ({"loss": {"weighting": "snr"}}, "loss.weighting"),
    ({"eval": {"nfe": 2000}}, "eval.nfe"),
    ({"eval": {"sampler": "euler"}}, "eval.sampler"),
    ({"diffusion": {"beta_schedule": "quadratic"}}, "diffusion.beta_schedule"),
    ({"data": {"download": "yes"}}, "data.download"),
]


@pytest.mark.parametrize("raw, key", BAD, ids=[k for _, k in BAD])
def test_bad_config_exits_2_naming_the_key_and_writes_nothing(tmp_path, raw, key):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert key in result.output
    assert not out.exists()


@pytest.mark.parametrize("override", ["model.base_channels=0", "model.channel_mults=[1, 2"])
def test_bad_override_exits_2(tmp_path, override):
    config, out = tmp_path / "empty.yaml", tmp_path / "run"
    config.write_text("")
    result = runner.invoke(app, ["train", str(config), "--out", str(out), "--set", override])
    assert result.exit_code == 2 and override.split("=")[0] in result.output and not out.exists()
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "command, message",
    [
        ("train {config} --out {tmp}/run --set train.batchsize=3", "train.batchsize: unknown key"),
        ("fid {tmp}/missing.npz {config}", "missing.npz: no such folder or file"),
        ("fid-stats {tmp}/missing --out {tmp}/stats.npz", "missing: not an image folder"),
    ],
    ids=["train", "fid", "fid-stats"],
)
def test_train_and_fid_refuse_bad_input_before_torch_or_ray_is_imported(tmp_path, command, message):
    """Exit 2 in about a second, as `sweep run` does: the input is checked before torch loads."""
    config = tmp_path / "c.yaml"
    config.write_text("")
    args = command.format(config=config, tmp=tmp_path).split()
    probe = (
        "import sys; from typer.testing import CliRunner; from cli.main import app; "
        f"result = CliRunner().invoke(app, {args!r}); "
        "print(result.exit_code, 'torch' in sys.modules, 'ray' in sys.modules); print(result.output)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[0] == "2 False False", done.stdout + done.stderr
    assert message in done.stdout


def test_missing_data_root_names_the_expected_layout(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"name": "cifar10", "root": str(tmp_path / "nowhere")}}))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--out", str(out)])
    assert result.exit_code == 2 and "cifar-10-batches-py" in result.output and not out.exists()


def test_a_corrupt_cifar_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="data_batch_1 is not a CIFAR-10 python batch"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


@needs_cifar
def test_cifar10_subset_loads_as_uint8_images():
    data = load_dataset(DataConfig(name="cifar10", root=str(CIFAR_ROOT)))
    assert len(data) == 5085 and data.images.shape[1:] == (3, 32, 32)
    assert 100 < data.images.float().mean() < 150  # real photographs, not zeros or noise


def test_folder_data_set_reads_any_images(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (48, 40), (i * 80, 10, 200)).save(tmp_path / f"{i}.png")
    data = load_dataset(DataConfig(name="folder", root=str(tmp_path)))
    assert data.images.shape == (3, 3, 32, 32) and data.images[2, 0, 0, 0] == 160


@pytest.mark.slow
def test_sweep_train_console_script_runs_and_resumes(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "shapes", "num_images": 32},
                "model": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1},
                "train": {"total_steps": 10, "batch_size": 4},
                "eval": {"every": 5, "nfe": 3, "grid_size": 4},
                "fid": {"num_samples": 0, "final_num_samples": 0},
                "curvature": {"probes": 0},
            }
        )
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli", "train", str(config), "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1])["step"] == 10
    assert sessions_by_status(out) == {"Success": {"."}, "Failure": set(), "Unknown": set()}  # the run is the logdir
    again = subprocess.run(cmd + ["--set", "train.total_steps=15"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming" in again.stderr and "from step 10" in again.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_the_sweep_command_exits_with_its_code_its_output_flushed_and_its_atexit_handlers_run(tmp_path):
    """`cli.entry` ends the process with os._exit, skipping the interpreter's teardown: what Python
    does at exit that matters still happens — threads finished, atexit handlers run, output
    (block-buffered into a pipe) flushed — and the exit code is the command's."""
    spec = write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4, 2e-4]}})
    marker = tmp_path / "atexit-ran"
    probe = (
        "import atexit, sys, threading, time; from cli.entry import main; "
        f"atexit.register(lambda: open({str(marker)!r}, 'w').close()); "
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start(); "
        "sys.argv[0] = 'sweep'; main()"
    )
    dry_run = subprocess.run(
        [sys.executable, "-c", probe, "run", str(spec), "--dry-run"], capture_output=True, text=True
    )
    assert dry_run.returncode == 0, dry_run.stderr
    assert "lr=0.0002" in dry_run.stdout and dry_run.stdout.rstrip().endswith("thread done")
    assert marker.is_file()
    refused = subprocess.run(
        [sys.executable, "-c", probe, "status", str(tmp_path / "nowhere")], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "no such experiment directory" in refused.stderr


def test_an_exit_with_a_message_is_status_1_with_the_message_on_stderr(capsys):
    assert (exit_code(None), exit_code(130)) == (0, 130)
    assert exit_code("gone wrong") == 1 and capsys.readouterr().err == "gone wrong\n"


def test_a_sweep_worker_ends_after_every_atexit_handler_and_without_the_module_teardown(tmp_path):
    """Ray's worker ends by sys.exit, its own atexit handlers registered at import: `end_at_exit`
    (the sweep's worker setup) runs them, flushes the output and ends the process before the
    interpreter tears its modules down (a module-level object's __del__ never runs)."""
    marker = tmp_path / "ray-atexit-ran"
    probe = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').close())  # as Ray's, at import\n"
        "class Module:\n"
        "    def __del__(self): print('torn down', flush=True)\n"
        "kept = Module()\n"
        "from sweeps.worker_setup import set_up_worker\n"
        "set_up_worker()\n"
        "print('worked')\n"
        "sys.exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "worked\n" and marker.is_file(), done.stdout + done.stderr
    plain = subprocess.run(
        [sys.executable, "-c", probe.replace("set_up_worker()\n", "")], capture_output=True, text=True
    )
    assert plain.stdout == "worked\ntorn down\n"  # the probe can tell a teardown


def test_a_sweep_worker_ends_quietly_when_its_exit_is_raised_where_python_ignores_it():
    """Ray's SIGTERM handler raises SystemExit wherever the signal lands; in a weakref or garbage
    collector callback Python prints it as an ignored exception and goes on. Other exceptions
    raised there are still printed as Python prints them."""
    probe = (
        "import sys, weakref\n"
        "from sweeps.worker_setup import set_up_worker\n"
        "set_up_worker()\n"
        "class Thing: pass\n"
        "first, second = Thing(), Thing()\n"
        "watches = [weakref.ref(first, lambda ref: 1 / 0), weakref.ref(second, lambda ref: sys.exit(1))]\n"
        "del first\n"
        "print('went on', flush=True)\n"
        "del second\n"
        "print('went on after the exit')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "went on\n"), done.stdout + done.stderr
    assert "ZeroDivisionError" in done.stderr and "SystemExit" not in done.stderr
    plain = subprocess.run(
        [sys.executable, "-c", probe.replace("set_up_worker()\n", "")], capture_output=True, text=True
    )
    assert plain.stdout.endswith("went on after the exit\n") and "SystemExit" in plain.stderr  # as Python does


@pytest.mark.parametrize("users_setting", [None, "1"])
def test_a_local_ray_is_started_without_the_idle_workers_unless_the_user_asks(monkeypatch, users_setting):
    """The raylet that `ray.init` starts reads Ray's settings from the environment of that moment."""
    import ray

    from sweeps import runner

    name = "RAY_prestart_worker_first_driver"
    environment = {key: value for key, value in os.environ.items() if key != name}
    if users_setting:
        environment[name] = users_setting
    monkeypatch.setattr(os, "environ", environment)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    at_init = {}
    monkeypatch.setattr(ray, "init", lambda **options: at_init.update(os.environ))
    runner.start_ray(None)
    assert at_init[name] == (users_setting or "0")
