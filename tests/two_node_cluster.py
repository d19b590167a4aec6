"""Start a two-node Ray cluster on this machine, run `sweep run SPEC --address` against it in a
separate process, shut the cluster down; exits with the CLI's code. Used by
test_sweep_processes.py.

With a third argument, the experiment folder, the worker node dies mid-sweep: once a trial
running on it has stored two checkpoints, its raylet and the worker processes it started are
killed (kill -9), as when the machine goes down, and `killed.json` in the working directory
says which trial, on which node, with which milestones stored. The head checks its nodes'
health every second (Ray's default, 3 s × 5 misses, would only slow the test)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Ray's temp folder of this cluster alone: `Cluster` writes its address into the temp folder,
# where a `ray.init()` without an address (another test's, running meanwhile) would join it.
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")  # short: Ray's socket paths

from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs, read from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        started = children.get(todo.pop(), [])
        found += started
        todo += started
    return found


def checkpoints_on(node_id: str, experiment: Path):
    """(trial folder, metrics.jsonl of its newest checkpoint) of a trial running on the node,
    once that checkpoint holds two milestones: the trial went on past its first report, which it
    does only once the driver took that report, so Ray knows of a checkpoint to restart from."""
    for trial_file in experiment.glob("*/trial.json"):
        if json.loads(trial_file.read_text())["node_id"] != node_id:
            continue
        for checkpoint in sorted(trial_file.parent.glob("checkpoint_*"), reverse=True):
            try:
                rows = (checkpoint / "metrics.jsonl").read_text()
            except OSError:  # replaced by a newer one meanwhile
                continue
            return (trial_file.parent, rows) if len(rows.splitlines()) >= 2 else None
    return None


health_checks = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
cluster = Cluster(
    initialize_head=True,
    head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": health_checks},
)
try:
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    sweep = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", sys.argv[1], "--address", cluster.address, "--no-analyze"]
    )
    if len(sys.argv) > 2:
        deadline = time.time() + 180
        while (found := checkpoints_on(worker.node_id, Path(sys.argv[2]))) is None:
            if sweep.poll() is not None or time.time() > deadline:
                sys.exit(f"no trial checkpointed on the worker node (sweep exit code {sweep.poll()})")
            time.sleep(0.1)
        raylet = worker.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        for pid in [raylet.pid, *descendants(raylet.pid)]:
            os.kill(pid, signal.SIGKILL)
        trial, stored = found
        Path("killed.json").write_text(json.dumps({"trial": trial.name, "node_id": worker.node_id, "stored": stored}))
    code = sweep.wait()
finally:
    cluster.shutdown()
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
sys.exit(code)
