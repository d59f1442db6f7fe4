"""Parallel trials on one machine: long-lived worker processes over one shared study.

Each worker is a process pinned to its GPU (CUDA_VISIBLE_DEVICES) that keeps its base model and
tokenized data between trials and runs the same `TrialLoop` as the single-process path. The
orchestrator (the `sweep run` process) owns the parent MLflow run, shows progress, notices a
worker that died (its exit code), fails and retries that worker's trial, and restarts it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import SweepConfig, load_config
from core.trial import TrialResult, TrialStatus
from sweeps.study import (
    SweepObserver,
    SweepOutcome,
    _Silent,
    best_summary,
    best_trial,
    close_orphans,
    count_states,
    finished_count,
    open_study,
    start_sweep,
    too_many_failures,
)
from sweeps.tracking import SweepTracker

_POLL_S = 0.2


def visible_gpus() -> list[str]:
    """GPU ids this process may use, honouring an existing CUDA_VISIBLE_DEVICES."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def default_worker_count(config: SweepConfig) -> int:
    """`workers.count`, else one per visible GPU times `trials_per_gpu`, else 1 on CPU."""
    if config.workers.count is not None:
        return config.workers.count
    gpus = visible_gpus()
    return len(gpus) * config.workers.trials_per_gpu if gpus else 1


def _device_of(index: int, gpus: list[str], trials_per_gpu: int) -> str | None:
    return gpus[(index // trials_per_gpu) % len(gpus)] if gpus else None


class _Forward:
    """A `SweepObserver` inside a worker that sends every event to the orchestrator's queue."""

    def __init__(self, events: Any):
        self.events = events

    def sweep_started(self, done: int, target: int) -> None:
        pass

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        self.events.put(("started", number, params))

    def trial_step(self, number: int, step: int, total: int) -> None:
        self.events.put(("step", number, step, total))

    def trial_finished(self, number: int, params: dict[str, Any], result: TrialResult) -> None:
        self.events.put(("finished", number, params, result.model_dump(mode="json")))


def worker_main(
    index: int,
    config_path: str,
    parent_id: str,
    target: int,
    deadline: float | None,
    device: str | None,
    events,
    stop,
) -> None:
    """Entry point of a worker process: claim and run trials until none are needed."""
    if device is not None:
        # Before torch is imported, so this process sees exactly its GPU as cuda:0.
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    from sweeps.preflight import preflight, quiet_libraries, stop_on_signals
    from sweeps.study import TrialLoop

    stop_on_signals()
    quiet_libraries()
    config = load_config(config_path)
    runner = preflight(config)
    tracker = SweepTracker(config)
    tracker.attach(parent_id)
    loop = TrialLoop(config, runner, open_study(config, worker=index), tracker, _Forward(events))
    try:
        while not stop.is_set() and (deadline is None or time.time() < deadline):
            trial = loop.claim(target)
            if trial is not None:
                loop.run(trial)
            elif finished_count(loop.study) >= target:
                return
            else:
                # Every missing trial is running elsewhere; wait in case one of them fails.
                time.sleep(1.0)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


@dataclass
class _Worker:
    index: int
    device: str | None
    process: mp.Process


def run_workers(
    config: SweepConfig,
    n_workers: int,
    n_trials: int | None = None,
    timeout: float | None = None,
    observer: SweepObserver | None = None,
) -> SweepOutcome:
    """Run the sweep with `n_workers` worker processes until the study holds `n_trials` finished trials."""
    observer = observer or _Silent()
    timeout = timeout if timeout is not None else config.budget.timeout
    started = start_sweep(config, n_trials, observer)
    study, tracker, outcome = started.study, started.tracker, started.outcome
    if outcome.already_done:
        return outcome
    target = outcome.target
    context = mp.get_context("spawn")
    events, stop = context.Queue(), context.Event()
    deadline = time.time() + timeout if timeout is not None else None
    gpus = visible_gpus()

    def start(index: int) -> _Worker:
        device = _device_of(index, gpus, config.workers.trials_per_gpu)
        args = (
            index,
            str(Path(config.source).resolve()),
            tracker.parent_id,
            target,
            deadline,
            device,
            events,
            stop,
        )
        process = context.Process(target=worker_main, args=args, name=f"sweep-worker-{index}", daemon=False)
        process.start()
        return _Worker(index, device, process)

    workers = [start(i) for i in range(n_workers)]
    failures, last_error, status, restarts = 0, None, "FINISHED", 0
    try:
        while any(w.process.is_alive() for w in workers) or not events.empty():
            try:
                event = events.get(timeout=_POLL_S)
            except queue.Empty:
                event = None
            if event is not None:
                kind, number, *rest = event
                if kind == "started":
                    observer.trial_started(number, rest[0])
                elif kind == "step":
                    observer.trial_step(number, *rest)
                else:
                    result = TrialResult.model_validate(rest[1])
                    outcome.ran.append(number)
                    observer.trial_finished(number, rest[0], result)
                    if result.status == TrialStatus.FAILED:
                        failures, last_error = failures + 1, result.error
                        limit = config.budget.max_failed_trials
                        if limit is not None and failures >= limit:
                            stop.set()
                            status = "FAILED"
            for position, worker in enumerate(workers):
                code = worker.process.exitcode
                if code in (None, 0, 130) or stop.is_set():
                    continue
                # A worker died mid-trial (SIGKILL, a segfault, the OOM killer): its trial is
                # orphaned. Fail it in both stores, queue its retry, and start a fresh worker.
                orphans = close_orphans(config, study, tracker, f"worker process died (exit code {code})")
                for number in orphans:
                    failures, last_error = failures + 1, f"worker died (exit code {code})"
                    observer.trial_finished(
                        number, {}, TrialResult(status=TrialStatus.FAILED, error=last_error)
                    )
                workers[position] = start(worker.index)
                restarts += 1
    except KeyboardInterrupt:
        status = "KILLED"
        stop.set()
        for worker in workers:
            if worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)
        for worker in workers:
            worker.process.join(timeout=60)
        # Workers close their own trials; whatever a worker could not (killed before it recorded
        # the run's id) is closed here, now that no worker is left running.
        close_orphans(config, study, tracker, "interrupted (SIGINT/SIGTERM)")
        tracker.close_stale_children(reason="interrupted (SIGINT/SIGTERM)")
        raise
    finally:
        tracker.summarise(count_states(study), best_summary(study), {"worker_restarts": restarts})
        tracker.close_sweep(status)
    if status == "FAILED":
        raise too_many_failures(config, failures, last_error)
    outcome.finished = finished_count(study)
    outcome.timed_out = deadline is not None and time.time() >= deadline and outcome.finished < target
    outcome.best = best_trial(study)
    return outcome
