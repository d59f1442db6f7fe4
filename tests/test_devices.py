"""Every process that runs trials sees exactly the GPUs of its slot (fake devices, no CUDA)."""

from __future__ import annotations

import inspect
import os
import queue
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sweeps.cli
import sweeps.loop
from core.config import SweepConfig, parse_config
from core.store import Store
from core.trial import TrialParams
from sweeps.executors import devices, processes
from sweeps.executors.base import Lost, TrialJob
from sweeps.executors.devices import pin_to, slot_device, visible_gpus
from sweeps.executors.processes import WorkerPool
from sweeps.loop import SweepOutcome


def write_config(folder: Path, workers: str = "") -> Path:
    path = folder / "gpus.yaml"
    path.write_text(
        "name: gpus\n"
        "model: {name_or_path: org/model}\n"
        f"data: {{format: alpaca, train_file: {folder / 'train.jsonl'}}}\n"
        "objective: {name: eval_loss}\n"
        "space:\n  learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}\n"
        f"{workers}\n"
    )
    return path


def load(path: Path) -> SweepConfig:
    return parse_config(path.read_text(), path)


@pytest.fixture
def no_nvidia_smi(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)


@pytest.fixture
def two_gpus_on_nvidia_smi(monkeypatch):
    """nvidia-smi lists GPUs 0 and 1; CUDA_VISIBLE_DEVICES is unset."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(
        devices.subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(args, 0, "0\n1\n", "")
    )


# -- visible_gpus ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listed", "expected"), [("0,1", ["0", "1"]), (" 2, 3 ", ["2", "3"]), ("", []), ("-1", [])]
)
def test_visible_gpus_honours_cuda_visible_devices(monkeypatch, two_gpus_on_nvidia_smi, listed, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)

    assert visible_gpus() == expected


def test_visible_gpus_asks_nvidia_smi_when_cuda_visible_devices_is_unset(two_gpus_on_nvidia_smi):
    assert visible_gpus() == ["0", "1"]


def test_visible_gpus_is_empty_without_nvidia_smi(monkeypatch, no_nvidia_smi):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    assert visible_gpus() == []


# -- slots ----------------------------------------------------------------------------------------


def test_one_worker_per_gpu_spreads_workers_round_robin():
    assert [slot_device(slot, ["0", "1"], 1) for slot in range(4)] == ["0", "1", "0", "1"]


def test_two_workers_per_gpu_fill_one_gpu_before_the_next():
    assert [slot_device(slot, ["0", "1"], 2) for slot in range(4)] == ["0", "0", "1", "1"]


def test_a_slot_on_a_cpu_machine_has_no_device():
    assert slot_device(0, [], 1) is None


def test_pin_to_makes_only_that_gpu_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    pin_to("1")

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert visible_gpus() == ["1"]


def test_pin_to_nothing_leaves_the_environment_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    pin_to(None)

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


# -- `sweep run` ----------------------------------------------------------------------------------


@pytest.fixture
def seen_by_trials(monkeypatch, tmp_path) -> dict[str, str | None]:
    """Run `sweep run` up to its trials: CUDA_VISIBLE_DEVICES as preflight and the loop see it."""
    monkeypatch.chdir(tmp_path)
    seen: dict[str, str | None] = {}

    def fake_preflight(config, store):
        seen["preflight"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return object()

    def fake_run_sweep(config, store, executor, n_trials=None, timeout=None, observer=None):
        seen["loop"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return SweepOutcome(target=1, finished_before=1, finished=1, already_done=True)

    monkeypatch.setattr(sweeps.cli, "preflight", fake_preflight)
    monkeypatch.setattr(sweeps.cli, "quiet_libraries", lambda: None)
    monkeypatch.setattr(sweeps.cli, "stop_on_signals", lambda: None)
    monkeypatch.setattr(sweeps.loop, "run_sweep", fake_run_sweep)
    return seen


def sweep_run(tmp_path: Path, *options: str) -> None:
    result = CliRunner().invoke(sweeps.cli.app, ["run", str(write_config(tmp_path)), *options])
    assert result.exit_code == 0, result.output


def test_sweep_run_with_one_worker_pins_itself_to_the_first_visible_gpu(
    monkeypatch, tmp_path, seen_by_trials
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    sweep_run(tmp_path, "--workers", "1")

    assert seen_by_trials == {"preflight": "0", "loop": "0"}


def test_sweep_run_with_one_worker_pins_to_gpu_0_of_nvidia_smi(
    two_gpus_on_nvidia_smi, tmp_path, seen_by_trials
):
    sweep_run(tmp_path, "--workers", "1")

    assert seen_by_trials == {"preflight": "0", "loop": "0"}


def test_sweep_run_with_two_workers_leaves_its_own_gpus_to_the_workers(
    monkeypatch, tmp_path, seen_by_trials, fake_spawn
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    sweep_run(tmp_path, "--workers", "2")

    assert seen_by_trials == {"preflight": "0,1", "loop": "0,1"}


def test_sweep_run_starts_its_workers_before_its_own_preflight_and_lets_them_open_the_stores_later(
    monkeypatch, tmp_path, seen_by_trials, fake_spawn
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    started_at_preflight = []
    preflight = sweeps.cli.preflight
    monkeypatch.setattr(
        sweeps.cli,
        "preflight",
        lambda config, store: (
            started_at_preflight.extend(p.started for p in fake_spawn.processes) or preflight(config, store)
        ),
    )

    sweep_run(tmp_path, "--workers", "2")

    assert started_at_preflight == [True, True]
    # The loop never asked for the pool (nothing to run): no worker was told to open the stores.
    assert all(process.args[4].empty() for process in fake_spawn.processes)


def test_a_pool_attached_to_the_loop_tells_each_worker_to_open_the_stores_once(tmp_path, fake_spawn):
    pool = WorkerPool(load(write_config(tmp_path)), Store(tmp_path / "mlruns"), 2, on_step=None)
    inboxes = [process.args[4] for process in fake_spawn.processes]
    assert all(inbox.empty() for inbox in inboxes)

    assert pool.attach(lambda *a: None) is pool

    assert [inbox.get_nowait() for inbox in inboxes] == ["start", "start"]
    assert all(inbox.empty() for inbox in inboxes)


def test_sweep_run_on_a_cpu_machine_sets_no_device(monkeypatch, no_nvidia_smi, tmp_path, seen_by_trials):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    sweep_run(tmp_path)

    assert seen_by_trials == {"preflight": None, "loop": None}


# -- WorkerPool -----------------------------------------------------------------------------------


class FakeProcess:
    """Records what a worker process would be started with; starts nothing."""

    def __init__(self, target, args, name, daemon):
        self.target, self.args, self.name = target, args, name
        self.exitcode: int | None = None
        self.started = False

    def start(self) -> None:
        self.started = True

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        return None

    @property
    def device(self) -> str | None:
        return inspect.signature(self.target).bind(*self.args).arguments["device"]


class FakeContext:
    def __init__(self):
        self.processes: list[FakeProcess] = []

    def Queue(self):
        return queue.Queue()

    def Process(self, **kwargs):
        process = FakeProcess(**kwargs)
        self.processes.append(process)
        return process


@pytest.fixture
def fake_spawn(monkeypatch) -> FakeContext:
    context = FakeContext()
    monkeypatch.setattr(processes.mp, "get_context", lambda method: context)
    return context


def test_a_pool_of_two_pins_its_workers_to_gpus_0_and_1(monkeypatch, tmp_path, fake_spawn):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    pool = WorkerPool(load(write_config(tmp_path)), Store(tmp_path / "mlruns"), 2, lambda *a: None)

    assert [worker.device for worker in pool.workers] == ["0", "1"]
    assert [(p.device, p.started, p.target) for p in fake_spawn.processes] == [
        ("0", True, processes.worker_main),
        ("1", True, processes.worker_main),
    ]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_a_pool_with_two_trials_per_gpu_puts_two_workers_on_each(monkeypatch, tmp_path, fake_spawn):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    config = load(write_config(tmp_path, "workers: {trials_per_gpu: 2}"))

    pool = WorkerPool(config, Store(tmp_path / "mlruns"), 4, lambda *a: None)

    assert [p.device for p in fake_spawn.processes] == ["0", "0", "1", "1"]
    assert pool.capacity == 4


def test_a_worker_that_died_is_replaced_on_the_same_gpu_and_its_trial_lost(monkeypatch, tmp_path, fake_spawn):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    config = load(write_config(tmp_path))
    pool = WorkerPool(config, Store(tmp_path / "mlruns"), 2, lambda *a: None)
    jobs = [
        TrialJob(number=n, trial_id=n, params=TrialParams(), run_id=f"run-{n}", work_dir=str(tmp_path))
        for n in range(2)
    ]
    for job in jobs:
        pool.submit(job)
    fake_spawn.processes[1].exitcode = -9

    events = pool.wait(timeout=0.01)

    assert events == [Lost(1, "worker process died (exit code -9)")]
    assert [p.device for p in fake_spawn.processes] == ["0", "1", "1"]
    assert pool.workers[1].process is fake_spawn.processes[2] and pool.workers[1].jobs == set()
