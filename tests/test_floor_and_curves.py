"""The FID floor (what real images score under a sweep's FID conditions), what a
configuration's curves say over training (did FID get worse after its best, does curvature
track FID), and what the report's figures show: their info objects (`analysis.plot_info`),
checked without drawing them. Experiment folders are built with the record's own writers."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from analysis import plots
from analysis.curves import PAIRED_IN_RUN, curvature_correlation, floor_gap, got_worse
from analysis.decisions import configurations
from analysis.plot_info import (
    COLOURED,
    DENOISE_ROWS,
    FloorBand,
    best_by_key_info,
    figure_infos,
    floor_band,
    sample_grids_info,
)
from analysis.report import analyze_experiment
from diffusion_lib.config import RunConfig
from diffusion_lib.data import ImageDataset, load_dataset
from diffusion_lib.metrics.fid import FidReference, fid_floor
from diffusion_lib.run_files import FidFloor, FloorPoint
from record.experiment import Experiment, Trial, load_experiment
from record.noise import SEED_SPREAD

from conftest import SHARED, StandInFeatures, needs_cifar, tiny_config, write_sweep_file, write_trial

POOL3 = SHARED / "data" / "inception_pool3_train_subset.npy"
needs_pool3 = pytest.mark.skipif(not POOL3.is_file(), reason=f"the subset's Inception features are not at {POOL3}")


class PrecomputedFeatures:
    """The shared subset's real pool3 features, looked up by each image's bytes: FID on real
    Inception features without an Inception pass."""

    def __init__(self, data: ImageDataset, features: np.ndarray):
        self.rows = {hashlib.sha1(img.numpy().tobytes()).digest(): i for i, img in enumerate(data.images)}
        self.features = features.astype(np.float64)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.features[[self.rows[hashlib.sha1(img.numpy().tobytes()).digest()] for img in images.cpu()]]


def exact_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID by symmetric eigenvalue problems: |μa − μb|² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½."""
    mu_a, mu_b, sigma_a, sigma_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sigma_a)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sigma_b @ root_a).clip(0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.sqrt(cross).sum())


@pytest.mark.slow
@needs_cifar
@needs_pool3
def test_the_floor_is_the_fid_of_held_out_real_features_at_the_run_count(tmp_path):
    config = RunConfig.from_dict(
        {
            "data": {"name": "cifar10", "root": str(SHARED / "data"), "download": False},
            "fid": {"num_samples": 250, "final_num_samples": 0, "ref_num_images": 1085},
        }
    )
    data = load_dataset(config.data)
    features = np.load(POOL3).astype(np.float64)
    reference = FidReference.from_features(features[:1085], "subset-1085.npz")

    floor = fid_floor(config, data, PrecomputedFeatures(data, features), reference, tmp_path)

    assert floor.held_out == "training images outside the reference" and floor.held_out_images == 5085 - 1085
    point = floor.at(250)
    # The next 250 real images after the reference, scored against it by an independent exact route.
    assert point.fid == pytest.approx(exact_fid(features[1085:1335], features[:1085]), rel=1e-6)
    assert 85 < point.fid < 105  # real images at 250 samples are far from FID 0
    assert 0 < point.stderr < 5
    assert FidFloor.read(tmp_path) == floor  # stored, and read back whole


def test_a_stored_or_cached_floor_is_reused_and_too_few_held_out_images_get_a_sentence(tmp_path):
    config = tiny_config(
        fid={"num_samples": 16, "final_num_samples": 48, "ref_num_images": 32, "cache_dir": str(tmp_path / "cache")}
    )
    data = load_dataset(config.data)  # 64 shapes: 32 held out
    features = StandInFeatures()
    reference = FidReference.from_features(features(data.images[:32]), "ref.npz")
    calls = features.calls
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()

    floor = fid_floor(config, data, features, reference, first)
    assert features.calls == calls + 1 and floor.held_out_images == 32
    assert floor.at(16).fid > 0 and floor.at(48) == FloorPoint(48, None, None)
    assert "only 32 real images outside the 32-image reference" in floor.sentence(48)
    assert "score" not in floor.sentence(48)  # a sentence, not a guessed number

    assert fid_floor(config, data, features, reference, first) == floor
    assert features.calls == calls + 1  # the stored floor, no second pass
    assert fid_floor(config, data, features, reference, second) == floor == FidFloor.read(second)
    assert features.calls == calls + 1  # another experiment on the same data: the machine's cached floor

    other = FidReference.from_features(features(data.images[:30]), "other.npz")
    assert fid_floor(config, data, features, other, first).reference == "other.npz"  # not another's floor
    same_name = FidReference.from_features(features(data.images[1:33]), "ref.npz")
    calls = features.calls
    assert fid_floor(config, data, features, same_name, tmp_path).at(16) != floor.at(16)
    assert features.calls == calls + 1  # other statistics under the same name: measured, not taken from the cache


