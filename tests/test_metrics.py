"""Milestone metrics: FID against closed forms and pytorch-fid itself, the statistics cache,
Hutchinson against the exact Hessian trace, missing weights, TensorBoard contents."""

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.utils
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from diffusion_lib.build import create_trainer
from diffusion_lib.config import ConfigError, DataConfig
from diffusion_lib.data import ImageDataset, float_to_uint8, load_dataset, uint8_to_float
from diffusion_lib.metrics.curvature import hutchinson_trace
from diffusion_lib.metrics.fid import FeatureStats, InceptionFeatures, reference_statistics
from diffusion_lib.metrics.frechet import FrechetReference
from diffusion_lib.milestone import HPARAMS_METRICS
from diffusion_lib.run_files import FidFloor
from diffusion_lib.run_log import RunLog, write_hparams_config, write_session_end

from conftest import CIFAR_ROOT, FID_WEIGHTS, TINY_RUN, needs_cifar, needs_fid_weights, tiny_config, write_spec


def closed_form_frechet(mu1, cov1, mu2, cov2) -> float:
    """d² = ‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½), by symmetric eigendecompositions."""

    def sqrt_psd(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    s1 = sqrt_psd(cov1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * sqrt_psd(s1 @ cov2 @ s1)))


def test_a_second_sweep_on_the_same_data_reuses_the_machines_reference_and_floor(tmp_path, standin_features):
    from sweeps.shared_reference import with_shared_fid_reference
    from sweeps.spec import load_spec

    fid = {"num_samples": 8, "final_num_samples": 0, "ref_num_images": 32, "cache_dir": str(tmp_path / "cache")}
    stored = []
    for name in ("first", "second"):
        spec = load_spec(
            write_spec(
                tmp_path,
                base={**TINY_RUN, "fid": fid},
                name=name,
                metric="val/fid",
                search={"optim.lr": {"grid": [1e-3]}},
            )
        )
        data = load_dataset(spec.run_config.data)
        before = standin_features.calls
        shared = with_shared_fid_reference(spec, data, standin_features)
        stored.append((standin_features.calls - before, Path(shared.run_config.fid.reference)))
    (first_passes, first_file), (second_passes, second_file) = stored
    assert (first_passes, second_passes) == (2, 0)  # the reference's and the floor's held-out pass, then none
    assert first_file.parent.parent.name == "first" and second_file.parent.parent.name == "second"
    assert first_file.read_bytes() == second_file.read_bytes()  # each experiment keeps its copy
    assert FidFloor.read(tmp_path / "runs" / "first") == FidFloor.read(tmp_path / "runs" / "second") is not None


def test_fid_of_features_equals_the_closed_form_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(3000, 6)) @ rng.normal(size=(6, 6))
    ours = FrechetReference.from_features(b).fid(a)
    expected = closed_form_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert ours == pytest.approx(expected, rel=1e-6)
    assert FrechetReference.from_features(a).fid(a) == pytest.approx(0, abs=1e-6)


def test_reference_statistics_are_cached_and_invalidated_by_new_data(tmp_path, standin_features):
    data = load_dataset(DataConfig(name="shapes", num_images=50))
    first = reference_statistics(data, standin_features, None, str(tmp_path))
    assert standin_features.calls == 1
    second = reference_statistics(data, standin_features, None, str(tmp_path))
    assert standin_features.calls == 1  # a hit: no feature pass
    np.testing.assert_array_equal(first.frechet.sqrt_sigma, second.frechet.sqrt_sigma)
    np.testing.assert_array_equal(first.kid_features, second.kid_features)
    assert first.name == second.name and first.num_images == 50
    changed = ImageDataset("shapes", data.images.clone())
    changed.images[0, 0, 0, 0] ^= 1
    reference_statistics(changed, standin_features, None, str(tmp_path))
    assert standin_features.calls == 2
    reference_statistics(data, standin_features, 20, str(tmp_path))  # another count is another entry
    assert standin_features.calls == 3


def exact_hessian_trace(model, loss_of_params) -> float:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    shapes = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def f(vector):
        params, i = {}, 0
        for name, shape, numel in shapes:
            params[name] = vector[i : i + numel].view(shape)
            i += numel
        return loss_of_params(params)

    return torch.func.hessian(f)(flat).diagonal().sum().item()


