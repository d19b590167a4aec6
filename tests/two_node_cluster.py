"""Start a two-node Ray cluster on this machine, run `sweep run SPEC --address` against it in a
separate process, shut the cluster down. Used by test_sweeps.py; exits with the CLI's code."""

import subprocess
import sys

from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    code = subprocess.call(
        [sys.executable, "-m", "cli", "run", sys.argv[1], "--address", cluster.address, "--no-analyze"]
    )
finally:
    cluster.shutdown()
sys.exit(code)