def test_no_held_out_images_when_the_reference_holds_them_all(tmp_path):
    config = tiny_config(fid={"num_samples": 16, "final_num_samples": 0})
    data = load_dataset(config.data)
    reference = FidReference.from_features(StandInFeatures()(data.images), "all.npz")
    floor = fid_floor(config, data, StandInFeatures(), reference, tmp_path)
    assert floor.held_out_images == 0 and floor.at(16).fid is None


def _rows(fids, *, replicates, curvature=None, n=250, reference="ref.npz"):
    """Milestone rows every 100 steps with FIDs, their jackknife replicates and standard errors."""
    rows = []
    for i, fid in enumerate(fids):
        reps = [float(fid + r) for r in replicates[i]]
        rows.append(
            {
                "step": 100 * (i + 1),
                "wall_time_s": 10.0 * (i + 1),
                "val/fid": float(fid),
                "val/fid_jackknife": reps,
                "val/fid_stderr": float(np.std(reps) * 4.9),
                "val/fid_num_samples": n,
                "val/fid_reference": reference,
                **({"curvature/hutch_trace_mean": float(curvature[i])} if curvature is not None else {}),
            }
        )
    return rows


def _replicates(rng, num_milestones, shared_sd=3.0, own_sd=0.3):
    """Jackknife replicates whose sampling noise is mostly shared between milestones (the same
    samples' noise, `eval.seed`), as in a real run."""
    shared = rng.normal(0, shared_sd, 25)
    return [shared + rng.normal(0, own_sd, 25) for _ in range(num_milestones)]


def _experiment(tmp_path, curves: dict[str, tuple[dict, list]]):
    write_sweep_file(tmp_path, {"optim.lr": {"grid": [1e-4, 1e-3]}})
    for name, (searched, rows) in curves.items():
        write_trial(tmp_path, name, rows, searched=searched, total_steps=rows[-1]["step"])
    return load_experiment(tmp_path)


def test_a_curve_rising_by_many_standard_errors_got_worse_and_a_flat_one_did_not(tmp_path):
    rng = np.random.default_rng(0)
    rising = [300, 306, 312, 318, 324]
    flat = [300.4, 300.0, 300.3, 300.1, 300.3]
    experiment = _experiment(
        tmp_path,
        {
            "rising": ({"optim.lr": 1e-3}, _rows(rising, replicates=_replicates(rng, 5))),
            "flat": ({"optim.lr": 1e-4}, _rows(flat, replicates=_replicates(rng, 5))),
        },
    )
    verdicts = {c.searched["optim.lr"]: got_worse(experiment, c) for c in configurations(experiment)}

    up, level = verdicts[1e-3], verdicts[1e-4]
    assert (up.best_step, up.last_step, up.gap) == (100, 500, pytest.approx(24.0))
    assert up.kind == PAIRED_IN_RUN and up.is_effect and "an effect" in up.sentence
    # The shared noise cancels: the paired error is far below the FIDs' own (≈ 15).
    assert up.stderr < 3
    assert level.best_step == 200 and level.gap == pytest.approx(0.3)
    assert not level.is_effect and "within noise" in level.sentence


def test_seed_repeats_judge_got_worse_by_the_spread_of_their_own_gaps(tmp_path):
    rng = np.random.default_rng(1)
    curves = {}
    for seed, offset in zip((1, 2, 3), (0.0, 4.0, -3.0)):
        fids = [310 + offset, 300 + offset, 330 + offset + seed]
        curves[f"s{seed}"] = ({"optim.lr": 1e-3, "train.seed": seed}, _rows(fids, replicates=_replicates(rng, 3)))
    experiment = _experiment(tmp_path, curves)
    (config,) = configurations(experiment)
    verdict = got_worse(experiment, config)
    gaps = [31.0, 32.0, 33.0]
    assert verdict.num_seeds == 3 and verdict.best_step == 200 and verdict.kind == SEED_SPREAD
    assert verdict.gap == pytest.approx(np.mean(gaps)) and verdict.stderr == pytest.approx(
        np.std(gaps, ddof=1) / 3**0.5
    )
    assert verdict.is_effect


