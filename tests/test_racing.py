"""Early stopping beyond noise, on hand-made reports (no training, no Ray cluster): the rule stops
what is clearly worse and keeps what is within noise, paired replicates see gaps the unpaired
standard error hides, the scheduler's state survives save and restore (and Tune's callback
checkpoint), and the replay shows ASHA losing a best that trailed within noise at its first
rung while racing keeps it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import ray.cloudpickle as pickle
from ray.tune.callback import CallbackList
from ray.tune.schedulers import TrialScheduler

from diffusion_lib.jackknife import replicate_stderr
from diffusion_lib.milestone import FID, FID_NUM_SAMPLES, FID_REPLICATES, FID_STDERR, STEP
from record.files import StoppedEarly
from record.noise import Measurement, difference, later_change, rung_dynamics
from sweeps.racing import DynamicsRacingScheduler, RacingScheduler, RacingStateCallback, should_stop
from sweeps.replay import render, replay

NUM_SAMPLES, GROUPS = 250, 25
STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


class Trial:
    def __init__(self, trial_id: str, path=None):
        self.trial_id = trial_id
        self.path = str(path)


def replicates(fid: float, stderr: float, rng: np.random.Generator, pattern=None) -> np.ndarray:
    """25 jackknife replicates around `fid` whose standard error is `stderr`; `pattern` (a centred
    vector) is the sampling noise shared with another trial, else drawn afresh."""
    noise = rng.standard_normal(GROUPS) if pattern is None else np.asarray(pattern, dtype=float)
    noise = noise - noise.mean()
    return fid + noise * stderr / replicate_stderr(noise, NUM_SAMPLES)


def row(step: int, fid: float, stderr: float | None = None, rng=None, pattern=None) -> dict:
    """A milestone row as the trainer reports it; with an rng, with jackknife replicates."""
    result = {STEP.name: step, FID.name: fid}
    if stderr is not None:
        result[FID_STDERR.name] = stderr
    if rng is not None:
        reps = replicates(fid, stderr, rng, pattern)
        result |= {FID_REPLICATES.name: list(reps), FID_NUM_SAMPLES.name: NUM_SAMPLES}
    return result


def scheduler(**settings) -> RacingScheduler:
    return RacingScheduler(STEP.name, FID.name, "min", **({"max_t": 60, "grace_period": 20} | settings))


def test_rule_stops_what_is_many_standard_errors_worse_and_keeps_what_is_within_noise():
    best = Measurement(400.0, stderr=4.0)
    assert should_stop("b", {"a": best, "b": Measurement(470.0, stderr=4.0)}, 2, 2.5, "min")
    assert not should_stop("b", {"a": best, "b": Measurement(410.0, stderr=4.0)}, 2, 2.5, "min")  # 10 < 2.5·5.7
    assert not should_stop("a", {"a": best, "b": Measurement(470.0, stderr=4.0)}, 2, 2.5, "min")  # among the kept
    # Without any standard error it is ASHA's plain comparison; with mode max, larger is better.
    assert should_stop("b", {"a": Measurement(400.0), "b": Measurement(400.5)}, 2, 2.5, "min")
    assert should_stop("b", {"a": Measurement(470.0, 4.0), "b": Measurement(400.0, 4.0)}, 2, 2.5, "max")
    # The threshold is the worst of the best ⌈n / 2⌉: with four trials, the second best.
    four = {"a": Measurement(380.0, 2.0), "b": Measurement(400.0, 2.0), "c": Measurement(405.0, 2.0)}
    assert not should_stop("c", four | {"d": Measurement(500.0, 2.0)}, 2, 2.5, "min")  # 405 vs 400: noise
    assert should_stop("c", four | {"d": Measurement(500.0, 2.0)}, 2, 1.0, "min")  # 5 > 1·2.8


def test_paired_replicates_make_a_small_gap_significant():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(GROUPS)  # both trials sampled the same noise: their errors move together
    a = Measurement.from_row(row(20, 400.0, 4.0, rng, shared), FID.name)
    b_row = row(20, 403.0, 4.0, rng, shared + 0.02 * rng.standard_normal(GROUPS))
    b = Measurement.from_row(b_row, FID.name)
    assert difference(a, b).stderr < 0.5
    assert should_stop("b", {"a": a, "b": b}, 2, 2.5, "min")
    unpaired = Measurement(403.0, stderr=4.0)  # the same gap, only the standard errors known
    assert difference(a, unpaired).stderr == pytest.approx(np.hypot(4.0, 4.0))
    assert not should_stop("b", {"a": a, "b": unpaired}, 2, 2.5, "min")
    other_count = Measurement.from_row(b_row | {FID_NUM_SAMPLES.name: 500}, FID.name)  # not paired: other N
    assert difference(a, other_count).stderr == pytest.approx(np.hypot(4.0, 4.0), rel=1e-3)


def test_first_trial_at_a_rung_continues_and_max_t_ends_a_trial():
    racing = scheduler()
    racing.on_trial_add(None, Trial("first"))
    assert racing.on_trial_result(None, Trial("first"), row(10, 900.0, 4.0)) == CONTINUE  # before the grace period
    assert racing.on_trial_result(None, Trial("first"), row(20, 900.0, 4.0)) == CONTINUE  # alone at the rung
    assert racing.on_trial_result(None, Trial("second"), row(20, 400.0, 4.0)) == CONTINUE
    assert racing.on_trial_result(None, Trial("third"), row(20, 950.0, 4.0)) == STOP  # 950 vs 900: 50 > 14
    assert racing.on_trial_result(None, Trial("second"), row(60, 300.0, 4.0)) == STOP  # its budget
    assert racing.debug_string().splitlines()[1:] == [
        "Rung step 20 (3 trials): 400 ± 4, 900 ± 4, 950 ± 4",
        "Rung step 40 (0 trials): -",
    ]


def test_metric_and_mode_come_from_tune_as_for_asha():
    racing = RacingScheduler(STEP.name, max_t=60, grace_period=20)
    with pytest.raises(ValueError, match="needs a metric"):
        racing.on_trial_add(None, Trial("a"))
    assert racing.set_search_properties(FID.name, "min")
    assert not racing.set_search_properties(FID.name, "min")
    racing.on_trial_add(None, Trial("a"))


def reports_then_more(racing: RacingScheduler, rng: np.random.Generator) -> list[str]:
    """Results at rung 20 for four trials; returns the decisions on the reports that follow."""
    for trial_id, fid in (("a", 400.0), ("b", 402.0), ("c", 398.0), ("d", 401.0)):
        racing.on_trial_result(None, Trial(trial_id), row(20, fid, 4.0, rng))
    later = [("e", 20, 404.0), ("f", 20, 470.0), ("a", 40, 350.0), ("c", 40, 420.0)]
    return [racing.on_trial_result(None, Trial(t), row(s, fid, 4.0, rng)) for t, s, fid in later]


def test_state_survives_save_and_restore(tmp_path):
    before = scheduler()
    reports_then_more(before, np.random.default_rng(1))
    before.save(str(tmp_path / "racing.json"))
    after = scheduler()
    after.restore(str(tmp_path / "racing.json"))
    assert after.debug_string() == before.debug_string()
    assert after.state() == before.state()
    # The same reports now get the same decisions from both; a fresh scheduler, with no rung 20
    # recorded, would keep "g".
    more = [("g", 20, 480.0), ("b", 40, 352.0), ("d", 40, 450.0)]

    def decisions(racing: RacingScheduler) -> list[str]:
        return [racing.on_trial_result(None, Trial(t), row(step, fid, 4.0)) for t, step, fid in more]

    assert decisions(after) == decisions(before) == [STOP, CONTINUE, STOP]
    assert decisions(scheduler())[0] == CONTINUE
    with pytest.raises(ValueError, match="settings"):
        scheduler(grace_period=10).restore(str(tmp_path / "racing.json"))


def test_state_rides_in_tunes_callback_checkpoint(tmp_path):
    """Ray pickles the TuneConfig's scheduler and the RunConfig's callbacks together (tuner.pkl),
    then restores the callbacks' state from its experiment checkpoint: the restored callback must
    hold the restored scheduler and refill its rungs."""
    racing = scheduler()
    callback = RacingStateCallback(racing)
    restored_racing, restored_callback = pickle.loads(pickle.dumps((racing, callback)))  # tuner.pkl, when made
    assert restored_callback.scheduler is restored_racing
    decisions = reports_then_more(racing, np.random.default_rng(2))
    CallbackList([callback]).save_to_dir(str(tmp_path), session_str="before-the-kill")
    CallbackList([restored_callback]).restore_from_dir(str(tmp_path))
    assert restored_racing.debug_string() == racing.debug_string()
    assert decisions == [CONTINUE, STOP, CONTINUE, STOP]


def grid_curves() -> dict[str, list[dict]]:
    """Six arms: at step 20 four stand within noise (± 4, independent samples) and two are far
    behind; the eventual best trails the four at step 20 and pulls ahead by step 40."""
    rng = np.random.default_rng(3)
    fids = {
        "best": (404, 350, 330),
        "mid_a": (398, 372, 362),
        "mid_b": (400, 368, 361),
        "mid_c": (401, 375, 365),
        "bad_a": (470, 455, 450),
        "bad_b": (480, 460, 452),
    }
    return {t: [row(20 * (i + 1), float(f), 4.0, rng) for i, f in enumerate(fs)] for t, fs in fids.items()}


def test_replay_asha_loses_a_best_that_trailed_within_noise_and_racing_keeps_it(capsys):
    info = replay(grid_curves(), grace_period=20, reduction_factor=2, max_t=60, concurrency=2, num_orders=200, seed=0)
    assert capsys.readouterr().err == ""  # the replayed schedulers' stops are counted, not said
    asha, racing, _, _ = info.schedulers
    assert (info.best_trial, info.best_step, info.best_fid, info.grid_trial_steps) == ("best", 60, 330.0, 360)
    assert asha.kept_best_share < 0.8
    assert asha.stop_counts["best", 20] > 0.2 * info.num_orders
    assert racing.kept_best_share >= 0.95
    assert racing.stop_counts["best", 20] == 0
    assert racing.steps_share_mean < 0.9  # the two far-behind arms are still cut
    for run in asha.runs + racing.runs:  # every other FID is beyond two standard errors of 330
        assert run.kept_best == (run.best_fid == 330.0)
    text = "\n".join(render(info))
    assert "Rungs at step 20, 40 (grace period 20, reduction factor 2, max_t 60)" in text
    assert "best at step 20" in text


def test_replay_trial_step_shares_by_hand():
    """One trial at a time, a first: b arrives at step 10 with 200 against a's 100 and is cut by
    both (no standard error: a plain comparison), so the run uses 20 + 10 of the grid's 40
    trial-steps and sees 90, not the grid's best 80. b first: nothing is cut, 40 of 40. The
    dynamics rule cuts nothing: no three trials ever go past the rung to measure it; told the
    grid's term, it still cuts nothing: b caught up by 110 after the rung (τ = √2 · 110)."""
    curves = {"a": [row(10, 100.0), row(20, 90.0)], "b": [row(10, 200.0), row(20, 80.0)]}
    info = replay(curves, grace_period=10, reduction_factor=2, max_t=20, concurrency=1, num_orders=20, seed=5)
    asha, racing, dynamics, known = info.schedulers
    assert all(run.stopped == {} for run in dynamics.runs)  # two trials: the rung's dynamics never measured
    assert known.name == "dynamics known" and info.dynamics[0].spread == pytest.approx(math.sqrt(2) * 110)
    assert all(run.stopped == {} and run.steps_share == 1.0 for run in known.runs)
    for replayed in (asha, racing):
        for run in replayed.runs:
            if run.arrival[0] == "a":
                assert (run.steps_share, run.stopped, run.best_fid, run.kept_best) == (0.75, {"b": 10}, 90.0, False)
            else:
                assert (run.steps_share, run.stopped, run.best_fid, run.kept_best) == (1.0, {}, 80.0, True)
        a_first = sum(run.arrival[0] == "a" for run in replayed.runs)
        assert 0 < a_first < 20
        assert replayed.steps_share_mean == pytest.approx((0.75 * a_first + (20 - a_first)) / 20)
        assert (replayed.steps_share_min, replayed.steps_share_max) == (0.75, 1.0)
        assert replayed.stop_counts == {("b", 10): a_first}


