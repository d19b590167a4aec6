"""What a sweep costs before it runs, for `--dry-run`: training steps and images, generated FID
samples and images through Inception, without early stopping and with ASHA's nominal cuts.
"""

from __future__ import annotations

from typing import Any, Optional

from diffusion_lib.config import TOTAL_STEPS_KEY

from .search import Search
from .spec import SweepSpec

# The run-config keys a trial's cost depends on: the cost is worked out once per setting of them
# that the grid makes, not once per trial (a 100,000-point grid mostly varies other keys).
COST_KEYS = (TOTAL_STEPS_KEY, "train.batch_size", "eval.every", "fid.num_samples", "fid.final_num_samples")


def sweep_cost(spec: SweepSpec, stop_at: Optional[int] = None) -> dict[str, int]:
    """What the sweep costs if every trial stops at `stop_at` steps (its own total when None
    or larger): training steps and images, generated FID samples, and images through
    Inception (the reference once, then every FID sample). Exact for grids; a sampled key
    counts at its largest value, so Optuna and random searches get an upper bound."""

    def largest(dist: Search) -> Any:
        numbers = [v for v in dist.candidates() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return max(numbers) if numbers else dist.candidates()[0]

    sampled = {k: largest(d) for k, d in spec.search.items() if not d.is_grid}
    per_point = spec.num_trials // spec.num_grid_points
    totals = dict.fromkeys(("steps", "images", "fid_samples"), 0)
    for setting, points in spec.grid_settings(COST_KEYS, sampled).items():
        config = spec.run_config.with_overrides(dict(setting))
        trials = per_point * points
        steps = min(stop_at or config.train.total_steps, config.train.total_steps)
        milestones = -(-steps // config.eval.every)  # ceil: the last step is a milestone too
        finished = steps == config.train.total_steps
        totals["steps"] += trials * steps
        totals["images"] += trials * steps * config.train.batch_size
        totals["fid_samples"] += trials * (
            milestones * config.fid.num_samples + (config.fid.final_num_samples if finished else 0)
        )
    fid, data = spec.run_config.fid, spec.run_config.data
    reference = (fid.ref_num_images or data.num_images or 50_000) if totals["fid_samples"] else 0  # 50,000: CIFAR-10's
    return {"trials": spec.num_trials, **totals, "inception_images": reference + totals["fid_samples"]}


def asha_cost(spec: SweepSpec) -> dict[str, int]:
    """`sweep_cost` if ASHA promoted exactly 1/reduction_factor of the trials at each rung (its
    nominal schedule; asynchronous promotion can let more through early on)."""
    rungs = [int(r) for r in spec.rungs()] + [spec.max_total_steps()]
    shares = [spec.scheduler.reduction_factor**-k for k in range(len(rungs))]
    stopping = [a - b for a, b in zip(shares, shares[1:] + [0.0])]  # trials that stop at each rung
    totals = [sweep_cost(spec, stop_at=r) for r in rungs]
    return {
        key: round(sum(s * t[key] for s, t in zip(stopping, totals))) if key != "trials" else totals[0][key]
        for key in totals[0]
    }
