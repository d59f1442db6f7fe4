"""The sweep loop's guarantees, on a scripted executor over real Optuna and MLflow stores (no model)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import sweeps.loop
from core.config import SweepConfig, parse_config
from core.store import Store
from core.trial import TrialParams, TrialResult, TrialStatus
from sweeps.executors.base import Event, Executor, ExecutorCrashed, Finished, Lost, OnStep, TrialJob
from sweeps.executors.host import TrialHost
from sweeps.loop import SweepOutcome, TooManyFailures, run_sweep
from sweeps.space import suggest, trial_params
from sweeps.study import load_study, open_study
from sweeps.tracking import SweepTracker

SPACE = """
learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
lora_rank: {type: int, low: 2, high: 64}
"""

Script = Callable[[TrialJob], TrialResult | Lost | float]
"""What the fake executor does with a job: a result, a `Lost`, or a float (a complete trial's objective)."""


def complete(objective: float = 1.0, **fields) -> TrialResult:
    return TrialResult(status=TrialStatus.COMPLETE, objective=objective, **fields)


def failed(error: str = "RuntimeError: boom", **fields) -> TrialResult:
    return TrialResult(status=TrialStatus.FAILED, error=error, **fields)


class ScriptedExecutor(Executor):
    """Runs each submitted job through `script` when waited on; records what it was given."""

    def __init__(self, script: Script, on_step: OnStep, capacity: int = 1, steps: int = 0, per_wait: int = 0):
        self.script = script
        self.per_wait = per_wait  # jobs ended by one `wait`; 0: every pending one
        self.on_step = on_step
        self.capacity = capacity
        self.steps = steps
        self.pending: list[TrialJob] = []
        self.jobs: dict[int, TrialJob] = {}
        self.closed: bool | None = None

    def submit(self, job: TrialJob) -> None:
        assert len(self.pending) < self.capacity
        self.pending.append(job)
        self.jobs[job.number] = job

    def wait(self, timeout: float) -> list[Event]:
        events: list[Event] = []
        count = self.per_wait or len(self.pending)
        ending, self.pending = self.pending[:count], self.pending[count:]
        for job in ending:
            for step in range(1, self.steps + 1):
                self.on_step(job.number, step, self.steps)
            outcome = self.script(job)
            if isinstance(outcome, Lost):
                events.append(outcome)
            elif isinstance(outcome, TrialResult):
                events.append(Finished(job.number, outcome))
            else:
                events.append(Finished(job.number, complete(float(outcome))))
        return events

    def close(self, interrupted: bool = False) -> None:
        self.closed = interrupted


class Factory:
    """The executor factory `run_sweep` takes; keeps the executor it built."""

    def __init__(
        self,
        script: Script = lambda job: 1.0,
        capacity: int = 1,
        steps: int = 0,
        before=None,
        per_wait: int = 0,
    ):
        self.script, self.capacity, self.steps, self.before, self.per_wait = (
            script,
            capacity,
            steps,
            before,
            per_wait,
        )
        self.built: ScriptedExecutor | None = None
        self.parent_id: str | None = None

    def __call__(self, parent_id: str, on_step: OnStep) -> ScriptedExecutor:
        if self.before is not None:
            self.before()
        self.parent_id = parent_id
        self.built = ScriptedExecutor(self.script, on_step, self.capacity, self.steps, self.per_wait)
        return self.built


@pytest.fixture(autouse=True)
def quick_idle_poll(monkeypatch):
    """The loop polls other processes' trials every second; a twentieth is enough here."""
    monkeypatch.setattr(sweeps.loop, "_IDLE_POLL_S", 0.05)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "mlruns")


