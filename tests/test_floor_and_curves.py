"""The FID floor (what real images score under a sweep's FID conditions) and what a
configuration's curves say over training: did FID get worse after its best, does curvature
track FID. Experiment folders are built with the record's own writers."""

from __future__ import annotations

import hashlib
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from analysis import plots
from analysis.curves import PAIRED_IN_RUN, curvature_correlation, floor_gap, got_worse
from analysis.decisions import SEED_SPREAD, configurations
from analysis.report import analyze_experiment
from diffusion_lib.config import RunConfig
from diffusion_lib.data import ImageDataset, load_dataset
from diffusion_lib.metrics.fid import FidReference, fid_floor
from diffusion_lib.run_files import FidFloor, FloorPoint
from record.experiment import load_experiment

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


def test_a_stored_floor_is_reused_and_too_few_held_out_images_get_a_sentence(tmp_path):
    config = tiny_config(fid={"num_samples": 16, "final_num_samples": 48, "ref_num_images": 32})
    data = load_dataset(config.data)  # 64 shapes: 32 held out
    features = StandInFeatures()
    reference = FidReference.from_features(features(data.images[:32]), "ref.npz")
    calls = features.calls

    floor = fid_floor(config, data, features, reference, tmp_path)
    assert features.calls == calls + 1 and floor.held_out_images == 32
    assert floor.at(16).fid > 0 and floor.at(48) == FloorPoint(48, None, None)
    assert "only 32 real images outside the 32-image reference" in floor.sentence(48)
    assert "score" not in floor.sentence(48)  # a sentence, not a guessed number

    assert fid_floor(config, data, features, reference, tmp_path) == floor
    assert features.calls == calls + 1  # the stored floor, no second pass
    other = FidReference.from_features(features(data.images[:30]), "other.npz")
    assert fid_floor(config, data, features, other, tmp_path).reference == "other.npz"  # not another's floor


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


def test_the_floor_is_drawn_on_every_fid_plot_and_stated_in_the_report(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    experiment_dir = tmp_path / "exp"
    _experiment(
        experiment_dir,
        {
            "a": ({"optim.lr": 1e-3}, _rows([300, 290, 295], replicates=_replicates(rng, 3))),
            "b": ({"optim.lr": 1e-4}, _rows([330, 320, 315], replicates=_replicates(rng, 3))),
        },
    )
    FidFloor("ref.npz", 1000, "training images outside the reference", 4085, "f", (FloorPoint(250, 94.0, 1.5),)).write(
        experiment_dir
    )
    experiment = load_experiment(experiment_dir)
    assert floor_gap(experiment).sentence.endswith("the best trial, lr=0.001, scores 290: 196 above that.")

    drawn_on = []

    def spy(experiment, ax):
        drawn_on.append(ax.get_title())
        real_draw_floor(experiment, ax)

    real_draw_floor = plots.draw_floor
    monkeypatch.setattr(plots, "draw_floor", spy)
    analyze_experiment(experiment_dir)
    assert sorted(drawn_on) == [
        "FID vs step (± standard error)",
        "FID vs wall time (± standard error)",
        "best val/fid by optim.lr",
    ]
    report = (experiment_dir / "analysis" / "report.md").read_text()
    assert "Real images (training images outside the reference) score 94 ± 1.5 at 250 samples" in report

    fig, ax = plt.subplots()
    real_draw_floor(experiment, ax)
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [94.0, 94.0] and line.get_linestyle() == "--"
    plt.close(fig)


def test_a_floor_for_another_reference_or_count_is_not_drawn(tmp_path):
    rng = np.random.default_rng(5)
    _experiment(tmp_path, {"a": ({"optim.lr": 1e-3}, _rows([300, 290], replicates=_replicates(rng, 2)))})
    FidFloor("other.npz", 1000, "the CIFAR-10 test split", 10000, "f", (FloorPoint(250, 94.0, 1.5),)).write(tmp_path)
    experiment = load_experiment(tmp_path)
    assert experiment.floor is not None and experiment.floor_point() is None
    assert "No FID floor was stored for 250 samples" in floor_gap(experiment).sentence
    assert not math.isnan(experiment.best(experiment.trials[0])["val/fid"])
