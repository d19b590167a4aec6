"""Is this difference real? The one rule every comparison of the product uses: the racing
scheduler's cuts, the early-stopping replay, the report's verdicts and its curve verdicts.

A `Measurement` is a metric with what is known of its noise: its standard error and, for FID,
the jackknife replicates it was measured with. The standard error of a difference (`difference`)
is, in this order of preference:
- PAIRED: two single-seed FIDs sampled from the same noise (the same `eval.seed`, sample count
  and jackknife groups): the jackknife of the difference, from the differences of the two
  replicates (`jackknife.paired_stderr`), in which the shared sampling noise cancels;
- SEED_SPREAD: either side is a mean over K ≥ 2 training seeds, its standard error sd/√K (which
  holds the sampling noise too): √(se_a² + se_b²);
- INDEPENDENT: √(se_a² + se_b²) of the two FIDs' own jackknife standard errors (sampling noise
  only); unknown (NaN) when either has none.
A difference is an effect when it exceeds NOISE_MULTIPLE standard errors.

The rungs at which a scheduler compares trials are owned here too (`rungs`): the sweep spec
checks them against the milestones and the schedulers compare there, so both must agree.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from diffusion_lib.jackknife import paired_stderr, replicate_stderr
from diffusion_lib.milestone import (
    CURVATURE,
    CURVATURE_STDERR,
    FID,
    FID_NUM_SAMPLES,
    FID_REPLICATES,
    FID_STDERR,
    KID,
    KID_STDERR,
)

from .best import is_finite_number

NOISE_MULTIPLE = 2.0  # an effect is a gap beyond this many standard errors (about 5% two-sided)
DEFAULT_CUT_Z = 2.5  # the racing scheduler's: stop a trial only beyond this many (sweeps/racing.py says why)

PAIRED, SEED_SPREAD, INDEPENDENT = "paired jackknife", "seed spread", "jackknife"

# The rankable metrics that carry a standard error, and its name; only FID has replicates.
STDERR_OF = {FID.name: FID_STDERR.name, KID.name: KID_STDERR.name, CURVATURE.name: CURVATURE_STDERR.name}


@dataclass(frozen=True)
class Measurement:
    """A metric's value with what is known of its noise: its standard error (None when not
    measured); for a single-seed FID its jackknife replicates, sample count and the seed of its
    sampling noise (None: the one noise of the sweep); for a mean over seeds their number."""

    value: float
    stderr: Optional[float] = None
    replicates: tuple[float, ...] = ()
    num_samples: int = 0
    sampling_seed: Optional[int] = None
    num_seeds: int = 1

    @classmethod
    def from_row(cls, row: Mapping[str, Any], metric: str, sampling_seed: Optional[int] = None) -> Measurement:
        """From a milestone row (or a Tune result) holding a finite `metric`."""
        stderr = row.get(STDERR_OF.get(metric, ""))
        replicates = row.get(FID_REPLICATES.name) if metric == FID.name else None
        num_samples = row.get(FID_NUM_SAMPLES.name)
        has_replicates = (
            isinstance(replicates, (list, tuple))
            and len(replicates) > 1
            and all(map(is_finite_number, replicates))
            and is_finite_number(num_samples)
            and num_samples > 0
        )
        return cls(
            value=float(row[metric]),
            stderr=float(stderr) if is_finite_number(stderr) else None,
            replicates=tuple(float(r) for r in replicates) if has_replicates else (),
            num_samples=int(num_samples) if has_replicates else 0,
            sampling_seed=sampling_seed,
        )

    @classmethod
    def over_seeds(cls, values: Sequence[float]) -> Measurement:
        """The mean of one configuration's values over its training seeds, with their spread."""
        return cls(statistics.fmean(values), stderr_of_mean(values), num_seeds=len(values))


