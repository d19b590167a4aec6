"""The sweep as an Optuna study, whatever searched it (grid, random or Optuna): a SQLite file
that `optuna.load_study` and optuna-dashboard open, the searched keys ranked by Optuna's
importance evaluator, and Optuna's parallel-coordinates figure. Built from the experiment's
files alone, rewritten whole on each analysis.

Trial state (`record.states`) → Optuna state: finished → COMPLETE (value: the trial's best
metric on the common FID basis), stopped → PRUNED (value: its last comparable metric, as Optuna's
own pruning records), errored → FAIL, running and interrupted → RUNNING (Optuna's state for a
started, unfinished trial), pending → WAITING; the plots use COMPLETE trials, the importances
finished and stopped ones (`param_importances`). A
finished trial without one comparable metric value becomes FAIL. Every trial keeps its sweep
`trial_id` and `state` (and `error`) as user attributes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from optuna.visualization.matplotlib import plot_parallel_coordinate  # noqa: E402

from diffusion_lib.atomic import atomic_path  # noqa: E402
from diffusion_lib.milestone import STEP  # noqa: E402
from record import states  # noqa: E402
from record.best import comparable_rows  # noqa: E402
from record.experiment import Experiment, Trial  # noqa: E402

STUDY_FILE = "study.db"

_OPTUNA_STATES = {
    states.FINISHED: TrialState.COMPLETE,
    states.STOPPED: TrialState.PRUNED,
    states.ERRORED: TrialState.FAIL,
    states.RUNNING: TrialState.RUNNING,
    states.INTERRUPTED: TrialState.RUNNING,
    states.PENDING: TrialState.WAITING,
}
_CATEGORY_TYPES = (type(None), bool, int, float, str)  # what a CategoricalDistribution may hold


def _param_value(value: Any) -> Any:
    """A searched value as an Optuna param: itself, or its repr when Optuna cannot hold it (a list)."""
    return value if isinstance(value, _CATEGORY_TYPES) else repr(value)


def _declared(search: dict[str, dict], key: str) -> Optional[BaseDistribution]:
    """The distribution sweep.json declares for a dotted key, as an Optuna distribution."""
    if key not in search:
        return None
    kind, args = next(iter(search[key].items()))
    if kind in ("grid", "choice"):
        return CategoricalDistribution(list(dict.fromkeys(_param_value(a) for a in args))) if args else None
    low, high = args[:2]
    if kind == "randint":  # [low, high) integers
        return IntDistribution(low, high - 1)
    return FloatDistribution(low, high, log=kind == "loguniform", step=args[2] if kind == "quniform" else None)


def _fits(distribution: BaseDistribution, name: str, value: Any) -> bool:
    """Whether Optuna accepts `value` under `distribution` (its own check, through create_trial)."""
    try:
        optuna.trial.create_trial(state=TrialState.RUNNING, params={name: value}, distributions={name: distribution})
    except ValueError:
        return False
    return True


def _distributions(experiment: Experiment) -> dict[str, BaseDistribution]:
    """One distribution per searched key for the whole study: sweep.json's where every value the
    trials took fits it, otherwise (key missing from sweep.json, values outside the declared
    range) a categorical over the observed values."""
    observed: dict[str, list[Any]] = {}
    for trial in experiment.trials:
        for key, value in trial.searched.items():
            observed.setdefault(key, []).append(_param_value(value))
    distributions = {}
    for key, values in observed.items():
        declared = _declared(experiment.search, key)
        fits = declared is not None and all(_fits(declared, key, v) for v in values)
        distributions[key] = declared if fits else CategoricalDistribution(list(dict.fromkeys(values)))
    return distributions


def _frozen_trial(
    trial: Trial, experiment: Experiment, distributions: dict[str, BaseDistribution], stopped_as_complete: bool
) -> FrozenTrial:
    metric = experiment.metric
    curve = {r[STEP.name]: float(r[metric]) for r in comparable_rows(trial.milestones, metric, experiment.basis)}
    best = experiment.best(trial)
    state, value = _OPTUNA_STATES[trial.state], None
    if state == TrialState.PRUNED and stopped_as_complete:
        state = TrialState.COMPLETE
    if state == TrialState.COMPLETE:
        value = best[metric] if best else None
        state = TrialState.COMPLETE if best else TrialState.FAIL
    elif state == TrialState.PRUNED and curve:
        value = curve[max(curve)]
    attrs = {"trial_id": trial.trial_id, "state": trial.state, **({"error": trial.error} if trial.error else {})}
    return optuna.trial.create_trial(
        state=state,
        value=value,
        params={k: _param_value(v) for k, v in trial.searched.items()},
        distributions={k: distributions[k] for k in trial.searched},
        user_attrs=attrs,
        intermediate_values=curve,
    )


def _build_study(
    experiment: Experiment, storage: Optional[optuna.storages.BaseStorage], *, stopped_as_complete: bool = False
) -> optuna.Study:
    """The experiment as a study in `storage` (None: in memory), one Optuna trial per sweep trial;
    with `stopped_as_complete`, a stopped trial counts as COMPLETE with its best value (for ranking)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=experiment.path.name,
            direction="minimize" if experiment.mode == "min" else "maximize",
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    distributions = _distributions(experiment)
    study.add_trials(_frozen_trial(t, experiment, distributions, stopped_as_complete) for t in experiment.trials)
    return study


