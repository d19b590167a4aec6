"""Sweeps on cloud storage, against a real S3 API on 127.0.0.1 (moto's standalone server, in its
own process): run, kill -9 and resume, `sweep status` and `sweep analyze` on an s3:// experiment;
a 10 s storage outage mid-sweep; the shared FID reference uploaded once and downloaded by the
trials; bad storage refused with exit 2 before Ray starts. Nothing of this project is mocked:
every byte goes through pyarrow's S3 filesystem (the project's and Ray Tune's) over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

from cli.main import app
from diffusion_lib.run_files import SAMPLES_DIR, sample_grid_name
from record import mirror, storage
from sweeps.spec import load_spec

from conftest import TINY_RUN, run_sweep_with_standin_fid, tiny_run, write_spec

BUCKET = "sweeps-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# Settings from the developer's shell that would send requests elsewhere or change how they are signed.
FOREIGN = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_REGION",
    "RAY_ADDRESS",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, port: int, process: subprocess.Popen):
        self.port = port
        self.process = process
        self.endpoint = f"http://127.0.0.1:{port}"
        self.fs = pafs.S3FileSystem(
            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region="us-east-1",
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            allow_bucket_creation=True,
        )

    def files(self, prefix: str) -> list[str]:
        """Object keys under `BUCKET/prefix`, relative to it."""
        root = f"{BUCKET}/{prefix}".rstrip("/")
        infos = self.fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{BUCKET}/{key}") as f:
            return f.read()

    def read(self, key: str) -> str:
        return self.read_bytes(key).decode()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port, with an empty bucket; skipped only if it cannot start."""
    if tuple(int(p) for p in version("moto").split(".")[:3]) < (5, 2, 2):
        pytest.fail(
            f"moto {version('moto')}: its server answers CompleteMultipartUpload with a root element pyarrow "
            "rejects (getmoto/moto#10055, fixed in 5.2.2); install the test extra: pip install -e '.[test]'"
        )
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 60
        while True:
            if server.poll() is not None:
                pytest.skip(f"the local S3 server (moto) exited at start: {log.read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.skip("the local S3 server (moto) did not listen within 60 s")
                time.sleep(0.2)
        s3 = S3Server(port, server)
        s3.fs.create_dir(BUCKET)
        yield s3
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture
def aws_env(s3, monkeypatch) -> S3Server:
    """The usual AWS variables pointing at the local server (AWS_ENDPOINT_URL is what pyarrow,
    hence this project and Ray Tune, reads for a non-AWS endpoint); removed after the test."""
    for name in FOREIGN:
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    return s3


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def newest_ray_state(s3: S3Server, prefix: str) -> list[tuple[str, dict]]:
    """(trial folder, last result) per trial in Ray's newest experiment_state-*.json in the bucket."""
    states = [k for k in s3.files(prefix) if k.startswith("experiment_state-") and "/" not in k]
    if not states:
        return []
    try:
        data = json.loads(s3.read(f"{prefix}/{max(states)}"))
        trials = []
        for trial_json, metadata_json in data["trial_data"]:
            trial, metadata = json.loads(trial_json), json.loads(metadata_json)
            trials.append((trial.get("relative_logdir") or trial["trial_id"], metadata.get("last_result") or {}))
        return trials
    except (OSError, ValueError, KeyError, TypeError):  # caught mid-upload
        return []


@pytest.mark.parametrize("case", ["unknown scheme", "malformed", "unreachable endpoint", "missing bucket"])
def test_bad_storage_is_exit_2_before_ray_starts(aws_env, tmp_path, monkeypatch, case):
    storage_uri, expected = {
        "unknown scheme": ("nosuchscheme://x/runs", "storage: nosuchscheme://x/runs is not a location pyarrow"),
        "malformed": ("s3:///runs", "storage: s3:///runs is not a location pyarrow"),
        "unreachable endpoint": (f"s3://{BUCKET}/runs", f"storage: cannot reach s3://{BUCKET}/runs"),
        "missing bucket": (
            "s3://no-such-bucket/runs",
            "storage: s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist",
        ),
    }[case]
    if case == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert not ray.is_initialized()
    spec = write_spec(tmp_path, storage=storage_uri, search={"optim.lr": {"grid": [1e-4]}})
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert f"error: {expected}" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert not ray.is_initialized()  # refused before Ray started, so before any trial
    assert aws_env.files("") == []  # and nothing was written to the bucket
    if case != "unreachable endpoint":  # the same check (each try there waits out pyarrow's retries)
        for command in ("status", "analyze"):
            result = CliRunner().invoke(app, [command, storage_uri.replace("/runs", "/runs/tiny")])
            assert (
                result.exit_code == 2
                and f"error: {expected.replace('storage: ', 'EXPERIMENT: ').replace('/runs', '/runs/tiny')}"
                in result.output
            ), result.output


@pytest.mark.slow
def test_s3_sweep_killed_resumed_then_status_and_analyze(aws_env, tmp_path, monkeypatch):
    s3 = aws_env
    total = 40
    spec = write_spec(
        tmp_path,
        base=tiny_run(train={"total_steps": total}, eval={"every": 20}),
        search={"optim.lr": {"grid": [1e-4, 2e-4]}},
        max_concurrent=1,
        storage=f"s3://{BUCKET}/sweeps",
    )
    prefix, uri = "sweeps/tiny", f"s3://{BUCKET}/sweeps/tiny"
    cmd = [sys.executable, "-m", "cli", "run", str(spec), "--no-analyze"]
    env = dict(os.environ)
    driver = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )

    # Kill once Ray's state in the bucket records a checkpoint of an unfinished trial (then --resume
    # must restore that trial from it, or from a later one), i.e. mid-sweep with a checkpoint stored.
    deadline = time.time() + 150
    try:
        while True:
            known = [
                (t, r)
                for t, r in newest_ray_state(s3, prefix)
                if r.get("checkpoint_dir_name") and r.get("step", total) < total
            ]
            if known:
                interrupted, last = known[0]
                try:  # the milestones that checkpoint holds
                    before = rows(s3.read(f"{prefix}/{interrupted}/{last['checkpoint_dir_name']}/metrics.jsonl"))
                    break
                except OSError:  # already replaced by a newer checkpoint: look again
                    pass
            if driver.poll() is not None or time.time() > deadline:
                pytest.fail(
                    f"the sweep did not reach the kill point (exit code {driver.poll()}); in the bucket: "
                    f"{s3.files(prefix)}"
                )
            time.sleep(0.3)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # Just killed, Ray's state in the bucket seconds old: the driver lock there names the killed
    # pid, on this host, so status says at once that the sweep is not running (record.driver_lock).
    status = CliRunner().invoke(app, ["status", uri])
    killed = f"{uri}: sweep not running: its driver (pid {driver.pid} on host {socket.gethostname()}, "
    assert status.exit_code == 0 and killed in status.output and "no longer runs" in status.output, status.output
    assert before and before[-1]["step"] == last["step"]
    # What a resume will do, read from the bucket: the interrupted trial continues from its checkpoint.
    plan = CliRunner().invoke(app, ["run", str(spec), "--resume", "--dry-run"])
    assert plan.exit_code == 0 and plan.stdout.startswith(f"resuming {uri}:"), plan.output
    assert re.search(rf"^    {interrupted}  \w+: continues from its checkpoint at step", plan.stdout, re.M), plan.stdout

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary_uploaded = time.time()  # at the latest
    files = s3.files(prefix)
    trials = sorted({key.split("/")[0] for key in files if key.endswith("/trial.json")})
    assert len(trials) == 2 and interrupted in trials
    for trial in trials:
        assert [r["step"] for r in rows(s3.read(f"{prefix}/{trial}/metrics.jsonl"))] == list(
            range(20, total + 1, 20)
        ), trial
        assert f"{trial}/events.out.tfevents.session_end" in files  # TensorBoard's HParams status, on S3 too
    after = rows(s3.read(f"{prefix}/{interrupted}/metrics.jsonl"))
    assert after[: len(before)] == before  # resumed from its checkpoint (same rows, same wall times), not from step 0
    assert {"sweep.json", "experiment_summary.json"} <= set(files)
    assert any(key.startswith("events.out.tfevents.") and key.endswith(".hparams") for key in files)
    summary = json.loads(s3.read(f"{prefix}/experiment_summary.json"))
    assert {t["state"] for t in summary["trials"].values()} == {"finished"} and sorted(summary["trials"]) == trials

    # sweep analyze to a local folder
    out = tmp_path / "analysis"
    analysed = CliRunner().invoke(app, ["analyze", uri, "--out", str(out)])
    assert analysed.exit_code == 0, analysed.output
    for name in (
        "report.md",
        "report.html",
        "trials.parquet",
        "milestones.parquet",
        "best_grid.png",
        "loss_vs_step.png",
    ):
        assert (out / name).is_file(), name
    ranked = sorted(pq.read_table(out / "trials.parquet").to_pylist(), key=lambda t: t["best.value"])
    assert len(ranked) == 2
    assert pq.read_table(out / "milestones.parquet").num_rows == 2 * total // 20
    assert not any(key.startswith("analysis/") for key in s3.files(prefix))
    # The grids are the ones the best milestones recorded in the bucket.
    best_milestone_grids = [f"{t['trial_id']}/{SAMPLES_DIR}/{sample_grid_name(t['best.step'])}" for t in ranked]
    for file, grid in zip(["best_grid.png", "grid_rank2.png"], best_milestone_grids):
        assert (out / file).read_bytes() == s3.read_bytes(f"{prefix}/{grid}"), file

    # sweep status, from the bucket through a local mirror whose file times are the objects' (the
    # summary was uploaded at least 6 s ago, not just now)
    time.sleep(max(0.0, summary_uploaded + 6 - time.time()))
    status = CliRunner().invoke(app, ["status", uri])
    assert status.exit_code == 0, status.output
    assert f"{uri}: sweep ended" in status.output and "2 finished" in status.output
    assert not re.search(r"written [0-4] s ago", status.output), status.output
    assert tempfile.gettempdir() not in status.output  # the mirror's path is not shown

    # sweep analyze into the bucket, recording what its mirror downloads (and downloading it)
    downloaded: list[str] = []

    def fetch_all(fs, items):
        downloaded.extend(info.path.removeprefix(f"{BUCKET}/{prefix}/") for _, info in items)
        storage.fetch_all(fs, items)

    monkeypatch.setattr(mirror, "fetch_all", fetch_all)
    analysed = CliRunner().invoke(app, ["analyze", uri])
    assert analysed.exit_code == 0, analysed.output
    # One checkpoint, the best trial's (for the denoising diagnostic), and the two grids: not
    # each trial's newest and best checkpoints, nor every milestone's grid.
    checkpoints = [path for path in downloaded if path.endswith(".pt")]
    assert len(checkpoints) == 1 and checkpoints[0].startswith(f"{ranked[0]['trial_id']}/checkpoint_"), downloaded
    assert sorted(path for path in downloaded if path.endswith(".png")) == sorted(best_milestone_grids)
    assert f"wrote {uri}/analysis/report.md" in analysed.output
    uploaded = {key.removeprefix("analysis/") for key in s3.files(prefix) if key.startswith("analysis/")}
    assert {"report.md", "report.html", "trials.parquet", "milestones.parquet", "best_grid.png"} <= uploaded
    assert "best_grid.png" in s3.read(f"{prefix}/analysis/report.md")
    assert s3.read_bytes(f"{prefix}/analysis/best_grid.png") == s3.read_bytes(f"{prefix}/{best_milestone_grids[0]}")


