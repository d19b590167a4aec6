"""Ray Tune's OptunaSearch, told the truth about trials the scheduler stopped.

Ray's `OptunaSearch.on_trial_complete` tells Optuna a trial that ASHA or racing stopped as
COMPLETE with the value of its last report, so TPE ranks a step-150 FID beside the step-600
FIDs of finished trials. Optuna's own convention for a trial stopped early is PRUNED, with
its intermediate values by step (TPE then orders pruned trials behind complete ones by the
step they reached; `optuna.samplers.TPESampler`, `_get_pruned_trial_score`). This searcher
reports each milestone at its training step (Ray reports at the count of results) and tells a
trial that ended before its own `train.total_steps` without an error as PRUNED, and an errored
trial as FAIL (Ray tells it COMPLETE when its last report holds a value).
"""

from __future__ import annotations

from typing import Any, Optional

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from diffusion_lib.config import RunConfig
from diffusion_lib.milestone import STEP
from record.files import searched_values


class StoppedAsPrunedOptunaSearch(OptunaSearch):
    """`base`: the sweep's run config, which a trial's searched values complete to tell its
    total steps (a trial that stopped short of them was stopped by the scheduler)."""

    def __init__(self, base: RunConfig, **kwargs):
        super().__init__(**kwargs)
        self._base = base
        self._searched: dict[str, dict[str, Any]] = {}

    def suggest(self, trial_id: str) -> Optional[dict]:
        suggested = super().suggest(trial_id)
        if isinstance(suggested, dict):
            self._searched[trial_id] = suggested
        return suggested

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials and STEP.name in result and self.metric in result:
            self._ot_trials[trial_id].report(result[self.metric], int(result[STEP.name]))

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or not (error or (result and self._stopped_early(trial_id, result))):
            super().on_trial_complete(trial_id, result, error)  # finished: COMPLETE with its last value
            return
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL if error else TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    def _stopped_early(self, trial_id: str, result: dict) -> bool:
        total_steps = self._base.with_overrides(searched_values(self._searched.get(trial_id, {}))).train.total_steps
        return int(result.get(STEP.name, total_steps)) < total_steps
