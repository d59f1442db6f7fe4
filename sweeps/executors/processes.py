"""Parallel trials on one machine: long-lived worker processes, each pinned to its GPU.

A worker keeps its base model and tokenized data between trials. The `sweep run` process (the
loop) sends each worker its jobs and hears back progress and results; when a worker dies (its
exit code), its trials are reported lost and a fresh worker takes its place. A worker whose
orchestrator died (kill -9) notices within a second, closes its trial and stops.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from core.config import SweepConfig
from core.store import Store
from core.trial import TrialStatus
from sweeps.executors.base import Event, Executor, ExecutorCrashed, Finished, Lost, OnStep, TrialJob
from sweeps.executors.devices import pin_to, slot_device, visible_gpus

_WATCH_S = 1.0
_STOP = None
_START = "start"
"""Sent once the sweep's study and MLflow run exist: a worker opens them only then."""


def _watch_parent(parent_pid: int, orphaned: threading.Event) -> None:
    """SIGTERM this worker once its orchestrator is gone, so it starts no new trial on its own."""
    while True:
        time.sleep(_WATCH_S)
        if os.getppid() != parent_pid:
            orphaned.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return


def worker_main(
    slot: int, config_path: str, store_root: str, device: str | None, inbox: Any, events: Any, parent_pid: int
) -> None:
    """A worker process: run the jobs its inbox sends on its own executor (one trial, or a pack)."""
    pin_to(device)
    from core.config import load_config
    from sweeps.executors.local import local_executor
    from sweeps.preflight import preflight, quiet_libraries, stop_on_signals

    stop_on_signals()
    quiet_libraries()
    orphaned = threading.Event()
    threading.Thread(target=_watch_parent, args=(parent_pid, orphaned), daemon=True).start()
    running: dict[int, TrialJob] = {}
    inner = None
    try:
        store = Store(Path(store_root))
        config = load_config(config_path)
        runner = preflight(config, store)
        # `sweep run` starts its workers before its own set-up, so their imports and preflight
        # overlap it; the trials' stores (the study, MLflow) are opened once the pool says they exist.
        if inbox.get() is _STOP:
            return
        inner = local_executor(
            config, store, runner, lambda number, step, total: events.put(("step", number, step, total))
        )
        events.put(("capacity", slot, inner.capacity))
        while True:
            while len(running) < inner.capacity:
                try:
                    # Block only while idle: a busy worker goes back to its trials at once.
                    message = inbox.get(timeout=_WATCH_S if not running else 0.01)
                except queue.Empty:
                    break
                if message is _STOP:
                    return
                job = TrialJob.model_validate(message)
                running[job.number] = job
                inner.submit(job)
            if not running:
                continue
            capacity = inner.capacity
            for event in inner.wait(timeout=_WATCH_S):
                running.pop(event.number, None)
                events.put(("finished", event.number, event.result.model_dump(mode="json")))
            if inner.capacity != capacity:
                events.put(("capacity", slot, inner.capacity))
    except KeyboardInterrupt:
        if orphaned.is_set() and inner is not None:
            # Nobody is left to record these trials: close them here rather than leave them RUNNING.
            for job in running.values():
                inner.host.tracker.kill_trial(job.run_id, "the sweep's orchestrator died")
                inner.host.study.tell(job.number, state=TrialState[TrialStatus.KILLED.optuna_state])
        if orphaned.is_set():
            # No one reads `events` any more: a normal exit would wait on the queue's feeder
            # thread, for ever once the pipe is full. Both stores are written already.
            os._exit(130)
        raise SystemExit(130) from None
    except BaseException:  # noqa: BLE001 - whatever stops a worker, its orchestrator hears why
        events.put(("crash", traceback.format_exc()))
        raise SystemExit(1) from None


