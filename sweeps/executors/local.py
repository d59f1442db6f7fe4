"""Trials in this process, one after another, on the runner that preflight prepared."""

from __future__ import annotations

import traceback

from core.config import SweepConfig
from core.store import Store
from runners.sft import TrialRunner
from sweeps.executors.base import Event, Executor, ExecutorCrashed, Finished, OnStep, TrialJob
from sweeps.executors.host import TrialHost


class InProcess(Executor):
    """One trial at a time in the `sweep run` process; the base model stays loaded between trials."""

    capacity = 1

    def __init__(self, config: SweepConfig, store: Store, runner: TrialRunner, on_step: OnStep):
        self.host = TrialHost(config, store, runner)
        self.on_step = on_step
        self.queued: list[TrialJob] = []

    def submit(self, job: TrialJob) -> None:
        self.queued.append(job)

    def wait(self, timeout: float) -> list[Event]:
        if not self.queued:
            return []
        job = self.queued.pop(0)
        try:
            result = self.host.run(job, self.on_step)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise ExecutorCrashed(traceback.format_exc()) from exc
        return [Finished(job.number, result)]

    def close(self, interrupted: bool = False) -> None:
        self.queued.clear()


def local_executor(config: SweepConfig, store: Store, runner: TrialRunner, on_step: OnStep) -> Executor:
    """How this process runs trials: packed (`workers.pack`) where it pays, else one at a time.

    `pack: auto` packs only on a GPU: on a CPU a step is bound by arithmetic, not by kernel
    launches, so trials stepped together take as long as one after another.
    """
    import torch

    pack = config.workers.pack
    if pack == 1 or (pack == "auto" and not torch.cuda.is_available()):
        return InProcess(config, store, runner, on_step)
    from sweeps.executors.packed import Packed

    return Packed(config, store, runner, on_step, capacity=None if pack == "auto" else pack)
