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
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Literal, Optional

from diffusion_lib.config import (
    AT_LEAST_1,
    CHECKED_TOGETHER_KEYS,
    EMA_INITIALISATION_WARN_SHARE,
    POSITIVE,
    SEED_KEY,
    TOTAL_STEPS_KEY,
    Check,
    ConfigError,
    EmaConfig,
    RunConfig,
    load_dataclass,
    opt,
    parse_override,
    read_yaml,
    resolve_paths,
    set_dotted,
)
from diffusion_lib.milestone import CURVATURE, FID, RANKABLE
from record import storage
from record.files import searched_values, trial_label
from record.noise import DEFAULT_CUT_Z, rungs

from .search import Search, SectionSearch, parse_search


@dataclass
class Scheduler:
    """Early stopping at rungs (steps grace_period · reduction_factor^k): `asha` is Ray's ASHA,
    `racing` (sweeps/racing.py) stops a trial only when it is worse by more than `z` standard
    errors of the difference, and `racing_dynamics` counts in that standard error how far
    rankings still moved after the rung in the trials that went past it (none cut before)."""

    type: Literal["none", "asha", "racing", "racing_dynamics"] = "none"
    # Steps; load_spec sets the first milestone (eval.every) where the spec leaves it out.
    grace_period: Optional[int] = opt(None, Check(lambda v: v is None or v >= 1, "an integer >= 1"))
    reduction_factor: float = opt(2.0, Check(lambda v: v > 1, "a number > 1"))
    z: float = opt(DEFAULT_CUT_Z, POSITIVE)  # racing and racing_dynamics only


@dataclass
class Resources:
    cpu: float = opt(1.0, POSITIVE)
    gpu: float = opt(
        0.0, Check(lambda v: v >= 0, "a number >= 0")
    )  # fractional packs trials onto one GPU, e.g. 0.25 for four