@pytest.fixture
def make_config(tmp_path, empty_mlflow_db) -> Callable[..., SweepConfig]:
    """A config over a fresh copy of the MLflow schema in tmp_path; `budget`, `objective`, `extra` adjust it."""
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_mlflow_db, db)
    rows = [{"instruction": f"sort {n} 1", "input": "", "output": f"1 {n}"} for n in range(2, 12)]
    # Logged as a dataset.
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    def make(
        budget: str = "trials: 2",
        objective: str = "name: eval_loss",
        sampler: str = "type: random\nseed: 0",
        training: str = "per_device_batch_size: 8\ngradient_accumulation_steps: 1",
        extra: str = "",
    ) -> SweepConfig:
        def block(text: str) -> str:
            return textwrap.indent(textwrap.dedent(text).strip(), "  ")

        text = (
            "name: loop\n"
            "model: {name_or_path: org/model}\n"
            f"data: {{format: alpaca, train_file: {tmp_path / 'train.jsonl'}}}\n"
            f"objective:\n{block(objective)}\n"
            f"space:\n{block(SPACE)}\n"
            f"training:\n{block(training)}\n"
            f"sampler:\n{block(sampler)}\n"
            f"budget:\n{block(budget)}\n"
            f"tracking:\n  uri: sqlite:///{db}\n  artifact_location: {tmp_path / 'artifacts'}\n"
            f"{textwrap.dedent(extra).strip()}\n"
        )
        path = tmp_path / "loop.yaml"
        path.write_text(text)
        return parse_config(text, path)

    return make


def trials(config: SweepConfig, store: Store) -> list[optuna.trial.FrozenTrial]:
    return load_study(config, store).get_trials()


def states(config: SweepConfig, store: Store) -> list[str]:
    return [trial.state.name for trial in trials(config, store)]


