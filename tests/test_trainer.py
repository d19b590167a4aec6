"""The trainer: exact resume, milestone outputs, atomic checkpoints."""

import json
import math
import warnings

import pytest
import torch

from diffusion_lib.build import create_model_and_diffusion, create_trainer
from diffusion_lib.checkpoint import load_checkpoint
from diffusion_lib.config import ConfigError
from diffusion_lib.data import load_dataset, uint8_to_float
from diffusion_lib.run_files import CHECKPOINT_DIR, list_checkpoints
from diffusion_lib.trainer import Trainer

from conftest import StandInFeatures, tiny_config, trainer_with_parts


def params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in list(trainer.model.parameters()) + list(trainer.ema.model.parameters())]


def test_resume_is_bit_exact(tmp_path):
    n = 10
    straight = create_trainer(
        tiny_config(train={"total_steps": 2 * n}, eval={"every": n}), tmp_path / "straight", progress=False
    )
    straight.fit()

    first = create_trainer(
        tiny_config(train={"total_steps": n}, eval={"every": n}), tmp_path / "resumed", progress=False
    )
    first.fit()
    resumed = create_trainer(
        tiny_config(train={"total_steps": 2 * n}, eval={"every": n}), tmp_path / "resumed", progress=False
    )
    assert resumed.step == n
    resumed.fit()

    for a, b in zip(params(straight), params(resumed)):
        assert torch.equal(a, b)
    # And the check can tell: one extra step changes the parameters.
    resumed.train_step()
    assert not all(torch.equal(a, b) for a, b in zip(params(straight), params(resumed)))


def test_milestones_write_metrics_grids_and_checkpoints(tmp_path):
    config = tiny_config(train={"total_steps": 25}, eval={"every": 10}, curvature={"probes": 2})
    create_trainer(config, tmp_path, progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 25]
    for row in rows:
        assert {"train/loss", "wall_time_s", "images_seen", "curvature/hutch_trace_mean", "loss/t_bucket_9"} <= set(row)
        assert row["images_seen"] == row["step"] * 8
    assert rows[0]["wall_time_s"] < rows[1]["wall_time_s"] < rows[2]["wall_time_s"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"step_{s:07d}.png" for s in (10, 20, 25)]
    assert list(list_checkpoints(tmp_path / CHECKPOINT_DIR)) == [25]  # FID off: only the newest is kept
    state = load_checkpoint(list_checkpoints(tmp_path / CHECKPOINT_DIR)[25])
    assert state["step"] == 25 and state["config"]["train"]["total_steps"] == 25


def test_a_killed_run_loses_only_the_steps_since_its_last_checkpoint(tmp_path):
    config = tiny_config(train={"total_steps": 30}, eval={"every": 10})

    class Killed(Exception):
        pass

    def kill_at_20(row, path):
        if row["step"] == 20:
            raise Killed

    with pytest.raises(Killed):
        create_trainer(config, tmp_path, progress=False).fit(on_milestone=kill_at_20)
    resumed = create_trainer(config, tmp_path, progress=False)
    assert resumed.step == 20
    resumed.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]


def test_resume_refuses_a_changed_trajectory_key(tmp_path):
    create_trainer(tiny_config(), tmp_path, progress=False).fit()
    with pytest.raises(
        ConfigError,
        match=r"checkpoints/step_0000020\.pt: cannot resume from this checkpoint.*optim\.lr \(0\.0001 -> 0\.0003\)",
    ):
        create_trainer(tiny_config(optim={"lr": 3e-4}), tmp_path, progress=False)


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    create_trainer(tiny_config(), tmp_path, progress=False).fit()
    path = list_checkpoints(tmp_path / CHECKPOINT_DIR)[20]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        create_trainer(tiny_config(train={"total_steps": 30}), tmp_path, progress=False)