@dataclass
class SweepSpec:
    run_config: RunConfig  # the base config with the spec's overrides and `--set`, paths absolute
    search: dict[str, Search]  # by dotted key, or by section or arms name for a SectionSearch
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
        """Checks that span several fields, and the experiment's name."""
        check_experiment_name(self.name)
        if not self.search:
            raise ConfigError("search: expected a mapping of dotted run-config keys to distributions")
        for key, searched in self.search.items():
            if isinstance(searched, SectionSearch) and self.algorithm == "optuna":
                raise ConfigError(f"search.{key}: Optuna cannot search a whole section or arms; search dotted keys")
        if self.algorithm == "optuna" and self.grid_keys:
            raise ConfigError(f"search.{self.grid_keys[0]}: grid is not supported with algorithm optuna; use choice")
        if self.algorithm == "grid" and len(self.grid_keys) != len(self.search):
            sampled = next(k for k in self.search if k not in self.grid_keys)
            raise ConfigError(
                f"search.{sampled}: algorithm grid takes only grid entries; use algorithm random to sample"
            )
        if self.metric == FID.name and not any(self.candidates("fid.num_samples")):
            raise ConfigError("metric: val/fid needs fid.num_samples > 0 in the run config")
        if self.metric == CURVATURE.name and self.run_config.curvature.probes == 0:
            raise ConfigError("metric: curvature/hutch_trace_mean needs curvature.probes > 0 in the run config")
        if self.repeats > 1 and (self.algorithm != "grid" or SEED_KEY in self.search):
            raise ConfigError(
                "repeats: seed repeats need algorithm grid and train.seed not searched (repeats set the seeds)"
            )
        for setting in self.grid_settings(CHECKED_TOGETHER_KEYS):
            try:
                self.run_config.with_overrides(dict(setting))
            except ConfigError as err:
                raise ConfigError(f"search: the grid combines {trial_label(dict(setting))}: {err}") from None
        if self.scheduler.type != "none":
            for every in self.candidates("eval.every"):
                off = [rung for rung in self.rungs() if rung % every]
                if off:
                    raise ConfigError(
                        f"scheduler.grace_period: {self.scheduler.type} would compare trials at step {off[0]}, "
                        f"which is not a milestone (eval.every = {every}); "
                        "use a grace period that is a multiple of eval.every (and a whole reduction_factor)"
                    )

    def candidates(self, key: str) -> list[Any]:
        """The values a dotted run-config key takes across the sweep (its searched values, or the base's)."""
        for searched in self.search.values():
            if key in searched.dotted_keys():
                return searched.values_of(key, self.run_config)
        return [self.run_config.flat()[key]]

    @property
    def fid_enabled(self) -> bool:
        """Some trial measures FID."""
        return any(self.candidates("fid.num_samples")) or any(self.candidates("fid.final_num_samples"))

    def recorded_search(self) -> dict[str, dict[str, list]]:
        """sweep.json's record of the search: one distribution per searched dotted key."""
        return {key: dist for searched in self.search.values() for key, dist in searched.recorded().items()}

    def dotted_keys(self) -> list[str]:
        """Every searched dotted key (a section search's keys spelled out): the HParams columns."""
        return list(dict.fromkeys(k for searched in self.search.values() for k in searched.dotted_keys()))

    def rungs(self) -> list[int | float]:
        """The steps at which the scheduler compares trials (`record.noise.rungs`)."""
        return rungs(self.scheduler.grace_period, self.scheduler.reduction_factor, self.max_total_steps())

    def warnings(self) -> list[str]:
        """What makes a search measure something else than it claims, short of an error."""
        found = []
        if self.scheduler.type != "none":
            grace = self.scheduler.grace_period
            for decay in self.candidates("ema.decay"):
                left = EmaConfig(decay).initialisation_left(grace)
                if left > EMA_INITIALISATION_WARN_SHARE:
                    found.append(
                        f"ema.decay={decay}: at the scheduler's first rung (step {grace}) "
                        f"{left:.0%} of the EMA weights that FID is measured on are still the random initialisation, "
                        "so the rung compares EMA lag, not models; lower ema.decay or raise scheduler.grace_period"
                    )
        return found

    @property
    def grid_keys(self) -> list[str]:
        return [k for k, d in self.search.items() if d.is_grid]

    @property
    def num_grid_points(self) -> int:
        return math.prod(len(self.search[key].args) for key in self.grid_keys)

    def grid_point(self, index: int) -> dict[str, Any]:
        """The grid's point `index` (from 0) in Ray Tune's order, the first grid key varying
        fastest, made alone: a 100,000-point grid is described by its first and last points
        without making the others."""
        positions = {}
        for key in self.grid_keys:
            index, positions[key] = divmod(index, len(self.search[key].args))
        return {key: self.search[key].args[positions[key]] for key in self.grid_keys}

    def grid_settings(self, keys: Collection[str], sampled: Optional[dict[str, Any]] = None) -> Counter[tuple]:
        """Each setting of the dotted run-config `keys` (numbers) that the grid makes, as sorted
        (key, value) pairs of those it searches, with how many grid points make it; the sampled
        search keys at their values in `sampled`. Grid keys that leave `keys` alone multiply the
        counts, not the settings, so a question about a few keys is cheap on any grid."""

        def setting_of(searched: dict[str, Any]) -> tuple:
            return tuple(sorted((k, v) for k, v in searched_values(searched).items() if k in keys))

        settings = Counter({setting_of(sampled or {}): 1})
        for key in self.grid_keys:
            values = Counter(setting_of({key: value}) for value in self.search[key].args)
            combined: Counter[tuple] = Counter()
            for setting, points in settings.items():
                for value, times in values.items():
                    combined[tuple(sorted({**dict(setting), **dict(value)}.items()))] += points * times
            settings = combined
        return settings

    @property
    def num_trials(self) -> int:
        if self.algorithm == "optuna":
            return self.num_samples
        return self.num_grid_points * self.num_samples * self.repeats

    @property
    def seeds(self) -> list[int]:
        """The training seeds of each configuration's repeats."""
        return [self.run_config.train.seed + i for i in range(self.repeats)]

    def max_total_steps(self) -> int:
        """The longest trial's `train.total_steps` (ASHA's max_t)."""
        return int(max(self.candidates(TOTAL_STEPS_KEY)))

    def trial_config(self, searched: dict[str, Any]) -> RunConfig:
        """The run config of a trial with these searched values."""
        return self.run_config.with_overrides(searched_values(searched))

    @property
    def experiment_path(self) -> str:
        return storage.experiment_location(self.storage, self.name)


