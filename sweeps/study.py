"""The Optuna study behind a sweep: storage, sampler, pruner, resume, and the ask/run/tell loop.

`--trials N` means N *finished* trials (complete or pruned) in the study. Re-running the same
command after a stop counts what is already there and runs only what is missing.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from runners.sft import TrialCallbacks, TrialRunner
from sweeps.config import SweepConfig
from sweeps.space import grid, suggest, trial_params
from sweeps.tracking import SweepTracker
from sweeps.trial import TrialParams, TrialResult, TrialStatus

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
STORE = Path("mlruns")


def default_storage_path(config: SweepConfig) -> Path:
    """Where a sweep's study lives when the config names no storage."""
    return STORE / "optuna" / f"{config.name}.journal"


def open_storage(config: SweepConfig) -> optuna.storages.BaseStorage | str:
    """The configured storage URL, else a journal file under mlruns/ (safe for several processes)."""
    if config.storage:
        return config.storage
    path = default_storage_path(config).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def make_sampler(config: SweepConfig) -> optuna.samplers.BaseSampler:
    s = config.sampler
    startup = {} if s.n_startup_trials is None else {"n_startup_trials": s.n_startup_trials}
    if s.type == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, **startup)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.type == "grid":
        return optuna.samplers.GridSampler(grid(config), seed=s.seed)
    if s.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed, **startup)
    return optuna.samplers.GPSampler(seed=s.seed, **startup)


def make_pruner(config: SweepConfig) -> optuna.pruners.BasePruner:
    p = config.pruner
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_study(config: SweepConfig) -> optuna.Study:
    """Create the sweep's study, or load it when it exists (the study name is the sweep name)."""
    return optuna.create_study(
        study_name=config.name,
        storage=open_storage(config),
        sampler=make_sampler(config),
        pruner=make_pruner(config),
        direction=config.direction,
        load_if_exists=True,
    )


def load_study(config: SweepConfig) -> optuna.Study:
    """The existing study of a sweep, for read-only commands (status, best)."""
    return optuna.load_study(study_name=config.name, storage=open_storage(config))