@dataclass
class _Worker:
    slot: int
    device: str | None
    inbox: Any
    process: Any
    capacity: int = 1
    """Trials the worker runs at once (its pack); it says so once its runner is ready."""
    jobs: set[int] = field(default_factory=set)


class WorkerPool(Executor):
    """`n_workers` worker processes; worker i is pinned to GPU i // `workers.trials_per_gpu`.

    Each worker runs its own local executor, so with packing on, every GPU holds one pack.
    A pool built with `on_step=None` starts its processes at once (imports, preflight) but lets
    them open the sweep's stores only when `attach` gives it the progress sink: `sweep run` starts
    its workers before it has made the study and the MLflow run.
    """

    def __init__(self, config: SweepConfig, store: Store, n_workers: int, on_step: OnStep | None):
        self.config = config
        self.store = store
        self.on_step = on_step
        self.context = mp.get_context("spawn")
        self.events = self.context.Queue()
        gpus = visible_gpus()
        self.workers = [
            self._start(slot, slot_device(slot, gpus, config.workers.trials_per_gpu))
            for slot in range(n_workers)
        ]

    def _start(self, slot: int, device: str | None) -> _Worker:
        inbox = self.context.Queue()
        args = (
            slot,
            str(Path(self.config.source).resolve()),
            str(self.store.root),
            device,
            inbox,
            self.events,
            os.getpid(),
        )
        process = self.context.Process(
            target=worker_main, args=args, name=f"sweep-worker-{slot}", daemon=False
        )
        process.start()
        if self.on_step is not None:
            inbox.put(_START)
        return _Worker(slot, device, inbox, process)

    def attach(self, on_step: OnStep) -> WorkerPool:
        """The sweep's stores exist now: let the workers open them; progress goes to `on_step`."""
        if self.on_step is None:
            for worker in self.workers:
                worker.inbox.put(_START)
        self.on_step = on_step
        return self

    @property
    def capacity(self) -> int:
        # Every worker takes at most as many trials as the smallest pack: a worker whose auto pack
        # grew first would otherwise take every trial left at the end of a sweep, its GPU running
        # a pack of 8 while the other stands idle (measured on 2 GPUs: 0.96x of one GPU).
        return len(self.workers) * self._share()

    def _share(self) -> int:
        return min(worker.capacity for worker in self.workers)

    def submit(self, job: TrialJob) -> None:
        worker = min(self.workers, key=lambda w: (len(w.jobs) >= self._share(), len(w.jobs) - w.capacity))
        worker.jobs.add(job.number)
        worker.inbox.put(job.model_dump(mode="json"))

    def wait(self, timeout: float) -> list[Event]:
        from core.trial import TrialResult

        ended: list[Event] = []
        block = timeout
        while True:
            try:
                message = self.events.get(timeout=block) if block else self.events.get_nowait()
            except queue.Empty:
                break
            block = 0
            kind, *rest = message
            if kind == "step":
                self.on_step(*rest)
            elif kind == "capacity":
                slot, capacity = rest
                next(w for w in self.workers if w.slot == slot).capacity = capacity
            elif kind == "finished":
                number, result = rest
                for worker in self.workers:
                    worker.jobs.discard(number)
                ended.append(Finished(number, TrialResult.model_validate(result)))
            else:
                raise ExecutorCrashed(rest[0])
        for position, worker in enumerate(self.workers):
            code = worker.process.exitcode
            if code is None:
                continue
            ended += [
                Lost(number, f"worker process died (exit code {code})") for number in sorted(worker.jobs)
            ]
            self.workers[position] = self._start(worker.slot, worker.device)
        return ended

    def close(self, interrupted: bool = False) -> None:
        for worker in self.workers:
            if not worker.process.is_alive():
                continue
            if interrupted:
                os.kill(worker.process.pid, signal.SIGTERM)
            else:
                worker.inbox.put(_STOP)
        for worker in self.workers:
            worker.process.join(timeout=60)
            if worker.process.is_alive():
                worker.process.kill()