# One folder inside the storage: `..`, `/` or a leading dot would put the experiment elsewhere or
# hide it; a name longer than a file name may be (255 bytes on most filesystems) fails mid-sweep.
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EXPERIMENT_NAME_RULE = "up to 128 letters, digits, '.', '_' and '-', starting with a letter or digit"


def check_experiment_name(name: str) -> None:
    """A ConfigError unless `name` is one safe folder name (`EXPERIMENT_NAME`), from the spec,
    `--name` or `--set name=…` alike."""
    if not EXPERIMENT_NAME.fullmatch(name):
        raise ConfigError(f"name: {name!r} is not an experiment name; use {EXPERIMENT_NAME_RULE}")


def short_params(searched: dict[str, Any]) -> str:
    """`{"loss": {"minsnr_gamma": 5}, "model.base_channels": 64}` -> `minsnr_gamma=5,base_channels=64`."""
    return trial_label(searched_values(searched))


def load_spec(
    path: str | Path, overrides: list[str] | None = None, *, name: Optional[str] = None, storage: Optional[str] = None
) -> SweepSpec:
    """Read and validate a search-space file. `overrides` are `--set key=value`, each on the
    spec itself when its key starts with a spec field (`resources.gpu=0`, `scheduler.z=3`,
    `max_concurrent=2`), else on the run config (`train.batch_size=128`); `name` and `storage`
    (the CLI's options) replace the spec's own."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a search spec must be a mapping")
    accepted = ({f.name for f in dataclasses.fields(SweepSpec)} - {"run_config"}) | {"base", "overrides"}
    unknown = sorted(set(raw) - accepted)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown spec key; a spec accepts {', '.join(sorted(accepted))}")
    spec_overrides, run_overrides = _split_overrides(overrides or [], accepted - {"base", "overrides", "search"})
    raw = set_nested(raw, spec_overrides)

    run_config = _run_config(path, raw.get("base", {}), raw.get("overrides", {}), run_overrides)
    distributions = parse_search(raw.get("search"), run_config)

    options = {k: v for k, v in raw.items() if k not in ("base", "overrides", "search")}
    scheduler = options.get("scheduler")
    scheduler = {"type": scheduler} if isinstance(scheduler, str) else scheduler
    if isinstance(scheduler, dict) and scheduler.get("grace_period") is None:
        scheduler = {**scheduler, "grace_period": run_config.eval.every}  # the first rung: the first milestone
    if scheduler is not None:
        options["scheduler"] = scheduler
    options["name"] = name or options.get("name") or path.stem
    if storage:
        options["storage"] = storage
    return load_dataclass(SweepSpec, {**options, "run_config": run_config, "search": distributions}, what="a spec")


def _split_overrides(overrides: list[str], spec_fields: set[str]) -> tuple[dict[str, Any], list[str]]:
    """`--set` overrides as (those on the spec's own fields, by dotted key; those on the run
    config, as typed). One rule tells them apart: the key's first part names a spec field."""
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    on_spec, on_run = {}, []
    for text in overrides:
        key, value = parse_override(text)
        head = key.split(".")[0]
        if head in spec_fields:
            on_spec[key] = value
        elif head in sections:
            on_run.append(text)
        else:
            raise ConfigError(
                f"--set {key}: not a spec key ({', '.join(sorted(spec_fields))}) "
                f"or a run-config key ({', '.join(sorted(sections))}, e.g. train.batch_size)"
            )
    return on_spec, on_run


def set_nested(raw: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with each dotted key (`resources.gpu`) set, nested mappings made as needed
    (a scheduler given by name, `scheduler: asha`, becomes a mapping)."""
    merged = dict(raw)
    for key, value in dotted.items():
        head, *rest = key.split(".")
        if not rest:
            merged[head] = value
            continue
        inner = merged.get(head)
        inner = {"type": inner} if head == "scheduler" and isinstance(inner, str) else inner
        if inner is not None and not isinstance(inner, dict):
            raise ConfigError(f"--set {key}: {head} is not a mapping in the spec")
        merged[head] = set_nested(inner or {}, {".".join(rest): value})
    return merged


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
