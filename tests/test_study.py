"""The sweep as an Optuna study: crafted experiments (no Ray, no training) written to SQLite,
ranked by importance and drawn as parallel coordinates."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from matplotlib.collections import LineCollection
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

import analysis.study as study_module
from analysis.study import STUDY_FILE, parallel_coordinates, param_importances, write_optuna_study
from diffusion_lib.milestone import FID, STEP
from record.experiment import Experiment, Trial

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEARCH = {
    "optim.lr": {"loguniform": [1e-5, 1e-3]},
    "loss.weighting": {"choice": ["constant", "min_snr"]},  # a whole-section search, as sweep.json records it
    "loss.minsnr_gamma": {"choice": [5, 20]},
    "ema.decay": {"uniform": [0.99, 0.9999]},
    "train.batch_size": {"randint": [4, 129]},
    "eval.nfe": {"quniform": [50, 250, 50]},
}


def _trial(trial_id: str, searched: dict, fids: list, state: str = "finished") -> Trial:
    milestones = [{STEP.name: 1000 * (i + 1), FID.name: fid, "train/loss": 0.1} for i, fid in enumerate(fids)]
    return Trial(trial_id, Path(trial_id), searched=searched, milestones=milestones, state=state)


def _mixed_experiment(path: Path) -> Experiment:
    """Every status, a whole-section `loss` grid, every range kind and a key sweep.json lacks."""
    common = {"ema.decay": 0.995, "train.batch_size": 32, "eval.nfe": 100.0, "diffusion.beta_schedule": "cosine"}
    trials = [
        _trial("t0", {"optim.lr": 1e-4, "loss.weighting": "constant", **common}, [210.0, 150.0, float("nan"), 140.0]),
        _trial(
            "t1",
            {
                "optim.lr": 3e-4,
                "loss.weighting": "min_snr",
                "loss.minsnr_gamma": 5,
                **common,
                "diffusion.beta_schedule": "linear",
            },
            [190.0, None, 120.0],
        ),
        _trial(
            "t2",
            {"optim.lr": 2e-5, "loss.weighting": "min_snr", "loss.minsnr_gamma": 20, **common},
            [230.0, 180.0],
            "stopped",
        ),
        _trial("t3", {"optim.lr": 5e-4, "loss.weighting": "constant", **common}, [], "errored"),
        _trial(
            "t4", {"optim.lr": 1e-5, "loss.weighting": "min_snr", "loss.minsnr_gamma": 5, **common}, [250.0], "running"
        ),
        _trial(
            "t5", {"optim.lr": 8e-4, "loss.weighting": "constant", **common}, [float("nan")]
        ),  # ran to the end, no finite FID
    ]
    return Experiment(path, search=SEARCH, trials=trials)


def test_study_file_holds_each_sweep_trial_with_params_distributions_curves_and_states(tmp_path):
    experiment = _mixed_experiment(tmp_path / "min_snr_gamma")
    db = tmp_path / "analysis" / STUDY_FILE
    assert write_optuna_study(experiment, db) == db
    study = optuna.load_study(study_name="min_snr_gamma", storage=f"sqlite:///{db}")
    by_id = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert sorted(by_id) == [t.trial_id for t in experiment.trials]
    assert study.direction == optuna.study.StudyDirection.MINIMIZE

    for trial in experiment.trials:
        assert by_id[trial.trial_id].params == trial.searched
        assert by_id[trial.trial_id].user_attrs["state"] == trial.state
    dists = by_id["t1"].distributions
    assert dists["optim.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert dists["loss.weighting"] == CategoricalDistribution(["constant", "min_snr"])
    assert dists["loss.minsnr_gamma"] == CategoricalDistribution([5, 20])
    assert dists["ema.decay"] == FloatDistribution(0.99, 0.9999)
    assert dists["train.batch_size"] == IntDistribution(4, 128)
    assert dists["eval.nfe"] == FloatDistribution(50, 250, step=50)
    assert dists["diffusion.beta_schedule"] == CategoricalDistribution(
        ["cosine", "linear"]
    )  # not in sweep.json: observed values
    assert "loss.minsnr_gamma" not in by_id["t0"].params  # the constant-weight arm has no γ

    assert by_id["t0"].intermediate_values == {1000: 210.0, 2000: 150.0, 4000: 140.0}  # the NaN milestone skipped
    assert by_id["t1"].intermediate_values == {1000: 190.0, 3000: 120.0}  # the missing one skipped
    states = {tid: (t.state, t.value) for tid, t in by_id.items()}
    assert states == {
        "t0": (TrialState.COMPLETE, 140.0),
        "t1": (TrialState.COMPLETE, 120.0),
        "t2": (TrialState.PRUNED, 180.0),
        "t3": (TrialState.FAIL, None),
        "t4": (TrialState.RUNNING, None),
        "t5": (TrialState.FAIL, None),
    }

    write_optuna_study(experiment, db)  # re-analysis replaces the study, never appends to it
    assert len(optuna.load_study(study_name="min_snr_gamma", storage=f"sqlite:///{db}").trials) == len(
        experiment.trials
    )
    assert [p.name for p in db.parent.iterdir()] == [STUDY_FILE]  # no temporary file left behind


def _lr_matters_experiment(path: Path) -> Experiment:
    """24 finished trials where FID is a bowl in log10(lr) and dropout is noise, plus two stopped."""
    rng = np.random.default_rng(0)
    trials = []
    for i in range(26):
        lr, dropout = float(10 ** rng.uniform(-5, -3)), float(rng.choice([0.0, 0.1, 0.2]))
        fid = 120 + 60 * (math.log10(lr) + 4) ** 2 + rng.normal(0, 2)
        trials.append(
            _trial(
                f"t{i:02d}",
                {"optim.lr": lr, "model.dropout": dropout},
                [fid + 30, fid],
                "finished" if i < 24 else "stopped",
            )
        )
    search = {"optim.lr": {"loguniform": [1e-5, 1e-3]}, "model.dropout": {"choice": [0.0, 0.1, 0.2]}}
    return Experiment(path, search=search, trials=trials)


def test_param_importances_rank_the_key_that_moves_fid_first(tmp_path):
    experiment = _lr_matters_experiment(tmp_path / "lr_sweep")
    db = write_optuna_study(experiment, tmp_path / STUDY_FILE)
    study = optuna.load_study(study_name="lr_sweep", storage=f"sqlite:///{db}")
    assert set(optuna.importance.get_param_importances(study)) == {"optim.lr", "model.dropout"}

    importances, count = param_importances(experiment)
    assert count == 26  # the finished trials and the stopped ones, each at its best
    assert list(importances) == ["optim.lr", "model.dropout"]
    assert importances["optim.lr"] > 0.6 and sum(importances.values()) == pytest.approx(1.0)


def test_stopped_trials_count_in_the_ranking_and_four_trials_are_too_few_to_state_it(tmp_path):
    """Two finished trials at one lr and two stopped at another: ranked on the finished alone,
    weighting would take everything (lr never varied among them)."""
    trials = [
        _trial("f1", {"optim.lr": 1e-3, "loss.weighting": "constant"}, [300.0, 200.0]),
        _trial("f2", {"optim.lr": 1e-3, "loss.weighting": "min_snr"}, [300.0, 205.0]),
        _trial("s1", {"optim.lr": 1e-5, "loss.weighting": "constant"}, [400.0], "stopped"),
        _trial("s2", {"optim.lr": 1e-5, "loss.weighting": "min_snr"}, [401.0], "stopped"),
    ]
    experiment = Experiment(tmp_path / "exp", trials=trials)
    importances, count = param_importances(experiment)
    # Ranked on the finished pair alone, lr (one value there) would get 0 and weighting everything.
    assert count == 4 and list(importances)[0] == "optim.lr" and importances["optim.lr"] >= 0.5

    from analysis.report import ReportData, _importance_section

    report = ReportData(
        experiment=experiment,
        ranked=[],
        images=[],
        warnings=[],
        configurations=[],
        importances=importances,
        importance_trials=count,
        rank_agreements=[],
        ranking_movements=[],
        floor=None,
        got_worse=[],
        curvature=[],
    )
    blocks = _importance_section(report)
    assert "Too few trials to rank the searched keys: 4" in blocks[1].text


def test_param_importances_never_raise_on_thin_data(tmp_path):
    one = Experiment(
        tmp_path / "one",
        trials=[_trial("t0", {"optim.lr": 1e-4}, [100.0]), _trial("t1", {"optim.lr": 1e-3}, [], "errored")],
    )
    assert param_importances(one) == ({}, 1)
    constant_key = Experiment(
        tmp_path / "const", trials=[_trial(f"t{i}", {"a": 1, "b": i}, [float(i)]) for i in range(6)]
    )
    assert param_importances(constant_key) == ({"b": 1.0, "a": 0.0}, 6)
    same_fid = Experiment(tmp_path / "flat", trials=[_trial(f"t{i}", {"a": i % 2, "b": i}, [100.0]) for i in range(6)])
    assert param_importances(same_fid) == ({"a": 0.0, "b": 0.0}, 6)  # nothing to tell apart, not equal shares


def test_parallel_coordinates_draws_one_line_per_complete_trial(tmp_path, monkeypatch):
    axes, plot = [], study_module.plot_parallel_coordinate

    def recording_plot(study):  # Optuna's plot, keeping its Axes to count the lines drawn
        axes.append(plot(study))
        return axes[-1]

    monkeypatch.setattr(study_module, "plot_parallel_coordinate", recording_plot)
    experiment = _mixed_experiment(tmp_path / "mixed")
    study = optuna.load_study(
        study_name="mixed", storage=f"sqlite:///{write_optuna_study(experiment, tmp_path / STUDY_FILE)}"
    )
    png = tmp_path / "plots" / "parallel_coordinates.png"
    assert parallel_coordinates(study, png) == png
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in png.parent.iterdir()] == [png.name]
    segments = [s for c in axes[0].collections if isinstance(c, LineCollection) for s in c.get_segments()]
    assert len(segments) == 2  # t0 and t1 completed; stopped, failed and running trials are not drawn

    nothing = Experiment(tmp_path / "nothing", trials=[_trial("t0", {"optim.lr": 1e-4}, [100.0], "stopped")])
    study = optuna.load_study(
        study_name="nothing", storage=f"sqlite:///{write_optuna_study(nothing, tmp_path / 'n.db')}"
    )
    assert parallel_coordinates(study, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
