"""Trials in Ray actors, on this machine or a cluster.

Ray places the work (an actor per slot, with `ray.cpus_per_trial` / `ray.gpus_per_trial`, so Ray
pins each actor to its GPUs) and keeps actors alive between trials, so each keeps its base model
and tokenized data. Everything else (sampling, pruning through the sweep's Optuna pruner, retries,
the failure budget, records) is the one sweep loop's, as on every backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import SweepConfig
from core.store import Store
from sweeps.executors.base import Event, Executor, ExecutorCrashed, Finished, Lost, OnStep, TrialJob


class _TrialActor:
    """A Ray actor that runs trials on its own local executor (one at a time, or a pack)."""

    def __init__(self, config_path: str, store_root: str, project_dir: str, progress: Any):
        # Ray starts actors in its own folder; the tracking URI and the store are the project's.
        os.chdir(project_dir)
        from core.config import load_config
        from sweeps.executors.local import local_executor
        from sweeps.preflight import preflight, quiet_libraries

        quiet_libraries()
        config = load_config(config_path)
        store = Store(Path(store_root))
        self.inner = local_executor(
            config,
            store,
            preflight(config, store),
            lambda number, step, total: progress.put_nowait((number, step, total)),
        )

    def submit(self, job: dict[str, Any]) -> None:
        self.inner.submit(TrialJob.model_validate(job))

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            events = self.inner.wait(timeout)
        except ExecutorCrashed as exc:
            return {"crash": str(exc)}
        finished = [(e.number, e.result.model_dump(mode="json")) for e in events if isinstance(e, Finished)]
        return {"capacity": self.inner.capacity, "finished": finished}


@dataclass
class _Slot:
    actor: Any
    capacity: int = 1
    jobs: set[int] = field(default_factory=set)
    waiting: Any = None
    """The actor's outstanding `wait` call, if any."""


def ray_slots(config: SweepConfig, resources: dict[str, float]) -> int:
    """Trials at once: `ray.max_concurrent_trials`, else as many as the cluster's CPUs and GPUs hold."""
    settings = config.ray
    if settings.max_concurrent_trials is not None:
        return settings.max_concurrent_trials
    slots = int(resources.get("CPU", 1) // max(settings.cpus_per_trial, 1e-9))
    if settings.gpus_per_trial:
        slots = min(slots, int(resources.get("GPU", 0) // settings.gpus_per_trial))
    return max(slots, 1)


class RayActors(Executor):
    """Ray actors, `ray_slots` of them; a dead actor's trials are reported lost and a fresh actor replaces it."""

    def __init__(self, config: SweepConfig, store: Store, address: str | None, on_step: OnStep):
        import ray
        from ray.util.queue import Queue

        self.ray = ray
        settings = config.ray
        address = address or settings.address
        ray.init(
            address=address,
            num_cpus=None if address else settings.num_cpus,
            num_gpus=None if address else settings.num_gpus,
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=False,
        )
        self.config = config
        self.store = store
        self.on_step = on_step
        # The queue is a small actor of its own; it must not take a CPU a trial needs.
        self.progress = Queue(actor_options={"num_cpus": 0})
        self.actor_class = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial)(
            _TrialActor
        )
        self.slots = [self._start() for _ in range(ray_slots(config, ray.cluster_resources()))]

    def _start(self) -> _Slot:
        return _Slot(
            self.actor_class.remote(
                str(Path(self.config.source).resolve()), str(self.store.root), str(Path.cwd()), self.progress
            )
        )

    @property
    def capacity(self) -> int:
        return sum(slot.capacity for slot in self.slots)

    def submit(self, job: TrialJob) -> None:
        slot = min(self.slots, key=lambda s: len(s.jobs) - s.capacity)
        slot.jobs.add(job.number)
        slot.actor.submit.remote(job.model_dump(mode="json"))

    def _drain_progress(self) -> None:
        size = self.progress.qsize()
        if size:
            for number, step, total in self.progress.get_nowait_batch(size):
                self.on_step(number, step, total)

    def wait(self, timeout: float) -> list[Event]:
        from core.trial import TrialResult

        for slot in self.slots:
            if slot.jobs and slot.waiting is None:
                slot.waiting = slot.actor.wait.remote(timeout)
        refs = [slot.waiting for slot in self.slots if slot.waiting is not None]
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout) if refs else ([], [])
        self._drain_progress()
        ended: list[Event] = []
        for position, slot in enumerate(self.slots):
            if slot.waiting is None or slot.waiting not in ready:
                continue
            ref, slot.waiting = slot.waiting, None
            try:
                reply = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                reason = f"Ray actor died: {str(exc).strip().splitlines()[0]}"
                ended += [Lost(number, reason) for number in sorted(slot.jobs)]
                self.slots[position] = self._start()
                continue
            if "crash" in reply:
                raise ExecutorCrashed(reply["crash"])
            slot.capacity = reply["capacity"]
            for number, result in reply["finished"]:
                slot.jobs.discard(number)
                ended.append(Finished(number, TrialResult.model_validate(result)))
        return ended

    def close(self, interrupted: bool = False) -> None:
        for slot in self.slots:
            self.ray.kill(slot.actor)
        self.slots.clear()
        self.ray.shutdown()