def test_a_curve_lowest_at_its_end_says_so(tmp_path):
    rng = np.random.default_rng(2)
    experiment = _experiment(
        tmp_path, {"down": ({"optim.lr": 1e-3}, _rows([330, 320, 310], replicates=_replicates(rng, 3)))}
    )
    (config,) = configurations(experiment)
    verdict = got_worse(experiment, config)
    assert verdict.gap == 0 and not verdict.is_effect and "lowest at the last milestone" in verdict.sentence


def test_curvature_falling_as_fid_rises_is_a_significant_negative_rank_correlation(tmp_path):
    rng = np.random.default_rng(3)
    fids = [300, 304, 309, 311, 318, 322, 325, 331]
    falling = [50, 47, 45, 40, 38, 33, 30, 26]
    unrelated = [40, 26, 47, 33, 50, 30, 45, 38]
    experiment = _experiment(
        tmp_path,
        {
            "a": ({"optim.lr": 1e-3}, _rows(fids, replicates=_replicates(rng, 8), curvature=falling)),
            "b": ({"optim.lr": 1e-4}, _rows(fids, replicates=_replicates(rng, 8), curvature=unrelated)),
        },
    )
    found = {c.searched["optim.lr"]: curvature_correlation(experiment, c) for c in configurations(experiment)}
    assert found[1e-3].rho == pytest.approx(-1.0) and found[1e-3].p_value < 0.01 and found[1e-3].num_milestones == 8
    assert "falls as FID rises" in found[1e-3].sentence and "within noise" not in found[1e-3].sentence
    assert abs(found[1e-4].rho) < 0.5 and "within noise" in found[1e-4].sentence


def test_the_floor_is_on_every_fid_figure_and_stated_in_the_report(tmp_path):
    rng = np.random.default_rng(4)
    experiment_dir = tmp_path / "exp"
    curves = {
        "a": ({"optim.lr": 1e-3}, _rows([300, 290, 295], replicates=_replicates(rng, 3))),
        "b": ({"optim.lr": 1e-4}, _rows([330, 320, 315], replicates=_replicates(rng, 3))),
    }
    for _, rows in curves.values():
        for row in rows:
            row["train/loss"] = 0.05  # a figure that is not an FID's: no floor on it
    _experiment(experiment_dir, curves)
    FidFloor("ref.npz", 1000, "training images outside the reference", 4085, "f", (FloorPoint(250, 94.0, 1.5),)).write(
        experiment_dir
    )
    experiment = load_experiment(experiment_dir)
    assert floor_gap(experiment).sentence.endswith("the best trial, lr=0.001, scores 290: 196 above that.")

    band = FloorBand(fid=94.0, stderr=1.5, num_samples=250)
    floors = {name: info.floor for name, info in figure_infos(experiment)}
    assert floors == {
        "fid_vs_step": band,
        "loss_vs_step": None,
        "fid_vs_wall_time": band,
        "best_by_optim.lr": band,
    }
    assert band.label == "real images (N=250)"

    analyze_experiment(experiment_dir)
    analysis = experiment_dir / "analysis"
    assert all((analysis / f"{name}.png").is_file() for name in floors)
    report = (analysis / "report.md").read_text()
    assert "Real images (training images outside the reference) score 94 ± 1.5 at 250 samples" in report


def test_the_floor_is_drawn_as_a_dashed_line_in_its_band():
    fig, ax = plt.subplots()
    plots.draw_floor(ax, FloorBand(fid=94.0, stderr=1.5, num_samples=250))
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [94.0, 94.0] and line.get_linestyle() == "--"
    assert line.get_label() == "real images (N=250)"
    (band,) = ax.patches
    assert band.get_extents().height > 0 and ax.get_ylim()[0] <= 92.5 and ax.get_ylim()[1] >= 95.5
    plt.close(fig)