def test_hutchinson_agrees_with_the_exact_hessian_trace_and_its_stderr_shrinks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(64, 5), torch.randn(64, 2)
    exact = exact_hessian_trace(model, lambda p: ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean())
    loss_fn = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
    mean16, se16 = hutchinson_trace(loss_fn, list(model.parameters()), 16, torch.Generator().manual_seed(1))
    mean256, se256 = hutchinson_trace(loss_fn, list(model.parameters()), 256, torch.Generator().manual_seed(2))
    assert abs(mean16 - exact) < 3 * se16
    assert abs(mean256 - exact) < 3 * se256
    assert 2.5 < se16 / se256 < 6.5  # ≈ √(256/16) = 4


@pytest.mark.slow
@needs_cifar
@needs_fid_weights
def test_fid_equals_pytorch_fids_own_computation_on_the_same_pngs(tmp_path, monkeypatch):
    """Milestone FID (float samples quantised in memory) and `sweep fid-stats`/`sweep fid` (PNG
    folders) against pytorch-fid's own pipeline reading the same images as PNG files: its
    statistics, through the Fréchet distance checked against pytorch-fid's own in
    test_fid_statistics.py (its sqrtm of a 2,048² covariance would be most of this test)."""
    from pytorch_fid.fid_score import compute_statistics_of_path
    from pytorch_fid.inception import InceptionV3

    images = load_dataset(DataConfig(name="cifar10", root=str(CIFAR_ROOT))).images
    # Stand-ins for generated samples: float images in [-1, 1] off the uint8 grid.
    # 16 images a side (singular covariances): five Inception passes of 16, ours thrice and pytorch-fid's twice.
    samples = uint8_to_float(images[:16]) + 0.01 * torch.randn(
        16, 3, 32, 32, generator=torch.Generator().manual_seed(0)
    )
    (tmp_path / "a").mkdir()
    for i, x in enumerate(samples):
        torchvision.utils.save_image((x + 1) / 2, tmp_path / "a" / f"{i:04d}.png")
    (tmp_path / "b").mkdir()
    for i, img in enumerate(images[1000:1016]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "b" / f"{i:04d}.png")

    features = InceptionFeatures(str(FID_WEIGHTS), "cpu", batch_size=100)
    in_memory = FeatureStats.from_features(features(float_to_uint8(samples)))
    in_memory.save(tmp_path / "a.npz")
    runner = CliRunner()
    saved = runner.invoke(
        app, ["fid-stats", str(tmp_path / "b"), "--out", str(tmp_path / "b.npz"), "--weights", str(FID_WEIGHTS)]
    )
    assert saved.exit_code == 0, saved.output
    printed = runner.invoke(
        app, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--weights", str(FID_WEIGHTS)]
    )
    assert printed.exit_code == 0, printed.output
    ours = float(printed.output.split("FID:")[1].split()[0])
    # With B a folder, its images give the FID's jackknife standard error: "FID ± se (N images …)".
    with_error = runner.invoke(
        app, ["fid", str(tmp_path / "b.npz"), str(tmp_path / "a"), "--weights", str(FID_WEIGHTS)]
    )
    assert with_error.exit_code == 0, with_error.output
    value, plus_minus, stderr = with_error.stdout.split("FID:")[1].split()[:3]
    assert float(value) == pytest.approx(ours, rel=1e-3) and plus_minus == "±" and 0 < float(stderr) < float(value)
    assert "(16 images of a against 16 images of b.npz)" in with_error.stdout
    assert "fewer than the 2048 Inception features" in with_error.stderr

    # pytorch-fid's own pipeline: decodes the PNGs and finds the weights its own way (TORCH_HOME).
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / FID_WEIGHTS.name).symlink_to(FID_WEIGHTS)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    inception = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    for side in "ab":
        mu, sigma = compute_statistics_of_path(str(tmp_path / side), inception, 100, 2048, "cpu", num_workers=0)
        FeatureStats(mu, sigma, 16).save(tmp_path / f"theirs_{side}.npz")
    from_theirs = runner.invoke(app, ["fid", str(tmp_path / "theirs_a.npz"), str(tmp_path / "theirs_b.npz")])
    assert from_theirs.exit_code == 0, from_theirs.output
    theirs = float(from_theirs.output.split("FID:")[1].split()[0])
    assert ours == pytest.approx(theirs, rel=1e-3)
    assert ours > 1.0  # different images: the comparison is not vacuous


