"""The `search` block of a sweep spec: each searched key's values, parsed strictly. A key is a
run-config key with a `Distribution` (`optim.lr: {loguniform: [1e-5, 1e-3]}`), or a section or a
list of arms searched as one (`SectionSearch`). Both answer the `Search` protocol, which is all
the spec, the cost model and the Ray adapter ask of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from diffusion_lib.config import ConfigError, RunConfig
from record.files import searched_values, trial_label


@runtime_checkable
class Search(Protocol):
    """What the sweep asks of one searched key."""

    key: str
    kind: str
    args: tuple

    @property
    def is_grid(self) -> bool: ...

    def candidates(self) -> list[Any]:
        """Values that must each make a valid run config."""

    def tune_domain(self) -> Any:
        """The Ray Tune search-space object."""

    def describe(self) -> str: ...

    def dotted_keys(self) -> list[str]:
        """The run-config keys it sets (the HParams columns)."""

    def columns(self) -> list[str]:
        """Its columns in Ray's progress table."""

    def recorded(self) -> dict[str, dict[str, list]]:
        """sweep.json's record of it: a distribution per dotted key."""

    def values_of(self, key: str, base: RunConfig) -> list[Any]:
        """The values a dotted key takes across it."""


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

    key: str  # the dotted run-config key
    kind: Literal["grid", "choice", "uniform", "loguniform", "randint", "quniform"]
    args: tuple

    @classmethod
    def parse(cls, key: str, raw: Any) -> "Distribution":
        if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in DISTRIBUTION_FORMS:
            forms = ", ".join(f"{{{kind}: {form}}}" for kind, form in DISTRIBUTION_FORMS.items())
            raise ConfigError(f"search.{key}: expected one of {forms}; got {raw!r}")
        kind, args = next(iter(raw.items()))
        where = f"search.{key}"
        numbers = isinstance(args, list) and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if kind in ("grid", "choice"):
            ok = isinstance(args, list) and len(args) > 0
        elif kind == "quniform":
            ok = numbers and len(args) == 3 and args[0] < args[1] and args[2] > 0
        else:
            ok = numbers and len(args) == 2 and args[0] < args[1] and (kind != "loguniform" or args[0] > 0)
        if not ok:
            raise ConfigError(f"{where}: {kind} needs {DISTRIBUTION_FORMS[kind]}; got {args!r}")
        return cls(key, kind, tuple(args))

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

    def dotted_keys(self) -> list[str]:
        return [self.key]

    def columns(self) -> list[str]:
        return [self.key]

    def recorded(self) -> dict[str, dict[str, list]]:
        return {self.key: {self.kind: list(self.args)}}

    def values_of(self, key: str, base: RunConfig) -> list[Any]:
        return self.candidates()


@dataclass(frozen=True)
class SectionSearch:
    """A list of variants searched as one (`grid` or `choice`), each a partial mapping that sets
    only the keys it names; the others keep the base config's values. Under a section's name the
    variants set that section's keys, e.g. a γ sweep plus the constant-weight baseline:

        loss: {grid: [{weighting: constant}, {weighting: min_snr, minsnr_gamma: 5}]}

    Under any other name they are arms of an experiment plan that set dotted keys across
    sections, e.g. a longer run and a wider one beside a baseline (not their full grid):

        arm: {grid: [{train.total_steps: 600}, {train.total_steps: 3000}, {model.base_channels: 32}]}"""

    name: str  # the search key: a run-config section, or the arms' name
    kind: Literal["grid", "choice"]
    args: tuple  # the variants
    prefix: str  # what makes a variant's key dotted: "loss." for a section, "" for arms

    @property
    def key(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str, raw: Any, run_config: RunConfig) -> "SectionSearch":
        dist = Distribution.parse(name, raw)
        if not dist.is_listed or not all(isinstance(v, dict) and v for v in dist.args):
            raise ConfigError(
                f"search.{name}: "
                "a whole section, or arms across sections, are searched with grid or choice over mappings of keys"
            )
        is_section = name in run_config.to_dict()
        unknown = [k for v in dist.args for k in v if k not in run_config.flat()]
        if not is_section and unknown:
            raise ConfigError(
                f"search.{name}: {unknown[0]} is not a run-config key; arms set dotted keys, e.g. train.total_steps"
            )
        return cls(name, dist.kind, dist.args, f"{name}." if is_section else "")

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def candidates(self) -> list[Any]:
        return list(self.args)

    def tune_domain(self) -> Any:
        return Distribution(self.name, self.kind, self.args).tune_domain()

    def describe(self) -> str:
        return f"{self.kind}({', '.join(trial_label(v) for v in self.args)})"

    def dotted_keys(self) -> list[str]:
        """Every key some variant sets, dotted (`loss.minsnr_gamma`): the HParams columns."""
        return list(dict.fromkeys(self.prefix + k for v in self.args for k in v))

    def columns(self) -> list[str]:
        """The keys every variant sets, as Ray's progress table names them (`loss/weighting`);
        its table fails on a key some trials lack, and the trial name shows every value anyway."""
        return [f"{self.name}/{k}" for k in self.args[0] if all(k in v for v in self.args)]

    def recorded(self) -> dict[str, dict[str, list]]:
        """sweep.json's record: a `choice` over the values each dotted key takes in the variants."""
        return {key: {"choice": list(dict.fromkeys(self._set_in(key)))} for key in self.dotted_keys()}

    def _set_in(self, key: str) -> list[Any]:
        """The values of a dotted key in the variants that set it."""
        name = key[len(self.prefix) :]
        return [v[name] for v in self.args if name in v]

    def values_of(self, key: str, base: RunConfig) -> list[Any]:
        """The values a dotted key takes across the variants."""
        return [v.get(key[len(self.prefix) :], base.flat()[key]) for v in self.args]


def parse_search(search: Any, run_config: RunConfig) -> dict[str, Search]:
    """The spec's `search` mapping, each entry checked to make a valid run config at its values."""
    if not isinstance(search, dict) or not search:
        raise ConfigError("search: expected a mapping of dotted run-config keys to distributions")
    sections = run_config.to_dict().keys()
    distributions: dict[str, Search] = {}
    for key, value in search.items():
        if key in run_config.flat():
            distributions[key] = searched = Distribution.parse(key, value)
        elif key in sections or "." not in key:
            distributions[key] = searched = SectionSearch.parse(key, value, run_config)
        else:
            raise ConfigError(
                f"search.{key}: not a run-config key (e.g. loss.minsnr_gamma, train.total_steps), section or arms"
            )
        for candidate in searched.candidates():
            try:
                run_config.with_overrides(searched_values({key: candidate}))
            except ConfigError as err:
                raise ConfigError(f"search.{key}: value {candidate!r} gives an invalid run config: {err}") from None
    return distributions