def test_a_floor_for_another_reference_or_count_is_not_drawn(tmp_path):
    rng = np.random.default_rng(5)
    _experiment(tmp_path, {"a": ({"optim.lr": 1e-3}, _rows([300, 290], replicates=_replicates(rng, 2)))})
    FidFloor("other.npz", 1000, "the CIFAR-10 test split", 10000, "f", (FloorPoint(250, 94.0, 1.5),)).write(tmp_path)
    experiment = load_experiment(tmp_path)
    assert experiment.floor is not None and experiment.floor_point() is None
    assert "No FID floor was stored for 250 samples" in floor_gap(experiment).sentence
    assert floor_band(experiment) is None
    assert [name for name, _ in figure_infos(experiment)] == ["fid_vs_step", "fid_vs_wall_time"]
    assert all(info.floor is None for _, info in figure_infos(experiment))
    assert not math.isnan(experiment.best(experiment.trials[0])["val/fid"])


def test_a_floor_too_few_real_images_could_score_is_not_drawn(tmp_path):
    rng = np.random.default_rng(6)
    _experiment(tmp_path, {"a": ({"optim.lr": 1e-3}, _rows([300, 290], replicates=_replicates(rng, 2)))})
    FidFloor("ref.npz", 1000, "training images outside the reference", 100, "f", (FloorPoint(250, None, None),)).write(
        tmp_path
    )
    experiment = load_experiment(tmp_path)
    assert experiment.floor_point() == FloorPoint(250, None, None) and floor_band(experiment) is None


# --- What the figures show, from their info objects ------------------------------------------


def _fid_trial(index: int, fids: list[float]) -> Trial:
    """A finished trial with FIDs at 250 samples every 100 steps, standard errors 1, 2, ..."""
    rows = [
        {
            "step": 100 * (i + 1),
            "wall_time_s": 7.0 * (i + 1),
            "val/fid": fid,
            "val/fid_stderr": float(i + 1),
            "val/fid_num_samples": 250,
            "val/fid_reference": "ref.npz",
        }
        for i, fid in enumerate(fids)
    ]
    return Trial(f"t{index:02d}", Path(f"t{index:02d}"), searched={"optim.lr": 1e-4 * (index + 1)}, milestones=rows)


def test_curves_colour_the_best_trials_grey_the_rest_and_never_join_two_sample_counts(tmp_path):
    trials = [_fid_trial(i, [300.0 + 10 * i, 295.0 + 10 * i]) for i in range(COLOURED + 2)]  # t00 the best
    trials[0].milestones.append(
        {"step": 300, "wall_time_s": 21.0, "val/fid": 280.0, "val/fid_num_samples": 16, "val/fid_reference": "ref.npz"}
    )
    infos = dict(figure_infos(Experiment(tmp_path, trials=trials)))
    assert list(infos) == ["fid_vs_step", "fid_vs_wall_time", "best_by_optim.lr"]  # no loss, no curvature

    by_step = infos["fid_vs_step"]
    assert (by_step.title, by_step.xlabel, by_step.ylabel) == ("FID vs step (± standard error)", "training step", "FID")
    assert [c.trial_id for c in by_step.curves] == ["t00", *(t.trial_id for t in trials)]
    first_at_250, first_at_16, second = by_step.curves[:3]
    assert (first_at_250.label, first_at_16.label) == (f"{trials[0].label} (N=250)", f"{trials[0].label} (N=16)")
    assert (first_at_16.xs, first_at_16.ys) == ((300.0,), (280.0,)) and math.isnan(first_at_16.stderrs[0])
    assert (second.xs, second.ys, second.stderrs, second.label) == (
        (100.0, 200.0),
        (310.0, 305.0),
        (1.0, 2.0),
        "lr=0.0002",
    )
    assert [c.coloured for c in by_step.curves] == [True] * (COLOURED + 1) + [False, False]
    assert [c.label for c in by_step.curves[-2:]] == ["2 other trials", None]  # one legend entry for the grey
    assert by_step.floor is None  # none stored

    by_time = infos["fid_vs_wall_time"]
    assert by_time.xlabel == "wall time (s)" and by_time.curves[2].xs == (7.0, 14.0)


