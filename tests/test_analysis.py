"""Analysis of an experiment of two tiny real runs: tables, the best milestones' grids, plots, report,
damaged files. (That a Ray sweep lays out such a folder is tested in test_sweeps.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from analysis.grids import denoising_diagnostic
from analysis.report import analyze_experiment
from cli.main import app
from diffusion_lib.data import load_dataset
from diffusion_lib.metrics.fid import reference_statistics
from diffusion_lib.run_files import SAMPLES_DIR, sample_grid_name
from record.experiment import load_experiment
from record.files import REFERENCE_DIR

from conftest import StandInFeatures, tiny_config, train_into_experiment, write_summary, write_sweep_file

pytestmark = pytest.mark.slow  # trains two runs for the module, then analyses them whole

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """Two tiny runs trained without Ray into an experiment folder, as a finished grid leaves it."""
    path = tmp_path_factory.mktemp("sweep") / "tiny"
    config = tiny_config(
        train={"total_steps": 30, "batch_size": 8},
        fid={"num_samples": 8, "final_num_samples": 16},
        curvature={"probes": 2, "batch_size": 4},
    )
    reference = reference_statistics(load_dataset(config.data), StandInFeatures(), None, path / REFERENCE_DIR)
    write_sweep_file(path, {"optim.lr": {"grid": [1e-4, 2e-3]}})
    for i, lr in enumerate([1e-4, 2e-3]):
        train_into_experiment(
            path, f"t{i}_lr={lr:g}", config.with_overrides({"optim.lr": lr}), {"optim.lr": lr}, reference
        )
    write_summary(path, {"t0_lr=0.0001": "finished", "t1_lr=0.002": "finished"})
    return path


@pytest.fixture(scope="module")
def analysed(experiment) -> Path:
    result = CliRunner().invoke(app, ["analyze", str(experiment)])
    assert result.exit_code == 0, result.output
    return experiment / "analysis"


def test_tables_have_one_row_per_trial_and_milestone_with_documented_dtypes(analysed):
    trials = pq.read_table(analysed / "trials.parquet")
    milestones = pq.read_table(analysed / "milestones.parquet")
    assert trials.num_rows == 2 and milestones.num_rows == 2 * 3
    assert feather.read_table(analysed / "trials.arrow").equals(trials)
    assert milestones.schema.field("step").type == pa.int64()
    assert milestones.schema.field("val/fid").type == pa.float64()
    assert milestones.schema.field("val/fid_num_samples").type == pa.int64()
    assert milestones.schema.field("curvature/hutch_trace_mean").type == pa.float64()
    assert {f"loss/t_bucket_{i}" for i in range(10)} <= set(milestones.column_names)
    assert trials.schema.field("optim.lr").type == pa.float64()
    assert trials.schema.field("model.channel_mults").type == pa.string()
    assert trials.schema.field("best.val/fid").type == pa.float64()
    assert trials.column("state").to_pylist() == ["finished", "finished"]
    assert sorted(pd.read_parquet(analysed / "milestones.parquet")["step"].unique()) == [10, 20, 30]
    counts = duckdb.sql(
        f"select trial_id, count(*) as n, min(\"val/fid\") as best from '{analysed / 'milestones.parquet'}' group by "
        "trial_id"
    ).fetchall()
    assert sorted(n for _, n, _ in counts) == [3, 3]
    joined = duckdb.sql(
        f"select t.\"best.val/fid\", m.best from '{analysed / 'trials.parquet'}' t join "
        f"(select trial_id, min(\"val/fid\") as best from '{analysed / 'milestones.parquet'}' group by trial_id) m "
        "using (trial_id)"
    ).fetchall()
    assert all(a == pytest.approx(b) for a, b in joined)


def test_the_sweep_is_an_optuna_study_that_optunas_tools_read(experiment, analysed):
    import optuna

    study = optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{analysed / 'study.db'}")
    milestones = pd.read_parquet(analysed / "milestones.parquet")
    assert len(study.trials) == 2 and sorted(t.params["optim.lr"] for t in study.trials) == [1e-4, 2e-3]
    for t in study.trials:
        rows = milestones[milestones["trial_id"] == t.user_attrs["trial_id"]]
        assert t.intermediate_values == dict(zip(rows["step"], rows["val/fid"]))
    assert set(optuna.importance.get_param_importances(study)) == {"optim.lr"}


def test_grids_are_the_best_milestones_recorded_ones_and_denoise_is_drawn_from_the_best_checkpoint(
    experiment, analysed, tmp_path
):
    trials = pd.read_parquet(analysed / "trials.parquet").set_index("trial_id").sort_values("best.value")
    milestones = pd.read_parquet(analysed / "milestones.parquet")
    recorded = {
        (trial_id, step): (experiment / trial_id / SAMPLES_DIR / sample_grid_name(step)).read_bytes()
        for trial_id, step in zip(milestones["trial_id"], milestones["step"])
    }
    assert len(set(recorded.values())) == len(recorded) == 6  # no two alike: another step's would not pass
    for file, (trial_id, best) in zip(["best_grid.png", "grid_rank2.png"], trials.iterrows()):
        assert (analysed / file).read_bytes() == recorded[(trial_id, best["best.step"])], file

    best_checkpoint = Path(trials["best_checkpoint"].iloc[0])
    assert best_checkpoint.parent.parent.name == trials.index[0]
    denoising_diagnostic(best_checkpoint, tmp_path / "denoise.png")
    assert (tmp_path / "denoise.png").read_bytes() == (analysed / "denoise.png").read_bytes()


def test_plots_are_valid_pngs_and_the_report_links_only_existing_files(analysed):
    for name in [
        "fid_vs_step",
        "loss_vs_step",
        "curvature_vs_step",
        "fid_vs_wall_time",
        "best_by_optim.lr",
        "best_grid",
        "grid_rank2",
        "denoise",
        "parallel_coordinates",
    ]:
        data = (analysed / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name
    report = (analysed / "report.md").read_text()
    links = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(links) >= 7 and all((analysed / link).is_file() for link in links)
    assert "Best val/fid is at lr = " in report and ("(an effect:" in report or "(within noise:" in report)
    assert "Which knob matters" in report and "Too few trials to rank the searched keys: 2 with a val/fid" in report


def test_damaged_files_are_reported_and_the_rest_still_written(experiment, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(experiment, damaged, ignore=shutil.ignore_patterns("analysis"))
    intact, broken = sorted(p for p in damaged.iterdir() if (p / "metrics.jsonl").is_file())
    metrics = broken / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-40])  # a torn last line
    for checkpoint in broken.glob("checkpoint_*"):
        shutil.rmtree(checkpoint)
    shutil.rmtree(broken / SAMPLES_DIR)  # its grids lost too
    (broken / "error.txt").write_text("")  # a trial that died before Ray could write its error
    (damaged / "experiment_summary.json").unlink()  # ... in a sweep killed before its end
    warnings = analyze_experiment(damaged)
    assert any("metrics.jsonl:3: truncated or corrupt line" in w for w in warnings)
    # The experiment's own warnings (met reading it) first, then the analysis's, in a list of its own.
    read = load_experiment(damaged).warnings
    assert warnings[: len(read)] == read and not any("no sample grid" in w for w in read)
    trials = pq.read_table(damaged / "analysis" / "trials.parquet").to_pylist()
    assert len(trials) == 2
    by_id = {t["trial_id"]: t for t in trials}
    assert by_id[broken.name]["final.step"] == 20 and by_id[broken.name]["best_checkpoint"] is None
    assert by_id[broken.name]["state"] == "errored" and by_id[intact.name]["state"] == "finished"
    assert by_id[intact.name]["final.step"] == 30 and by_id[intact.name]["best_checkpoint"] is not None
    # The intact trial's grid is copied; the broken one's is a warning, not sampled again.
    lost_grid = broken / SAMPLES_DIR / sample_grid_name(by_id[broken.name]["best.step"])
    assert [w for w in warnings if "no sample grid" in w] == [
        f"{broken.name}: no sample grid for its best milestone ({lost_grid} is missing)"
    ]
    grids = [file for file in ("best_grid.png", "grid_rank2.png") if (damaged / "analysis" / file).is_file()]
    intact_grid = intact / SAMPLES_DIR / sample_grid_name(by_id[intact.name]["best.step"])
    assert len(grids) == 1 and (damaged / "analysis" / grids[0]).read_bytes() == intact_grid.read_bytes()
    assert (damaged / "analysis" / "denoise.png").is_file() and (damaged / "analysis" / "fid_vs_step.png").is_file()
    assert "Problems met while analysing" in (damaged / "analysis" / "report.md").read_text()


def test_a_corrupt_trial_file_and_a_missing_directory_are_clear_errors(experiment, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(experiment, damaged, ignore=shutil.ignore_patterns("analysis"))
    trial = next(p for p in damaged.iterdir() if (p / "trial.json").is_file())
    (trial / "trial.json").write_text("{not json")
    warnings = analyze_experiment(damaged)
    assert any("trial.json: unreadable" in w for w in warnings)
    assert pq.read_table(damaged / "analysis" / "trials.parquet").num_rows == 2
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such experiment directory" in result.output