class Runs:
    """The sweep's MLflow runs, read back."""

    def __init__(self, config: SweepConfig):
        self.client = MlflowClient(tracking_uri=config.tracking.uri)
        experiment = self.client.get_experiment_by_name(config.experiment_name)
        self.all = self.client.search_runs([experiment.experiment_id], max_results=1000)

    @property
    def parent(self):
        (parent,) = [run for run in self.all if run.data.tags.get("sweep.role") == "parent"]
        return parent

    def trial(self, number: int):
        (run,) = [run for run in self.all if run.data.tags.get("optuna.trial_number") == str(number)]
        return run

    @property
    def trial_statuses(self) -> dict[int, str]:
        return {
            int(run.data.tags["optuna.trial_number"]): run.info.status
            for run in self.all
            if run.data.tags.get("sweep.role") == "trial"
        }

    @property
    def running(self) -> list[str]:
        return [run.info.run_name for run in self.all if run.info.status == "RUNNING"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# -- how many trials ------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [1, 3])
def test_exactly_n_trials_finish_whatever_the_capacity(make_config, store, capacity):
    config = make_config(budget="trials: 4")
    factory = Factory(lambda job: 0.5 + job.number, capacity=capacity)

    outcome = run_sweep(config, store, factory)

    assert states(config, store) == ["COMPLETE"] * 4
    assert [t.values for t in trials(config, store)] == [[0.5 + n] for n in range(4)]
    assert (outcome.finished_before, outcome.finished, sorted(outcome.ran)) == (0, 4, [0, 1, 2, 3])
    assert outcome.best.number == 0
    runs = Runs(config)
    assert runs.trial_statuses == {n: "FINISHED" for n in range(4)}
    assert runs.trial(3).data.metrics["objective"] == 3.5
    assert runs.trial(3).data.tags["optuna.state"] == "COMPLETE"
    assert runs.parent.info.status == "FINISHED"
    assert runs.parent.data.metrics["n_complete"] == 4
    assert factory.built.closed is False


def test_a_larger_capacity_than_trials_left_claims_only_what_is_missing(make_config, store):
    config = make_config(budget="trials: 2")

    run_sweep(config, store, Factory(capacity=3))

    assert states(config, store) == ["COMPLETE", "COMPLETE"]
    assert len(Runs(config).trial_statuses) == 2


def test_a_finished_study_runs_nothing_and_builds_no_executor(make_config, store):
    config = make_config(budget="trials: 2")
    run_sweep(config, store, Factory())

    def refuse(parent_id, on_step):
        raise AssertionError("an executor was built for a finished study")

    outcome = run_sweep(config, store, refuse)

    assert outcome.already_done and outcome.ran == [] and outcome.finished == 2
    assert states(config, store) == ["COMPLETE", "COMPLETE"]
    runs = Runs(config)
    assert len(runs.trial_statuses) == 2
    assert runs.parent.info.status == "FINISHED"


def test_a_resume_runs_only_the_missing_trials(make_config, store):
    config = make_config(budget="trials: 2")
    run_sweep(config, store, Factory())

    outcome = run_sweep(config, store, Factory(), n_trials=4)

    assert (outcome.finished_before, outcome.finished, outcome.ran) == (2, 4, [2, 3])
    assert states(config, store) == ["COMPLETE"] * 4
    runs = Runs(config)
    assert len([run for run in runs.all if run.data.tags.get("sweep.role") == "parent"]) == 1
    assert runs.parent.info.status == "FINISHED"


def test_the_timeout_stops_claiming_new_trials(make_config, store):
    config = make_config(budget="trials: 5")

    def slow(job: TrialJob) -> float:
        time.sleep(0.3)
        return 1.0

    outcome = run_sweep(config, store, Factory(slow), timeout=0.2)

    assert outcome.timed_out and outcome.finished == 1
    assert states(config, store) == ["COMPLETE"]
    runs = Runs(config)
    assert runs.trial_statuses == {0: "FINISHED"}
    assert runs.parent.info.status == "FINISHED"


# -- how trials end -------------------------------------------------------------------------------


def test_a_pruned_trial_is_pruned_in_optuna_and_a_finished_run_tagged_pruned(make_config, store):
    config = make_config(budget="trials: 2")
    script = lambda job: TrialResult(status=TrialStatus.PRUNED) if job.number == 0 else 2.0

    outcome = run_sweep(config, store, Factory(script))

    assert states(config, store) == ["PRUNED", "COMPLETE"]
    assert outcome.finished == 2
    run = Runs(config).trial(0)
    assert run.info.status == "FINISHED"
    assert run.data.tags["optuna.state"] == "PRUNED"
    assert run.data.tags["sweep.status"] == "PRUNED"


def test_multi_objective_tells_the_objective_and_peak_memory(make_config, store):
    config = make_config(
        budget="trials: 2",
        objective="name: eval_loss\nminimize_peak_memory: true",
        sampler="type: nsga2\nseed: 0",
    )
    script = lambda job: complete(0.25 + job.number, peak_memory_mb=100.0 * (job.number + 1))

    run_sweep(config, store, Factory(script))

    assert [t.values for t in trials(config, store)] == [[0.25, 100.0], [1.25, 200.0]]
    assert Runs(config).trial(1).data.metrics["peak_memory_mb"] == 200.0


def test_a_failed_trial_keeps_its_traceback_as_error_txt_and_its_error_as_a_tag(make_config, store, tmp_path):
    config = make_config(budget="trials: 1")
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n'
    script = lambda job: failed("ValueError: boom", traceback=trace) if job.number == 0 else 1.0

    run_sweep(config, store, Factory(script))

    assert states(config, store) == ["FAIL", "COMPLETE"]
    assert trials(config, store)[0].user_attrs["error"] == "ValueError: boom"
    runs = Runs(config)
    run = runs.trial(0)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ValueError: boom"
    assert run.data.tags["optuna.state"] == "FAIL"
    local = runs.client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
    assert Path(local).read_text() == trace


def test_progress_from_the_executor_reaches_the_observer(make_config, store):
    config = make_config(budget="trials: 2")

    class Recorder:
        def __init__(self):
            self.calls: list[tuple] = []

        def sweep_started(self, done, target):
            self.calls.append(("sweep_started", done, target))

        def trial_started(self, number, params):
            self.calls.append(("trial_started", number, sorted(params)))

        def trial_step(self, number, step, total):
            self.calls.append(("trial_step", number, step, total))

        def trial_finished(self, number, params, result):
            self.calls.append(("trial_finished", number, result.status.value))

    observer = Recorder()
    run_sweep(config, store, Factory(steps=2), observer=observer)

    assert observer.calls == [
        ("sweep_started", 0, 2),
        ("trial_started", 0, ["learning_rate", "lora_rank"]),
        ("trial_step", 0, 1, 2),
        ("trial_step", 0, 2, 2),
        ("trial_finished", 0, "COMPLETE"),
        ("trial_started", 1, ["learning_rate", "lora_rank"]),
        ("trial_step", 1, 1, 2),
        ("trial_step", 1, 2, 2),
        ("trial_finished", 1, "COMPLETE"),
    ]


# -- failures and retries -------------------------------------------------------------------------


def test_the_failure_budget_stops_the_sweep_and_fails_the_parent(make_config, store):
    config = make_config(budget="trials: 5\nmax_failed_trials: 2")
    factory = Factory(lambda job: failed(f"RuntimeError: trial {job.number}", failure_kind="error"))

    with pytest.raises(TooManyFailures, match=r"2 trials failed.*trial 1"):
        run_sweep(config, store, factory)

    assert states(config, store) == ["FAIL", "FAIL"]
    runs = Runs(config)
    assert runs.trial_statuses == {0: "FAILED", 1: "FAILED"}
    assert runs.parent.info.status == "FAILED"
    assert runs.running == []


def test_the_failure_budget_lets_running_trials_finish_and_claims_no_more(make_config, store):
    config = make_config(budget="trials: 6\nmax_failed_trials: 1")
    script = lambda job: failed("RuntimeError: boom") if job.number == 0 else 1.0

    with pytest.raises(TooManyFailures):
        run_sweep(config, store, Factory(script, capacity=3, per_wait=1))

    assert states(config, store) == ["FAIL", "COMPLETE", "COMPLETE"]
    runs = Runs(config)
    assert runs.trial_statuses == {0: "FAILED", 1: "FINISHED", 2: "FINISHED"}
    assert runs.parent.info.status == "FAILED"


def test_an_out_of_memory_trial_is_retried_once_at_half_the_micro_batch(make_config, store):
    config = make_config(
        budget="trials: 2", training="per_device_batch_size: 8\ngradient_accumulation_steps: 2"
    )
    oom = lambda job: failed("CUDA out of memory", failure_kind="oom") if job.number < 2 else 1.0
    factory = Factory(oom)

    run_sweep(config, store, factory)

    first, retry, fresh, last = trials(config, store)
    assert [first.state, retry.state, fresh.state, last.state] == [
        TrialState.FAIL,
        TrialState.FAIL,
        *[TrialState.COMPLETE] * 2,
    ]
    assert retry.params == first.params
    assert retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["overrides"] == {"per_device_batch_size": 4, "gradient_accumulation_steps": 4}
    jobs = factory.built.jobs
    assert (jobs[0].params.per_device_batch_size, jobs[0].params.gradient_accumulation_steps) == (8, 2)
    assert (jobs[1].params.per_device_batch_size, jobs[1].params.gradient_accumulation_steps) == (4, 4)
    assert "retry_of" not in fresh.user_attrs  # the retry's own OOM is not retried again
    assert jobs[2].params.per_device_batch_size == 8
    run = Runs(config).trial(1)
    assert run.data.params["per_device_batch_size"] == "4"
    assert run.data.params["gradient_accumulation_steps"] == "4"


def test_an_out_of_memory_retry_is_not_queued_when_oom_retry_is_off(make_config, store):
    config = make_config(budget="trials: 1\noom_retry: false")
    oom = lambda job: failed("CUDA out of memory", failure_kind="oom") if job.number == 0 else 1.0

    run_sweep(config, store, Factory(oom))

    assert states(config, store) == ["FAIL", "COMPLETE"]
    assert "retry_of" not in trials(config, store)[1].user_attrs


def test_an_out_of_memory_trial_at_micro_batch_1_is_not_retried(make_config, store):
    config = make_config(budget="trials: 1", training="per_device_batch_size: 1")
    oom = lambda job: failed("CUDA out of memory", failure_kind="oom") if job.number == 0 else 1.0

    run_sweep(config, store, Factory(oom))

    assert states(config, store) == ["FAIL", "COMPLETE"]
    assert "retry_of" not in trials(config, store)[1].user_attrs


def test_a_lost_trial_fails_in_both_stores_and_is_retried_with_its_params_up_to_max_retries(
    make_config, store
):
    config = make_config(budget="trials: 1\nmax_retries: 2\nmax_failed_trials: 5")
    script = lambda job: Lost(job.number, "worker process died (exit code -9)") if job.number < 3 else 1.0
    factory = Factory(script)

    outcome = run_sweep(config, store, factory)

    found = trials(config, store)
    assert [t.state.name for t in found] == ["FAIL", "FAIL", "FAIL", "COMPLETE"]
    assert found[1].params == found[2].params == found[0].params
    assert [t.user_attrs.get("retry_of") for t in found] == [None, 0, 1, None]
    assert [t.user_attrs.get("retries") for t in found] == [None, 1, 2, None]
    assert found[3].params != found[0].params
    runs = Runs(config)
    assert runs.trial_statuses == {0: "FAILED", 1: "FAILED", 2: "FAILED", 3: "FINISHED"}
    assert runs.trial(0).data.tags["error"] == "worker process died (exit code -9)"
    assert runs.trial(0).data.tags["optuna.state"] == "FAIL"
    assert runs.parent.data.metrics["worker_restarts"] == 3
    assert outcome.ran == [0, 1, 2, 3]


def running_trial_of(config: SweepConfig, store: Store, pid: int, **attrs) -> str:
    """A RUNNING trial with its RUNNING child run, as process `pid` of this host leaves them; its run id."""
    tracker = SweepTracker(config)
    tracker.open_sweep()
    trial = open_study(config, store).ask()
    sampled = suggest(trial, config)
    run_id = tracker.start_trial(trial.number, trial_params(config, sampled), sampled)
    for key, value in {"host": socket.gethostname(), "pid": pid, "mlflow_run_id": run_id, **attrs}.items():
        trial.set_user_attr(key, value)
    return run_id


def test_trials_of_a_dead_process_are_closed_on_start_and_retried(make_config, store):
    config = make_config(budget="trials: 1")
    running_trial_of(config, store, dead_pid())

    outcome = run_sweep(config, store, Factory())

    first, retry = trials(config, store)
    assert (first.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.params == first.params and retry.user_attrs["retry_of"] == 0
    assert outcome.ran == [1]
    runs = Runs(config)
    assert runs.trial_statuses == {0: "FAILED", 1: "FINISHED"}
    assert runs.trial(0).data.tags["error"] == "the process running this trial died"
    assert runs.parent.info.status == "FINISHED"
    assert runs.running == []


def test_a_running_trial_of_a_live_process_is_left_alone(make_config, store):
    config = make_config(budget="trials: 1")
    run_id = running_trial_of(config, store, os.getpid())

    outcome = run_sweep(config, store, Factory(), n_trials=2, timeout=0.3)

    assert states(config, store) == ["RUNNING", "COMPLETE"]
    assert outcome.ran == [1] and outcome.timed_out
    assert Runs(config).running == ["trial-0"]
    assert run_id == Runs(config).trial(0).info.run_id


def test_an_orphan_that_used_its_retries_is_not_retried_again(make_config, store):
    config = make_config(budget="trials: 1\nmax_retries: 1")
    running_trial_of(config, store, dead_pid(), retries=1)

    run_sweep(config, store, Factory())

    found = trials(config, store)
    assert [t.state.name for t in found] == ["FAIL", "COMPLETE"]
    assert "retry_of" not in found[1].user_attrs


def test_a_child_run_left_running_without_its_trial_is_closed_killed(make_config, store):
    config = make_config(budget="trials: 1")
    tracker = SweepTracker(config)
    tracker.open_sweep()
    params = trial_params(config, {})
    stray = tracker.start_trial(7, params, {})  # its process died before the trial recorded the run

    run_sweep(config, store, Factory())

    runs = Runs(config)
    assert runs.client.get_run(stray).info.status == "KILLED"
    assert runs.running == []


def test_a_trial_of_another_process_that_dies_while_this_loop_waits_is_closed_and_retried(make_config, store):
    config = make_config(budget="trials: 2")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running_trial_of(config, store, other.pid)

        def kill_other_meanwhile(job: TrialJob) -> float:
            other.kill()
            other.wait()  # reaped: a zombie would still answer kill(pid, 0)
            return 1.0

        outcome = run_sweep(config, store, Factory(kill_other_meanwhile))
    finally:
        other.kill()
        other.wait()

    found = trials(config, store)
    assert [t.state.name for t in found] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert found[2].user_attrs["retry_of"] == 0 and found[2].params == found[0].params
    assert outcome.ran == [1, 2]
    assert Runs(config).trial_statuses == {0: "FAILED", 1: "FINISHED", 2: "FINISHED"}


# -- interrupts and crashes -----------------------------------------------------------------------


def raising(exc: BaseException) -> Script:
    def script(job: TrialJob):
        raise exc

    return script


def test_an_interrupt_closes_running_trials_killed_and_re_raises(make_config, store):
    config = make_config(budget="trials: 4")
    factory = Factory(raising(KeyboardInterrupt()), capacity=2)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, store, factory)

    assert states(config, store) == ["FAIL", "FAIL"]
    runs = Runs(config)
    assert runs.trial_statuses == {0: "KILLED", 1: "KILLED"}
    assert runs.trial(1).data.tags["optuna.state"] == "FAIL"
    assert runs.parent.info.status == "KILLED"
    assert runs.running == []
    assert factory.built.closed is True


def test_an_executor_crash_closes_running_trials_failed_and_re_raises(make_config, store):
    config = make_config(budget="trials: 4")
    factory = Factory(
        raising(ExecutorCrashed("Traceback ...\nNameError: name 'x' is not defined")), capacity=2
    )

    with pytest.raises(ExecutorCrashed):
        run_sweep(config, store, factory)

    assert states(config, store) == ["FAIL", "FAIL"]
    runs = Runs(config)
    assert runs.trial_statuses == {0: "FAILED", 1: "FAILED"}
    assert "NameError: name 'x' is not defined" in runs.trial(0).data.tags["error"]
    assert runs.parent.info.status == "FAILED"
    assert runs.running == []
    assert factory.built.closed is True


def test_an_unwritable_artifact_store_fails_the_trial_and_the_sweep_goes_on(make_config, store, tmp_path):
    config = make_config(budget="trials: 2")
    adapter = tmp_path / "adapter-0"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    artifacts = Path(config.tracking.artifact_location)

    def break_artifacts():  # after the experiment and the parent run exist
        shutil.rmtree(artifacts)
        artifacts.write_text("not a folder")

    script = lambda job: complete(1.0, adapter_path=str(adapter)) if job.number == 0 else 2.0

    outcome = run_sweep(config, store, Factory(script, before=break_artifacts))

    found = trials(config, store)
    assert [t.state.name for t in found] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert "adapter_uri" not in found[0].user_attrs
    assert "could not store" in found[0].user_attrs["error"]
    assert outcome.finished == 2
    runs = Runs(config)
    assert runs.trial_statuses == {0: "FAILED", 1: "FINISHED", 2: "FINISHED"}
    assert runs.trial(0).data.tags["optuna.state"] == "FAIL"
    assert runs.parent.info.status == "FINISHED"
    assert runs.running == []


# -- seeding --------------------------------------------------------------------------------------


def draws(config: SweepConfig, store: Store) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in trials(config, store)]


