"""Search-space files: a base run config, a `search` block over dotted config keys, and how to
search it. Parsed once, strictly, before Ray starts, into a `SweepSpec` of typed fields.

    base: ../configs/e1.yaml          # or an inline mapping of run-config sections
    overrides: {train.total_steps: 10000}
    search:
      model.base_channels: {grid: [32, 64]}
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
      loss:                           # a whole section: grid over partial mappings, e.g. a
        grid:                         # γ sweep plus the constant-weight baseline
          - {weighting: constant}
          - {weighting: min_snr, minsnr_gamma: 5}
    algorithm: grid                   # grid | random | optuna
    scheduler: {type: asha, grace_period: 2000, reduction_factor: 2}   # or: none
    metric: val/fid
    mode: min
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from diffusion_lib.config import (
    AT_LEAST_1, POSITIVE, Check, ConfigError, RunConfig, flatten, load_dataclass, opt, parse_override, read_yaml,
    resolve_paths, set_dotted,
)
from diffusion_lib.milestone import CURVATURE, FID, RANKABLE

from . import storage
from .layout import trial_label

# Each distribution and the arguments it takes.
DISTRIBUTION_FORMS = {
    "grid": "a non-empty list of values",
    "choice": "a non-empty list of values",
    "uniform": "[low, high]",
    "loguniform": "[low, high] with 0 < low",
    "randint": "[low, high) integers",
    "quniform": "[low, high, q]",
}


@dataclass(frozen=True)
class Distribution:
    """One searched key's values: listed (`grid`, `choice`) or drawn from a range."""

    kind: Literal["grid", "choice", "uniform", "loguniform", "randint", "quniform"]
    args: tuple

    @classmethod
    def parse(cls, key: str, raw: Any) -> "Distribution":
        if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in DISTRIBUTION_FORMS:
            forms = ", ".join(f"{{{kind}: {form}}}" for kind, form in DISTRIBUTION_FORMS.items())
            raise ConfigError(f"{key}: expected one of {forms}; got {raw!r}")
        kind, args = next(iter(raw.items()))
        numbers = isinstance(args, list) and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if kind in ("grid", "choice"):
            ok = isinstance(args, list) and len(args) > 0
        elif kind == "quniform":
            ok = numbers and len(args) == 3 and args[0] < args[1] and args[2] > 0
        else:
            ok = numbers and len(args) == 2 and args[0] < args[1] and (kind != "loguniform" or args[0] > 0)
        if not ok:
            raise ConfigError(f"{key}: {kind} needs {DISTRIBUTION_FORMS[kind]}; got {args!r}")
        return cls(kind, tuple(args))

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    @property
    def is_listed(self) -> bool:
        return self.kind in ("grid", "choice")

    def candidates(self) -> list[Any]:
        """Values that must each make a valid run config: every listed value, or a range's ends."""
        if self.is_listed:
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def tune_domain(self) -> Any:
        """The Ray Tune search-space object for this distribution."""
        from ray import tune

        make = {"grid": tune.grid_search, "choice": tune.choice}
        if self.is_listed:
            return make[self.kind](list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def describe(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.args))})"


@dataclass
class Scheduler:
    type: Literal["none", "asha"] = "none"
    grace_period: Optional[int] = opt(None, Check(lambda v: v is None or v >= 1, "an integer >= 1"))  # steps; default eval.every
    reduction_factor: float = opt(2.0, Check(lambda v: v > 1, "a number > 1"))


@dataclass
class Resources:
    cpu: float = opt(1.0, POSITIVE)
    gpu: float = opt(0.0, Check(lambda v: v >= 0, "a number >= 0"))  # fractional packs trials onto one GPU, e.g. 0.25 for four