def write_optuna_study(experiment: Experiment, path: Path) -> Path:
    """Write the sweep as an Optuna study (named after the experiment folder) to the SQLite file
    `path`, atomically, replacing any earlier study there; open it with
    `optuna.load_study(study_name=..., storage=f"sqlite:///{path}")`."""
    with atomic_path(path) as tmp:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
        try:
            _build_study(experiment, storage)
        finally:
            storage.remove_session()
            storage.engine.dispose()
    return Path(path)


MIN_TRIALS_TO_RANK = 10  # PED-ANOVA weighs a top 10% against the rest: below ten trials the top is one trial


def param_importances(
    experiment: Experiment, *, evaluator: Optional[optuna.importance.BaseImportanceEvaluator] = None
) -> tuple[dict[str, float], int]:
    """The searched keys by importance to the objective, most important first (shares summing
    to 1), and the number of trials they rest on: every finished or stopped trial with a value on
    the common FID basis, each at its best comparable milestone (as the trials table ranks them).
    Leaving out the stopped trials would rank the knobs on the survivors only, whose values the
    scheduler has already narrowed. Read the ranking only from MIN_TRIALS_TO_RANK trials up.

    The evaluator defaults to Optuna's PED-ANOVA (`PedAnovaImportanceEvaluator`, Optuna's own
    default): it needs no scikit-learn (fANOVA's random forest does; it is not a dependency and
    not installed), it works on a sweep's few dozen trials (a forest wants many more), and
    it handles conditional keys (`loss.minsnr_gamma` exists only for Min-SNR trials of a `loss`
    section grid). Its default asks what it takes to reach the top 10% of trials: in a sweep of
    24 that is 3 trials, so read the ranking as indicative, or pass
    `evaluator=PedAnovaImportanceEvaluator(target_quantile=0.25)` for a wider top.

    Never raises on thin data: with fewer than 2 trials it returns ({}, count); a key that took
    one value explains nothing and gets 0.0 (Optuna is asked only about keys that varied); when
    nothing can be told apart (no key varied, every trial scored the same) every key gets 0.0,
    not Optuna's equal shares.
    """
    study = _build_study(experiment, None, stopped_as_complete=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, len(complete)
    taken: dict[str, set[str]] = {}
    for trial in complete:
        for key, value in trial.params.items():
            taken.setdefault(key, set()).add(repr(value))
    varied = [k for k, values in taken.items() if len(values) > 1]
    raw = {}
    if varied:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's notes on thin data and on `normalize`: handled here
            raw = get_param_importances(
                study, evaluator=evaluator or PedAnovaImportanceEvaluator(), params=varied, normalize=False
            )
    total = sum(raw.values())
    shares = {k: raw.get(k, 0.0) / total if total > 0 else 0.0 for k in taken}
    return dict(sorted(shares.items(), key=lambda kv: -kv[1])), len(complete)


def parallel_coordinates(study: optuna.Study, path: Path, metric: str = "objective") -> Optional[Path]:
    """Optuna's parallel-coordinates figure (one line per COMPLETE trial across the searched
    keys, coloured by its objective value) as a PNG written atomically; None when no COMPLETE
    trial has a searched key. Restyled to be read: viridis lines (Optuna's Blues draws the worst
    trials near-white on white), the metric's name for "Objective Value", "not set" for a key a
    trial does not use (`loss.minsnr_gamma` under constant weighting) instead of "None"."""
    if not any(t.params for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plot is experimental; a key with one value has a flat axis
        ax = plot_parallel_coordinate(study)
    fig = ax.figure
    fig.set_size_inches(9, 5)
    for collection in ax.collections:
        collection.set_cmap(LINE_COLOURS)
    for axis in fig.axes:
        if axis.get_ylabel() == "Objective Value":  # the colour bar, which follows the lines' colours
            axis.set_ylabel(metric)
        elif axis is not ax:  # a searched key's axis
            axis.set_yticks(axis.get_yticks(), [_tick(t.get_text()) for t in axis.get_yticklabels()])
    ax.set_title(f"{metric} across the searched keys")
    ax.set_xticks(
        ax.get_xticks(), [metric if t.get_text() == "Objective Value" else t.get_text() for t in ax.get_xticklabels()]
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


LINE_COLOURS = matplotlib.colors.ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, 256)))


def _tick(label: str) -> str:
    return "not set" if label == "None" else label
