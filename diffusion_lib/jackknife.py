"""The delete-d jackknife's standard errors from its replicates (Shao & Wu 1989, Ann. Statist.
17:1176), torch-free so that the record's noise rule (`record.noise`) and the readers that
compare FIDs start without torch. `metrics.frechet` computes the replicates.
"""

from __future__ import annotations

import numpy as np


def replicate_stderr(replicates: np.ndarray, num_samples: int) -> float:
    """The delete-d jackknife standard error from G replicates of N − d samples each:

    SE² = (N − d) / (d · G) · Σ_g (F_g − F̄)².
    """
    replicates = np.asarray(replicates, dtype=np.float64)
    groups = replicates.size
    d = num_samples // groups
    return float(np.sqrt((num_samples - d) / (d * groups) * np.sum((replicates - replicates.mean()) ** 2)))


def paired_stderr(replicates_a: np.ndarray, replicates_b: np.ndarray, num_samples: int) -> float:
    """Standard error of FID_a − FID_b for two sample sets drawn from the same noise (same N,
    same groups): the jackknife of the difference, whose replicates are the differences of the
    two jackknifes' replicates. Shared sampling noise cancels in it; for independent sets it
    agrees with √(se_a² + se_b²)."""
    a, b = np.asarray(replicates_a, dtype=np.float64), np.asarray(replicates_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired replicates need the same number of groups, got {a.size} and {b.size}")
    return replicate_stderr(a - b, num_samples)