def test_sweep_replay_reads_a_finished_grid_from_its_files_and_refuses_an_unfinished_one(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    from conftest import write_summary, write_sweep_file, write_trial

    experiment = tmp_path / "grid"
    write_sweep_file(experiment, {"optim.lr": {"grid": list(range(6))}})
    for i, (name, rows) in enumerate(grid_curves().items()):
        reference = {"val/fid_reference": "ref.npz"}
        write_trial(experiment, name, [r | reference for r in rows], searched={"optim.lr": i}, total_steps=60)
    write_summary(experiment, dict.fromkeys(grid_curves(), "finished"))
    result = CliRunner().invoke(app, ["replay", str(experiment), "--orders", "50"])
    assert result.exit_code == 0, result.output
    assert "Rungs at step 20, 40 (grace period 20, reduction factor 2, max_t 60)" in result.output
    kept = next(line for line in result.output.splitlines() if line.startswith("kept the grid's best"))
    assert kept.split()[5] == "100%"  # racing (ASHA's column first), as in the replay test above

    write_trial(experiment, "mid_a", grid_curves()["mid_a"][:1], searched={"optim.lr": 1}, total_steps=60)
    write_summary(
        experiment, {**dict.fromkeys(grid_curves(), "finished"), "mid_a": "stopped"}
    )  # an early-stopped sweep
    refused = CliRunner().invoke(app, ["replay", str(experiment)])
    assert refused.exit_code == 2 and "not ended: mid_a" in refused.output


# --- The training-dynamics term: rankings that still move after the rung ---------------------


def crossing_pilots(rng=None) -> dict[str, list[dict]]:
    """Four pilot trials whose differences at step 20 do not last: pairs swap places by step 60,
    by 30–60 FID, far beyond their sampling standard errors (± 4)."""
    fids = {"p1": (400, 380, 340), "p2": (430, 370, 300), "p3": (410, 390, 380), "p4": (440, 380, 320)}
    return {t: [row(20 * (i + 1), float(f), 4.0, rng) for i, f in enumerate(fs)] for t, fs in fids.items()}


def dynamics_scheduler(**settings) -> DynamicsRacingScheduler:
    return DynamicsRacingScheduler(STEP.name, FID.name, "min", **({"max_t": 60, "grace_period": 20} | settings))


def feed(racing: RacingScheduler, curves: dict[str, list[dict]]) -> None:
    """Every trial's every milestone, one trial after another, as if run one at a time to its end."""
    for trial_id, rows in curves.items():
        racing.on_trial_add(None, Trial(trial_id))
        for result in rows:
            racing.on_trial_result(None, Trial(trial_id), dict(result))
        racing.on_trial_complete(None, Trial(trial_id), dict(rows[-1]))


def test_the_dynamics_term_equals_its_definition_on_a_hand_computed_example():
    """Three trials, rung 10, later step 20, standard error 1 each (no replicates: independent).
    The trailer's catch-up C of each pair (its gap at the rung minus its gap at step 20): b on a
    (110 − 100) − (70 − 80) = 20; c on a (120 − 100) − (110 − 80) = −10; c on b (120 − 110) −
    (110 − 70) = −30; se_C² = 4 each. Only catching up counts: τ² = 2 · mean(max(C, 0)²) − 4 =
    800/3 − 4 (the two-sided mean(C² − 4) would be 1400/3 − 4). A trial's lead is its lead
    whichever way the metric points: negated values give the same τ."""
    values = {"a": (100, 80), "b": (110, 70), "c": (120, 110)}
    curves = {
        t: {10: Measurement(f10, stderr=1.0), 20: Measurement(f20, stderr=1.0)} for t, (f10, f20) in values.items()
    }
    measured = rung_dynamics(curves, 10)
    assert (measured.num_trials, measured.num_pairs, measured.sampling_spread) == (3, 3, 2.0)
    assert measured.spread == pytest.approx(math.sqrt(800 / 3 - 4))
    negated = {t: {s: Measurement(-m.value, stderr=1.0) for s, m in c.items()} for t, c in curves.items()}
    assert rung_dynamics(negated, 10).spread == pytest.approx(measured.spread)
    assert rung_dynamics({t: curves[t] for t in "ab"}, 10) is None  # two trials past it: not measured yet
    assert rung_dynamics(curves, 20) is None  # nobody went past the last step


def test_the_later_change_of_trials_sampled_alike_is_paired_across_trials_and_steps():
    """With replicates from one noise, Δ's standard error is the jackknife of the replicates
    combined as Δ combines the values: the noise every milestone shares cancels."""
    rng = np.random.default_rng(4)
    shared = rng.standard_normal(GROUPS)
    curve = {  # every measurement carries the same sampling noise plus a little of its own
        t: {
            s: Measurement.from_row(row(s, f, 4.0, rng, shared + 0.01 * rng.standard_normal(GROUPS)), FID.name)
            for s, f in points.items()
        }
        for t, points in {"a": {10: 400.0, 20: 350.0}, "b": {10: 410.0, 20: 340.0}}.items()
    }
    change = later_change(curve["a"], curve["b"], 10)
    combined = [
        a20 - b20 - a10 + b10
        for a20, b20, a10, b10 in zip(
            *(curve[t][s].replicates for t, s in (("a", 20), ("b", 20), ("a", 10), ("b", 10)))
        )
    ]
    assert change.later_step == 20 and change.change == pytest.approx(20.0)
    assert change.stderr == pytest.approx(replicate_stderr(combined, NUM_SAMPLES))
    assert change.stderr < 0.5  # unpaired it would be √(4 · 4²) = 8


def test_a_late_bloomer_is_kept_once_the_rung_has_measured_curves_like_it_and_a_loser_is_cut():
    racing, dynamics = scheduler(), dynamics_scheduler()
    for replayed in (racing, dynamics):
        feed(replayed, crossing_pilots())
    measured = dynamics.dynamics(20)
    assert measured.num_trials == 4 and measured.spread > 30  # the pilots' rankings moved by 30–60
    # The late bloomer trails the keep threshold (430, the third of five) at step 20 by 20: 3.5 standard
    # errors of the difference, had only sampling noise to be allowed for.
    late = row(20, 450.0, 4.0)
    assert racing.on_trial_result(None, Trial("late"), dict(late)) == STOP  # sampling noise alone cuts it
    assert dynamics.on_trial_result(None, Trial("late"), dict(late)) == CONTINUE
    # A trial far worse than rankings ever moved is cut, and says why in one line.
    assert dynamics.on_trial_result(None, Trial("loser"), row(20, 700.0, 4.0)) == STOP
    assert "Rung step 20" in dynamics.debug_string() and "training dynamics" in dynamics.debug_string()


def test_the_dynamics_rule_cuts_nothing_before_the_rung_is_measured(capsys, tmp_path):
    dynamics = dynamics_scheduler(experiment=str(tmp_path))
    feed(dynamics, dict(list(crossing_pilots().items())[:2]))  # two pilots past the rung: fewer than three
    assert dynamics.dynamics(20) is None
    assert dynamics.on_trial_result(None, Trial("loser"), row(20, 900.0, 4.0)) == CONTINUE
    assert "not measured yet" in dynamics.debug_string()
    feed(dynamics, {"p3": crossing_pilots()["p3"]})
    assert dynamics.on_trial_result(None, Trial("loser2", tmp_path / "loser2_lr=1"), row(20, 900.0, 4.0)) == STOP
    line = capsys.readouterr().err.strip()
    assert StoppedEarly.read(tmp_path / "loser2_lr=1", []) == StoppedEarly(20, line)
    assert line.startswith("trial loser2 stopped at step 20: val/fid 900, ")
    assert "training dynamics" in line and "from 3 pairs of 3 trials past the rung" in line


def test_the_dynamics_state_survives_save_and_restore(tmp_path):
    before = dynamics_scheduler()
    feed(before, crossing_pilots(np.random.default_rng(5)))
    before.save(str(tmp_path / "racing.json"))
    after = dynamics_scheduler()
    after.restore(str(tmp_path / "racing.json"))
    assert after.state() == before.state() and after.debug_string() == before.debug_string()
    assert after.dynamics(20) == before.dynamics(20) is not None
    for decided in (before, after):
        assert decided.on_trial_result(None, Trial("late"), row(20, 450.0, 4.0)) == CONTINUE
    with pytest.raises(ValueError, match="settings"):
        scheduler().restore(str(tmp_path / "racing.json"))  # plain racing cannot take a dynamics state


def test_a_stop_whose_reason_cannot_be_written_still_stops_and_says_so(capsys, tmp_path):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")  # the trial's folder cannot be made under a file: as on a full or broken storage
    dynamics = dynamics_scheduler(experiment=str(blocked))
    feed(dynamics, crossing_pilots())
    assert dynamics.on_trial_result(None, Trial("loser", blocked / "loser_lr=1"), row(20, 900.0, 4.0)) == STOP
    err = capsys.readouterr().err
    assert "trial loser stopped at step 20" in err and "warning: why trial loser stopped was not recorded" in err
