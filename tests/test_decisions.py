"""Decisions that respect the noise, on crafted experiments: ties read as ties, real gaps as
effects, seed repeats grouped, FIDs on different bases never ranked together, and the rank
agreement that says whether ASHA's early cuts can be trusted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.decisions import basis_warnings, configurations, effect_sentences, rank_agreement, ranking_movements
from record.experiment import Experiment, Trial
from sweeps.spec import load_spec

from conftest import REPO


def trial(
    trial_id: str,
    searched: dict,
    fids: list[float],
    stderr: float = 1.0,
    count: int = 2000,
    reference: str = "ref.npz",
    steps=None,
) -> Trial:
    steps = steps or [2000 * (i + 1) for i in range(len(fids))]
    rows = [
        {
            "step": s,
            "val/fid": f,
            "val/fid_stderr": stderr,
            "val/fid_num_samples": count,
            "val/fid_reference": reference,
        }
        for s, f in zip(steps, fids)
    ]
    return Trial(trial_id, Path(trial_id), searched=searched, milestones=rows, state="finished")


def experiment(*trials: Trial) -> Experiment:
    return Experiment(Path("crafted"), trials=list(trials))


def sentences(exp: Experiment) -> list[str]:
    return effect_sentences(configurations(exp), exp.searched_keys)


def test_two_configurations_a_noise_apart_read_as_a_tie():
    """The research notes' E7a vs E7c: 203.6 vs 203.2, each ± 1.0."""
    (sentence,) = sentences(
        experiment(
            trial("e7a", {"model.base_channels": 32}, [203.6]), trial("e7c", {"model.base_channels": 64}, [203.2])
        )
    )
    assert "Best val/fid is at base_channels = 64 (203.2 ± 1)" in sentence
    assert "base_channels = 32: 203.6 ± 1 (within noise: +0.4 ± 1.4, jackknife)" in sentence


def test_a_gap_of_many_standard_errors_is_stated_as_an_effect():
    (sentence,) = sentences(
        experiment(trial("a", {"optim.lr": 1e-4}, [203.6]), trial("b", {"optim.lr": 1e-3}, [180.0]))
    )
    assert "lr = 0.0001: 203.6 ± 1 (an effect: +23.6 ± 1.4, jackknife)" in sentence


def test_fids_sampled_from_the_same_noise_are_compared_paired():
    """The issue's measurement in miniature: the two models' jackknife replicates move together
    (shared sampling noise), so their gap of 11.3, within two unpaired standard errors, is an
    effect paired; sampled from other noise (another eval.seed), it gets no such credit."""
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 1.0, 25)

    def paired_trial(name, lr, fid, replicates, eval_seed=0):
        t = trial(name, {"optim.lr": lr}, [fid], stderr=4.5)
        t.milestones[0].update({"val/fid_jackknife": list(fid + replicates), "val/fid_num_samples": 250})
        t.config["eval.seed"] = eval_seed
        return t

    a = paired_trial("a", 1e-4, 340.0, shared)
    b = paired_trial("b", 1e-3, 351.3, 1.02 * shared + rng.normal(0, 0.1, 25))
    (sentence,) = sentences(experiment(a, b))
    gap_se = float(sentence.split("+11.3 ± ")[1].split(",")[0])
    assert "(an effect: +11.3" in sentence and "paired jackknife" in sentence and gap_se < 11.3 / 4
    other_noise = paired_trial("b", 1e-3, 351.3, 1.02 * shared + rng.normal(0, 0.1, 25), eval_seed=1)
    (unpaired,) = sentences(experiment(a, other_noise))
    assert "(within noise: +11.3 ± 6.4, jackknife)" in unpaired


def test_seed_repeats_are_grouped_and_their_spread_is_the_noise():
    rng = np.random.default_rng(0)
    trials = [
        trial(f"{lr}-{seed}", {"optim.lr": lr, "train.seed": seed}, [base + rng.normal(0, 3.0)], stderr=0.5)
        for lr, base in [(1e-4, 200.0), (1e-3, 201.0)]
        for seed in (1, 2, 3)
    ]
    exp = experiment(*trials)
    configs = configurations(exp)
    assert [len(c.best_fids) for c in configs] == [3, 3]
    assert all("train.seed" not in c.searched for c in configs)
    for c in configs:
        assert abs(c.stderr - np.std(c.best_fids, ddof=1) / np.sqrt(3)) < 1e-9  # seed spread, not the 0.5 jackknife
    (sentence,) = sentences(exp)
    assert "within noise" in sentence  # a 1-point gap under a 3-point seed spread


