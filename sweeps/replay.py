"""Would early stopping have kept the grid's best, and what would it have saved? One full grid's
recorded curves replayed through Ray's own ASHA, `RacingScheduler` and `DynamicsRacingScheduler`.

Which trials ASHA cuts depends on which reach a rung first, so one sweep is one draw. The replay
draws many: in each arrival order the trials start in a random order, at most `concurrency` at
a time, each at a random speed, so their milestones arrive interleaved as in a real run, and a
fresh instance of each scheduler is handed every milestone row through the methods Tune calls
(`on_trial_add`, `on_trial_result`, `on_trial_complete`). A STOP ends that trial where it stands
and frees its slot for the next. Every scheduler sees the same orders and speeds.

Per order and scheduler it records the trial-steps used (the last step each trial reached) as a
share of the grid's, the best FID seen, whether that is the grid's best or within noise of it
(`record.noise`'s rule: a gap within two standard errors, paired from the two milestones'
jackknife replicates where they have them), and which trials were stopped where. `replay`
computes a `ReplayInfo`, with how far rankings moved after each rung on the whole grid (the
training-dynamics term); `render` writes it as a short table, the schedulers side by side.

The grid's best is the lowest `val/fid` over every trial's milestones: the curves must hold FIDs
measured at one sample count against one reference (the caller checks).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from diffusion_lib.milestone import FID, STEP
from record.best import is_finite_number
from record.noise import (
    DEFAULT_CUT_Z,
    MIN_DYNAMICS_TRIALS,
    NOISE_MULTIPLE,
    Measurement,
    RungDynamics,
    difference,
    rung_dynamics,
    rungs,
)

if TYPE_CHECKING:
    from ray.tune.schedulers import TrialScheduler

STOP = "STOP"  # ray.tune.schedulers.TrialScheduler.STOP, the decision that ends a trial
SPEEDS = (0.75, 1.25)  # each trial's steps per unit time, drawn uniformly from this range

Curves = dict[str, list[dict[str, Any]]]  # trial id -> its milestone rows in step order


@dataclass(frozen=True)
class ReplayRun:
    """One arrival order through one scheduler."""

    arrival: tuple[str, ...]  # the order the trials started in
    steps_share: float  # trial-steps used / the grid's
    best_trial: str  # where the lowest FID seen in this run was
    best_step: int
    best_fid: float
    kept_best: bool  # that FID is the grid's best or within noise of it
    stopped: dict[str, int]  # trial -> the step at which the scheduler stopped it (before its end)


@dataclass(frozen=True)
class SchedulerReplay:
    """Every arrival order through one scheduler."""

    name: str
    runs: tuple[ReplayRun, ...]

    @property
    def kept_best_share(self) -> float:
        return statistics.fmean(run.kept_best for run in self.runs)

    @property
    def steps_share_mean(self) -> float:
        return statistics.fmean(run.steps_share for run in self.runs)

    @property
    def steps_share_min(self) -> float:
        return min(run.steps_share for run in self.runs)

    @property
    def steps_share_max(self) -> float:
        return max(run.steps_share for run in self.runs)

    @property
    def stop_counts(self) -> Counter:
        """(trial, step) -> in how many orders the trial was stopped at that step."""
        return Counter(stop for run in self.runs for stop in run.stopped.items())


@dataclass(frozen=True)
class ReplayInfo:
    """The replay's settings, the grid's own figures, and each scheduler's replays (ASHA, racing)."""

    grace_period: float
    reduction_factor: float
    max_t: float
    z: float
    concurrency: int
    num_orders: int
    seed: int
    num_trials: int
    grid_trial_steps: int
    best_trial: str
    best_step: int
    best_fid: float
    best_stderr: float | None
    schedulers: tuple[SchedulerReplay, ...]
    dynamics: tuple[RungDynamics, ...]  # each rung's, from the whole grid


@dataclass(frozen=True)
class _ReplayTrial:
    """What the schedulers read of a Tune trial: its id."""

    trial_id: str


