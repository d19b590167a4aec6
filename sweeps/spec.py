"""Search-space files: a base run config, a `search` block over dotted config keys, and how to
search it. Validated as strictly as run configs, before Ray starts.

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
    scheduler: {type: asha, grace_period: 2000, reduction_factor: 2}   # or: none | asha
    metric: val/fid
    mode: min
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from diffusion_lib.config import ConfigError, RunConfig, apply_overrides, check_type, from_dict, parse_override, read_yaml, resolve_paths

DISTRIBUTIONS = {
    "grid": "a non-empty list of values",
    "choice": "a non-empty list of values",
    "uniform": "[low, high]",
    "loguniform": "[low, high] with 0 < low",
    "randint": "[low, high) integers",
    "quniform": "[low, high, q]",
}
METRICS = ("val/fid", "train/loss", "curvature/hutch_trace_mean")


@dataclass
class AshaConfig:
    type: Literal["none", "asha"] = "none"
    grace_period: Optional[int] = None  # training steps; default: one milestone (eval.every)
    reduction_factor: float = 2.0


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0  # fractional packs trials onto one GPU, e.g. 0.25 for four


@dataclass
class SweepSpec:
    base: Any = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    scheduler: Any = "none"
    metric: str = "val/fid"
    mode: Literal["min", "max"] = "min"
    num_samples: int = 1
    max_concurrent: Optional[int] = None
    max_failures: int = 0
    seed: int = 0
    resources: Any = field(default_factory=dict)
    name: Optional[str] = None
    storage: str = "runs"
    # Derived in `load_spec`:
    run_config: RunConfig = field(default_factory=RunConfig)
    asha: AshaConfig = field(default_factory=AshaConfig)
    trial_resources: Resources = field(default_factory=Resources)

    @property
    def grid_keys(self) -> list[str]:
        return [k for k, d in self.search.items() if "grid" in d]

    def grid_points(self) -> list[dict[str, Any]]:
        keys = self.grid_keys
        return [dict(zip(keys, values)) for values in itertools.product(*(self.search[k]["grid"] for k in keys))]

    @property
    def num_trials(self) -> int:
        if self.algorithm == "optuna":
            return self.num_samples
        return len(self.grid_points()) * self.num_samples

    def max_total_steps(self) -> int:
        searched = self.search.get("train.total_steps")
        if searched is None:
            return self.run_config.train.total_steps
        values = searched.get("grid") or searched.get("choice") or [searched[d][1] for d in searched]
        return int(max(values))


_SPEC_KEYS = {f.name for f in dataclasses.fields(SweepSpec)} - {"run_config", "asha", "trial_resources"}


def flatten_searched(searched: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched values as dotted keys: {"loss": {"weighting": "constant"}} -> {"loss.weighting": ...}."""
    flat = {}
    for key, value in searched.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _check_distribution(key: str, dist: Any) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(
            f"search.{key}: expected one of {', '.join(f'{{{d}: {form}}}' for d, form in DISTRIBUTIONS.items())}; got {dist!r}"
        )
    kind, args = next(iter(dist.items()))
    ok = isinstance(args, list) and len(args) > 0
    if kind in ("uniform", "loguniform", "randint"):
        ok = ok and len(args) == 2 and all(isinstance(a, (int, float)) for a in args) and args[0] < args[1]
        ok = ok and (kind != "loguniform" or args[0] > 0)
    if kind == "quniform":
        ok = ok and len(args) == 3 and all(isinstance(a, (int, float)) for a in args) and args[0] < args[1] and args[2] > 0
    if not ok:
        raise ConfigError(f"search.{key}: {kind} needs {DISTRIBUTIONS[kind]}; got {args!r}")


