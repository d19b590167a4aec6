"""The one noise rule (`record.noise`): which standard error a difference gets, when it is an
effect, and the rungs, the same in the spec that checks them and the scheduler that cuts there."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_lib.jackknife import paired_stderr
from diffusion_lib.milestone import FID, FID_NUM_SAMPLES, FID_REPLICATES, FID_STDERR, STEP
from record.noise import (
    INDEPENDENT,
    PAIRED,
    SEED_SPREAD,
    Difference,
    Measurement,
    RungDynamics,
    difference,
    rungs,
    with_dynamics,
)
from sweeps.racing import RacingScheduler
from sweeps.spec import load_spec

from conftest import write_spec


def fid_row(fid: float, replicates: list[float], num_samples: int = 250, stderr: float = 4.0) -> dict:
    return {FID.name: fid, FID_STDERR.name: stderr, FID_REPLICATES.name: replicates, FID_NUM_SAMPLES.name: num_samples}


def test_two_fids_sampled_alike_are_paired_and_anything_else_is_not():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(25)
    a = Measurement.from_row(fid_row(400.0, list(400 + shared)), FID.name, sampling_seed=0)
    b = Measurement.from_row(fid_row(403.0, list(403 + shared + 0.1 * rng.standard_normal(25))), FID.name, 0)
    paired = difference(b, a)
    assert paired.kind == PAIRED and paired.gap == pytest.approx(3.0)
    assert paired.stderr == pytest.approx(paired_stderr(b.replicates, a.replicates, 250))
    assert paired.stderr < 1.0 and paired.is_effect  # the shared noise cancels: 3 is many standard errors
    # Another sampling seed, another count, or no replicates: the two FIDs' own errors, added in quadrature.
    for other in (
        Measurement.from_row(fid_row(403.0, list(b.replicates)), FID.name, sampling_seed=1),
        Measurement.from_row(fid_row(403.0, list(b.replicates), num_samples=500), FID.name, 0),
        Measurement(403.0, stderr=4.0, sampling_seed=0),
    ):
        unpaired = difference(other, a)
        assert unpaired.kind == INDEPENDENT and unpaired.stderr == pytest.approx(math.hypot(4.0, 4.0))
        assert not unpaired.is_effect  # 3 < 2 · 5.7


def test_a_mean_over_seeds_carries_their_spread_and_says_so():
    seeds = Measurement.over_seeds([350.0, 354.0, 346.0])
    assert seeds.value == 350.0 and seeds.stderr == pytest.approx(4.0 / math.sqrt(3)) and seeds.num_seeds == 3
    gap = difference(Measurement.over_seeds([365.0, 361.0, 369.0]), seeds)
    assert gap.kind == SEED_SPREAD and gap.stderr == pytest.approx(math.hypot(4.0, 4.0) / math.sqrt(3))
    assert gap.is_effect  # 15 > 2 · 3.3
    # One seed has no spread: the gap's standard error is unknown, and nothing is called an effect.
    single = difference(Measurement.over_seeds([365.0]), seeds)
    assert math.isnan(single.stderr) and not single.is_effect


def test_an_effect_is_a_gap_beyond_two_standard_errors_either_way():
    assert Difference(-4.1, 2.0, INDEPENDENT).is_effect and Difference(4.1, 2.0, INDEPENDENT).is_effect
    assert not Difference(3.9, 2.0, INDEPENDENT).is_effect
    assert not Difference(100.0, math.nan, INDEPENDENT).is_effect


def test_rungs_sit_where_ashas_do():
    assert rungs(20, 2, 60) == [20, 40]
    assert rungs(20, 3, 60) == [20]
    assert rungs(2000, 2.0, 10000) == [2000, 4000, 8000]
    assert rungs(100, 2.3, 1000) == [100, 230, 529]  # 100 · 2.3 is 229.99999999999997 in floating point
    assert rungs(100, 2.5, 1000) == [100, 250, 625]


def scheduler_rungs(scheduler: RacingScheduler) -> list[str]:
    """The rung steps the scheduler prints (one `Rung step N (...)` line each)."""
    return [line.split()[2] for line in scheduler.debug_string().splitlines()[1:]]


@pytest.mark.parametrize(("reduction_factor", "total_steps"), [(1.1, 133), (1.2, 170), (2.3, 1000), (3.3, 2000)])
def test_fractional_reduction_factors_give_the_spec_and_the_scheduler_the_same_rungs(
    tmp_path, reduction_factor, total_steps
):
    scheduler = {"type": "racing", "grace_period": 100, "reduction_factor": reduction_factor}
    spec = load_spec(
        write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4]}}, scheduler=scheduler),
        [f"train.total_steps={total_steps}", "eval.every=1"],
    )
    racing = RacingScheduler(
        STEP.name, max_t=spec.max_total_steps(), grace_period=100, reduction_factor=reduction_factor
    )
    assert all(isinstance(rung, int) for rung in spec.rungs())  # every rung is a whole step: a milestone
    assert [str(rung) for rung in spec.rungs()] == scheduler_rungs(racing)
    assert spec.rungs() == rungs(100, reduction_factor, total_steps)


def test_the_dynamics_term_widens_a_difference_with_or_without_a_sampling_standard_error():
    dynamics = RungDynamics(rung=20, num_trials=3, num_pairs=3, spread=12.0, sampling_spread=2.0)
    widened = with_dynamics(Difference(30.0, 5.0, PAIRED), dynamics)
    assert widened.stderr == pytest.approx(13.0) and widened.kind == "paired jackknife + training dynamics"
    plain = with_dynamics(Difference(30.0, math.nan, INDEPENDENT), dynamics)  # e.g. train/loss: no standard error
    assert plain.stderr == 12.0 and plain.margin(2.5) == 30.0