def _lowest_fid(rows: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """The (trial, row) with the lowest finite FID."""
    finite = [(t, r) for t, r in rows if is_finite_number(r.get(FID.name))]
    if not finite:
        raise ValueError(f"no milestone holds a finite {FID.name}")
    return min(finite, key=lambda tr: tr[1][FID.name])


def _run_order(
    curves: Curves,
    arrival: tuple[str, ...],
    speeds: dict[str, float],
    concurrency: int,
    scheduler: TrialScheduler,
    grid_best: dict[str, Any],
    grid_trial_steps: int,
) -> ReplayRun:
    """The trials through `scheduler` in `arrival` order: milestone events in time order, a
    trial's row i at its start time + step_i / speed."""
    waiting = list(arrival)
    events: list[tuple[float, int, str, int]] = []  # (time, tie-break, trial, row index)
    tie_break = itertools.count()
    started: dict[str, float] = {}
    reached: dict[str, int] = {}
    stopped: dict[str, int] = {}
    seen: list[tuple[str, dict[str, Any]]] = []

    def start(trial_id: str, now: float) -> None:
        scheduler.on_trial_add(None, _ReplayTrial(trial_id))
        started[trial_id] = now
        arrive(trial_id, 0)

    def arrive(trial_id: str, index: int) -> None:
        time = started[trial_id] + curves[trial_id][index][STEP.name] / speeds[trial_id]
        heapq.heappush(events, (time, next(tie_break), trial_id, index))

    while waiting and len(started) < concurrency:
        start(waiting.pop(0), 0.0)
    while events:
        now, _, trial_id, index = heapq.heappop(events)
        row = curves[trial_id][index]
        seen.append((trial_id, row))
        decision = scheduler.on_trial_result(None, _ReplayTrial(trial_id), dict(row))
        last = index == len(curves[trial_id]) - 1
        if decision == STOP or last:
            scheduler.on_trial_complete(None, _ReplayTrial(trial_id), dict(row))
            reached[trial_id] = row[STEP.name]
            if not last:
                stopped[trial_id] = row[STEP.name]
            if waiting:
                start(waiting.pop(0), now)
        else:
            arrive(trial_id, index + 1)

    best_trial, best = _lowest_fid(seen)
    above_best = difference(Measurement.from_row(best, FID.name), Measurement.from_row(grid_best, FID.name))
    return ReplayRun(
        arrival=arrival,
        steps_share=sum(reached.values()) / grid_trial_steps,
        best_trial=best_trial,
        best_step=best[STEP.name],
        best_fid=best[FID.name],
        kept_best=above_best.gap <= above_best.margin(NOISE_MULTIPLE),
        stopped=stopped,
    )


def replay(
    curves: Curves,
    *,
    grace_period: float,
    reduction_factor: float,
    max_t: float,
    z: float = DEFAULT_CUT_Z,
    concurrency: int = 2,
    num_orders: int = 200,
    seed: int = 0,
    pilots: Sequence[int] = (MIN_DYNAMICS_TRIALS,),
) -> ReplayInfo:
    """Replay the grid's `curves` in `num_orders` random arrival orders through a fresh ASHA, a
    fresh RacingScheduler, a fresh DynamicsRacingScheduler for each pilot count in `pilots`
    (the trials that must go past a rung before it cuts) and one told the whole grid's term from
    the start ("dynamics known": no pilots, a bound on what they cost), all on the same rungs
    (grace period, reduction factor, max_t in steps)."""
    from ray.tune.schedulers import ASHAScheduler  # Ray loads only once the input is read and checked

    from .racing import DynamicsRacingScheduler, RacingScheduler

    curves = {trial_id: rows for trial_id, rows in curves.items() if rows}  # no milestones: nothing to replay
    best_trial, grid_best = _lowest_fid([(t, r) for t, rows in curves.items() for r in rows])
    grid_trial_steps = sum(rows[-1][STEP.name] for rows in curves.values())
    rung_settings = dict(max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor, z=z)
    grid_terms = grid_dynamics(curves, rungs(grace_period, reduction_factor, max_t))
    makers = {
        "ASHA": lambda: ASHAScheduler(
            time_attr=STEP.name,
            metric=FID.name,
            mode="min",
            max_t=max_t,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        ),
        "racing": lambda: RacingScheduler(STEP.name, FID.name, "min", **rung_settings),
        **{
            _dynamics_name(count, pilots): functools.partial(
                DynamicsRacingScheduler, STEP.name, FID.name, "min", **rung_settings, min_trials_past=count
            )
            for count in pilots
        },
        "dynamics known": lambda: _told_the_grids_dynamics(grid_terms, **rung_settings),
    }
    rng = np.random.default_rng(seed)
    ids = list(curves)
    runs: dict[str, list[ReplayRun]] = {name: [] for name in makers}
    for _ in range(num_orders):
        arrival = tuple(ids[i] for i in rng.permutation(len(ids)))
        speeds = dict(zip(ids, rng.uniform(*SPEEDS, size=len(ids))))
        for name, make in makers.items():
            runs[name].append(_run_order(curves, arrival, speeds, concurrency, make(), grid_best, grid_trial_steps))
    return ReplayInfo(
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        max_t=max_t,
        z=z,
        concurrency=concurrency,
        num_orders=num_orders,
        seed=seed,
        num_trials=len(curves),
        grid_trial_steps=grid_trial_steps,
        best_trial=best_trial,
        best_step=grid_best[STEP.name],
        best_fid=grid_best[FID.name],
        best_stderr=Measurement.from_row(grid_best, FID.name).stderr,
        schedulers=tuple(SchedulerReplay(name, tuple(found)) for name, found in runs.items()),
        dynamics=grid_terms,
    )


def _told_the_grids_dynamics(grid_terms: tuple[RungDynamics, ...], **rung_settings):
    """racing_dynamics told the whole grid's training-dynamics term at every rung from its first
    trial on. No sweep can run it (the term is known once the grid has run); replayed, it shows
    what the rule costs without its pilots."""
    from .racing import DynamicsRacingScheduler

    terms = {term.rung: term for term in grid_terms}

    class TermKnown(DynamicsRacingScheduler):
        def dynamics(self, rung: float) -> Optional[RungDynamics]:
            return terms.get(rung)

    return TermKnown(STEP.name, FID.name, "min", **rung_settings)


def _dynamics_name(count: int, pilots: Sequence[int]) -> str:
    return "dynamics" if len(pilots) == 1 else f"dynamics-{count}"


def grid_dynamics(curves: Curves, rung_steps: list[int | float]) -> tuple[RungDynamics, ...]:
    """Each rung's training-dynamics term measured on the whole grid (every trial past it)."""
    measured = {t: {row[STEP.name]: Measurement.from_row(row, FID.name) for row in rows} for t, rows in curves.items()}
    found = (rung_dynamics(measured, rung, min_trials=2) for rung in rung_steps)
    return tuple(d for d in found if d is not None)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    width = max(len(cell) for cell in [header[0], *(row[0] for row in rows)])
    column = max(9, *(len(cell) for cell in header[1:]))
    return [f"{row[0]:<{width}}" + "".join(f"  {cell:>{column}}" for cell in row[1:]) for row in [header, *rows]]


def render(info: ReplayInfo) -> list[str]:
    """The replay as plain-text lines: the settings, then ASHA beside racing."""
    stderr = "" if info.best_stderr is None else f" ± {info.best_stderr:.2g}"
    rung_list = ", ".join(f"{r:g}" for r in rungs(info.grace_period, info.reduction_factor, info.max_t)) or "none"
    schedulers = info.schedulers
    orders = f"{info.num_orders} arrival orders (seed {info.seed})"
    speeds = f"speeds {SPEEDS[0]:g}–{SPEEDS[1]:g}× at random"
    settings = f"grace period {info.grace_period:g}, reduction factor {info.reduction_factor:g}, max_t {info.max_t:g}"
    best = f"{FID.name} {info.best_fid:.4g}{stderr} ({info.best_trial} at {STEP.name} {info.best_step})"
    lines = [
        f"Early stopping replayed on {info.num_trials} trials: {orders}, {info.concurrency} at a time, {speeds}",
        f"Rungs at {STEP.name} {rung_list} ({settings}); racing stops only beyond z = {info.z:g} standard errors",
        f"Grid: {info.grid_trial_steps} trial-steps; best {best}",
        f"Kept: the best seen is within {NOISE_MULTIPLE:g} standard errors of the grid's best",
        *(
            f"Rankings still move after {STEP.name} {d.rung:g}: "
            f"training dynamics {d.spread:.3g} (sampling alone {d.sampling_spread:.3g}) "
            f"over {d.num_pairs} pairs of trials that went past it"
            for d in info.dynamics
        ),
        "",
    ]
    lines += _table(
        ["", *(s.name for s in schedulers)],
        [
            ["kept the grid's best", *(f"{s.kept_best_share:.0%}" for s in schedulers)],
            ["trial-steps, mean", *(f"{s.steps_share_mean:.0%}" for s in schedulers)],
            ["trial-steps, min–max", *(f"{s.steps_share_min:.0%}–{s.steps_share_max:.0%}" for s in schedulers)],
        ],
    )
    counts = [s.stop_counts for s in schedulers]
    stops = sorted(set().union(*counts))
    if stops:
        lines.append("")
        lines += _table(
            ["stopped (share of orders)", *(s.name for s in schedulers)],
            [
                [f"{t} at {STEP.name} {step}", *(f"{c[t, step] / info.num_orders:.0%}" for c in counts)]
                for t, step in stops
            ],
        )
    return lines


def replay_experiment(
    experiment_dir,
    *,
    grace_period: int | None,
    reduction_factor: float,
    z: float,
    concurrency: int,
    orders: int,
    seed: int,
    pilots: Sequence[int] = (MIN_DYNAMICS_TRIALS,),
) -> ReplayInfo:
    """`replay` on the recorded FID curves (on the common basis) of the finished grid in the folder
    `experiment_dir`: its first rung at `grace_period` or else the first milestone, max_t its
    longest trial. Raises ConfigError unless every trial ended: a running grid's curves would
    replay a grid that never happened."""
    from diffusion_lib.config import ConfigError
    from record import states
    from record.best import comparable_rows
    from record.experiment import load_experiment

    experiment = load_experiment(experiment_dir)
    curves = {t.trial_id: comparable_rows(t.milestones, FID.name, experiment.basis) for t in experiment.trials}
    # An errored trial (a diverged learning rate) is part of the grid's outcome; its curve ends where it failed.
    unfinished = [t.trial_id for t in experiment.trials if t.state not in (states.FINISHED, states.ERRORED)]
    if unfinished or not any(curves.values()):
        raise ConfigError(
            f"{experiment_dir}: a replay needs a grid whose every trial ended with {FID.name} at its milestones; "
            f"not ended: {', '.join(unfinished) or 'none'}"
        )
    first = min(rows[0][STEP.name] for rows in curves.values() if rows)
    return replay(
        curves,
        grace_period=grace_period or first,
        reduction_factor=reduction_factor,
        max_t=max(t.total_steps or 0 for t in experiment.trials),
        z=z,
        concurrency=concurrency,
        num_orders=orders,
        seed=seed,
        pilots=pilots,
    )