def _candidate_values(dist: dict) -> list[Any]:
    """Values that must each make a valid run config: every listed value, or a range's ends."""
    kind, args = next(iter(dist.items()))
    if kind in ("grid", "choice"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a search-space file; `overrides` are `--set key=value` on the run config."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a search spec must be a mapping")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown spec key; a spec accepts {', '.join(sorted(_SPEC_KEYS))}")
    hints = typing.get_type_hints(SweepSpec)
    # base, overrides, search, scheduler and resources have their own checks below.
    spec = SweepSpec(**{k: v if hints[k] is Any or hints[k] is dict else check_type(k, v, hints[k]) for k, v in raw.items()})
    spec.name = spec.name or path.stem

    # The base run config: a path relative to the spec file, or inline sections.
    if isinstance(spec.base, str):
        base_path = (path.parent / spec.base).resolve()
        base = read_yaml(base_path)
    elif isinstance(spec.base, dict):
        base = spec.base
    else:
        raise ConfigError(f"base: expected a run-config path or mapping, got {spec.base!r}")
    if not isinstance(spec.overrides, dict):
        raise ConfigError("overrides: expected a mapping of dotted run-config keys to values")
    if not isinstance(spec.search, dict) or not spec.search:
        raise ConfigError("search: expected a mapping of dotted run-config keys to distributions")
    cli = dict(parse_override(o) for o in overrides or [])
    base = apply_overrides(base, {**spec.overrides, **cli})
    spec.run_config = resolve_paths(from_dict(base))
    spec.base = spec.run_config.to_dict()

    known = spec.run_config.flat()
    sections = spec.run_config.to_dict()
    for key, dist in spec.search.items():
        if key not in known and key not in sections:
            raise ConfigError(f"search.{key}: not a run-config key (e.g. loss.minsnr_gamma, train.total_steps) or section")
        _check_distribution(key, dist)
        if key in sections and not (next(iter(dist)) in ("grid", "choice") and all(isinstance(v, dict) for v in dist[next(iter(dist))])):
            raise ConfigError(f"search.{key}: a whole section is searched with grid or choice over mappings of its keys")
        for value in _candidate_values(dist):
            try:
                from_dict(apply_overrides(base, flatten_searched({key: value})))
            except ConfigError as err:
                raise ConfigError(f"search.{key}: value {value!r} gives an invalid run config: {err}") from None
    if spec.algorithm == "optuna" and any(k in sections for k in spec.search):
        section = next(k for k in spec.search if k in sections)
        raise ConfigError(f"search.{section}: Optuna cannot search a whole section; search its dotted keys")
    if spec.algorithm == "optuna" and spec.grid_keys:
        raise ConfigError(f"search.{spec.grid_keys[0]}: grid is not supported with algorithm optuna; use choice")
    if spec.algorithm == "grid" and len(spec.grid_keys) != len(spec.search):
        sampled = next(k for k in spec.search if k not in spec.grid_keys)
        raise ConfigError(f"search.{sampled}: algorithm grid takes only grid entries; use algorithm random to sample")

    if spec.metric not in METRICS:
        raise ConfigError(f"metric: {spec.metric!r} is not reported; choose one of {', '.join(METRICS)}")
    if spec.metric == "val/fid" and spec.run_config.fid.num_samples == 0 and "fid.num_samples" not in spec.search:
        raise ConfigError("metric: val/fid needs fid.num_samples > 0 in the run config")
    if spec.metric == "curvature/hutch_trace_mean" and spec.run_config.curvature.probes == 0:
        raise ConfigError("metric: curvature/hutch_trace_mean needs curvature.probes > 0 in the run config")
    if spec.num_samples < 1:
        raise ConfigError(f"num_samples: {spec.num_samples} is out of range; expected an integer >= 1")
    if spec.max_concurrent is not None and spec.max_concurrent < 1:
        raise ConfigError(f"max_concurrent: {spec.max_concurrent} is out of range; expected an integer >= 1")

    scheduler = {"type": spec.scheduler} if isinstance(spec.scheduler, str) else spec.scheduler
    spec.asha = _section("scheduler", scheduler, AshaConfig)
    if spec.asha.type == "asha":
        if spec.asha.grace_period is None:
            spec.asha.grace_period = spec.run_config.eval.every
        if spec.asha.grace_period < 1 or spec.asha.reduction_factor <= 1:
            raise ConfigError("scheduler: asha needs grace_period >= 1 and reduction_factor > 1")
    spec.trial_resources = _section("resources", spec.resources, Resources)
    if spec.trial_resources.cpu <= 0 or spec.trial_resources.gpu < 0:
        raise ConfigError("resources: cpu must be > 0 and gpu >= 0")
    return spec


def _section(name: str, raw: Any, cls: type) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in hints:
            raise ConfigError(f"{name}.{key}: unknown key; {name} accepts {', '.join(hints)}")
    return cls(**{k: check_type(f"{name}.{k}", v, hints[k]) for k, v in raw.items()})