def test_a_resumed_sweep_never_repeats_a_draw(make_config, store):
    config = make_config(budget="trials: 2")
    run_sweep(config, store, Factory())
    run_sweep(config, store, Factory(), n_trials=4)

    found = draws(config, store)
    assert len(found) == 4
    assert len(set(found)) == 4


def test_two_loops_sharing_a_store_never_repeat_a_draw_nor_overshoot(make_config, store):
    config = make_config(budget="trials: 4")
    both_running = threading.Barrier(2, timeout=30)
    outcomes: list[SweepOutcome] = []
    errors: list[BaseException] = []

    def paced() -> Script:
        first = [True]

        def script(job: TrialJob) -> float:
            if first.pop() if first else False:
                both_running.wait()  # each loop's first trial waits until the other's runs too
            time.sleep(0.05)
            return 1.0

        return script

    def loop() -> None:
        try:
            outcomes.append(run_sweep(config, store, Factory(paced())))
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert not both_running.broken
    found = draws(config, store)
    assert len(found) == 4 and len(set(found)) == 4
    assert states(config, store) == ["COMPLETE"] * 4
    assert sorted(outcomes[0].ran + outcomes[1].ran) == list(range(4))
    assert outcomes[0].ran and outcomes[1].ran
    assert Runs(config).running == []


