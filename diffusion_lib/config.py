"""The run configuration: one typed schema with defaults, loaded from YAML and `--set` overrides.

The defaults reproduce the research notes' E1 baseline (CIFAR-10, UNetCifar32 at width 32,
linear β over T=1000, ε-prediction, constant weighting, batch 4, Adam 1e-4, EMA 0.999,
50-NFE DDPM evaluation, seed 1077). Every key is validated before any work starts; a bad
key raises `ConfigError`, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """Bad user input (config, spec, data or checkpoint): reported with exit code 2."""


@dataclass
class DataConfig:
    name: Literal["cifar10", "shapes", "folder"] = "cifar10"
    root: str = "data"
    download: bool = False
    num_images: Optional[int] = None  # use only the first N images (None: all; shapes: 10,000)


@dataclass
class ModelConfig:
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.1


@dataclass
class DiffusionConfig:
    beta_schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = 1000
    prediction: Literal["eps", "x0", "v"] = "eps"


@dataclass
class LossConfig:
    weighting: Literal["constant", "min_snr"] = "constant"
    minsnr_gamma: float = 5.0


@dataclass
class TrainConfig:
    total_steps: int = 10_000
    batch_size: int = 4
    seed: int = 1077
    grad_clip: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    compile: bool = False  # torch.compile the training step's network (CUDA graphs on CUDA); eager if it fails
    device: str = "auto"  # "auto" picks cuda when available


@dataclass
class OptimConfig:
    lr: float = 1e-4


@dataclass
class EmaConfig:
    decay: float = 0.999


@dataclass
class EvalConfig:
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    nfe: int = 50
    eta: float = 0.0  # DDIM stochasticity; 0 is the deterministic DDIM sampler
    every: int = 2_000  # milestone interval in training steps
    grid_size: int = 64  # images in the milestone sample grid
    batch_size: int = 500  # sampling batch for FID


@dataclass
class FidConfig:
    num_samples: int = 2_000  # samples per milestone FID; 0 turns FID off
    final_num_samples: int = 10_000  # samples for the FID after the last step
    weights: Optional[str] = None  # local pytorch-fid Inception weights; env SWEEP_FID_WEIGHTS
    ref_num_images: Optional[int] = None  # reference statistics over the first N images (None: all)
    cache_dir: Optional[str] = None  # reference-statistics cache; default ~/.cache/diffusion_sweeps/fid
    batch_size: int = 200  # Inception batch


@dataclass
class CurvatureConfig:
    probes: int = 16  # Rademacher probes per milestone; 0 turns curvature off
    batch_size: int = 32  # images in the fixed probe batch


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """The config as {"section.key": value}, the form `--set`, search specs and tables use."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# Range checks: (predicate, what is allowed). Keys absent here accept any value of their type.
_RANGES: dict[str, tuple[Any, str]] = {
    "data.num_images": (lambda v: v is None or v > 0, "a positive integer or null"),
    "model.base_channels": (lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8 (GroupNorm uses 8 groups)"),
    "model.channel_mults": (lambda v: len(v) > 0 and all(m > 0 for m in v), "a non-empty list of positive integers"),
    "model.num_res_blocks": (lambda v: v >= 1, "an integer >= 1"),
    "model.attention_resolutions": (lambda v: all(r in (32, 16, 8, 4) for r in v), "a list drawn from 32, 16, 8, 4"),
    "model.dropout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "diffusion.num_timesteps": (lambda v: v >= 2, "an integer >= 2"),
    "loss.minsnr_gamma": (lambda v: v > 0, "a number > 0"),
    "train.total_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.seed": (lambda v: v >= 0, "an integer >= 0"),
    "train.grad_clip": (lambda v: v > 0, "a number > 0"),
    "train.device": (lambda v: v == "auto" or v == "cpu" or v.startswith("cuda"), "auto, cpu or cuda[:N]"),
    "optim.lr": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "ema.decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "eval.nfe": (lambda v: v >= 1, "an integer >= 1"),
    "eval.eta": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "eval.every": (lambda v: v >= 1, "an integer >= 1"),
    "eval.grid_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "fid.num_samples": (lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2"),
    "fid.final_num_samples": (lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2"),
    "fid.ref_num_images": (lambda v: v is None or v >= 2, "an integer >= 2 or null"),
    "fid.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "curvature.probes": (lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2"),
    "curvature.batch_size": (lambda v: v >= 1, "an integer >= 1"),
}


def check_type(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's type annotation, allowing int where float is expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return check_type(key, value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested dict; unknown keys are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping of sections, got {type(raw).__name__}")
    sections = _section_types()
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"{name}: unknown section; allowed sections are {', '.join(sections)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {value!r}")
        cls = sections[name]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, v in value.items():
            dotted = f"{name}.{key}"
            if key not in hints:
                raise ConfigError(f"{dotted}: unknown key; {name} accepts {', '.join(hints)}")
            kwargs[key] = check_type(dotted, v, hints[key])
        built[name] = cls(**kwargs)
    config = RunConfig(**built)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    for key, value in config.flat().items():
        if key in _RANGES:
            ok, allowed = _RANGES[key]
            if not ok(value):
                raise ConfigError(f"{key}: {value!r} is out of range; expected {allowed}")
    if config.eval.nfe > config.diffusion.num_timesteps:
        raise ConfigError(
            f"eval.nfe: {config.eval.nfe} exceeds diffusion.num_timesteps={config.diffusion.num_timesteps}; "
            "the sampler can take at most one step per training timestep"
        )
    if 32 % (2 ** (len(config.model.channel_mults) - 1)) != 0:
        raise ConfigError("model.channel_mults: too many levels for 32x32 images (at most 6)")


def parse_override(text: str) -> tuple[str, Any]:
    """`train.batch_size=128` -> ("train.batch_size", 128); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.batch_size=128")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict copy; the result is validated by `from_dict`."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted, value in overrides.items():
        if dotted.count(".") != 1:
            raise ConfigError(f"{dotted}: expected a dotted key SECTION.KEY, e.g. train.batch_size")
        section, key = dotted.split(".")
        if not isinstance(merged.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        merged[section][key] = value
    return merged


def read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or the defaults when `path` is None) and apply `--set` overrides.

    Relative `data.root`, `fid.weights` and `fid.cache_dir` are made absolute against the
    working directory now, so the config means the same thing after Ray moves a trial into
    its own directory.
    """
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, dict(parse_override(o) for o in overrides or []))
    return resolve_paths(from_dict(raw))


def resolve_paths(config: RunConfig) -> RunConfig:
    def absolute(p: Optional[str]) -> Optional[str]:
        return None if p is None else str(Path(p).expanduser().resolve())

    config.data.root = absolute(config.data.root)
    config.fid.weights = absolute(config.fid.weights)
    config.fid.cache_dir = absolute(config.fid.cache_dir)
    return config
