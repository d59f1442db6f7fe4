"""The same sweep on a Ray cluster: Ray Tune schedules trials, Optuna samples them.

Ray Tune's `OptunaSearch` drives the sweep's own Optuna study (same name, same storage), so
`sweep status` / `sweep best` and resuming work as with the local backend; each trial writes the
same nested MLflow child run under the sweep's parent run. Pruners map to Ray's ASHA scheduler.
Ray actors are reused between trials, so a worker keeps its base model and tokenized data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from core.config import SweepConfig, load_config
from core.trial import TrialResult, TrialStatus
from sweeps.space import suggest, trial_params
from sweeps.study import (
    STORE,
    SweepObserver,
    SweepOutcome,
    _Silent,
    best_summary,
    best_trial,
    count_states,
    finished_count,
    make_sampler,
    open_storage,
    open_study,
    start_sweep,
)
from sweeps.tracking import SweepTracker

_NUMBER = "_optuna_trial_number"
_FINISHED = "trial_finished"
_RUNNERS: dict[str, Any] = {}


def _runner_for(config_path: str):
    """The actor's TrialRunner for a sweep, prepared once and kept while Ray reuses the actor."""
    if config_path not in _RUNNERS:
        from sweeps.preflight import preflight, quiet_libraries

        quiet_libraries()
        _RUNNERS[config_path] = preflight(load_config(config_path))
    return _RUNNERS[config_path]


def _set_user_attrs(config: SweepConfig, number: int, attrs: dict[str, Any]) -> None:
    # The trial object lives in the driver's OptunaSearch; from the actor it is reached through
    # the shared storage by its number.
    storage = optuna.storages.get_storage(open_storage(config))
    study_id = storage.get_study_id_from_name(config.name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)


def ray_trial(tune_config: dict[str, Any], config_path: str, parent_id: str, project_dir: str) -> None:
    """One trial inside a Ray actor: train, record in MLflow, report the objective to Tune."""
    from ray import tune

    from runners.sft import TrialCallbacks

    # Tune starts trials in their own folder; mlruns/ (study, MLflow, caches) is the project's.
    os.chdir(project_dir)
    runner = _runner_for(config_path)
    config = runner.config
    number = int(tune_config[_NUMBER])
    sampled = {key: value for key, value in tune_config.items() if key != _NUMBER}
    params = trial_params(config, sampled)
    tracker = SweepTracker(config)
    tracker.attach(parent_id)
    run_id = tracker.start_trial(number, params, sampled)

    def report(value: float, step: int) -> bool:
        tune.report({"objective": value, "intermediate_objective": value, "step": step})
        return True

    callbacks = TrialCallbacks(
        on_log=lambda metrics, step: tracker.log_metrics(run_id, metrics, step), report=report
    )
    result = runner.run(
        params, STORE.resolve() / "trials" / config.name / f"trial-{number}", callbacks, number
    )
    state = {TrialStatus.COMPLETE: "COMPLETE", TrialStatus.PRUNED: "PRUNED"}.get(result.status, "FAIL")
    adapter_uri = tracker.end_trial(run_id, result, state)
    _set_user_attrs(
        config, number, {"mlflow_run_id": run_id, **({"adapter_uri": adapter_uri} if adapter_uri else {})}
    )
    if result.status == TrialStatus.FAILED:
        raise RuntimeError(result.error)
    if result.status == TrialStatus.COMPLETE:
        tune.report({"objective": result.objective, _FINISHED: True})


class _OptunaSearch(OptunaSearch):
    """OptunaSearch that records a trial ASHA stopped as PRUNED, not COMPLETE.

    Every report carries `objective` (OptunaSearch forwards it to the Optuna trial as an
    intermediate value), so the last report of a stopped trial looks like a result; only a
    trial's own final report is marked finished.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and not error and not result.get(_FINISHED):
            result = {key: value for key, value in result.items() if key != self.metric}
        super().on_trial_complete(trial_id, result, error)


class _DefineByRun:
    """OptunaSearch's search space: the sweep's own `suggest`, plus the trial number for the actor.

    A class rather than a closure because Tune pickles its searcher to checkpoint the experiment.
    """

    def __init__(self, config: SweepConfig):
        self.config = config

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        suggest(trial, self.config)
        return {_NUMBER: trial.number}


def _scheduler(config: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.pruner.type == "none":
        return FIFOScheduler()
    # Ray's time axis is the number of intermediate reports, one every eval_every_steps.
    return ASHAScheduler(
        time_attr="training_iteration",
        metric="objective",
        mode="min" if config.direction == "minimize" else "max",
        grace_period=config.pruner.min_resource,
        reduction_factor=config.pruner.reduction_factor,
        max_t=10**6,
    )


def run_ray(
    config: SweepConfig,
    n_trials: int | None = None,
    timeout: float | None = None,
    address: str | None = None,
    observer: SweepObserver | None = None,
) -> SweepOutcome:
    """Run the sweep on Ray (a local one when no address is given) until `n_trials` are finished."""
    import ray
    from ray import tune

    observer = observer or _Silent()
    timeout = timeout if timeout is not None else config.budget.timeout
    started = start_sweep(config, n_trials, observer)
    study, tracker, outcome = started.study, started.tracker, started.outcome
    if outcome.already_done:
        return outcome
    target, before = outcome.target, outcome.finished_before

    settings = config.ray
    ray.init(
        address=address or settings.address,
        num_cpus=settings.num_cpus if not (address or settings.address) else None,
        num_gpus=settings.num_gpus if not (address or settings.address) else None,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,
    )

    searcher = _OptunaSearch(
        space=_DefineByRun(config),
        metric="objective",
        mode="min" if config.direction == "minimize" else "max",
        sampler=make_sampler(config, seed_offset=len(study.trials)),
        study_name=config.name,
        storage=optuna.storages.get_storage(open_storage(config)),
    )
    trainable = tune.with_parameters(
        ray_trial,
        config_path=str(Path(config.source).resolve()),
        parent_id=tracker.parent_id,
        project_dir=str(Path.cwd()),
    )
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(config),
            num_samples=target - before,
            max_concurrent_trials=settings.max_concurrent_trials,
            reuse_actors=True,
            time_budget_s=timeout,
        ),
        run_config=tune.RunConfig(
            name=config.name, storage_path=str((STORE / "ray").resolve()), verbose=0, log_to_file=True
        ),
    )
    status = "FINISHED"
    try:
        grid = tuner.fit()
        for result in grid:
            number = int(result.config[_NUMBER])
            if result.error is not None:
                trial_result = TrialResult(status=TrialStatus.FAILED, error=str(result.error).strip()[-500:])
            elif result.metrics.get(_FINISHED):
                trial_result = TrialResult(status=TrialStatus.COMPLETE, objective=result.metrics["objective"])
            else:
                trial_result = TrialResult(status=TrialStatus.PRUNED)
            outcome.ran.append(number)
            observer.trial_finished(
                number, {k: v for k, v in result.config.items() if k != _NUMBER}, trial_result
            )
        # A trial ASHA stopped was cut off between reports and never closed its run.
        tracker.close_stale_children(status="FINISHED", state="PRUNED", reason="stopped early by ASHA")
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        study = open_study(config)
        tracker.summarise(count_states(study), best_summary(study))
        tracker.close_sweep(status)
        ray.shutdown()
    outcome.finished = finished_count(study)
    outcome.best = best_trial(study)
    return outcome
