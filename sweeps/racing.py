"""Early stopping that stops a trial only when the evidence says it is worse: `RacingScheduler`.

Ray's ASHA cuts a trial at a rung when its latest value is worse than a quantile of the values
recorded there, by any margin: between arms that stand within noise of each other, which one
survives depends on which reported first. Here the rungs sit where ASHA's do (grace_period ·
reduction_factor^k below max_t, in units of `time_attr`) and so does the keep threshold (the
worst of the best ⌈n / reduction_factor⌉ of the n trials recorded at the rung, this one
included), but a trial outside those is stopped only when it is worse than the threshold trial
by more than `z` standard errors of the difference (`should_stop`), the one rule of
`record.noise`: for FID, paired from the two trials' jackknife replicates when both were
sampled from the same noise (every trial of a sweep samples the same seeded noise, so it
cancels), else √(se_a² + se_b²); a metric without a standard error is compared plainly, as ASHA
does. The rungs are `record.noise.rungs`, as the spec checks them.

The default z = 2.5 (`record.noise.DEFAULT_CUT_Z`) is a one-sided test (only "worse" stops a
trial) at 0.6% under the normal, 1% under Student's t with the 24 degrees of freedom of a
25-group jackknife's standard error. The comparison that matters is the one that could cut the
sweep's best trial, and that trial meets it once per rung: with up to four rungs, Bonferroni at
5% for the sweep asks for z = Φ⁻¹(1 − 0.05/4) ≈ 2.24, and 2.5 adds room for the standard error's
own noise. Cutting the best loses the sweep's answer, while keeping a loser costs only its
remaining steps, so the error is set on the side of keeping; z = 2 would cut a tied best with ≈
2.8% per rung (t), ≈ 11% over four rungs. These rates are those of a trial tied with the
threshold trial; a tied trial among more recorded ones is cut less often still, since the
threshold is the ⌈n / reduction_factor⌉-th best, not the best.

Persistence: Ray 2.60's Tuner pickles the scheduler once, empty, into `tuner.pkl` when the
Tuner is made, and its TuneController never calls a scheduler's `save`/`restore`: ASHA's rungs
are lost when the driver dies. Tune does save and restore its callbacks' `get_state()` with
every experiment checkpoint, so `RacingStateCallback(scheduler)`, passed in the RunConfig's
callbacks beside the scheduler in the TuneConfig (the two are pickled together, so the restored
callback holds the restored scheduler), carries the rungs across a driver kill. `save` and
`restore` write and read the same state as a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from diffusion_lib.atomic import atomic_write_text
from diffusion_lib.config import EVAL_SEED_KEY
from record import storage
from record.best import is_finite_number
from record.files import StoppedEarly, searched_values
from record.noise import (
    DEFAULT_CUT_Z,
    MIN_DYNAMICS_TRIALS,
    Difference,
    Measurement,
    RungDynamics,
    difference,
    rung_dynamics,
    rungs,
    with_dynamics,
)
from record.states import trial_count


@dataclass(frozen=True)
class Comparison:
    """A trial outside the kept share at a rung, against the keep threshold (the worst kept)."""

    trial_id: str
    threshold_id: str
    gap: Difference  # trial − threshold, with its standard error
    sign: float  # +1 when lower is better (mode min), −1 when higher is
    z: float
    dynamics: Optional[RungDynamics] = None  # the rung's training-dynamics term, when it counts

    @property
    def worse_by(self) -> float:
        return self.sign * self.gap.gap

    @property
    def stops(self) -> bool:
        return self.worse_by > self.gap.margin(self.z)

    def line(self, metric: str, rung: float, value: float, threshold: float) -> str:
        """What the console and the trial's record say of a stop."""
        needed = f"{self.z:g} × {self.gap.stderr:.3g} = {self.gap.margin(self.z):.3g}"
        if self.dynamics is not None:
            sampling = math.sqrt(max(self.gap.stderr**2 - self.dynamics.spread**2, 0.0))
            pairs = f"{self.dynamics.num_pairs} pairs of {trial_count(self.dynamics.num_trials)}"
            needed += (
                f" (sampling {sampling:.3g}, training dynamics {self.dynamics.spread:.3g} from {pairs} past the rung)"
            )
        return (
            f"trial {self.trial_id} stopped at step {rung:g}: {metric} {value:.4g}, "
            f"{self.worse_by:.3g} worse than the keep threshold {threshold:.4g} (trial {self.threshold_id}); "
            f"the cut needed more than {needed}"
        )


def compare_at_rung(
    trial_id: str, recorded: Mapping[str, Measurement], reduction_factor: float, z: float, mode: str
) -> Optional[Comparison]:
    """The comparison of `trial_id`, recorded at a rung with every other trial recorded there,
    with the keep threshold; None when it is among the kept: the best ⌈n / reduction_factor⌉ of
    the n recorded (ASHA's share). Trials with equal values are never told apart."""
    sign = 1.0 if mode == "min" else -1.0
    ranked = sorted(recorded, key=lambda t: sign * recorded[t].value)
    kept = math.ceil(len(ranked) / reduction_factor)
    if trial_id in ranked[:kept]:
        return None
    threshold_id = ranked[kept - 1]
    gap = difference(recorded[trial_id], recorded[threshold_id])
    return Comparison(trial_id, threshold_id, gap, sign, z)


