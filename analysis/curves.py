"""What a configuration's curves over training say, with their noise (the research notes' E7
observations): did FID get worse after its best milestone, and does curvature track FID?

"Got worse" is a paired comparison within each run: every milestone of a trial samples from the
same noise (`eval.seed`), so FID(last) − FID(best step) is measured by `record.noise`'s rule,
paired from the two milestones' jackknife replicates, in which the shared sampling noise cancels.
With seed repeats the configuration's best step is where its mean FID over seeds is lowest, and
the gap's standard error is the spread of the seeds' own gaps, sd/√K (which holds the sampling
noise too). The best step is picked from the same curves, so noise alone makes the gap
positive: the sentence says so, and the rule (`NOISE_MULTIPLE` standard errors) guards against
it only in part.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Optional

from scipy import stats

from diffusion_lib.milestone import CURVATURE, FID, STEP
from record.best import comparable_rows, is_finite_number
from record.experiment import Experiment
from record.files import trial_label
from record.noise import INDEPENDENT, PAIRED, SEED_SPREAD, Difference, Measurement, difference, stderr_of_mean

from .decisions import ENDED, Configuration

# The standard error's name in a sentence about one run's two milestones.
PAIRED_IN_RUN, INDEPENDENT_IN_RUN = "paired jackknife within the run", "the two FIDs' jackknife"
IN_RUN_WORDS = {PAIRED: PAIRED_IN_RUN, INDEPENDENT: INDEPENDENT_IN_RUN}


@dataclass(frozen=True)
class GotWorse:
    """FID at a configuration's last milestone against its best step, over its K seeds."""

    searched: dict[str, Any]
    best_step: int
    last_step: int
    best_fid: float  # mean over seeds at the best step
    last_fid: float  # mean over seeds at the last step
    num_milestones: int  # the milestones the best step was picked from
    num_seeds: int
    gap: float  # last − best
    stderr: float
    kind: str  # which standard error

    @property
    def is_effect(self) -> bool:
        """Worse beyond noise (a lower last FID is no sign of getting worse)."""
        return self.gap > 0 and Difference(self.gap, self.stderr, self.kind).is_effect

    @property
    def sentence(self) -> str:
        who = trial_label(self.searched) or "the run"
        if self.best_step == self.last_step:
            return (
                f"{who}: FID is lowest at the last milestone, step {self.last_step} ({self.last_fid:.4g}): "
                "no sign of getting worse with training."
            )
        verdict = "an effect" if self.is_effect else "within noise"
        return (
            f"{who}: FID at the last milestone (step {self.last_step}, {self.last_fid:.4g}) "
            f"against its best (step {self.best_step}, {self.best_fid:.4g}): "
            f"{self.gap:+.3g} ± {self.stderr:.2g} ({verdict}; "
            f"{self.kind}, {self.num_seeds} seed{'s' if self.num_seeds > 1 else ''}; "
            f"the best is the lowest of {self.num_milestones} milestones, so noise alone makes this gap positive)."
        )


def got_worse(experiment: Experiment, config: Configuration) -> Optional[GotWorse]:
    """The "did FID get worse after its best?" comparison of one configuration, over its trials
    that ended; None when they share fewer than two milestones with an FID on the common basis."""
    curves = []
    for trial in (t for t in config.trials if t.state in ENDED):
        rows = {r[STEP.name]: r for r in comparable_rows(trial.milestones, FID.name, experiment.basis)}
        if rows:
            curves.append(rows)
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    if len(steps) < 2:
        return None
    mean_at = {s: statistics.fmean(c[s][FID.name] for c in curves) for s in steps}
    best_step, last_step = min(steps, key=mean_at.get), steps[-1]
    gaps = [c[last_step][FID.name] - c[best_step][FID.name] for c in curves]
    if len(curves) >= 2:
        stderr, kind = stderr_of_mean(gaps), SEED_SPREAD
    else:
        in_run = difference(
            Measurement.from_row(curves[0][last_step], FID.name), Measurement.from_row(curves[0][best_step], FID.name)
        )
        stderr, kind = in_run.stderr, IN_RUN_WORDS[in_run.kind]
    return GotWorse(
        dict(config.searched),
        best_step,
        last_step,
        mean_at[best_step],
        mean_at[last_step],
        len(steps),
        len(curves),
        statistics.fmean(gaps),
        stderr,
        kind,
    )


@dataclass(frozen=True)
class CurvatureCorrelation:
    """Spearman's rank correlation of curvature with FID over a configuration's milestones."""

    searched: dict[str, Any]
    rho: float
    p_value: float
    num_milestones: int
    num_trials: int

    @property
    def sentence(self) -> str:
        who = trial_label(self.searched) or "the run"
        direction = "falls as FID rises" if self.rho < 0 else "rises with FID"
        strength = "" if self.p_value < 0.05 else ", which is within noise (p ≥ 0.05)"
        trials = f"{self.num_trials} trial{'s' if self.num_trials > 1 else ''}"
        return (
            f"{who}: curvature {direction}: "
            f"Spearman's ρ = {self.rho:+.2f} over n = {self.num_milestones} milestones of {trials} "
            f"(p = {self.p_value:.2g}){strength}. "
            "Both change with the training step, so this is a correlation along training, not a cause."
        )


def curvature_correlation(experiment: Experiment, config: Configuration) -> Optional[CurvatureCorrelation]:
    """The rank correlation (scipy's spearmanr) of Hutchinson curvature with FID over every
    milestone of the configuration's ended trials that has both; None below 4 such milestones."""
    pairs, trials = [], 0
    for trial in (t for t in config.trials if t.state in ENDED):
        rows = [
            r
            for r in comparable_rows(trial.milestones, FID.name, experiment.basis)
            if is_finite_number(r.get(CURVATURE.name))
        ]
        pairs += [(r[CURVATURE.name], r[FID.name]) for r in rows]
        trials += bool(rows)
    if len(pairs) < 4:
        return None
    curvature, fid = zip(*pairs)
    rho, p_value = stats.spearmanr(curvature, fid)
    if not math.isfinite(rho):  # a constant series has no ranks to correlate
        return None
    return CurvatureCorrelation(dict(config.searched), float(rho), float(p_value), len(pairs), trials)


@dataclass(frozen=True)
class FloorGap:
    """How far the best FID sits above what real images score under the same conditions."""

    floor_sentence: str  # `FidFloor.sentence`: the floor's figure, or why there is none
    floor_fid: Optional[float]
    best_label: Optional[str]
    best_fid: Optional[float]

    @property
    def sentence(self) -> str:
        text = self.floor_sentence[0].upper() + self.floor_sentence[1:]
        if self.floor_fid is None or self.best_fid is None:
            return text + "."
        above = self.best_fid - self.floor_fid
        return f"{text}; the best trial, {self.best_label}, scores {self.best_fid:.4g}: {above:.4g} above that."


def floor_gap(experiment: Experiment) -> Optional[FloorGap]:
    """The floor under the sweep's common FID basis against its best FID; None without a stored floor."""
    if experiment.floor is None or experiment.basis is None:
        return None
    point = experiment.floor_point()
    count = experiment.basis[0]
    sentence = (
        experiment.floor.sentence(count)
        if point
        else f"no FID floor was stored for {count} samples against this reference"
    )
    bests = [(t, experiment.best(t, FID.name)) for t in experiment.trials]
    bests = [(t, b) for t, b in bests if b is not None]
    if not bests:
        return FloorGap(sentence, point.fid if point else None, None, None)
    trial, best = min(bests, key=lambda tb: tb[1][FID.name])
    return FloorGap(sentence, point.fid if point else None, trial.label, best[FID.name])
