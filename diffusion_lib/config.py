"""The run configuration: one typed schema with defaults, loaded from YAML and `--set` overrides.

The defaults reproduce the research notes' E1 baseline (CIFAR-10, UNetCifar32 at width 32,
linear β over T=1000, ε-prediction, constant weighting, batch 4, Adam 1e-4, EMA 0.999,
50-NFE DDPM evaluation, seed 1077). Each field carries its allowed range (`opt(default, check)`);
`load_dataclass` is the one strict loader for run configs and sweep specs alike. A bad key
raises `ConfigError`, which the CLI turns into exit code 2, before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar

import yaml


class ConfigError(ValueError):
    """Bad user input (config, spec, data or checkpoint): reported with exit code 2."""


# ---- ranges on the fields ------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A field's allowed values: a predicate and how to say what it allows."""

    ok: Callable[[Any], bool]
    allowed: str


def opt(
    default: Any = dataclasses.MISSING, check: Optional[Check] = None, *, factory: Any = dataclasses.MISSING
) -> Any:
    """A dataclass field with its range check attached (read by `load_dataclass`)."""
    metadata = {"check": check} if check else {}
    return field(default=default, default_factory=factory, metadata=metadata)


AT_LEAST_1 = Check(lambda v: v >= 1, "an integer >= 1")
POSITIVE = Check(lambda v: v > 0, "a number > 0")
OFF_OR_AT_LEAST_2 = Check(lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2")
UNIT_INTERVAL = Check(lambda v: 0 <= v < 1, "a number in [0, 1)")


# ---- the run config ------------------------------------------------------------------------

# Keys that code outside this module reads by name.
TOTAL_STEPS_KEY = "train.total_steps"
SEED_KEY = "train.seed"
EVAL_SEED_KEY = "eval.seed"
# The keys `RunConfig.__post_init__` checks against each other (every other check reads one
# value): a sweep checks each combination of them its grid makes.
CHECKED_TOGETHER_KEYS = ("eval.nfe", "diffusion.num_timesteps")


@dataclass
class DataConfig:
    name: Literal["cifar10", "shapes", "folder"] = "cifar10"
    root: str = "data"
    download: bool = False
    num_images: Optional[int] = opt(
        None, Check(lambda v: v is None or v > 0, "a positive integer or null")
    )  # None: all; shapes: 10,000


@dataclass
class ModelConfig:
    base_channels: int = opt(
        32, Check(lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8 (GroupNorm uses 8 groups)")
    )
    channel_mults: list[int] = opt(
        check=Check(
            lambda v: 0 < len(v) <= 6 and all(m > 0 for m in v),
            "1 to 6 positive integers (32x32 images halve at most 5 times)",
        ),
        factory=lambda: [1, 2, 2, 2],
    )
    num_res_blocks: int = opt(2, AT_LEAST_1)
    attention_resolutions: list[int] = opt(
        check=Check(lambda v: all(r in (32, 16, 8, 4) for r in v), "a list drawn from 32, 16, 8, 4"), factory=list
    )
    dropout: float = opt(0.1, UNIT_INTERVAL)


@dataclass
class DiffusionConfig:
    beta_schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = opt(1000, Check(lambda v: v >= 2, "an integer >= 2"))
    prediction: Literal["eps", "x0", "v"] = "eps"


@dataclass
class LossConfig:
    weighting: Literal["constant", "min_snr"] = "constant"
    minsnr_gamma: float = opt(5.0, POSITIVE)

    def unused(self) -> set[str]:
        """The keys this config ignores: γ outside Min-SNR weighting."""
        return {"minsnr_gamma"} if self.weighting != "min_snr" else set()


@dataclass
class TrainConfig:
    total_steps: int = opt(10_000, AT_LEAST_1)
    batch_size: int = opt(4, AT_LEAST_1)
    seed: int = opt(1077, Check(lambda v: v >= 0, "an integer >= 0"))
    grad_clip: float = opt(1.0, POSITIVE)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    compile: bool = False  # torch.compile the training step's network (CUDA graphs on CUDA); eager if it fails
    device: str = opt("auto", Check(lambda v: v in ("auto", "cpu") or v.startswith("cuda"), "auto, cpu or cuda[:N]"))


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, Check(lambda v: 0 < v < 1, "a number in (0, 1)"))


# Above this share of the random initialisation left in the EMA weights, samples and FID measure
# the initialisation as much as the training: a run and an early-stopping rung warn.
EMA_INITIALISATION_WARN_SHARE = 0.05


@dataclass
class EmaConfig:
    decay: float = opt(0.999, UNIT_INTERVAL)

    def initialisation_left(self, steps: int) -> float:
        """The share of the random initialisation still in the EMA weights after `steps` updates."""
        return self.decay**steps


@dataclass
class EvalConfig:
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    nfe: int = opt(50, AT_LEAST_1)
    eta: float = opt(
        0.0, Check(lambda v: 0 <= v <= 1, "a number in [0, 1]")
    )  # DDIM stochasticity; 0 is deterministic DDIM
    every: int = opt(2_000, AT_LEAST_1)  # milestone interval in training steps
    grid_size: int = opt(64, AT_LEAST_1)  # images in the milestone sample grid
    batch_size: int = opt(500, AT_LEAST_1)  # sampling batch for FID
    # The sampling noise, its own seed so that every trial of a sweep (seed repeats too) samples
    # from the same noise: their FIDs then move together and are compared paired.
    seed: int = opt(0, Check(lambda v: v >= 0, "an integer >= 0"))


@dataclass
class FidConfig:
    num_samples: int = opt(2_000, OFF_OR_AT_LEAST_2)  # samples per milestone FID; 0 turns FID off
    final_num_samples: int = opt(10_000, OFF_OR_AT_LEAST_2)  # samples for the FID after the last step
    weights: Optional[str] = None  # local pytorch-fid Inception weights; env SWEEP_FID_WEIGHTS
    ref_num_images: Optional[int] = opt(
        None, Check(lambda v: v is None or v >= 2, "an integer >= 2 or null")
    )  # None: all
    reference: Optional[str] = None  # reference statistics (.npz) computed beforehand, e.g. once per sweep
    cache_dir: Optional[str] = None  # reference statistics and FID floors; default $XDG_CACHE_HOME/diffusion_sweeps/fid
    batch_size: int = opt(200, AT_LEAST_1)  # Inception batch

    @property
    def enabled(self) -> bool:
        """FID is measured at the milestones, after the last step, or both."""
        return bool(self.num_samples or self.final_num_samples)


@dataclass
class CurvatureConfig:
    probes: int = opt(16, OFF_OR_AT_LEAST_2)  # Rademacher probes per milestone; 0 turns curvature off
    batch_size: int = opt(32, AT_LEAST_1)  # images in the fixed probe batch


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

    def __post_init__(self) -> None:
        if self.eval.nfe > self.diffusion.num_timesteps:
            raise ConfigError(
                f"eval.nfe: {self.eval.nfe} exceeds diffusion.num_timesteps={self.diffusion.num_timesteps}; "
                "the sampler can take at most one step per training timestep"
            )

    @classmethod
    def from_dict(cls, raw: Any) -> "RunConfig":
        """A validated RunConfig from nested sections; unknown keys and bad values are errors."""
        return load_dataclass(cls, raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """The config as {"section.key": value}, the form `--set`, search specs and tables use."""
        return flatten(self.to_dict())

    def hparams(self) -> dict[str, Any]:
        """The flat config less the keys it ignores (γ under constant weighting): TensorBoard's
        HParams table shows those empty rather than as a default that played no part."""
        unused = {f"loss.{name}" for name in self.loss.unused()}
        return {k: v for k, v in self.flat().items() if k not in unused}

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """A new, validated config with dotted keys set (`{"optim.lr": 1e-3}`); a whole section
        given as a mapping (`{"loss": {"weighting": "min_snr"}}`) sets the keys it names."""
        return RunConfig.from_dict(set_dotted(self.to_dict(), overrides))


def set_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of nested sections `raw` with the (dotted or section-mapping) `overrides` set."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted, value in flatten(overrides).items():
        if dotted.count(".") != 1:
            raise ConfigError(f"{dotted}: expected a dotted key SECTION.KEY, e.g. train.batch_size")
        section, key = dotted.split(".")
        if not isinstance(merged.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        merged[section][key] = value
    return merged


def flatten(nested: dict[str, Any]) -> dict[str, Any]:
    """{"loss": {"weighting": "constant"}, "optim.lr": 1e-4} -> {"loss.weighting": ..., "optim.lr": ...}."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# ---- the strict loader ---------------------------------------------------------------------

T = TypeVar("T")


def load_dataclass(cls: type[T], raw: Any, prefix: str = "", what: str = "a run config") -> T:
    """Build `cls` from a mapping: unknown keys, wrong types and out-of-range values raise
    ConfigError naming the dotted key; nested dataclass fields are loaded the same way."""
    where = prefix.rstrip(".") or what
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{dotted}: unknown key; {where} accepts {', '.join(fields)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation) and not isinstance(value, annotation):
            kwargs[key] = load_dataclass(annotation, value, f"{dotted}.", what)
            continue
        kwargs[key] = check_type(dotted, value, annotation)
        check = fields[key].metadata.get("check")
        if check is not None and not check.ok(kwargs[key]):
            raise ConfigError(f"{dotted}: {value!r} is out of range; expected {check.allowed}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field left out
        raise ConfigError(f"{where}: {err}") from None


def check_type(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's type annotation, allowing int where float is expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or (dataclasses.is_dataclass(annotation) and isinstance(value, annotation)):  # built already
        return value
    if origin is typing.Union:  # Optional[X], or a union of classes built already
        if value is None and type(None) in args:
            return None
        if any(isinstance(value, a) for a in args if dataclasses.is_dataclass(a)):
            return value
        return check_type(key, value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: check_type(f"{key}.{k}", v, args[1]) for k, v in value.items()}
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
    if isinstance(annotation, type) and isinstance(value, annotation):  # built already, e.g. a runtime Protocol
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


# ---- files and the command line ------------------------------------------------------------


class SafeLoaderWithYaml12Floats(yaml.SafeLoader):
    """PyYAML's safe loader reading `1e-4`, `1E5`, `-2.5e-3` and `.5e3` as the numbers YAML 1.2
    says they are: YAML 1.1, which PyYAML follows, wants a dot and a signed exponent (`1.0e-4`)
    and reads the rest as strings, so `--set optim.lr=1e-4` was "expected a number"."""


SafeLoaderWithYaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    # Tried after YAML 1.1's own float and int patterns, so `128` stays an int: this one only
    # catches what they leave as strings.
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML text as Python values, YAML 1.2's floats included: every config, spec and `--set`
    value is read here."""
    return yaml.load(text, Loader=SafeLoaderWithYaml12Floats)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.batch_size=128` -> ("train.batch_size", 128); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.batch_size=128")
    key, value = text.split("=", 1)
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"--set {text!r}: the value is not YAML ({problem})") from None


def read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


WEIGHTS_ENV = "SWEEP_FID_WEIGHTS"  # local FID Inception weights, when fid.weights is not set


def fid_weights(configured: Optional[str]) -> tuple[Optional[str], str]:
    """The FID weights file to use and where it came from: the configured one (`fid.weights`, a
    `--weights` option), else `$SWEEP_FID_WEIGHTS`; None means pytorch-fid downloads them."""
    if configured is None and os.environ.get(WEIGHTS_ENV):
        return os.environ[WEIGHTS_ENV], f"${WEIGHTS_ENV}"
    return configured, "fid.weights"


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or the defaults when `path` is None), apply `--set`
    overrides, and resolve its paths (`resolve_paths`)."""
    raw = read_yaml(path) if path is not None else {}
    return resolve_paths(RunConfig.from_dict(set_dotted(raw, dict(parse_override(o) for o in overrides or []))))


def resolve_paths(config: RunConfig) -> RunConfig:
    """Make every path absolute against the working directory of the command that was typed, and
    check the input files exist, so the config means the same after Ray moves a trial into its
    own directory (or onto another node). `$SWEEP_FID_WEIGHTS` becomes `fid.weights` here."""

    def absolute(p: Optional[str]) -> Optional[str]:
        return None if p is None else str(Path(p).expanduser().resolve())

    config.data.root = absolute(config.data.root)
    config.fid.cache_dir = absolute(config.fid.cache_dir)
    config.fid.reference = absolute(config.fid.reference)
    weights, source = fid_weights(config.fid.weights)
    config.fid.weights = absolute(weights)
    if config.fid.enabled and config.fid.weights is not None and not Path(config.fid.weights).is_file():
        raise ConfigError(
            f"{source}: no such file {config.fid.weights}; point it at pt_inception-2015-12-05-6726825d.pth"
        )
    reference = config.fid.reference
    if config.fid.enabled and reference is not None and "://" not in reference and not Path(reference).is_file():
        raise ConfigError(f"fid.reference: no such file {config.fid.reference}")
    return config
