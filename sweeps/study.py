"""The Optuna study behind a sweep: storage, sampler, pruner, resume, and the ask/run/tell loop.

`--trials N` means N *finished* trials (complete or pruned) in the study. Re-running the same
command after a stop counts what is already there and runs only what is missing.
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from core.config import SweepConfig
from core.trial import TrialParams, TrialResult, TrialStatus
from runners.sft import TrialCallbacks, TrialRunner
from sweeps.space import grid, suggest, trial_params
from sweeps.tracking import SweepTracker

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


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler that does not call `study.stop()` when the grid is done.

    `stop()` only works inside `study.optimize`; under ask/tell it raises in the middle of `tell`,
    before the last trial's result is stored. The loop ends on its own once the grid is covered,
    because `run_sweep` caps the target at the grid's size.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


def grid_size(config: SweepConfig) -> int | None:
    """Points in the grid of a grid-sampled sweep, else None."""
    if config.sampler.type != "grid":
        return None
    return math.prod(len(values) for values in grid(config).values())


def make_sampler(config: SweepConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler, its seed shifted by `seed_offset` (see `open_study`)."""
    s = config.sampler
    seed = None if s.seed is None else s.seed + seed_offset
    startup = {} if s.n_startup_trials is None else {"n_startup_trials": s.n_startup_trials}
    if s.type == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **startup)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.type == "grid":
        return _AskTellGridSampler(grid(config), seed=seed)
    if s.type == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if s.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    return optuna.samplers.GPSampler(seed=seed, **startup)


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


def open_study(config: SweepConfig, worker: int = 0) -> optuna.Study:
    """Create the sweep's study, or load it when it exists (the study name is the sweep name)."""
    study = optuna.create_study(
        study_name=config.name,
        storage=open_storage(config),
        pruner=make_pruner(config),
        directions=config.directions,
        load_if_exists=True,
    )
    # A seeded sampler replays the same random draws in every process started from that seed: a
    # resumed run would retry the first trials' parameters and parallel workers would sample
    # alike. Offsetting by the trials already there and the worker keeps runs reproducible yet distinct.
    study.sampler = make_sampler(config, seed_offset=len(study.trials) + 7919 * worker)
    return study


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
    """The best complete trial, or None before the first one finishes.

    In a multi-objective study: the Pareto-optimal trial with the best primary objective.
    """
    if len(study.directions) > 1:
        front = study.best_trials
        if not front:
            return None
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
        return min(front, key=lambda trial: sign * trial.values[0])
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


