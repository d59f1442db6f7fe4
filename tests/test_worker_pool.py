"""How a pool of worker processes (one pack per GPU) shares trials between its workers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from core.trial import TrialParams
from sweeps.executors.base import TrialJob
from sweeps.executors.processes import WorkerPool, _Worker


class Inbox:
    def __init__(self) -> None:
        self.jobs: list[dict] = []

    def put(self, job: dict) -> None:
        self.jobs.append(job)


@pytest.fixture
def pool(monkeypatch, tmp_path) -> WorkerPool:
    """Two workers without processes: what `submit` sends lands in each worker's inbox."""
    monkeypatch.setattr(WorkerPool, "_start", lambda self, slot, device: _Worker(slot, device, Inbox(), None))
    config = SimpleNamespace(workers=SimpleNamespace(trials_per_gpu=1), source=str(tmp_path / "space.yaml"))
    return WorkerPool(config, SimpleNamespace(root=tmp_path), 2, on_step=lambda *args: None)


def job(number: int) -> TrialJob:
    return TrialJob(
        number=number, trial_id=number, params=TrialParams(), run_id=f"run-{number}", work_dir="."
    )


def test_workers_take_at_most_the_smallest_pack_each(pool):
    first, second = pool.workers
    first.capacity, second.capacity = 8, 4
    assert pool.capacity == 8


def test_the_last_trials_go_to_the_idle_worker_not_the_one_whose_pack_grew(pool):
    first, second = pool.workers
    first.capacity, second.capacity = 8, 4
    second.jobs = {0, 1, 2, 3}  # the second worker's pack of 4 is still training
    number = 4
    while len(first.jobs) + len(second.jobs) < pool.capacity:  # as the sweep loop fills the pool
        pool.submit(job(number))
        number += 1
    assert first.jobs == {4, 5, 6, 7} and second.jobs == {0, 1, 2, 3}
    assert [j["number"] for j in first.inbox.jobs] == [4, 5, 6, 7]
