"""What `sweep run --dry-run` prints: the expanded trial list and its cost, read from the spec
alone, and the warnings a real run would turn into refusals. Nothing starts, so a user can check
a search space before spending a cluster on it."""

from __future__ import annotations

from typing import Optional

from diffusion_lib.config import SEED_KEY
from record.noise import MIN_DYNAMICS_TRIALS
from record.states import trial_count

from .cost import asha_cost, sweep_cost
from .spec import SweepSpec, short_params


def describe(spec: SweepSpec) -> str:
    """The expanded trial list `--dry-run` prints, ending with the line `N trials`."""
    sampled = {k: d for k, d in spec.search.items() if not d.is_grid}
    lines = [
        f"experiment: {spec.name} at {spec.experiment_path}",
        f"algorithm: {spec.algorithm}; scheduler: {_scheduler(spec)}; metric: {spec.metric} ({spec.mode})",
        f"resources per trial: {spec.resources.cpu:g} cpu, {spec.resources.gpu:g} gpu; "
        f"max concurrent: {spec.max_concurrent or 'unlimited'}; max failures: {spec.max_failures}",
    ]
    lines += [f"sampled: {key} ~ {dist.describe()}" for key, dist in sampled.items()]
    lines += _trial_lines(spec, sampled=bool(sampled))
    costs = [("without early stopping", sweep_cost(spec))]
    if spec.scheduler.type == "asha":
        cut = f"1/{spec.scheduler.reduction_factor:g} promoted at each rung"
        costs.append((f"with ASHA's nominal cuts ({cut})", asha_cost(spec)))
    for what, cost in costs:
        lines.append(
            f"cost {what}: {cost['steps']:,} training steps ({cost['images']:,} images), "
            f"{cost['fid_samples']:,} FID samples, "
            f"{cost['inception_images']:,} images through Inception (reference included)"
        )
    lines.append(trial_count(spec.num_trials))
    return "\n".join(lines)


def _scheduler(spec: SweepSpec) -> str:
    """The early-stopping scheduler with its rungs, e.g. `asha (rungs at steps 500, 1000, …)`."""
    scheduler = spec.scheduler
    if scheduler.type == "none":
        return "none"
    rungs = ", ".join(map(str, spec.rungs()))
    rule = {
        "racing": f", stops only beyond {scheduler.z:g} standard errors",
        "racing_dynamics": f", stops only beyond {scheduler.z:g} standard errors of sampling and training dynamics, "
        f"each rung once {MIN_DYNAMICS_TRIALS} trials went past it",
    }.get(scheduler.type, "")
    return (
        f"{scheduler.type} (rungs at steps {rungs}, reduction {scheduler.reduction_factor:g}, "
        f"max_t {spec.max_total_steps()}{rule})"
    )


# Up to this many trials are listed one a line; a longer list shows its first and last few (a
# 100,000-trial grid printed 100,005 lines).
TRIALS_LISTED_IN_FULL = 40
TRIALS_AT_EACH_END = 10


def _trial_lines(spec: SweepSpec, *, sampled: bool) -> list[str]:
    """One numbered line per trial, its grid point and seed, or the first and last few of a long
    list; Optuna's trials are suggested as the search goes, so they are only counted."""
    count = spec.num_trials
    width = max(3, len(str(count)))

    def line(index: int) -> str:
        return f"  {index + 1:>{width}}  {_trial_label(spec, index, sampled=sampled)}"

    if count <= TRIALS_LISTED_IN_FULL:
        return [line(index) for index in range(count)]
    left_out = count - 2 * TRIALS_AT_EACH_END
    return [
        *(line(index) for index in range(TRIALS_AT_EACH_END)),
        f"  {'…':>{width}}  {left_out:,} trials not listed",
        *(line(index) for index in range(count - TRIALS_AT_EACH_END, count)),
    ]


def _trial_label(spec: SweepSpec, index: int, *, sampled: bool) -> str:
    """Trial `index` (from 0) in Ray Tune's order, the order of its trial names: the grid's first
    key varying fastest, the repeats' seeds (searched after every other key) slowest, and the
    whole grid once more for each of `num_samples`."""
    if spec.algorithm == "optuna":
        return f"(Optuna TPE suggestion, seed {spec.seed})"
    within_sample = index % (spec.num_grid_points * spec.repeats)
    point = spec.grid_point(within_sample % spec.num_grid_points)
    if spec.repeats > 1:
        point[SEED_KEY] = spec.seeds[within_sample // spec.num_grid_points]
    return (short_params(point) or "(base config)") + ("  + sampled" if sampled else "")


def dry_run_warnings(spec: SweepSpec, address: Optional[str]) -> list[str]:
    """What a real run would refuse that a dry run can see without starting Ray."""
    if spec.resources.gpu == 0 or address is not None:
        return []
    import torch  # only here, and only to count GPUs: the trial list above prints without it

    if torch.cuda.device_count() == 0:
        return [
            f"resources.gpu: each trial asks for {spec.resources.gpu:g} GPU but this machine has none; "
            "a run here would be refused (set resources.gpu: 0, or attach to a cluster with --address)"
        ]
    return []
