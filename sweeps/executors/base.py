"""The interface between the sweep loop and the places trials run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from core.trial import TrialParams, TrialResult


class TrialJob(BaseModel):
    """A claimed trial, as plain data so it crosses into a worker process or a Ray actor unchanged."""

    number: int
    trial_id: int
    """Optuna's storage id of the trial: where intermediate values (pruning) are reported."""
    params: TrialParams
    run_id: str
    """The MLflow child run the trial logs its curves to."""
    work_dir: str


@dataclass(frozen=True)
class Finished:
    """A trial ended, as the runner reports it: complete, pruned or failed."""

    number: int
    result: TrialResult


@dataclass(frozen=True)
class Lost:
    """The process running a trial died (SIGKILL, a segfault, the OOM killer) before it reported."""

    number: int
    reason: str


Event = Finished | Lost

OnStep = Callable[[int, int, int], None]
"""Where an executor sends progress as it happens: (trial number, optimizer step, total steps)."""


class ExecutorCrashed(RuntimeError):
    """The project's own code raised in an executor: a bug to show, not a trial to fail and retry."""


class Executor(ABC):
    """Runs up to `capacity` jobs at a time; the loop submits jobs and waits for events."""

    capacity: int

    @abstractmethod
    def submit(self, job: TrialJob) -> None:
        """Start `job`; called only while fewer than `capacity` jobs run."""

    @abstractmethod
    def wait(self, timeout: float) -> list[Event]:
        """Trials that ended since the last call, waiting up to `timeout` seconds for the first one.

        Progress goes to the executor's `OnStep` sink meanwhile.

        Raises `ExecutorCrashed` when the project's own code failed, and KeyboardInterrupt when
        this process is interrupted.
        """

    @abstractmethod
    def close(self, interrupted: bool = False) -> None:
        """Stop and release everything; with `interrupted`, stop running jobs without waiting for them."""