def test_best_by_key_puts_words_on_a_category_axis_and_a_wide_range_on_a_log_one(tmp_path):
    def trial(index: int, lr: float, weighting: str, fids: list[float]) -> Trial:
        searched = {"optim.lr": lr, "loss.weighting": weighting, "model.dropout": 0.1, "train.seed": index}
        milestones = [{"step": 100 * (i + 1), "val/fid": fid} for i, fid in enumerate(fids)]
        return Trial(f"t{index}", Path(f"t{index}"), searched=searched, milestones=milestones)

    experiment = Experiment(
        tmp_path,
        trials=[
            trial(0, 1e-5, "min_snr", [320.0, 310.0]),
            trial(1, 1e-4, "constant", [305.0, 300.0]),
            trial(2, 1e-3, "min_snr", [330.0, 340.0]),
        ],
    )
    infos = dict(figure_infos(experiment))
    # dropout took one value (nothing to show); the seed is a repeat, not a knob
    assert [name for name in infos if name.startswith("best_by_")] == ["best_by_optim.lr", "best_by_loss.weighting"]
    assert best_by_key_info(experiment, "model.dropout") is None

    lr = infos["best_by_optim.lr"]
    assert (lr.xs, lr.ys, lr.categories, lr.log_x) == ((1e-5, 1e-4, 1e-3), (310.0, 300.0, 330.0), None, True)
    assert (lr.title, lr.xlabel, lr.ylabel, lr.floor) == ("best val/fid by optim.lr", "optim.lr", "best val/fid", None)
    weighting = infos["best_by_loss.weighting"]
    assert weighting.categories == ("constant", "min_snr") and weighting.xs == (1, 0, 1) and not weighting.log_x
    assert weighting.ys == (310.0, 300.0, 330.0)


def test_sample_grids_are_the_top_trials_recorded_grids_of_their_best_milestones(tmp_path):
    def trial(name: str, fids: list[float], kept: list[int]) -> Trial:
        milestones = [{"step": 100 * (i + 1), "val/fid": fid} for i, fid in enumerate(fids)]
        checkpoints = {step: tmp_path / name / f"step_{step}.pt" for step in kept}
        return Trial(name, tmp_path / name, searched={"optim.lr": 1e-3}, milestones=milestones, checkpoints=checkpoints)

    a = trial("a", [320.0, 300.0, 310.0], kept=[200, 300])
    b = trial("b", [290.0, 295.0], kept=[200])  # the best milestone's checkpoint was not kept
    c = trial("c", [400.0], kept=[100])
    d = trial("d", [350.0], kept=[])
    info = sample_grids_info(Experiment(tmp_path, trials=[a, b, c, d]), top_k=3)

    # Each grid is the one the best milestone recorded, whether its checkpoint was kept or not.
    assert [(g.trial_id, g.recorded, g.file) for g in info.grids] == [
        ("b", tmp_path / "b" / "samples" / "step_0000100.png", "best_grid.png"),
        ("a", tmp_path / "a" / "samples" / "step_0000200.png", "grid_rank2.png"),
        ("d", tmp_path / "d" / "samples" / "step_0000100.png", "grid_rank3.png"),
    ]
    own = "(the milestone's own samples: the first of those its FID was measured on)"
    assert [g.caption for g in info.grids] == [
        f"Best: lr=0.001, step 100, val/fid 290 {own}",
        f"Rank 2: lr=0.001, step 200, val/fid 300 {own}",
        f"Rank 3: lr=0.001, step 100, val/fid 350 {own}",
    ]
    # The denoising diagnostic needs a checkpoint: the best trial's best kept one, and its caption
    # says which, and why it is not the best milestone's.
    assert (info.denoise.trial_id, info.denoise.checkpoint) == ("b", tmp_path / "b" / "step_200.pt")
    assert info.denoise.caption == (
        f"Denoising diagnostic of b at step 200 (val/fid 295): {DENOISE_ROWS}; "
        "the checkpoint of its best milestone, step 100, was not kept"
    )
    assert info.warnings == ()
    from_the_second = sample_grids_info(Experiment(tmp_path, trials=[d, c]), top_k=3).denoise
    assert from_the_second.caption == (
        f"Denoising diagnostic of c at step 100 (val/fid 400): {DENOISE_ROWS}; "
        "1 better trial kept no checkpoint of a milestone"
    )

    nothing_kept = sample_grids_info(Experiment(tmp_path, trials=[d]), top_k=3)
    assert [g.trial_id for g in nothing_kept.grids] == ["d"] and nothing_kept.denoise is None
    assert nothing_kept.warnings == ("no trial has a checkpoint for a milestone with val/fid; no denoising diagnostic",)


def test_what_an_image_shows_is_computed_without_matplotlib():
    code = "import sys, analysis.plot_info; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
