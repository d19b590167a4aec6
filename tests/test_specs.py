"""Search-space files: the shipped ones validate, bad ones exit 2 naming the problem, before Ray starts."""

import re

import pytest
import ray
from typer.testing import CliRunner

from cli.main import app
from sweeps.spec import load_spec

from conftest import REPO, write_spec

runner = CliRunner()


@pytest.mark.parametrize("spec", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_passes_dry_run(spec):
    result = runner.invoke(app, ["run", str(spec), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    trial_lines = [line for line in lines if re.match(r"^\s+\d+\s+\S", line)]
    expected = load_spec(spec).num_trials
    assert [int(line.split()[0]) for line in trial_lines] == list(range(1, expected + 1))
    assert f"{expected} trials" in lines


def test_min_snr_spec_is_the_gamma_grid_plus_the_baseline():
    spec = load_spec(REPO / "search_spaces" / "min_snr_gamma.yaml")
    points = [spec.grid_point(i)["loss"] for i in range(spec.num_grid_points)]
    assert points[0] == {"weighting": "constant"}
    assert sorted(p["minsnr_gamma"] for p in points[1:]) == [1, 2, 5, 10, 20]
    assert spec.scheduler.type == "asha" and spec.max_total_steps() == 10_000


def test_the_dry_run_numbers_the_trials_as_ray_tune_names_them(tmp_path):
    """Trial 1 of the list is Ray's trial 00000, and so on: the grid's first key fastest, the
    repeats' seeds slowest, the whole grid again for each sample."""
    from ray.tune.search.variant_generator import generate_variants

    from sweeps.describe import describe
    from sweeps.runner import param_space
    from sweeps.spec import short_params

    search = {"optim.lr": {"grid": [1e-4, 2e-4]}, "train.batch_size": {"grid": [4, 8, 16]}}
    spec = load_spec(write_spec(tmp_path, search=search, repeats=2, num_samples=2))
    listed = [line.split(None, 1)[1] for line in describe(spec).splitlines() if re.match(r"^\s+\d+\s", line)]
    named = [
        short_params(config) for _ in range(spec.num_samples) for _, config in generate_variants(param_space(spec))
    ]
    assert len(listed) == spec.num_trials == 24 and listed == named, (listed, named)


BAD_SPECS = [
    ({"search": {"train.batch_sise": {"grid": [4]}}}, "train.batch_sise"),
    ({"search": {"optim.lr": {"gaussian": [0, 1]}}}, "optim.lr"),
    ({"search": {"optim.lr": {"loguniform": [0, 1e-3]}}}, "optim.lr"),
    ({"search": {"eval.nfe": {"grid": [50, 5000]}}}, "eval.nfe"),
    ({"search": {"optim.lr": {"grid": [1e-4]}}, "algorithm": "optuna"}, "grid is not supported with algorithm optuna"),
    ({"search": {"optim.lr": {"grid": [1e-4]}}, "schedular": "asha"}, "schedular"),
    ({"search": {"optim.lr": {"grid": [1e-4]}}, "metric": "val/fid"}, "fid.num_samples"),
    ({"search": {"optim.lr": {"grid": [1e-4]}}, "scheduler": {"type": "asha", "grace": 3}}, "scheduler.grace"),
    ({"search": {"loss": {"grid": [{"weighting": "min_snr", "minsnr_gamma": -1}]}}}, "loss.minsnr_gamma"),
    (
        {"search": {"loss": {"choice": [{"weighting": "constant"}]}}, "algorithm": "optuna"},
        "Optuna cannot search a whole section or arms",
    ),
    ({"search": {"loss": {"uniform": [1, 2]}}}, "are searched with grid or choice over mappings"),
    ({"search": {"arm": {"grid": [{"train.total_step": 600}]}}}, "train.total_step is not a run-config key"),
    ({"search": {"arm": {"grid": [{"train.total_steps": -1}]}}}, "train.total_steps"),
    ({"search": {"optim.lrr": {"grid": [1e-4]}}}, "optim.lrr: not a run-config key"),
    (
        {"search": {"optim.lr": {"grid": [1e-4]}}, "scheduler": {"type": "asha", "grace_period": 15}},
        "step 15, which is not a milestone",
    ),
    ({"search": {"optim.lr": {"grid": [1e-4]}}, "algorithm": "random", "repeats": 2}, "repeats"),
]


@pytest.mark.parametrize("fields, named", BAD_SPECS, ids=[n for _, n in BAD_SPECS])
def test_bad_specs_exit_2_naming_the_problem_and_start_nothing(tmp_path, fields, named):
    result = runner.invoke(app, ["run", str(write_spec(tmp_path, **fields))])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not (tmp_path / "runs").exists()
    assert not ray.is_initialized()  # refused before Ray started


def test_a_searched_section_knows_its_columns_keys_and_record():
    def columns(spec):
        return [column for searched in spec.search.values() for column in searched.columns()]

    smoke = load_spec(REPO / "search_spaces" / "smoke.yaml")
    assert columns(smoke) == ["loss/weighting", "optim.lr"]  # γ is not set by every variant: not a Ray column
    assert smoke.dotted_keys() == ["loss.weighting", "loss.minsnr_gamma", "optim.lr"]
    assert smoke.search["loss"].recorded() == {
        "loss.weighting": {"choice": ["constant", "min_snr"]},
        "loss.minsnr_gamma": {"choice": [5]},
    }
    assert smoke.candidates("loss.minsnr_gamma") == [5.0, 5]  # the base's γ where a variant leaves it out
    assert columns(load_spec(REPO / "search_spaces" / "steps_vs_capacity.yaml")) == [
        "model.base_channels",
        "train.total_steps",
    ]


def test_bad_input_is_refused_before_torch_or_ray_is_imported(tmp_path):
    """Exit 2 in well under two seconds: validation imports neither torch nor Ray."""
    import subprocess
    import sys

    spec = write_spec(tmp_path, search={"optim.lr": {"grid": [1e-4]}}, base={"train": {"batch_size": -3}})
    probe = (
        "import sys; from typer.testing import CliRunner; from cli.main import app; "
        f"result = CliRunner().invoke(app, ['run', {str(spec)!r}]); "
        "print(result.exit_code, 'torch' in sys.modules, 'ray' in sys.modules); print(result.output)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[0] == "2 False False", done.stdout
    assert "train.batch_size: -3 is out of range" in done.stdout


def test_set_reaches_the_specs_own_keys_through_the_same_strict_loader(tmp_path):
    spec = load_spec(
        REPO / "search_spaces" / "min_snr_gamma.yaml",
        ["resources.gpu=0", "scheduler.z=3", "scheduler.type=racing", "max_concurrent=2", "train.total_steps=8000"],
    )
    assert (spec.resources.gpu, spec.resources.cpu, spec.max_concurrent) == (0.0, 2.0, 2)
    assert (spec.scheduler.type, spec.scheduler.z, spec.scheduler.grace_period) == ("racing", 3.0, 4000)
    assert spec.run_config.train.total_steps == 8000  # a run-config key still reaches the run config
    for bad, named in [
        ("resources.gpus=0", "resources.gpus: unknown key"),
        ("resourcez.gpu=0", "--set resourcez.gpu"),
        ("scheduler.z=-1", "scheduler.z: -1 is out of range"),
    ]:
        result = runner.invoke(
            app, ["run", str(REPO / "search_spaces" / "min_snr_gamma.yaml"), "--set", bad, "--dry-run"]
        )
        assert result.exit_code == 2 and named in result.output, (bad, result.output)


def test_arms_set_dotted_keys_across_sections_and_each_trial_gets_its_arm(tmp_path):
    """E7's plan: a baseline, the same run 5× longer, the same run twice as wide — three arms,
    not the 2 × 2 grid of their keys; each arm's trial config is the base with its keys set."""
    from record.files import searched_values
    from sweeps.runner import param_space

    spec = load_spec(REPO / "search_spaces" / "cpu_steps_vs_capacity.yaml")
    arms = spec.search["arm"]
    assert spec.num_trials == 9 and spec.dotted_keys() == ["model.base_channels", "train.total_steps"]
    assert spec.candidates("train.total_steps") == [600, 3000, 600]
    assert spec.candidates("model.base_channels") == [16, 16, 32]
    assert spec.max_total_steps() == 3000
    assert spec.recorded_search() == {
        "model.base_channels": {"choice": [16, 32]},
        "train.total_steps": {"choice": [600, 3000]},
    }
    assert arms.columns() == ["arm/model.base_channels", "arm/train.total_steps"]
    # A trial's point in Ray's search space, as the trainable receives it: its arm's keys, dotted.
    point = {"arm": param_space(spec)["arm"]["grid_search"][2], "train.seed": 1078}
    assert searched_values(point) == {"model.base_channels": 32, "train.total_steps": 600, "train.seed": 1078}
    config = spec.trial_config(point)
    assert (config.model.base_channels, config.train.total_steps, config.train.seed) == (32, 600, 1078)
    assert config.optim.lr == 1e-3  # the spec's overrides stay
    described = runner.invoke(app, ["run", str(REPO / "search_spaces" / "cpu_steps_vs_capacity.yaml"), "--dry-run"])
    assert "base_channels=16,total_steps=3000,seed=1079" in described.output