def should_stop(
    trial_id: str, recorded: Mapping[str, Measurement], reduction_factor: float, z: float, mode: str
) -> bool:
    """Whether the trial, outside the kept share, is worse than the keep threshold by more than z
    standard errors of the difference (`record.noise`); without a standard error, by any margin,
    as ASHA does."""
    comparison = compare_at_rung(trial_id, recorded, reduction_factor, z, mode)
    return comparison is not None and comparison.stops


class RacingScheduler(FIFOScheduler):
    """ASHA's rungs and keep share, with a trial stopped only when it is worse beyond noise
    (`should_stop`). `metric` and `mode` may be left to Tune (TuneConfig), as with ASHA."""

    def __init__(
        self,
        time_attr: str,
        metric: str | None = None,
        mode: str | None = None,
        *,
        max_t: float,
        grace_period: float,
        reduction_factor: float = 2,
        z: float = DEFAULT_CUT_Z,
        experiment: Optional[str] = None,
    ):
        """`experiment` (a path or URI), in a sweep: each stop is said on the console and its
        reason written into the trial's folder (`record.files.StoppedEarly`); the replay, which
        passes none, runs the same decisions silently."""
        if not 0 < grace_period <= max_t:
            raise ValueError(f"grace_period must be in (0, max_t = {max_t}], got {grace_period}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        if z < 0:
            raise ValueError(f"z must be >= 0, got {z}")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        super().__init__()
        self._time_attr = time_attr
        self._metric = metric
        self._mode = mode
        self._max_t = max_t
        self._grace_period = grace_period
        self._reduction_factor = reduction_factor
        self._z = z
        self._rungs: dict[float, dict[str, Measurement]] = {r: {} for r in rungs(grace_period, reduction_factor, max_t)}
        self._num_stopped = 0
        self._experiment = experiment

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        """Tune's metric and mode, unless the scheduler was given its own (ASHA's contract)."""
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        if self._metric is None and self._mode:
            self._metric = DEFAULT_METRIC
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._metric or self._mode not in ("min", "max"):
            raise ValueError(
                f"RacingScheduler needs a metric ({self._metric}) and a mode ({self._mode}): "
                "pass them to the scheduler or to tune.TuneConfig()"
            )

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """STOP at max_t (each trial's budget, as in ASHA) or when the trial, at a rung it has
        just reached, is worse than the kept trials beyond noise; else CONTINUE."""
        if self._time_attr not in result or not is_finite_number(result.get(self._metric)):
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t:
            return TrialScheduler.STOP
        rung = self._record(trial.trial_id, result)
        comparison = None if rung is None else self._compare(trial.trial_id, rung)
        if comparison is None or not comparison.stops:
            return TrialScheduler.CONTINUE
        self._num_stopped += 1
        if self._experiment is not None:
            recorded = self._rungs[rung]
            line = comparison.line(
                self._metric, rung, recorded[trial.trial_id].value, recorded[comparison.threshold_id].value
            )
            print(line, file=sys.stderr, flush=True)
            try:
                StoppedEarly(int(rung), line).write(storage.join(self._experiment, Path(trial.path).name))
            except OSError as err:  # a reason the record lacks is no reason to stop the sweep (a full disk)
                print(f"warning: why trial {trial.trial_id} stopped was not recorded: {err}", file=sys.stderr)
        return TrialScheduler.STOP

    def _compare(self, trial_id: str, rung: float) -> Optional[Comparison]:
        """The trial against the rung's keep threshold (None: among the kept)."""
        return compare_at_rung(trial_id, self._rungs[rung], self._reduction_factor, self._z, self._mode)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        """The last result is recorded at its rung, if it is the trial's first there (as in ASHA),
        for the trials that reach the rung later."""
        if self._time_attr in result and is_finite_number(result.get(self._metric)):
            self._record(trial.trial_id, result)

    def _record(self, trial_id: str, result: dict) -> float | None:
        """Record the result at the highest rung it has reached; that rung, or None when it has
        reached none or the trial is recorded there already."""
        reached = [r for r in self._rungs if r <= result[self._time_attr]]
        if not reached or trial_id in self._rungs[reached[-1]]:
            return None
        sampling_seed = searched_values(result.get("config") or {}).get(EVAL_SEED_KEY)  # None: the sweep's one noise
        self._rungs[reached[-1]][trial_id] = Measurement.from_row(result, self._metric, sampling_seed)
        return reached[-1]

    def debug_string(self) -> str:
        """The rungs with their recorded values, best first, each ± its standard error."""
        head = f"Using racing (z = {self._z:g}, reduction factor {self._reduction_factor:g})"
        lines = [f"{head}: num_stopped={self._num_stopped}"]
        for rung, recorded in self._rungs.items():
            values = sorted(recorded.values(), key=lambda m: m.value, reverse=self._mode == "max")
            shown = ", ".join(f"{m.value:.4g}" + ("" if m.stderr is None else f" ± {m.stderr:.2g}") for m in values)
            lines.append(f"Rung {self._time_attr} {rung:g} ({trial_count(len(values))}): {shown or '-'}")
        return "\n".join(lines)

    def _settings(self) -> dict[str, Any]:
        return {
            "time_attr": self._time_attr,
            "metric": self._metric,
            "mode": self._mode,
            "max_t": self._max_t,
            "grace_period": self._grace_period,
            "reduction_factor": self._reduction_factor,
            "z": self._z,
        }

    def state(self) -> dict[str, Any]:
        """The settings and every recorded value, as JSON-ready data."""
        return {
            "settings": self._settings(),
            "rungs": [[rung, {t: asdict(m) for t, m in recorded.items()}] for rung, recorded in self._rungs.items()],
            "num_stopped": self._num_stopped,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Take over `state()` of a scheduler with the same settings (else ValueError: the recorded
        values would mean something else)."""
        settings = json.loads(json.dumps(self._settings()))
        if state["settings"] != settings:
            raise ValueError(
                f"scheduler state saved with settings {state['settings']}, but this scheduler has {settings}"
            )
        self._rungs = {
            rung: {t: Measurement(**{**m, "replicates": tuple(m["replicates"])}) for t, m in recorded.items()}
            for rung, recorded in state["rungs"]
        }
        self._num_stopped = state["num_stopped"]

    def save(self, checkpoint_path: str) -> None:
        atomic_write_text(checkpoint_path, json.dumps(self.state()))

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, encoding="utf-8") as f:
            self.load_state(json.load(f))


class DynamicsRacingScheduler(RacingScheduler):
    """Racing whose cut also allows for how far a trailing trial still catches up after the rung:
    a trial is stopped only when it is worse than the keep threshold by more than z standard
    errors of the difference, sampling and training dynamics together, √(se² + τ²), where τ is
    measured from the trials that went past the rung (`record.noise.rung_dynamics`). A rung whose τ is not yet
    measured cuts nothing: its first trials run on as pilots until `min_trials_past` of them have
    gone past it (the replay compares the choices). A trial is told apart from its rivals by
    every milestone it reports, so the scheduler keeps each trial's curve, in its state too."""

    RULE = "racing with training dynamics"

    def __init__(self, *args, min_trials_past: int = MIN_DYNAMICS_TRIALS, **kwargs):
        super().__init__(*args, **kwargs)
        self._min_trials_past = min_trials_past
        self._curves: dict[str, dict[int, Measurement]] = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._remember(trial.trial_id, result)
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._remember(trial.trial_id, result)
        super().on_trial_complete(tune_controller, trial, result)

    def _remember(self, trial_id: str, result: dict) -> None:
        if self._time_attr in result and is_finite_number(result.get(self._metric)):
            sampling_seed = searched_values(result.get("config") or {}).get(EVAL_SEED_KEY)
            measured = Measurement.from_row(result, self._metric, sampling_seed)
            self._curves.setdefault(trial_id, {})[int(result[self._time_attr])] = measured

    def dynamics(self, rung: float) -> Optional[RungDynamics]:
        """The rung's training-dynamics term, or None while too few trials have gone past it."""
        return rung_dynamics(self._curves, rung, self._min_trials_past)

    def _compare(self, trial_id: str, rung: float) -> Optional[Comparison]:
        comparison = super()._compare(trial_id, rung)
        dynamics = self.dynamics(rung)
        if comparison is None or dynamics is None:  # kept, or the rung is not measured yet: no cut
            return None
        return dataclasses.replace(comparison, gap=with_dynamics(comparison.gap, dynamics), dynamics=dynamics)

    def debug_string(self) -> str:
        lines = super().debug_string().splitlines()
        lines[0] = lines[0].replace("Using racing", f"Using {self.RULE}")
        for i, rung in enumerate(self._rungs, start=1):
            dynamics = self.dynamics(rung)
            lines[i] += (
                f"; training dynamics {dynamics.spread:.3g} ({dynamics.num_trials} trials past it)"
                if dynamics
                else f"; training dynamics not measured yet (cuts nothing until {self._min_trials_past} trials pass)"
            )
        return "\n".join(lines)

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "rule": self.RULE, "min_trials_past": self._min_trials_past}

    def state(self) -> dict[str, Any]:
        curves = {t: [[step, asdict(m)] for step, m in curve.items()] for t, curve in self._curves.items()}
        return {**super().state(), "curves": curves}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self._curves = {
            t: {int(step): Measurement(**{**m, "replicates": tuple(m["replicates"])}) for step, m in curve}
            for t, curve in state["curves"].items()
        }


class RacingStateCallback(Callback):
    """Carries a RacingScheduler's state in Tune's experiment checkpoints, which Tune restores on
    `Tuner.restore` (Ray calls no scheduler's save/restore; see the module docstring). Pass it in
    the RunConfig's callbacks of the Tuner whose TuneConfig holds the scheduler."""

    def __init__(self, scheduler: RacingScheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any]:
        return self.scheduler.state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state(state)