def test_the_same_seed_gives_the_same_draws_in_a_new_store(make_config, store, tmp_path):
    config = make_config(budget="trials: 2")
    run_sweep(config, store, Factory())
    other = Store(tmp_path / "other")

    run_sweep(
        config.model_copy(update={"tracking": config.tracking.model_copy(update={"experiment": "again"})}),
        other,
        Factory(),
    )

    assert draws(config, other) == draws(config, store)


# -- nothing left behind on unexpected errors -----------------------------------------------------


def test_an_executor_that_fails_to_start_leaves_the_parent_failed(make_config, store):
    config = make_config(budget="trials: 2")

    def broken(parent_id, on_step):
        raise RuntimeError("ray.init failed")

    with pytest.raises(RuntimeError):
        run_sweep(config, store, broken)

    runs = Runs(config)
    assert runs.parent.info.status == "FAILED"
    assert runs.running == []


def test_an_interrupt_while_the_executor_starts_leaves_the_parent_killed(make_config, store):
    config = make_config(budget="trials: 2")

    def interrupted(parent_id, on_step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, store, interrupted)

    runs = Runs(config)
    assert runs.parent.info.status == "KILLED"
    assert runs.running == []


def test_an_unexpected_error_from_the_executor_fails_the_parent_and_its_running_trials(make_config, store):
    config = make_config(budget="trials: 4")
    factory = Factory(raising(RuntimeError("the Ray cluster went away")), capacity=2)

    with pytest.raises(RuntimeError):
        run_sweep(config, store, factory)

    assert states(config, store) == ["FAIL", "FAIL"]
    runs = Runs(config)
    assert runs.trial_statuses == {0: "FAILED", 1: "FAILED"}
    assert runs.parent.info.status == "FAILED"
    assert runs.running == []


def test_an_executor_crash_without_a_message_still_closes_its_trials(make_config, store):
    config = make_config(budget="trials: 2")

    with pytest.raises(ExecutorCrashed):
        run_sweep(config, store, Factory(raising(ExecutorCrashed(""))))

    assert states(config, store) == ["FAIL"]
    assert Runs(config).trial_statuses == {0: "FAILED"}


def test_a_trial_asks_the_sweeps_own_pruner_not_optunas_default(make_config, store, tmp_path):
    # Optuna's default pruner (median, after 5 trials) would let the second trial go on.
    config = make_config(extra="pruner: {type: median, n_startup_trials: 1, eval_every_steps: 2}")
    study = open_study(config, store)
    first = study.ask()
    first.report(1.0, 2)
    study.tell(first, 1.0)
    second = study.ask()
    job = TrialJob(
        number=second.number,
        trial_id=second._trial_id,
        params=TrialParams(),
        run_id="run",
        work_dir=str(tmp_path),
    )
    report = TrialHost(config, store, runner=None).callbacks(job, lambda *_: None).report

    assert report(10.0, 2) is False