@needs_fid_weights
def test_inception_features_turn_off_tf32_convolutions_only_while_they_run():
    """On CUDA, cuDNN computes fp32 convolutions in TF32 unless told otherwise."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.allow_tf32)
            return [x.mean(dim=(2, 3), keepdim=True)]

    features = InceptionFeatures(str(FID_WEIGHTS), "cpu", batch_size=2)
    features.model = Recorder()
    assert torch.backends.cudnn.allow_tf32  # PyTorch's default
    assert features(torch.zeros(4, 3, 32, 32, dtype=torch.uint8)).shape == (4, 3)
    assert seen == [False, False]
    assert torch.backends.cudnn.allow_tf32


def test_a_run_without_reachable_weights_fails_fast_with_exit_2(tmp_path, monkeypatch):
    import pytorch_fid.inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(pytorch_fid.inception, "FID_WEIGHTS_URL", "http://127.0.0.1:9/pt_inception.pth")
    config = tmp_path / "c.yaml"
    config.write_text("data: {name: shapes, num_images: 16}\nfid: {num_samples: 8}\n")
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "SWEEP_FID_WEIGHTS" in result.output and "fid.weights" in result.output
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "run").exists()


@needs_fid_weights
def test_a_process_loads_the_inception_network_once_per_weights_file(tmp_path):
    weights = tmp_path / FID_WEIGHTS.name
    shutil.copy(FID_WEIGHTS, weights)
    first, second = InceptionFeatures(str(weights)), InceptionFeatures(str(weights))
    assert first.model is second.model  # the next trial in a reused worker loads nothing
    changed = weights.stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(changed, changed))  # a file replaced on disk is loaded again
    assert InceptionFeatures(str(weights)).model is not first.model


def test_a_missing_weights_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.pth: no such file"):
        InceptionFeatures(str(tmp_path / "nowhere.pth"))


def test_a_resumed_run_reads_unknown_until_it_ends_again(tmp_path):
    ended = write_session_end(tmp_path / "run", succeeded=True)
    RunLog.open(tmp_path / "run", resume_step=10, hparams={}).close()
    assert not ended.exists()  # TensorBoard would show the earlier end's Success while it runs


def test_tensorboard_reader_finds_fid_and_hparams_from_the_first_moment(tmp_path, standin_features):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    class Stopped(Exception):
        pass

    def stop_at_first_milestone(row, path):  # as ASHA ends a trial: fit() never returns
        raise Stopped

    config = tiny_config(
        fid={"num_samples": 8, "final_num_samples": 8, "cache_dir": str(tmp_path / "cache")}, curvature={"probes": 2}
    )
    with pytest.raises(Stopped):
        create_trainer(config, tmp_path / "run", features=standin_features, progress=False).fit(
            on_milestone=stop_at_first_milestone
        )
    write_hparams_config(tmp_path / "run", ["loss.weighting", "train.batch_size"])
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {
        "val/fid",
        "val/fid_stderr",
        "val/kid",
        "val/best_fid",
        "train/loss",
        "curvature/hutch_trace_mean",
        "loss/t_bucket_0",
    } <= set(scalars)
    assert [e.step for e in events.Scalars("val/fid")] == [10]
    assert "samples" in events.Tags()["images"]
    hparams = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["loss.weighting"].string_value == "constant"
    assert "loss.minsnr_gamma" not in session.hparams  # γ plays no part under constant weighting: shown empty
    assert session.hparams["train.batch_size"].number_value == 8
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == [m.name for m in HPARAMS_METRICS]
    assert [h.name for h in experiment.hparam_infos] == ["loss.weighting", "train.batch_size"]
    assert set(m.name for m in HPARAMS_METRICS) <= set(scalars) | {"val/final_fid"}  # every declared column is logged