def count_states(study: optuna.Study) -> dict[str, int]:
    counts = {
        state.name: 0
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name in counts:
            counts[trial.state.name] += 1
    return counts


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial, or None before the first one finishes."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _owner_alive(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the process that started a RUNNING trial still runs (trials record host and pid)."""
    host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
    if host != socket.gethostname() or pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose process died (a kill -9, a crash); returns their numbers.

    Journal storage has no heartbeat, so ownership is checked through the pid each trial records;
    trials of a live process on this host, or of another host, are left alone.
    """
    orphaned = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not _owner_alive(t)
    ]
    for number in orphaned:
        study.tell(number, state=TrialState.FAIL)
    return orphaned


class SweepObserver(Protocol):
    """What a front end (the CLI's live view) is told while a sweep runs."""

    def sweep_started(self, done: int, target: int) -> None: ...
    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...
    def trial_step(self, step: int, total: int) -> None: ...
    def trial_finished(self, number: int, params: dict[str, Any], result: TrialResult) -> None: ...


class _Silent:
    def sweep_started(self, done: int, target: int) -> None:
        pass

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        pass

    def trial_step(self, step: int, total: int) -> None:
        pass

    def trial_finished(self, number: int, params: dict[str, Any], result: TrialResult) -> None:
        pass


class TooManyFailures(RuntimeError):
    """The sweep reached `budget.max_failed_trials` in this invocation."""


@dataclass
class SweepOutcome:
    """How an invocation of `sweep run` ended."""

    target: int
    finished_before: int
    finished: int
    ran: list[int] = field(default_factory=list)
    already_done: bool = False
    timed_out: bool = False
    best: optuna.trial.FrozenTrial | None = None


def _best_summary(study: optuna.Study) -> dict[str, Any] | None:
    best = best_trial(study)
    if best is None:
        return None
    return {"number": best.number, "value": best.value, "params": best.params}


_OPTUNA_STATE = {
    TrialStatus.COMPLETE: TrialState.COMPLETE,
    TrialStatus.PRUNED: TrialState.PRUNED,
    TrialStatus.FAILED: TrialState.FAIL,
    TrialStatus.KILLED: TrialState.FAIL,
}


def _report(trial: optuna.Trial, value: float, step: int) -> bool:
    """Hand an intermediate value to the pruner; True while the trial should go on."""
    trial.report(value, step)
    return not trial.should_prune()


def run_sweep(
    config: SweepConfig,
    runner: TrialRunner,
    n_trials: int | None = None,
    timeout: float | None = None,
    observer: SweepObserver | None = None,
) -> SweepOutcome:
    """Run trials until the study holds `n_trials` finished ones (default: the config's budget).

    Failed trials are recorded and the sweep goes on, up to `budget.max_failed_trials` in this
    invocation; Ctrl-C closes the running trial as KILLED (MLflow) / FAIL (Optuna) and re-raises.
    """
    observer = observer or _Silent()
    target = n_trials or config.budget.trials
    timeout = timeout if timeout is not None else config.budget.timeout
    study = open_study(config)
    tracker = SweepTracker(config)
    fail_orphaned_trials(study)
    tracker.open_sweep()
    tracker.close_stale_children()

    def finished() -> int:
        return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))

    outcome = SweepOutcome(target=target, finished_before=finished(), finished=finished())
    if outcome.finished >= target:
        outcome.already_done = True
        outcome.best = best_trial(study)
        tracker.summarise(count_states(study), _best_summary(study))
        tracker.close_sweep("FINISHED")
        return outcome

    observer.sweep_started(outcome.finished, target)
    work_dir = STORE / "trials" / config.name
    started = time.monotonic()
    failures = 0
    status = "FINISHED"
    try:
        while finished() < target:
            if timeout is not None and time.monotonic() - started >= timeout:
                outcome.timed_out = True
                break
            trial = study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            sampled = suggest(trial, config)
            params: TrialParams = trial_params(config, sampled)
            run_id = tracker.start_trial(trial.number, params, sampled)
            trial.set_user_attr("mlflow_run_id", run_id)
            observer.trial_started(trial.number, sampled)
            callbacks = TrialCallbacks(
                on_step=observer.trial_step,
                on_log=lambda metrics, step, run_id=run_id: tracker.log_metrics(run_id, metrics, step),
                report=lambda value, step, trial=trial: _report(trial, value, step),
            )
            try:
                result = runner.run(params, work_dir / f"trial-{trial.number}", callbacks)
            except KeyboardInterrupt:
                tracker.kill_trial(run_id, "interrupted (SIGINT/SIGTERM)")
                study.tell(trial, state=TrialState.FAIL)
                raise
            state = _OPTUNA_STATE[result.status]
            # MLflow first: once the adapter is an artifact, a kill before `tell` loses no result.
            adapter_uri = tracker.end_trial(run_id, result, state.name)
            if adapter_uri:
                trial.set_user_attr("adapter_uri", adapter_uri)
            if result.error:
                trial.set_user_attr("error", result.error[:1000])
            if state == TrialState.COMPLETE:
                study.tell(trial, result.objective)
            else:
                study.tell(trial, state=state)
            outcome.ran.append(trial.number)
            observer.trial_finished(trial.number, sampled, result)
            tracker.summarise(count_states(study), _best_summary(study))
            if result.status == TrialStatus.FAILED:
                failures += 1
                limit = config.budget.max_failed_trials
                if limit is not None and failures >= limit:
                    status = "FAILED"
                    raise TooManyFailures(
                        f"{failures} trials failed in this run (budget.max_failed_trials = {limit}); "
                        f"last error: {result.error}"
                    )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close_sweep(status)
    outcome.finished = finished()
    outcome.best = best_trial(study)
    return outcome