def stderr_of_mean(values: Sequence[float]) -> float:
    """sd/√K of K ≥ 2 values (NaN for fewer): the standard error of their mean."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else math.nan


@dataclass(frozen=True)
class Difference:
    """a − b, its standard error (NaN: unknown), and which standard error it is."""

    gap: float
    stderr: float
    kind: str

    def margin(self, multiple: float) -> float:
        """`multiple` standard errors, for a scheduler's cut: 0 when the standard error is unknown
        (a metric without one is compared plainly, as ASHA compares)."""
        return multiple * self.stderr if math.isfinite(self.stderr) else 0.0

    @property
    def is_effect(self) -> bool:
        """|gap| beyond NOISE_MULTIPLE standard errors; never when the standard error is unknown."""
        return math.isfinite(self.stderr) and abs(self.gap) > NOISE_MULTIPLE * self.stderr


def sampled_alike(a: Measurement, b: Measurement) -> bool:
    """Two single-seed FIDs from the same sampling noise: replicates over the same groups."""
    return (
        a.num_seeds == b.num_seeds == 1
        and bool(a.replicates)
        and len(a.replicates) == len(b.replicates)
        and a.num_samples == b.num_samples
        and a.sampling_seed == b.sampling_seed
    )


def difference(a: Measurement, b: Measurement) -> Difference:
    """a.value − b.value with its standard error, paired where the two were sampled alike."""
    gap = a.value - b.value
    if sampled_alike(a, b):
        return Difference(gap, paired_stderr(a.replicates, b.replicates, a.num_samples), PAIRED)
    kind = SEED_SPREAD if max(a.num_seeds, b.num_seeds) >= 2 else INDEPENDENT
    if a.stderr is None or b.stderr is None:
        return Difference(gap, math.nan, kind)
    return Difference(gap, math.hypot(a.stderr, b.stderr), kind)


def rungs(grace_period: float, reduction_factor: float, max_t: float) -> list[int | float]:
    """The steps where a scheduler compares trials, ASHA's: grace_period · reduction_factor^k
    below max_t, rounded to 6 decimals (100 · 2.3 is 229.99999999999997 in floating point: 230),
    whole numbers as int."""
    found, rung = [], float(grace_period)
    while round(rung, 6) < max_t:
        rounded = round(rung, 6)
        found.append(int(rounded) if rounded.is_integer() else rounded)
        rung *= reduction_factor
    return found


# --- How far rankings still move after a rung ---------------------------------------------------

MIN_DYNAMICS_TRIALS = 3  # trials gone past a rung before its dynamics term counts as measured

Curve = Mapping[int, Measurement]  # one trial's measurements by step


@dataclass(frozen=True)
class LaterChange:
    """How much the difference between two trials changed from a rung to the last step both
    reached: Δ = (a − b at `later_step`) − (a − b at the rung), with its sampling standard error."""

    later_step: int
    change: float
    stderr: float


def later_change(a: Curve, b: Curve, rung: int | float) -> Optional[LaterChange]:
    """Δ for two trials measured at the rung and at some later common step (None otherwise). Its
    standard error is the jackknife of the four measurements' replicates combined the same way
    when all four were sampled alike (the noise shared across trials and steps cancels), else
    the four standard errors in quadrature (an unknown one counted as 0)."""
    later = [step for step in a if step > rung and step in b]
    if rung not in a or rung not in b or not later:
        return None
    last = max(later)
    four = (a[last], b[last], a[rung], b[rung])
    change = four[0].value - four[1].value - four[2].value + four[3].value
    if all(sampled_alike(four[0], m) for m in four[1:]):
        replicates = [
            ra - rb - rr + rs for ra, rb, rr, rs in zip(*(m.replicates for m in four))
        ]  # the replicates of Δ itself
        return LaterChange(last, change, replicate_stderr(replicates, four[0].num_samples))
    return LaterChange(last, change, math.sqrt(sum((m.stderr or 0.0) ** 2 for m in four)))


@dataclass(frozen=True)
class RungDynamics:
    """The training-dynamics noise of a cut at a rung: how far a trailing trial still catches up
    with a leading one after the rung, beyond what sampling explains. Only catching up can make a
    cut wrong (a trailer that falls further behind was rightly cut), so the spread is one-sided:
    with C the trailer's catch-up of a pair (its gap at the rung minus its gap later),
    τ = √max(0, 2 · mean(max(C, 0)²) − mean(se_C²)) over the pairs of trials that went past the
    rung. For C symmetric about 0 this is the two-sided moment estimate (E[C²] = τ² + E[se_C²],
    half of it on each side); where trailers fall behind, as a bad learning rate's does, it is
    smaller; where they catch up, as curves that cross do, larger."""

    rung: int | float
    num_trials: int
    num_pairs: int
    spread: float  # τ, in the metric's units
    sampling_spread: float  # √mean(se_C²): what sampling alone would move the pairs' differences by


def rung_dynamics(
    curves: Mapping[str, Curve], rung: int | float, min_trials: int = MIN_DYNAMICS_TRIALS
) -> Optional[RungDynamics]:
    """τ at `rung` from every pair of the trials measured there and later; None until
    `min_trials` trials have gone past the rung (a rung not yet measured). Which of a pair trails
    needs no mode: the catch-up is how much their gap at the rung narrowed, either way round."""
    past = sorted(t for t, curve in curves.items() if rung in curve and any(step > rung for step in curve))
    catch_ups = []  # (C, se_C) of each pair
    for a, b in itertools.combinations(past, 2):
        if (found := later_change(curves[a], curves[b], rung)) is None:
            continue
        gap = curves[a][rung].value - curves[b][rung].value  # Δ is later gap minus this one
        catch_up = -found.change if gap > 0 else found.change if gap < 0 else abs(found.change)
        catch_ups.append((catch_up, found.stderr))
    if len(past) < max(min_trials, 2) or not catch_ups:
        return None
    excess = 2 * statistics.fmean(max(c, 0.0) ** 2 for c, _ in catch_ups) - statistics.fmean(
        se**2 for _, se in catch_ups
    )
    sampling = math.sqrt(statistics.fmean(se**2 for _, se in catch_ups))
    return RungDynamics(rung, len(past), len(catch_ups), math.sqrt(max(excess, 0.0)), sampling)


def with_dynamics(gap: Difference, dynamics: RungDynamics) -> Difference:
    """The difference at a rung with the rung's training-dynamics noise added to its standard error
    (a metric without a standard error of its own is then compared against τ alone)."""
    sampling = gap.stderr if math.isfinite(gap.stderr) else 0.0
    return Difference(gap.gap, math.hypot(sampling, dynamics.spread), f"{gap.kind} + training dynamics")