def test_every_milestone_fid_shares_one_sample_count_and_the_final_count_is_reported_apart(tmp_path, standin_features):
    """FID falls as the sample count grows, so a best taken across counts favours the final,
    larger evaluation by bias alone: `val/fid` (and so the best and the kept checkpoint) uses
    fid.num_samples at every milestone, the last one too; the final count is `val/final_fid`."""
    config = tiny_config(
        train={"total_steps": 30}, fid={"num_samples": 8, "final_num_samples": 64, "cache_dir": str(tmp_path / "cache")}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = create_trainer(config, tmp_path / "run", features=standin_features, progress=False)
        summary = trainer.fit()
    said = [str(w.message) for w in caught]
    assert sum("fewer than the 2048 Inception features" in m for m in said) == 1  # once per run, not per milestone
    assert sum("the FID reference holds 64 shapes images, not the 50,000" in m for m in said) == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/fid_num_samples"] for r in rows] == [8, 8, 8]
    assert [r.get("val/final_fid_num_samples") for r in rows] == [None, None, 64]
    best = min(rows, key=lambda r: r["val/fid"])
    assert summary["best_fid"] == best["val/fid"] and summary["best_step"] == best["step"]
    assert [r["val/best_fid"] for r in rows] == [min(r["val/fid"] for r in rows[: i + 1]) for i in range(3)]
    assert summary["final_fid"] == rows[-1]["val/final_fid"] != rows[-1]["val/fid"]
    assert all(r["val/fid_stderr"] > 0 and r["val/kid_stderr"] > 0 for r in rows)
    assert set(list_checkpoints(tmp_path / "run" / CHECKPOINT_DIR)) == {30, best["step"]}


def test_the_model_and_its_training_draw_the_same_numbers_whatever_the_fid_setup_drew(tmp_path):
    """Building Inception draws from torch's global stream, and a sweep's worker builds it for its
    first trial only (later trials reuse it): the seed governing initialisation and dropout must
    come after the FID setup, or a trial's model depends on which trials its worker ran before."""

    class DrawingFeatures(StandInFeatures):
        def __call__(self, images):
            torch.rand(100)  # as building the network does, the first time only
            return super().__call__(images)

    config = tiny_config(fid={"num_samples": 8, "final_num_samples": 0, "cache_dir": str(tmp_path / "cache")})
    drawn = create_trainer(config, tmp_path / "drawn", features=DrawingFeatures(), progress=False)
    dropout_after_drawn = torch.rand(8)
    # The reference is in the cache now: this setup draws nothing, as a worker's second trial.
    undrawn = create_trainer(config, tmp_path / "undrawn", features=DrawingFeatures(), progress=False)
    dropout_after_undrawn = torch.rand(8)
    assert all(torch.equal(a, b) for a, b in zip(drawn.model.parameters(), undrawn.model.parameters()))
    assert torch.equal(dropout_after_drawn, dropout_after_undrawn)


def test_an_ema_too_slow_for_the_run_length_is_flagged(tmp_path):
    with pytest.warns(UserWarning, match="leaves 82% of the random initialisation"):
        create_trainer(tiny_config(ema={"decay": 0.99}), tmp_path / "short", progress=False)  # 0.99^20 ≈ 0.82
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_trainer(tiny_config(ema={"decay": 0.5}), tmp_path / "fine", progress=False)
    assert not [w for w in caught if "ema.decay" in str(w.message)]


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    config = lambda compile: tiny_config(model={"dropout": 0.0}, train={"compile": compile})  # noqa: E731
    eager = create_trainer(config(False), tmp_path / "eager", progress=False)
    compiled = create_trainer(config(True), tmp_path / "compiled", progress=False)
    x0 = uint8_to_float(eager.data.images[:8])
    t = torch.arange(0, 100, 13)[:8]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="train.compile")  # no silent fallback to eager
        torch.testing.assert_close(compiled.forward_backward(x0, t, noise), eager.forward_backward(x0, t, noise))
        for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6)
        for _ in range(3):
            eager.train_step()
            compiled.train_step()
    assert compiled.train_model is not compiled.model
    torch.testing.assert_close(compiled._bucket_sum, eager._bucket_sum, rtol=1e-4, atol=0)
    # Checkpoints hold the plain module's keys, so compiled and eager runs resume each other.
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()


def test_a_failing_compile_falls_back_to_eager(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    # One trainer after the other: both seed the global RNG that dropout draws from.
    eager = trainer_with_parts(tiny_config(), tmp_path / "eager", progress=False)
    for _ in range(2):
        eager.train_step()
    fallback = trainer_with_parts(
        tiny_config(train={"compile": True}), tmp_path / "fallback", train_model=Broken(), progress=False
    )
    with pytest.warns(
        UserWarning,
        match=r"train.compile: torch.compile failed \(RuntimeError: InvalidCxxCompiler: "
        r"No working C\+\+ compiler found\); training eagerly",
    ):
        fallback.train_step()
    fallback.train_step()
    assert fallback.train_model is fallback.model
    for a, b in zip(params(eager), params(fallback)):
        assert torch.equal(a, b)


def test_curvature_runs_with_tf32_convolutions_off(tmp_path):
    class RecordingNetwork(torch.nn.Module):
        """The tiny UNet, recording cuDNN's TF32 switch each time it runs in training mode."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.seen = inner, []

        def forward(self, x, t):
            if torch.is_grad_enabled():
                self.seen.append(torch.backends.cudnn.allow_tf32)
            return self.inner(x, t)

    config = tiny_config(curvature={"probes": 2})
    model, diffusion, loss = create_model_and_diffusion(config, torch.device("cpu"))
    network = RecordingNetwork(model)
    trainer = Trainer(
        config, tmp_path, model=network, diffusion=diffusion, loss=loss, data=load_dataset(config.data), progress=False
    )
    trainer.train_step()
    mean, stderr = trainer.curvature()
    assert math.isfinite(mean) and stderr >= 0
    assert network.seen == [True, False]  # the training step in TF32's default, curvature in full fp32
    assert torch.backends.cudnn.allow_tf32


def test_minsnr_and_constant_runs_measure_the_same_curvature_on_the_same_weights(tmp_path):
    constant = create_trainer(tiny_config(curvature={"probes": 4}), tmp_path / "c", progress=False)
    minsnr = create_trainer(
        tiny_config(curvature={"probes": 4}, loss={"weighting": "min_snr", "minsnr_gamma": 1}),
        tmp_path / "m",
        progress=False,
    )
    constant.train_step()
    minsnr.model.load_state_dict(constant.model.state_dict())
    x0 = uint8_to_float(constant.data.images[:4])
    t = torch.tensor([1, 30, 60, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the training losses differ (Min-SNR weights), so the check can tell
        assert not torch.allclose(
            constant.loss.per_sample(constant.model.eval(), x0, t, noise),
            minsnr.loss.per_sample(minsnr.model.eval(), x0, t, noise),
        )
    assert constant.curvature() == minsnr.curvature()