def fail_orphaned_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Fail RUNNING trials whose process died (a kill -9, a crash); returns them as they were.

    Journal storage has no heartbeat, so ownership is checked through the pid each trial records;
    trials of a live process on this host, or of another host, are left alone.
    """
    orphaned = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if not _owner_alive(t)]
    for trial in orphaned:
        study.tell(trial.number, state=TrialState.FAIL)
    return orphaned


def enqueue_retry(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, overrides: dict[str, Any] | None = None
) -> None:
    """Queue the same parameters again as a new trial, remembering which trial it retries."""
    attrs = {
        "retry_of": trial.number,
        "retries": trial.user_attrs.get("retries", 0) + 1,
        "overrides": {**trial.user_attrs.get("overrides", {}), **(overrides or {})},
    }
    study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)


class SweepObserver(Protocol):
    """What a front end (the CLI's live view) is told while a sweep runs."""

    def sweep_started(self, done: int, target: int) -> None: ...
    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...
    def trial_step(self, number: int, step: int, total: int) -> None: ...
    def trial_finished(self, number: int, params: dict[str, Any], result: TrialResult) -> None: ...


class _Silent:
    def sweep_started(self, done: int, target: int) -> None:
        pass

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        pass

    def trial_step(self, number: int, step: int, total: int) -> None:
        pass

    def trial_finished(self, number: int, params: dict[str, Any], result: TrialResult) -> None:
        pass


class TooManyFailures(RuntimeError):
    """The sweep reached `budget.max_failed_trials` in this invocation."""


def too_many_failures(config: SweepConfig, failures: int, last_error: str | None) -> TooManyFailures:
    return TooManyFailures(
        f"{failures} trials failed in this run (budget.max_failed_trials = {config.budget.max_failed_trials}); "
        f"last error: {last_error}"
    )


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


def best_summary(study: optuna.Study) -> dict[str, Any] | None:
    """The best trial as plain data, for the parent run's summary."""
    best = best_trial(study)
    if best is None:
        return None
    return {"number": best.number, "value": best.values[0], "params": best.params}


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


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


@contextmanager
def claim_lock(config: SweepConfig) -> Iterator[None]:
    """Serialise "is another trial needed? then ask" across this host's workers.

    Without it two workers could both see one missing trial and both start it. Only the default
    journal file is local enough for a file lock; a shared RDB storage may overshoot by a trial
    per extra host.
    """
    if config.storage:
        yield
        return
    path = default_storage_path(config).with_suffix(".lock").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def close_orphans(config: SweepConfig, study: optuna.Study, tracker: SweepTracker, reason: str) -> list[int]:
    """Fail the trials of dead processes in both stores and queue their retries.

    A trial is retried (same parameters, as a new trial) up to `budget.max_retries` times.
    """
    orphans = fail_orphaned_trials(study)
    for trial in orphans:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            tracker.fail_run(run_id, reason)
        if trial.user_attrs.get("retries", 0) < config.budget.max_retries:
            enqueue_retry(study, trial)
    return [trial.number for trial in orphans]


class TrialLoop:
    """One worker's part of a sweep: claim a trial, run it, record it in MLflow and Optuna."""

    def __init__(
        self,
        config: SweepConfig,
        runner: TrialRunner,
        study: optuna.Study,
        tracker: SweepTracker,
        observer: SweepObserver,
    ):
        self.config = config
        self.runner = runner
        self.study = study
        self.tracker = tracker
        self.observer = observer
        self.work_dir = STORE / "trials" / config.name

    def claim(self, target: int) -> optuna.Trial | None:
        """A new trial to run, or None when finished plus running trials already reach `target`."""
        with claim_lock(self.config):
            trials = self.study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
            if len(trials) >= target:
                return None
            trial = self.study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            return trial

    def run(self, trial: optuna.Trial) -> TrialResult:
        """Run a claimed trial to its end; Ctrl-C closes it as KILLED / FAIL and re-raises."""
        run_id = None
        try:
            sampled = suggest(trial, self.config)
            overrides = trial.user_attrs.get("overrides", {})
            params: TrialParams = trial_params(self.config, {**sampled, **overrides})
            run_id = self.tracker.start_trial(trial.number, params, sampled)
            trial.set_user_attr("mlflow_run_id", run_id)
            self.observer.trial_started(trial.number, sampled)
            callbacks = TrialCallbacks(
                on_step=lambda step, total: self.observer.trial_step(trial.number, step, total),
                on_log=lambda metrics, step: self.tracker.log_metrics(run_id, metrics, step),
                report=lambda value, step: _report(trial, value, step),
            )
            result = self.runner.run(params, self.work_dir / f"trial-{trial.number}", callbacks, trial.number)
        except KeyboardInterrupt:
            # Wherever the interrupt lands, from sampling to the last step, both stores close the trial.
            if run_id is not None:
                self.tracker.kill_trial(run_id, "interrupted (SIGINT/SIGTERM)")
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        self._record(trial, run_id, result, params)
        self.observer.trial_finished(trial.number, sampled, result)
        return result

    def _record(self, trial: optuna.Trial, run_id: str, result: TrialResult, params: TrialParams) -> None:
        state = _OPTUNA_STATE[result.status]
        # MLflow first: once the adapter is an artifact, a kill before `tell` loses no result.
        adapter_uri = self.tracker.end_trial(run_id, result, state.name)
        if adapter_uri:
            trial.set_user_attr("adapter_uri", adapter_uri)
        if result.error:
            trial.set_user_attr("error", result.error[:1000])
        if state == TrialState.COMPLETE and self.config.objective.minimize_peak_memory:
            self.study.tell(trial, [result.objective, result.peak_memory_mb or 0.0])
        elif state == TrialState.COMPLETE:
            self.study.tell(trial, result.objective)
        else:
            self.study.tell(trial, state=state)
        if result.failure_kind == "oom" and self.config.budget.oom_retry and params.per_device_batch_size > 1:
            frozen = self.study.get_trials(deepcopy=False)[trial.number]
            if "overrides" not in frozen.user_attrs or not frozen.user_attrs["overrides"]:
                enqueue_retry(
                    self.study,
                    frozen,
                    {
                        "per_device_batch_size": params.per_device_batch_size // 2,
                        "gradient_accumulation_steps": params.gradient_accumulation_steps * 2,
                    },
                )
        self.tracker.summarise(count_states(self.study), best_summary(self.study))


def sweep_target(config: SweepConfig, n_trials: int | None) -> int:
    """Finished trials to reach: --trials, else the budget; never more than a grid has points."""
    target = n_trials or config.budget.trials
    points = grid_size(config)
    return target if points is None else min(target, points)


@dataclass
class SweepStart:
    """A sweep opened for one invocation: its study, its tracker (parent run open) and what to reach."""

    study: optuna.Study
    tracker: SweepTracker
    outcome: SweepOutcome


def start_sweep(config: SweepConfig, n_trials: int | None, observer: SweepObserver) -> SweepStart:
    """Open the study and (re)open the parent run; close what a killed earlier invocation left running.

    When the study already holds the target, the parent run is closed again and the outcome says
    `already_done`: every backend answers a finished sweep the same way. Otherwise the observer
    is told where the sweep starts from.
    """
    target = sweep_target(config, n_trials)
    study = open_study(config)
    tracker = SweepTracker(config)
    tracker.open_sweep()
    close_orphans(config, study, tracker, "the process running this trial died")
    tracker.close_stale_children()
    before = finished_count(study)
    outcome = SweepOutcome(target=target, finished_before=before, finished=before)
    if before >= target:
        outcome.already_done = True
        outcome.best = best_trial(study)
        tracker.summarise(count_states(study), best_summary(study))
        tracker.close_sweep("FINISHED")
    else:
        observer.sweep_started(before, target)
    return SweepStart(study, tracker, outcome)


def run_sweep(
    config: SweepConfig,
    runner: TrialRunner,
    n_trials: int | None = None,
    timeout: float | None = None,
    observer: SweepObserver | None = None,
) -> SweepOutcome:
    """Run trials in this process until the study holds `n_trials` finished ones.

    Failed trials are recorded and the sweep goes on, up to `budget.max_failed_trials` in this
    invocation; Ctrl-C closes the running trial as KILLED (MLflow) / FAIL (Optuna) and re-raises.
    """
    observer = observer or _Silent()
    timeout = timeout if timeout is not None else config.budget.timeout
    started = start_sweep(config, n_trials, observer)
    study, tracker, outcome = started.study, started.tracker, started.outcome
    if outcome.already_done:
        return outcome
    target = outcome.target
    loop = TrialLoop(config, runner, study, tracker, observer)
    clock_start = time.monotonic()
    failures = 0
    status = "FINISHED"
    try:
        while True:
            if timeout is not None and time.monotonic() - clock_start >= timeout:
                outcome.timed_out = True
                break
            trial = loop.claim(target)
            if trial is None:
                break
            result = loop.run(trial)
            outcome.ran.append(trial.number)
            if result.status == TrialStatus.FAILED:
                failures += 1
                limit = config.budget.max_failed_trials
                if limit is not None and failures >= limit:
                    status = "FAILED"
                    raise too_many_failures(config, failures, result.error)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close_sweep(status)
    outcome.finished = finished_count(study)
    outcome.best = best_trial(study)
    return outcome
