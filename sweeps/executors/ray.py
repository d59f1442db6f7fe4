"""Trials in Ray actors, on this machine or a cluster.

Ray places the work (an actor per slot, with `ray.cpus_per_trial` / `ray.gpus_per_trial`, so Ray
pins each actor to its GPUs) and keeps actors alive between trials, so each keeps its base model
and tokenized data. Everything else (sampling, pruning through the sweep's Optuna pruner, retries,
the failure budget, records) is the one sweep loop's, as on every backend.

Gang trials (`workers.gpus_per_trial: G` > 1) are the local backend's gangs, one to an actor: the
actor reserves G GPUs (`ray.gpus_per_trial` follows G) and runs a `GangExecutor` over the GPUs Ray
gave it, so starting the gang's G rank processes (kept between its trials), stopping them and
telling a failed trial from a lost one is that executor's alone. Ray places each actor on one node, so a gang never spans hosts:
its ranks meet at MASTER_ADDR 127.0.0.1, as NCCL and gloo over localhost need, and a node with fewer
than G GPUs never holds a gang. On a cluster without GPUs (with `distributed.allow_cpu`) an actor
takes no GPU and runs its gang as G CPU processes over gloo. Not Ray Train's TorchTrainer: it runs
each trial as a training job of its own, with rank actors, failure handling and restarts of its
own, a second idea of a lost trial beside the sweep loop's, and the ranks' code would move into
its training function. The ranks die with their actor: they are children of the actor's main
thread, where a non-threaded actor runs its methods, and ask for SIGKILL when it ends.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import SweepConfig
from core.store import Store
from sweeps.executors.base import Event, Executor, ExecutorCrashed, Finished, Lost, OnStep, TrialJob


class _TrialActor:
    """A Ray actor that runs trials on its own executor: one at a time, a pack, or its gang's."""

    def __init__(self, config_path: str, store_root: str, project_dir: str, progress: Any):
        # Ray starts actors in its own folder; the tracking URI and the store are the project's.
        os.chdir(project_dir)
        from core.config import load_config
        from sweeps.executors.local import local_executor
        from sweeps.preflight import preflight, quiet_libraries

        quiet_libraries()
        config = load_config(config_path)
        store = Store(Path(store_root))

        def on_step(number: int, step: int, total: int) -> None:
            progress.put_nowait((number, step, total))

        if config.workers.gpus_per_trial > 1:
            import ray

            from sweeps.executors.gang import GangExecutor

            gpus = [str(gpu) for gpu in ray.get_gpu_ids()]
            # Ray leaves CUDA_VISIBLE_DEVICES alone in an actor without GPUs: a CPU gang's ranks
            # would see the node's GPUs. Set first, so preflight checks the gang Ray gave.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            preflight(config, store)
            self.inner: Executor = GangExecutor(config, store, [gpus], on_step)
        else:
            self.inner = local_executor(config, store, preflight(config, store), on_step)

    def submit(self, job: dict[str, Any]) -> None:
        self.inner.submit(TrialJob.model_validate(job))

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            events = self.inner.wait(timeout)
        except ExecutorCrashed as exc:
            return {"crash": str(exc)}
        finished = [(e.number, e.result.model_dump(mode="json")) for e in events if isinstance(e, Finished)]
        # A gang whose rank died: the actor lives on, and the loop retries the trial.
        lost = [(e.number, e.reason) for e in events if isinstance(e, Lost)]
        return {"capacity": self.inner.capacity, "finished": finished, "lost": lost}


@dataclass
class _Slot:
    actor: Any
    capacity: int = 1
    jobs: set[int] = field(default_factory=set)
    waiting: Any = None
    """The actor's outstanding `wait` call, if any."""


def start_ray(config: SweepConfig, address: str | None) -> None:
    """Join the cluster at `address` (else `ray.address`), or start a local Ray.

    A local Ray has `ray.num_cpus` / `ray.num_gpus`; a second call in this process keeps the first's.
    """
    import ray

    settings = config.ray
    address = address or settings.address
    # ray.init installs a SIGTERM handler of its own (sys.exit), which would turn `kill` of the
    # sweep into a crash instead of the clean stop `stop_on_signals` makes of it.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(
            address=address,
            num_cpus=None if address else settings.num_cpus,
            num_gpus=None if address else settings.num_gpus,
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=False,
            # Ray's start-up notices would stand above the live view or a one-line error.
            logging_level=logging.ERROR,
        )
    except ConnectionError as exc:
        field = "ray.address" if "address" in settings.model_fields_set else "backend"
        raise config.error(field, f"cannot join Ray at {address}: {exc}") from None
    except ValueError as exc:
        # Ray refuses a local instance of more GPUs than the machine shows.
        raise config.error("ray.num_gpus", str(exc).splitlines()[0]) from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)


