"""The Optuna searcher told the truth about stopped trials: a trial the scheduler stopped reaches
the live study as PRUNED with its intermediate values by training step; a finished one as
COMPLETE with its last value; an errored one as FAIL."""

from __future__ import annotations

from optuna.trial import TrialState
from ray import tune

from diffusion_lib.milestone import FID, STEP
from sweeps.optuna_search import StoppedAsPrunedOptunaSearch

from conftest import tiny_config


def searcher() -> StoppedAsPrunedOptunaSearch:
    return StoppedAsPrunedOptunaSearch(
        tiny_config(train={"total_steps": 60}),
        space={"optim.lr": tune.loguniform(1e-5, 1e-3)},
        metric=FID.name,
        mode="min",
        seed=0,
    )


def run(search: StoppedAsPrunedOptunaSearch, trial_id: str, fids: dict[int, float], error: bool = False) -> None:
    assert search.suggest(trial_id)
    results = [
        {STEP.name: step, FID.name: fid, "training_iteration": i + 1} for i, (step, fid) in enumerate(fids.items())
    ]
    for result in results:
        search.on_trial_result(trial_id, result)
    search.on_trial_complete(trial_id, results[-1], error=error)


def test_a_stopped_trial_is_pruned_with_its_intermediate_values_and_a_finished_one_complete():
    search = searcher()
    run(search, "stopped", {20: 410.0})  # the scheduler stopped it at its first rung
    run(search, "finished", {20: 420.0, 40: 380.0, 60: 350.0})
    run(search, "errored", {20: 430.0}, error=True)
    stopped, finished, errored = search._ot_study.trials
    assert stopped.state == TrialState.PRUNED and stopped.intermediate_values == {20: 410.0}
    assert finished.state == TrialState.COMPLETE and finished.value == 350.0
    assert finished.intermediate_values == {20: 420.0, 40: 380.0, 60: 350.0}  # by training step, not report count
    assert errored.state == TrialState.FAIL


def test_a_searched_total_steps_decides_what_stopped_early():
    search = StoppedAsPrunedOptunaSearch(
        tiny_config(train={"total_steps": 60}),
        space={"train.total_steps": tune.choice([40])},
        metric=FID.name,
        mode="min",
        seed=0,
    )
    run(search, "short", {20: 400.0, 40: 390.0})  # its own total is 40: finished, not stopped
    assert search._ot_study.trials[0].state == TrialState.COMPLETE
