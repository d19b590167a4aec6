"""Comparisons that respect the noise: configurations (seed repeats grouped), effects of each
searched key called effects only beyond two standard errors, and whether ASHA's early cuts can be
trusted here (rank agreement between an early milestone and the end).

The rule, used in every sentence, is `record.noise`'s: two numbers differ when their gap exceeds
twice its standard error. A configuration is measured by its best FID, the mean over its K ≥ 2
seeds with their spread sd/√K (which holds the sampling noise too), or one seed's best FID with
its jackknife standard error and replicates (sampling noise only: training noise is then
unmeasured); two single-seed configurations sampled from the same noise (same `eval.seed`,
count and reference) are compared paired. Each sentence says which standard error it used.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from scipy import stats

from diffusion_lib.config import EVAL_SEED_KEY, SEED_KEY
from diffusion_lib.milestone import FID, STEP
from record import states
from record.best import comparable_rows
from record.experiment import Experiment, Trial
from record.noise import Difference, Measurement, RungDynamics, difference, rung_dynamics

ENDED = (states.FINISHED, states.STOPPED)
MAX_VALUES_COMPARED = 8  # a key sampled from a range takes a value per trial: no sentence lists them all
MIN_TRIALS_FOR_TAU = 5  # with 4 or fewer, Kendall's τ cannot reach p < 0.05 (exact, two-sided) whatever the ranks


@dataclass
class Configuration:
    """The trials that share every searched value but the seed."""

    searched: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    bests: list[Measurement] = field(default_factory=list)  # same-count best FID of each finished seed

    @property
    def best_fids(self) -> list[float]:
        return [best.value for best in self.bests]

    @property
    def measurement(self) -> Measurement:
        """Its best FID over seeds (mean and spread), or its one seed's with that FID's noise."""
        return self.bests[0] if len(self.bests) == 1 else Measurement.over_seeds(self.best_fids)

    @property
    def mean(self) -> float:
        return self.measurement.value if self.bests else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.best_fids) if len(self.bests) >= 2 else math.nan

    @property
    def stderr(self) -> float:
        stderr = self.measurement.stderr if self.bests else None
        return math.nan if stderr is None else stderr


def basis_warnings(experiment: Experiment) -> list[str]:
    """A warning naming the trials whose FIDs are on another basis than the common one."""
    if not experiment.off_basis:
        return []
    count, reference = experiment.basis
    basis = f"{count} samples / reference {reference}"
    return [
        f"FIDs measured at another sample count or against another reference than {basis} "
        f"are not ranked with the others: {', '.join(experiment.off_basis)}"
    ]


def configurations(experiment: Experiment) -> list[Configuration]:
    """Trials grouped by their searched values without the seed, best mean FID first; the best
    FIDs are those of the trials that ended (finished or stopped by the scheduler)."""
    groups: dict[str, Configuration] = {}
    for trial in experiment.trials:
        searched = {k: v for k, v in trial.searched.items() if k != SEED_KEY}
        group = groups.setdefault(repr(sorted(searched.items())), Configuration(searched))
        group.trials.append(trial)
        best = (
            experiment.best(trial, FID.name) if trial.state in ENDED else None
        )  # a running trial's best is not its last word
        if best is not None:
            group.bests.append(Measurement.from_row(best, FID.name, trial.config.get(EVAL_SEED_KEY)))
    return sorted(groups.values(), key=lambda c: (not c.best_fids, c.mean if c.best_fids else 0.0))


def config_difference(a: Configuration, b: Configuration) -> Difference:
    """b − a by the noise rule (`record.noise.difference`)."""
    return difference(b.measurement, a.measurement)


def fmt(value: float, stderr: float) -> str:
    return f"{value:.4g} ± {stderr:.2g}" if math.isfinite(stderr) else f"{value:.4g} (± unknown)"


def effect_sentences(configs: list[Configuration], keys: list[str]) -> list[str]:
    """One sentence per searched key: the best configuration at each of its values, compared
    with the best at the key's best value — an effect, or within noise.

    Where configurations differ in that key alone (a grid, or arms that change one key each
    from a baseline), the comparison holds the other keys fixed: among the configurations that
    agree with the best one on every other key (else with the best one that has such partners).
    Otherwise it compares the best configuration at each value (others free, said so)."""
    sentences = []
    for key in keys:
        if key == SEED_KEY:
            continue
        others = [k for k in keys if k not in (key, SEED_KEY)]
        finished = [c for c in configs if c.best_fids and key in c.searched]  # configs are sorted best first
        slices: dict[str, list[Configuration]] = {}
        for config in finished:
            slices.setdefault(repr([config.searched.get(k) for k in others]), []).append(config)
        varied = [s for s in slices.values() if len({repr(c.searched[key]) for c in s}) >= 2]
        held = varied[0] if varied else finished  # the slice holding the best configuration that has partners
        best_at: dict[str, Configuration] = {}
        for config in held:
            best_at.setdefault(repr(config.searched[key]), config)
        if not 2 <= len(best_at) <= MAX_VALUES_COMPARED:  # a continuous key: its best_by plot shows it
            continue
        name = key.split(".")[-1]
        ranked = list(best_at.values())
        winner = ranked[0]
        parts = []
        for other in ranked[1:]:
            gap = config_difference(winner, other)
            verdict = "an effect" if gap.is_effect else "within noise"
            parts.append(
                f"{name} = {other.searched[key]}: "
                f"{fmt(other.mean, other.stderr)} ({verdict}: {gap.gap:+.3g} ± {gap.stderr:.2g}, {gap.kind})"
            )
        fixed = ", ".join(f"{k.split('.')[-1]} = {winner.searched.get(k)}" for k in others)
        condition = (f" with {fixed}" if fixed else "") if varied else (" (other keys free)" if others else "")
        sentences.append(
            f"Best {FID.name}{condition} is at {name} = {winner.searched[key]} ({fmt(winner.mean, winner.stderr)}); "
            + "; ".join(parts)
            + "."
        )
    return sentences


@dataclass
class RankAgreement:
    step: int
    num_trials: int
    tau: float
    p_value: float

    @property
    def sentence(self) -> str:
        base = (
            "Early stopping: "
            f"FID at step {self.step} and at the end agree in rank with Kendall's τ = {self.tau:.2f} "
            f"over {self.num_trials} trials (p = {self.p_value:.2g})"
        )
        if self.tau >= 0.6 and self.p_value < 0.05:
            return base + ": strong agreement, so cuts at this step keep the trials that end best."
        return base + ": too weak to trust ASHA's cuts at this step."


def rank_agreement(experiment: Experiment) -> list[RankAgreement]:
    """For each earlier milestone step, Kendall's τ (scipy) between the same-count FID there and
    at the end, over the trials that ran to the end (the sweep's last step); needs
    MIN_TRIALS_FOR_TAU of them."""
    finals, at_step = {}, {}
    for trial in experiment.trials:
        rows = comparable_rows(trial.milestones, FID.name, experiment.basis)
        if len(rows) < 2:
            continue
        finals[trial.trial_id] = rows[-1]
        for row in rows[:-1]:
            at_step.setdefault(row[STEP.name], {})[trial.trial_id] = row[FID.name]
    if not finals:
        return []
    end = max(row[STEP.name] for row in finals.values())
    agreements = []
    for step, fids in sorted(at_step.items()):
        ids = [t for t in fids if finals[t][STEP.name] == end]
        if len(ids) < MIN_TRIALS_FOR_TAU:
            continue
        tau, p_value = stats.kendalltau([fids[t] for t in ids], [finals[t][FID.name] for t in ids])
        agreements.append(RankAgreement(step, len(ids), float(tau), float(p_value)))
    return agreements


@dataclass(frozen=True)
class RankingMovement:
    """How far rankings still moved after an earlier milestone (`record.noise.RungDynamics`)."""

    dynamics: RungDynamics

    @property
    def sentence(self) -> str:
        d = self.dynamics
        pairs = f"{d.num_pairs} pairs of {d.num_trials} trials"
        if d.spread == 0:
            return (
                f"Rankings held after step {d.rung:g}: no trial trailing another there caught up by more "
                f"than the {d.sampling_spread:.3g} that sampling alone explains ({pairs}) "
                "by the last milestone both reached."
            )
        return (
            f"Rankings still move after step {d.rung:g}: "
            f"a trial trailing another there caught up by a spread of {d.spread:.3g} FID "
            "by the last milestone both reached, "
            f"beyond the {d.sampling_spread:.3g} that sampling alone explains ({pairs}); "
            "a cut at this step is safe only with a margin that counts it (scheduler racing_dynamics)."
        )


def ranking_movements(experiment: Experiment) -> list[RankingMovement]:
    """The training-dynamics term at every milestone step before the last, measured on the
    same-count FID curves of every trial that went past it."""
    curves = experiment.fid_curves()
    steps = sorted({step for curve in curves.values() for step in curve})
    found = (rung_dynamics(curves, step) for step in steps[:-1])
    return [RankingMovement(d) for d in found if d is not None]