@dataclass
class SweepSpec:
    run_config: RunConfig  # the base config with the spec's overrides and `--set`, paths absolute
    search: dict[str, Distribution]
    name: str
    storage: str = "runs"
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    scheduler: Scheduler = field(default_factory=Scheduler)
    metric: str = opt(FID.name, Check(lambda v: v in RANKABLE, f"one of the reported metrics {', '.join(RANKABLE)}"))
    mode: Literal["min", "max"] = "min"
    num_samples: int = opt(1, AT_LEAST_1)
    max_concurrent: Optional[int] = opt(None, Check(lambda v: v is None or v >= 1, "an integer >= 1 or null"))
    max_failures: int = opt(0, Check(lambda v: v >= 0, "an integer >= 0"))
    seed: int = 0
    resources: Resources = field(default_factory=Resources)
    fail_on_trial_error: bool = True  # `sweep run` exits 1 when a trial errors (after its retries)
    repeats: int = opt(1, AT_LEAST_1)  # runs of each grid configuration, each with its own train.seed

    def __post_init__(self) -> None:
        """Checks that span several fields."""
        if not self.search:
            raise ConfigError("search: expected a mapping of dotted run-config keys to distributions")
        sections = {f.name for f in dataclasses.fields(RunConfig)}
        for key in self.search:
            if key in sections and self.algorithm == "optuna":
                raise ConfigError(f"search.{key}: Optuna cannot search a whole section; search its dotted keys")
        if self.algorithm == "optuna" and self.grid_keys:
            raise ConfigError(f"search.{self.grid_keys[0]}: grid is not supported with algorithm optuna; use choice")
        if self.algorithm == "grid" and len(self.grid_keys) != len(self.search):
            sampled = next(k for k in self.search if k not in self.grid_keys)
            raise ConfigError(f"search.{sampled}: algorithm grid takes only grid entries; use algorithm random to sample")
        if self.metric == FID.name and self.run_config.fid.num_samples == 0 and "fid.num_samples" not in self.search:
            raise ConfigError("metric: val/fid needs fid.num_samples > 0 in the run config")
        if self.metric == CURVATURE.name and self.run_config.curvature.probes == 0:
            raise ConfigError("metric: curvature/hutch_trace_mean needs curvature.probes > 0 in the run config")
        if self.repeats > 1 and (self.algorithm != "grid" or "train.seed" in self.search):
            raise ConfigError("repeats: seed repeats need algorithm grid and train.seed not searched (repeats set the seeds)")
        if self.scheduler.type == "asha":
            if self.scheduler.grace_period is None:
                self.scheduler.grace_period = self.run_config.eval.every
            for every in self.candidates("eval.every"):
                off = [rung for rung in self.asha_rungs() if rung % every]
                if off:
                    raise ConfigError(
                        f"scheduler.grace_period: ASHA would compare trials at step {off[0]}, which is not a milestone "
                        f"(eval.every = {every}); use a grace period that is a multiple of eval.every (and a whole reduction_factor)"
                    )

    def candidates(self, key: str) -> list[Any]:
        """The values a run-config key takes across the sweep (its searched values, or the base's)."""
        if key in self.search:
            return self.search[key].candidates()
        section, name = key.split(".")
        if section in self.search:
            return [v.get(name, getattr(getattr(self.run_config, section), name)) for v in self.search[section].args]
        return [self.run_config.flat()[key]]

    def asha_rungs(self) -> list[int]:
        """The steps at which ASHA compares trials: grace_period · reduction_factor^k below max_t."""
        rungs, rung, max_t = [], float(self.scheduler.grace_period), self.max_total_steps()
        while rung < max_t:
            rungs.append(round(rung, 6))
            rung *= self.scheduler.reduction_factor
        return [int(r) if float(r).is_integer() else r for r in rungs]

    def cost(self, stop_at: Optional[int] = None) -> dict[str, int]:
        """What the sweep costs if every trial stops at `stop_at` steps (its own total when None
        or larger): training steps and images, generated FID samples, and images through
        Inception (the reference once, then every FID sample). Exact for grids; a sampled key
        counts at its largest value, so Optuna and random searches get an upper bound."""
        def largest(dist: Distribution) -> Any:
            numbers = [v for v in dist.candidates() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            return max(numbers) if numbers else dist.candidates()[0]

        sampled = {k: largest(d) for k, d in self.search.items() if not d.is_grid}
        per_point = self.num_trials // max(len(self.grid_points()), 1)
        totals = dict.fromkeys(("steps", "images", "fid_samples"), 0)
        for point in self.grid_points() or [{}]:
            config = self.trial_config({**sampled, **point})
            steps = min(stop_at or config.train.total_steps, config.train.total_steps)
            milestones = -(-steps // config.eval.every)  # ceil: the last step is a milestone too
            finished = steps == config.train.total_steps
            totals["steps"] += per_point * steps
            totals["images"] += per_point * steps * config.train.batch_size
            totals["fid_samples"] += per_point * (milestones * config.fid.num_samples + (config.fid.final_num_samples if finished else 0))
        fid, data = self.run_config.fid, self.run_config.data
        reference = (fid.ref_num_images or data.num_images or 50_000) if totals["fid_samples"] else 0  # 50,000: CIFAR-10's
        return {"trials": self.num_trials, **totals, "inception_images": reference + totals["fid_samples"]}

    def asha_cost(self) -> dict[str, int]:
        """`cost()` if ASHA promoted exactly 1/reduction_factor of the trials at each rung (its
        nominal schedule; asynchronous promotion can let more through early on)."""
        rungs = [int(r) for r in self.asha_rungs()] + [self.max_total_steps()]
        shares = [self.scheduler.reduction_factor ** -k for k in range(len(rungs))]
        stopping = [a - b for a, b in zip(shares, shares[1:] + [0.0])]  # trials that stop at each rung
        totals = [self.cost(stop_at=r) for r in rungs]
        return {key: round(sum(s * t[key] for s, t in zip(stopping, totals))) if key != "trials" else totals[0][key] for key in totals[0]}

    def warnings(self) -> list[str]:
        """What makes a search measure something else than it claims, short of an error."""
        found = []
        if self.scheduler.type == "asha":
            grace = self.scheduler.grace_period
            for decay in self.candidates("ema.decay"):
                if decay**grace > 0.05:
                    found.append(
                        f"ema.decay={decay}: at ASHA's first rung (step {grace}) {decay**grace:.0%} of the EMA weights that FID "
                        "is measured on are still the random initialisation, so the rung compares EMA lag, not models; "
                        "lower ema.decay or raise scheduler.grace_period"
                    )
        return found

    @property
    def grid_keys(self) -> list[str]:
        return [k for k, d in self.search.items() if d.is_grid]

    def grid_points(self) -> list[dict[str, Any]]:
        keys = self.grid_keys
        return [dict(zip(keys, values)) for values in itertools.product(*(self.search[k].args for k in keys))]

    @property
    def num_trials(self) -> int:
        if self.algorithm == "optuna":
            return self.num_samples
        return len(self.grid_points()) * self.num_samples * self.repeats

    @property
    def seeds(self) -> list[int]:
        """The training seeds of each configuration's repeats."""
        return [self.run_config.train.seed + i for i in range(self.repeats)]

    def max_total_steps(self) -> int:
        """The longest trial's `train.total_steps` (ASHA's max_t)."""
        searched = self.search.get("train.total_steps")
        if searched is None:
            return self.run_config.train.total_steps
        return int(max(searched.candidates()))

    def trial_config(self, searched: dict[str, Any]) -> RunConfig:
        """The run config of a trial with these searched values."""
        return self.run_config.with_overrides(searched)

    @property
    def experiment_path(self) -> str:
        """storage/name: a local storage path made absolute, or a URI (s3://…, its ?query of
        pyarrow options kept at the end)."""
        if storage.is_uri(self.storage):
            return storage.join(self.storage, self.name)
        return str(Path(self.storage).expanduser().resolve() / self.name)


def short_params(searched: dict[str, Any]) -> str:
    """`{"loss": {"minsnr_gamma": 5}, "model.base_channels": 64}` -> `minsnr_gamma=5,base_channels=64`."""
    return trial_label(flatten(searched))


def load_spec(path: str | Path, overrides: list[str] | None = None, *, name: Optional[str] = None, storage: Optional[str] = None) -> SweepSpec:
    """Read and validate a search-space file. `overrides` are `--set key=value` on the run
    config; `name` and `storage` (the CLI's options) replace the spec's own."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a search spec must be a mapping")
    accepted = ({f.name for f in dataclasses.fields(SweepSpec)} - {"run_config"}) | {"base", "overrides"}
    unknown = sorted(set(raw) - accepted)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown spec key; a spec accepts {', '.join(sorted(accepted))}")

    run_config = _run_config(path, raw.get("base", {}), raw.get("overrides", {}), overrides)
    search = raw.get("search")
    if not isinstance(search, dict) or not search:
        raise ConfigError("search: expected a mapping of dotted run-config keys to distributions")
    sections = run_config.to_dict().keys()
    known = run_config.flat().keys() | sections
    distributions = {}
    for key, value in search.items():
        if key not in known:
            raise ConfigError(f"search.{key}: not a run-config key (e.g. loss.minsnr_gamma, train.total_steps) or section")
        distributions[key] = dist = Distribution.parse(f"search.{key}", value)
        if key in sections and not (dist.is_listed and all(isinstance(v, dict) for v in dist.args)):
            raise ConfigError(f"search.{key}: a whole section is searched with grid or choice over mappings of its keys")
        for candidate in dist.candidates():
            try:
                run_config.with_overrides({key: candidate})
            except ConfigError as err:
                raise ConfigError(f"search.{key}: value {candidate!r} gives an invalid run config: {err}") from None

    options = {k: v for k, v in raw.items() if k not in ("base", "overrides", "search")}
    if isinstance(options.get("scheduler"), str):
        options["scheduler"] = {"type": options["scheduler"]}
    options["name"] = name or options.get("name") or path.stem
    if storage:
        options["storage"] = storage
    return load_dataclass(SweepSpec, {**options, "run_config": run_config, "search": distributions}, what="a spec")


def _run_config(spec_path: Path, base: Any, overrides: Any, cli: list[str] | None) -> RunConfig:
    """The base run config (a path relative to the spec file, or inline sections) with the
    spec's `overrides` and the command line's `--set` applied."""
    if isinstance(base, str):
        base = read_yaml((spec_path.parent / base).resolve())
    if not isinstance(base, dict):
        raise ConfigError(f"base: expected a run-config path or mapping, got {base!r}")
    if not isinstance(overrides, dict):
        raise ConfigError("overrides: expected a mapping of dotted run-config keys to values")
    merged = set_dotted(base, {**overrides, **dict(parse_override(o) for o in cli or [])})
    return resolve_paths(RunConfig.from_dict(merged))
