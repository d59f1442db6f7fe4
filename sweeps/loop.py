"""The one sweep loop: claim a trial, hand it to an executor, record how it ended. Written once.

Every backend (this process, worker processes, Ray actors, packs of LoRA trials on one base) is an
`Executor`; the loop around them is this one, so every guarantee holds everywhere:

- `--trials N` means N finished (complete or pruned) trials in the study; claiming is serialised
  across this host's processes, so parallel slots and concurrent `sweep run`s never overshoot;
- each trial is sampled with its own seed (the sweep's seed plus its number): reproducible, and
  no two processes replay each other's draws;
- a failed trial is recorded in both stores and the sweep goes on, up to `budget.max_failed_trials`
  in one invocation; an out-of-memory trial is retried once at half the micro-batch
  (`budget.oom_retry`); a trial whose process died is retried with the same parameters
  (`budget.max_retries`); trials of a process that died earlier (kill -9) are closed on start;
- an interrupt closes every running trial as KILLED (MLflow) / FAIL (Optuna) and re-raises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from core.config import SweepConfig
from core.store import Store
from core.trial import TrialResult, TrialStatus
from sweeps.executors.base import Executor, Finished, Lost, OnStep, TrialJob
from sweeps.space import suggest, trial_params
from sweeps.study import (
    FINISHED_STATES,
    best_trial,
    count_states,
    enqueue_retry,
    fail_orphaned_trials,
    finished_count,
    grid_size,
    make_sampler,
    open_study,
)
from sweeps.tracking import SweepTracker

_IDLE_POLL_S = 1.0


class SweepObserver(Protocol):
    """What a front end (the CLI's live view) is told while a sweep runs."""

    def sweep_started(self, done: int, target: int) -> None: ...
    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...
    def trial_step(self, number: int, step: int, total: int) -> None: ...
    def trial_finished(self, number: int, params: dict[str, Any], result: TrialResult) -> None: ...


class Silent:
    """An observer that ignores everything (library use, tests)."""

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


def sweep_target(config: SweepConfig, n_trials: int | None) -> int:
    """Finished trials to reach: --trials, else the budget; never more than a grid has points."""
    target = n_trials or config.budget.trials
    points = grid_size(config)
    return target if points is None else min(target, points)


def best_summary(study: optuna.Study) -> dict[str, Any] | None:
    """The best trial as plain data, for the parent run's summary."""
    best = best_trial(study)
    if best is None:
        return None
    return {"number": best.number, "value": best.values[0], "params": best.params}


@contextlib.contextmanager
def _interrupts_held():
    """Hold SIGINT / SIGTERM until the block is done, then act on them as the process would have.

    Claiming a trial writes several records (the Optuna trial, its owner, its MLflow run) and so
    does recording its end; an interrupt between two of them would leave a trial that no clean-up
    recognises as this process's. Held for milliseconds, never across a trial.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda number, frame: received.append(number))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                raise KeyboardInterrupt


@dataclass
class _Running:
    job: TrialJob
    sampled: dict[str, Any]
    retries: int
    overrides: dict[str, Any]


class _Sweep:
    """The state of one invocation: the study, the parent run, the running trials, the failure count."""

    def __init__(self, config: SweepConfig, store: Store, target: int, observer: SweepObserver):
        self.config = config
        self.store = store
        self.target = target
        self.observer = observer
        # Two `sweep run`s started at once in a fresh folder would both create MLflow's schema and
        # both open a parent run; one at a time, the second finds the first's.
        with store.locked("mlflow"):
            self.tracker = SweepTracker(config)
            self.tracker.open_sweep()
        self.study = open_study(config, store)
        self.running: dict[int, _Running] = {}
        self.failures = 0
        self.last_error: str | None = None
        self.restarts = 0

    # -- claiming -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _claim_lock(self):
        # Only the default journal file is local enough for a file lock; a shared RDB storage may
        # overshoot by a trial per extra host.
        if self.config.storage:
            yield
        else:
            with self.store.locked(f"claim-{self.config.name}"):
                yield

    def claim(self) -> TrialJob | None:
        """Ask the study for a new trial, or None when finished plus running trials reach the target."""
        with _interrupts_held():
            return self._claim()

    def _claim(self) -> TrialJob | None:
        with self._claim_lock():
            live = self.study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
            if len(live) >= self.target:
                return None
            # Seeded per trial number: reproducible, and distinct across processes and resumes
            # (numbers are unique), where one seeded sampler per process would replay its draws.
            if self.config.sampler.type != "grid":
                # A grid sampler instead keeps its one seed: it deals grid points by trial number
                # from an order shuffled with that seed, and a new order per trial would repeat points.
                number = len(self.study.get_trials(deepcopy=False))
                self.study.sampler = make_sampler(self.config, seed_offset=number)
            trial = self.study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
        try:
            sampled = suggest(trial, self.config)
            overrides = trial.user_attrs.get("overrides", {})
            params = trial_params(self.config, {**sampled, **overrides})
            run_id = self.tracker.start_trial(trial.number, params, sampled)
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("mlflow_run_id", run_id)
        job = TrialJob(
            number=trial.number,
            trial_id=trial._trial_id,
            params=params,
            run_id=run_id,
            work_dir=str(self.store.trials(self.config.name) / f"trial-{trial.number}"),
        )
        self.running[trial.number] = _Running(job, sampled, trial.user_attrs.get("retries", 0), overrides)
        self.observer.trial_started(trial.number, sampled)
        return job

    # -- recording ------------------------------------------------------------------------------

    def _trial(self, job: TrialJob) -> optuna.trial.Trial:
        return optuna.trial.Trial(self.study, job.trial_id)

    def finish(self, number: int, result: TrialResult) -> None:
        """Record a trial's end in MLflow (first: once the adapter is stored no result is lost) and Optuna."""
        with _interrupts_held():
            self._finish(number, result)

    def _finish(self, number: int, result: TrialResult) -> None:
        entry = self.running.pop(number)
        job = entry.job
        try:
            adapter_uri = self.tracker.end_trial(job.run_id, result)
        except (OSError, MlflowException) as exc:
            # The artifact store refused the adapter (a full disk, an unwritable folder): a trial
            # whose adapter is not stored cannot be promoted, so it fails like any other trial.
            error = f"could not store the trial's artifacts: {type(exc).__name__}: {exc}"
            result = result.model_copy(
                update={
                    "status": TrialStatus.FAILED,
                    "error": error,
                    "adapter_path": None,
                    "failure_kind": "error",
                }
            )
            self.tracker.fail_run(job.run_id, error)
            adapter_uri = None
        trial = self._trial(job)
        if adapter_uri:
            trial.set_user_attr("adapter_uri", adapter_uri)
        if result.error:
            trial.set_user_attr("error", result.error[:1000])
        state = TrialState[result.status.optuna_state]
        if state == TrialState.COMPLETE and self.config.objective.minimize_peak_memory:
            self.study.tell(number, [result.objective, result.peak_memory_mb or 0.0])
        elif state == TrialState.COMPLETE:
            self.study.tell(number, result.objective)
        else:
            self.study.tell(number, state=state)
        if result.status == TrialStatus.FAILED:
            self._count_failure(result.error)
            if self._oom_retry_due(entry, result):
                enqueue_retry(
                    self.study,
                    self.study.get_trials(deepcopy=False)[number],
                    {
                        "per_device_batch_size": job.params.per_device_batch_size // 2,
                        "gradient_accumulation_steps": job.params.gradient_accumulation_steps * 2,
                    },
                )
        self.observer.trial_finished(number, entry.sampled, result)
        self.summarise()

    def _oom_retry_due(self, entry: _Running, result: TrialResult) -> bool:
        return (
            result.failure_kind == "oom"
            and self.config.budget.oom_retry
            and entry.job.params.per_device_batch_size > 1
            and not entry.overrides
        )

    def lose(self, number: int, reason: str) -> None:
        """The process running a trial died: fail it in both stores and queue the same parameters again."""
        entry = self.running.pop(number)
        self.tracker.fail_run(entry.job.run_id, reason)
        self.study.tell(number, state=TrialState.FAIL)
        self._count_failure(reason)
        if entry.retries < self.config.budget.max_retries:
            enqueue_retry(self.study, self.study.get_trials(deepcopy=False)[number])
        self.observer.trial_finished(
            number, entry.sampled, TrialResult(status=TrialStatus.FAILED, error=reason)
        )
        self.summarise()

    def close_running(self, status: TrialStatus, reason: str) -> None:
        """Close every trial this process left running (an interrupt, a crash), in both stores.

        Read from the study, not from `running`: an interrupt may land between asking for a trial
        and handing it to the executor, or between a trial's two records.
        """
        host, pid = socket.gethostname(), os.getpid()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("host") != host or trial.user_attrs.get("pid") != pid:
                continue
            run_id = trial.user_attrs.get("mlflow_run_id") or self.tracker.run_of_trial(trial.number)
            if run_id is not None and status == TrialStatus.KILLED:
                self.tracker.kill_trial(run_id, reason)
            elif run_id is not None:
                self.tracker.fail_run(run_id, reason)
            self.study.tell(trial.number, state=TrialState.FAIL)
        self.running.clear()

    def close_orphans(self, reason: str) -> list[int]:
        """Fail the trials of dead processes (a kill -9 of an earlier run) and queue their retries."""
        orphans = fail_orphaned_trials(self.study)
        for trial in orphans:
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                self.tracker.fail_run(run_id, reason)
            if trial.user_attrs.get("retries", 0) < self.config.budget.max_retries:
                enqueue_retry(self.study, trial)
        return [trial.number for trial in orphans]

    def _count_failure(self, error: str | None) -> None:
        self.failures += 1
        self.last_error = error

    @property
    def over_failure_budget(self) -> bool:
        limit = self.config.budget.max_failed_trials
        return limit is not None and self.failures >= limit

    def too_many_failures(self) -> TooManyFailures:
        return TooManyFailures(
            f"{self.failures} trials failed in this run (budget.max_failed_trials = "
            f"{self.config.budget.max_failed_trials}); last error: {self.last_error}"
        )

    def summarise(self) -> None:
        self.tracker.summarise(
            count_states(self.study), best_summary(self.study), {"worker_restarts": self.restarts}
        )


def _close_quietly(runner: Executor | None) -> None:
    """Stop an executor on the way out of a failed sweep; its own error must not hide the first one."""
    if runner is not None:
        with contextlib.suppress(Exception):
            runner.close(interrupted=True)


def run_sweep(
    config: SweepConfig,
    store: Store,
    executor: Callable[[str, OnStep], Executor],
    n_trials: int | None = None,
    timeout: float | None = None,
    observer: SweepObserver | None = None,
) -> SweepOutcome:
    """Run trials on an executor until the study holds `n_trials` finished ones.

    `executor` builds the executor from the parent run's id and the progress sink; it is called
    only when there is work to do, so a finished sweep starts no process. Raises `TooManyFailures` after
    `budget.max_failed_trials` failed trials, and re-raises an interrupt once every running trial
    is closed.
    """
    observer = observer or Silent()
    timeout = timeout if timeout is not None else config.budget.timeout
    sweep = _Sweep(config, store, sweep_target(config, n_trials), observer)
    sweep.close_orphans("the process running this trial died")
    live = {t.user_attrs.get("mlflow_run_id") for t in sweep.study.get_trials(states=(TrialState.RUNNING,))}
    sweep.tracker.close_stale_children(keep=live)
    before = finished_count(sweep.study)
    outcome = SweepOutcome(target=sweep.target, finished_before=before, finished=before)
    if before >= sweep.target:
        outcome.already_done = True
        outcome.best = best_trial(sweep.study)
        sweep.summarise()
        sweep.tracker.close_sweep("FINISHED")
        return outcome
    observer.sweep_started(before, sweep.target)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = "FINISHED"
    runner: Executor | None = None
    try:
        runner = executor(sweep.tracker.parent_id, observer.trial_step)
        while True:
            outcome.timed_out = deadline is not None and time.monotonic() >= deadline
            claiming = not outcome.timed_out and not sweep.over_failure_budget
            while claiming and len(sweep.running) < runner.capacity:
                job = sweep.claim()
                if job is None:
                    break
                runner.submit(job)
            if not sweep.running:
                if not claiming or finished_count(sweep.study) >= sweep.target:
                    break
                # Every missing trial runs in another process; wait in case one of them fails.
                time.sleep(_IDLE_POLL_S)
                sweep.close_orphans("the process running this trial died")
                continue
            for event in runner.wait(timeout=_IDLE_POLL_S):
                if isinstance(event, Finished):
                    outcome.ran.append(event.number)
                    sweep.finish(event.number, event.result)
                elif isinstance(event, Lost):
                    outcome.ran.append(event.number)
                    sweep.restarts += 1
                    sweep.lose(event.number, event.reason)
        runner.close()
        if sweep.over_failure_budget:
            status = "FAILED"
            raise sweep.too_many_failures()
    except KeyboardInterrupt:
        status = "KILLED"
        _close_quietly(runner)
        sweep.close_running(TrialStatus.KILLED, "interrupted (SIGINT/SIGTERM)")
        raise
    except TooManyFailures:
        raise
    except BaseException as exc:
        # A crash of our own code (ExecutorCrashed) or anything unforeseen: nothing stays RUNNING.
        status = "FAILED"
        _close_quietly(runner)
        lines = str(exc).strip().splitlines()
        sweep.close_running(
            TrialStatus.FAILED, f"the sweep crashed: {lines[-1] if lines else type(exc).__name__}"
        )
        raise
    finally:
        sweep.summarise()
        sweep.tracker.close_sweep(status)
    outcome.finished = finished_count(sweep.study)
    outcome.timed_out = outcome.timed_out and outcome.finished < sweep.target
    outcome.best = best_trial(sweep.study)
    return outcome