def alive_nodes() -> list[dict[str, float]]:
    """The resources (CPU, GPU, ...) of each live node of the Ray cluster this process joined."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def actor_gpus(config: SweepConfig, nodes: list[dict[str, float]]) -> float:
    """GPUs an actor reserves: `ray.gpus_per_trial` (a gang's G), or none for a CPU gang.

    A gang runs on CPU only where no node has a GPU, as a local gang does only where none is
    visible; preflight has then checked `distributed.allow_cpu`.
    """
    if config.workers.gpus_per_trial > 1 and not any(node.get("GPU") for node in nodes):
        return 0
    return config.ray.gpus_per_trial


def ray_gang_preflight(config: SweepConfig, store: Store, address: str | None):
    """`preflight` for gang trials on Ray: the gang settings checked against the cluster's GPUs.

    The `sweep run` process's own GPUs say nothing of the cluster's (a head node often has none).
    Starts or joins Ray first, for the actors to come, and leaves it again on an `InputError`.
    """
    import ray

    from core.errors import InputError
    from sweeps.preflight import preflight

    start_ray(config, address)
    try:
        nodes = alive_nodes()
        gang_gpus = _gang_gpus(config, nodes)
        check_placement(config, nodes)
        return preflight(config, store, gang_gpus=gang_gpus)
    except InputError:
        ray.shutdown()
        raise


def _gang_gpus(config: SweepConfig, nodes: list[dict[str, float]]) -> list[str]:
    """The GPUs one gang actor will see: G (stand-ins: Ray picks the ids as it starts the actor), or
    none on a cluster without GPUs (a CPU gang).

    Raises `InputError` where no node has G GPUs: a gang stays within one node, and Ray would wait
    for such a node for ever.
    """
    size = config.workers.gpus_per_trial
    per_node = sorted((node.get("GPU", 0) for node in nodes), reverse=True)
    if not any(per_node):
        return []
    if per_node[0] < size:
        counts = ", ".join(f"{gpus:g}" for gpus in per_node)
        raise config.error(
            "workers.gpus_per_trial",
            f"{size} GPUs a trial, but no Ray node has {size} (GPUs a node: {counts}); "
            "a gang trial runs within one node",
        )
    return [str(gpu) for gpu in range(size)]


def check_placement(config: SweepConfig, nodes: list[dict[str, float]]) -> None:
    """Raise `InputError` where no live node holds one trial's actor: Ray would wait for ever to place it."""
    cpus, gpus = config.ray.cpus_per_trial, actor_gpus(config, nodes)
    if any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        return
    if not any(node.get("CPU", 0) >= cpus for node in nodes):
        most = max((node.get("CPU", 0) for node in nodes), default=0)
        raise config.error(
            "ray.cpus_per_trial",
            f"a trial's actor takes {cpus:g} CPUs, but no Ray node has that many (at most "
            f"{most:g}); lower ray.cpus_per_trial or give Ray more CPUs (ray.num_cpus)",
        )
    counts = ", ".join(f"{node.get('GPU', 0):g}" for node in nodes)
    raise config.error(
        "ray.gpus_per_trial",
        f"a trial's actor takes {gpus:g} GPUs and {cpus:g} CPUs, but no Ray node has both "
        f"(GPUs a node: {counts})",
    )


def ray_slots(config: SweepConfig, nodes: list[dict[str, float]]) -> int:
    """Trials at once: `ray.max_concurrent_trials`, else as many actors as the nodes hold.

    Counted node by node, as Ray places an actor's CPUs and GPUs on one node: a gang trial's actor
    takes G GPUs, so two nodes of 3 GPUs hold two gangs of 2, not the three their sum would give.
    At least one, once `check_placement` passed.
    """
    settings = config.ray
    if settings.max_concurrent_trials is not None:
        return settings.max_concurrent_trials
    gpus = actor_gpus(config, nodes)
    slots = 0
    for node in nodes:
        fits = int(node.get("CPU", 0) // settings.cpus_per_trial)
        if gpus:
            fits = min(fits, int(node.get("GPU", 0) // gpus))
        slots += fits
    return slots


class RayActors(Executor):
    """Ray actors, `ray_slots` of them; a dead actor's trials are reported lost and a fresh actor replaces it."""

    def __init__(self, config: SweepConfig, store: Store, address: str | None, on_step: OnStep):
        import ray
        from ray.util.queue import Queue

        self.ray = ray
        start_ray(config, address)
        self.config = config
        self.store = store
        self.on_step = on_step
        # The queue is a small actor of its own; it must not take a CPU a trial needs.
        self.progress = Queue(actor_options={"num_cpus": 0})
        nodes = alive_nodes()
        check_placement(config, nodes)
        self.actor_class = ray.remote(num_cpus=config.ray.cpus_per_trial, num_gpus=actor_gpus(config, nodes))(
            _TrialActor
        )
        self.slots = [self._start() for _ in range(ray_slots(config, nodes))]

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
            for number, reason in reply["lost"]:
                slot.jobs.discard(number)
                ended.append(Lost(number, reason))
        return ended

    def close(self, interrupted: bool = False) -> None:
        for slot in self.slots:
            self.ray.kill(slot.actor)
        self.slots.clear()
        self.ray.shutdown()