def test_fids_on_different_counts_or_references_are_not_ranked_together():
    exp = experiment(
        trial("a", {"optim.lr": 1e-4}, [250.0]),
        trial("b", {"optim.lr": 1e-3}, [230.0]),
        trial("c", {"optim.lr": 3e-3}, [150.0], count=10_000),
    )
    warnings = basis_warnings(exp)
    assert exp.basis == (2000, "ref.npz")
    assert len(warnings) == 1 and "not ranked" in warnings[0] and warnings[0].endswith(": c")
    configs = configurations(exp)
    assert [c.searched["optim.lr"] for c in configs if c.best_fids] == [1e-3, 1e-4]  # c's lower FID is not a winner


def test_rank_agreement_reads_strong_agreement_and_shuffled_finals_as_too_weak():
    early = np.linspace(200, 260, 12)
    agreeing = experiment(*[trial(f"t{i}", {"optim.lr": i}, [e, e - 20]) for i, e in enumerate(early)])
    (strong,) = rank_agreement(agreeing)
    assert strong.num_trials == 12 and strong.tau == pytest.approx(1.0) and "strong agreement" in strong.sentence
    finals = np.random.default_rng(3).permutation(early)
    shuffled = experiment(*[trial(f"t{i}", {"optim.lr": i}, [e, f]) for i, (e, f) in enumerate(zip(early, finals))])
    (weak,) = rank_agreement(shuffled)
    assert abs(weak.tau) < 0.4 and "too weak to trust" in weak.sentence


def test_ranking_movements_measure_crossing_curves_and_not_parallel_ones():
    """Curves that cross: trailers catch up by tens of FID after step 2000; parallel curves keep
    every difference, so only sampling noise (± 1 each, not paired) is left."""
    crossing = experiment(
        *[trial(f"t{i}", {"optim.lr": i}, fids) for i, fids in enumerate([[300, 250], [320, 220], [340, 280]])]
    )
    (moved,) = ranking_movements(crossing)
    # The trailer's catch-up C: t1 on t0 (320 − 300) − (220 − 250) = 50; t2 on t0 (340 − 300) − (280 − 250)
    # = 10; t2 on t1 (340 − 320) − (280 − 220) = −40 (fell behind: counts 0); each se_C² = 4:
    # τ² = 2 · (2500 + 100 + 0) / 3 − 4.
    assert (moved.dynamics.rung, moved.dynamics.num_pairs) == (2000, 3)
    assert moved.dynamics.spread == pytest.approx(np.sqrt(5200 / 3 - 4))
    assert "Rankings still move after step 2000: a trial trailing another there caught up by a spread of 41.6 FID" in (
        moved.sentence
    )
    parallel = experiment(*[trial(f"t{i}", {"optim.lr": i}, [300 + i, 250 + i]) for i in range(3)])
    (still,) = ranking_movements(parallel)
    assert still.dynamics.spread == 0.0 and still.dynamics.sampling_spread == pytest.approx(2.0)
    assert still.sentence.startswith("Rankings held after step 2000: no trial trailing another there caught up")


def test_repeats_give_each_configuration_k_distinct_seeds(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    from conftest import write_spec

    path = write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4, 1e-3]}}, repeats=3)
    spec = load_spec(path)
    assert spec.num_trials == 6 and spec.seeds == [1077, 1078, 1079]
    printed = CliRunner().invoke(app, ["run", str(path), "--dry-run"]).output
    assert sum("seed=1078" in line for line in printed.splitlines()) == 2
    assert printed.strip().endswith("6 trials")


def test_every_shipped_spec_passes_the_new_checks():
    from typer.testing import CliRunner

    from cli.main import app

    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.warnings() == [], path.name
        assert CliRunner().invoke(app, ["run", str(path), "--dry-run"]).exit_code == 0