@pytest.mark.slow
def test_a_storage_outage_mid_sweep_loses_no_milestone_and_repeats_none(aws_env, tmp_path):
    """The S3 server stops answering for 10 s (SIGSTOP: requests hang and time out, as with a
    network partition) while a trial reports its milestones, then answers again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s3 = aws_env
    total, every = 120, 30
    spec = write_spec(
        tmp_path,
        base=tiny_run(train={"total_steps": total}, eval={"every": every}),
        search={"optim.lr": {"grid": [1e-4]}},
        max_failures=3,
        storage=f"s3://{BUCKET}/outage",
    )
    prefix = "outage/tiny"
    cmd = [sys.executable, "-m", "cli", "run", str(spec), "--no-analyze"]
    log = tmp_path / "console.txt"
    with open(log, "w") as console:
        driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 120
            while not any("/checkpoint_" in key for key in s3.files(prefix)):  # a milestone stored: mid-trial
                if driver.poll() is not None or time.time() > deadline:
                    pytest.fail(
                        f"no checkpoint reached the bucket (exit code {driver.poll()}): {log.read_text()[-2000:]}"
                    )
                time.sleep(0.2)
            os.killpg(s3.process.pid, signal.SIGSTOP)
            time.sleep(10)
        finally:
            os.killpg(s3.process.pid, signal.SIGCONT)
        code = driver.wait(timeout=300)
    output = log.read_text()
    if code != 0:  # Ray gave up: the record says how to finish it
        resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        output += resumed.stdout + resumed.stderr

    # Ray's storage calls retry, so a trial may ride the outage out (on a loaded machine, where
    # its reports are far apart); a report the outage failed is one line, with what happens next.
    # No traceback on the console either way.
    failures = [line for line in output.splitlines() if re.match(r"trial \S+: (attempt \d+ failed|errored) \(", line)]
    assert not failures or any("OSError" in line for line in failures), output[-3000:]
    assert "Traceback" not in output and "Trial task failed" not in output, output[-3000:]
    # Every milestone once, in metrics.jsonl and in TensorBoard's scalars.
    (trial,) = {key.split("/")[0] for key in s3.files(prefix) if key.endswith("/trial.json")}
    steps = list(range(every, total + 1, every))
    assert [r["step"] for r in rows(s3.read(f"{prefix}/{trial}/metrics.jsonl"))] == steps
    local = storage.download_tree(f"s3://{BUCKET}/{prefix}/{trial}", tmp_path / "trial")
    events = EventAccumulator(str(local), size_guidance={"scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == steps
    summary = json.loads(s3.read(f"{prefix}/experiment_summary.json"))
    assert [t["state"] for t in summary["trials"].values()] == ["finished"]


@pytest.mark.slow
def test_fid_reference_is_computed_once_uploaded_and_downloaded_by_the_trials(aws_env, tmp_path, monkeypatch):
    """The endpoint in the URI's query this time (pyarrow's options, which Ray Tune passes on too),
    not in the environment."""
    s3 = aws_env
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    query = f"endpoint_override=127.0.0.1:{s3.port}&scheme=http"
    base = {**TINY_RUN, "fid": {"num_samples": 8, "final_num_samples": 16, "cache_dir": str(tmp_path / "fid_cache")}}
    spec = load_spec(
        write_spec(
            tmp_path,
            base=base,
            metric="val/fid",
            search={"optim.lr": {"grid": [1e-4, 2e-4]}},
            storage=f"s3://{BUCKET}/fid?{query}",
        )
    )
    run_sweep_with_standin_fid(spec)

    files = s3.files("fid/tiny")
    references = [key for key in files if key.startswith("fid_reference/")]
    assert len(references) == 1 and references[0].endswith(".npz")
    name = references[0].split("/")[1]
    # The launcher's one reference is also the machine's (fid.cache_dir), for the next sweep, as is its floor.
    assert sorted(p.name for p in (tmp_path / "fid_cache").iterdir()) == ["floors", name]
    reference_uri = storage.join(f"s3://{BUCKET}/fid/tiny?{query}", "fid_reference", name)
    trial_files = [key for key in files if key.endswith("/trial.json")]
    assert len(trial_files) == 2
    for key in trial_files:
        assert json.loads(s3.read(f"fid/tiny/{key}"))["config"]["fid.reference"] == reference_uri  # the URI is recorded
        milestones = rows(s3.read(f"fid/tiny/{key.split('/')[0]}/metrics.jsonl"))
        fids = [r for r in milestones if r.get("val/fid") is not None]
        assert fids and all(r["val/fid_reference"] == name for r in fids)
    assert {"sweep.json", "experiment_summary.json"} <= set(files)
