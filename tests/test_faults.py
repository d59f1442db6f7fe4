"""Faults never kill a sweep or lose a result: OOM, a killed worker, a full disk, parallel workers, SIGTERM."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys

import pytest

from runners.faults import Fault, planned_faults
from tests.test_sweep import REPO, runs, sweep, trial_states, wait_for


def trials(name: str):
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"mlruns/optuna/{name}.journal")
    )
    return optuna.load_study(study_name=name, storage=storage).trials


def by_number(children) -> dict[int, object]:
    return {int(c.data.tags["optuna.trial_number"]): c for c in children}


# Trials no wait of these tests outlasts: a signal or a kill always finds them training, never between
# a trial that just ended and the next (a worker that started late would otherwise find its partner's
# first trial over).
ENDLESS = "max_steps: 100000\nper_device_batch_size: 8\ncutoff_len: 48"


def test_fault_spec_is_parsed_per_trial():
    assert planned_faults("1:oom@2, 3:sigkill, 4:disk_full") == {
        1: Fault(1, "oom", 2),
        3: Fault(3, "sigkill", 1),
        4: Fault(4, "disk_full", 1),
    }


def test_unknown_fault_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        planned_faults("1:melt")


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_out_of_memory_fails_the_trial_with_its_peak_and_retries_at_half_the_batch(write_config, monkeypatch):
    monkeypatch.setenv("SWEEP_FAULTS", "0:oom@1")
    config = write_config(space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    result = sweep("run", config, "--trials", 2)
    assert result.exit_code == 0, result.output
    history = trials("tiny")
    assert [t.state.name for t in history] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert history[1].user_attrs["retry_of"] == 0
    assert history[1].params == history[0].params
    children = by_number(runs("tiny")[1])
    failed = children[0]
    assert failed.info.status == "FAILED"
    assert "OutOfMemoryError: injected out of memory at step 1" in failed.data.tags["error"]
    assert failed.data.metrics["peak_memory_mb"] > 64
    retried = children[1].data.params
    assert (retried["per_device_batch_size"], retried["gradient_accumulation_steps"]) == ("4", "2")


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_full_disk_while_saving_fails_the_trial_and_leaves_no_adapter(write_config, monkeypatch, project):
    monkeypatch.setenv("SWEEP_FAULTS", "0:disk_full")
    config = write_config(space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    result = sweep("run", config, "--trials", 1)
    assert result.exit_code == 0, result.output
    assert trial_states("tiny") == ["FAIL", "COMPLETE"]
    failed = by_number(runs("tiny")[1])[0]
    assert "No space left on device" in failed.data.tags["error"]
    trial_dir = project / "mlruns" / "trials" / "tiny" / "trial-0"
    assert not (trial_dir / "adapter").exists() and not (trial_dir / "adapter.partial").exists()
    assert "adapter_uri" not in trials("tiny")[0].user_attrs


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_two_workers_finish_exactly_n_distinct_trials(write_config):
    config = write_config()
    result = sweep("run", config, "--trials", 4, "--workers", 2)
    assert result.exit_code == 0, result.output
    history = trials("tiny")
    assert [t.state.name for t in history] == ["COMPLETE"] * 4
    assert len({tuple(sorted(t.params.items())) for t in history}) == 4
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED" and len(children) == 4
    # Two workers: some trial started before another one ended.
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
    assert all(c.info.status == "FINISHED" for c in children)


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_sigkilled_worker_fails_its_trial_which_is_retried_by_a_restarted_worker(write_config, monkeypatch):
    monkeypatch.setenv("SWEEP_FAULTS", "1:sigkill@2")
    config = write_config(training="max_steps: 6\nper_device_batch_size: 8\ncutoff_len: 48")
    result = sweep("run", config, "--trials", 3, "--workers", 2)
    assert result.exit_code == 0, result.output
    history = trials("tiny")
    assert history[1].state.name == "FAIL"
    retry = next(t for t in history if t.user_attrs.get("retry_of") == 1)
    assert retry.state.name == "COMPLETE" and retry.params == history[1].params
    assert sum(t.state.name == "COMPLETE" for t in history) == 3
    parent, children = runs("tiny")
    killed = by_number(children)[1]
    assert killed.info.status == "FAILED"
    assert killed.data.tags["error"] == "worker process died (exit code -9)"
    assert parent.data.metrics["worker_restarts"] == 1


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_sigterm_stops_a_two_worker_sweep_cleanly_and_a_rerun_finishes(write_config, project):
    config = write_config(training="max_steps: 200\nper_device_batch_size: 8\ncutoff_len: 48")
    command = [sys.executable, "-m", "sweeps.cli", "run", str(config), "--trials", "3", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = project / "mlruns" / "optuna" / "tiny.journal"
    wait_for(lambda: journal.exists() and journal.read_text().count('"op_code":4') >= 2, 180)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert "RUNNING" not in trial_states("tiny")
    parent, children = runs("tiny")
    assert parent.info.status == "KILLED"
    assert {c.info.status for c in children} <= {"KILLED", "FINISHED"} and "KILLED" in {
        c.info.status for c in children
    }

    # The same command again, in this process (its imports already paid for), with short trials.
    config.write_text(config.read_text().replace("max_steps: 200", "max_steps: 4"))
    rerun = sweep("run", config, "--trials", 3, "--workers", 2)
    assert rerun.exit_code == 0, rerun.output
    assert trial_states("tiny").count("COMPLETE") == 3
    assert "RUNNING" not in [c.info.status for c in runs("tiny")[1]]


# -- faults that must leave nothing behind (issue 9) ---------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_ui_on_a_port_in_use_exits_1_with_one_line(project):
    import socket

    from tests.test_sweep import one_line_error

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = sweep("ui", "--port", port)
    assert result.exit_code == 1, result.output
    assert f"cannot serve on 127.0.0.1:{port}" in one_line_error(result)


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_to_sweep_ui_stops_the_mlflow_server_and_everything_it_started(project, signum):
    import socket

    import psutil

    port = _free_port()
    command = [sys.executable, "-m", "sweeps.cli", "ui", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started: list = []
    try:

        def serving() -> bool:
            assert proc.poll() is None, "sweep ui exited before serving"
            with socket.socket() as client:
                client.settimeout(0.5)
                return client.connect_ex(("127.0.0.1", port)) == 0

        wait_for(serving, 240)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "sweep ui started no server process"
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 130
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        # Never leave a server behind, even when the test failed: the server runs in its own
        # session, so killing `sweep ui` alone would orphan it.
        with contextlib.suppress(psutil.Error):
            started += psutil.Process(proc.pid).children(recursive=True)
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for leftover in [proc, *started]:
            with contextlib.suppress(Exception):
                leftover.kill()


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _created_trials(journal) -> int:
    return journal.read_text().count('"op_code":4')  # 4: CREATE_TRIAL


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_kill_9_of_a_two_worker_orchestrator_stops_its_workers_and_a_rerun_closes_everything(
    write_config, project
):
    import time

    import psutil

    config = write_config(training=ENDLESS)
    command = [sys.executable, "-m", "sweeps.cli", "run", str(config), "--trials", "3", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    scratch = project / "mlruns" / "trials" / "tiny"
    journal = project / "mlruns" / "optuna" / "tiny.journal"
    # Each trainer makes its trial's folder as it starts: then both workers are training.
    wait_for(lambda: (scratch / "trial-0").exists() and (scratch / "trial-1").exists(), 300)
    workers = psutil.Process(proc.pid).children(recursive=True)
    created = _created_trials(journal)
    proc.kill()
    proc.wait()
    killed_at = time.monotonic()
    try:
        wait_for(lambda: not any(_alive(w) for w in workers), 60)
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.kill()
    print(f"workers gone {time.monotonic() - killed_at:.1f} s after the orchestrator's kill -9")
    assert _created_trials(journal) == created  # no new trial after the orchestrator died
    # The workers closed their own trials: nothing is left RUNNING but the parent (its owner died).
    assert trial_states("tiny") == ["FAIL", "FAIL"]
    parent, children = runs("tiny")
    assert sorted(c.info.status for c in children) == ["KILLED", "KILLED"]
    assert {c.data.tags["error"] for c in children} == {"the sweep's orchestrator died"}

    # The same command again, in this process (its imports already paid for), with short trials.
    config.write_text(config.read_text().replace("max_steps: 100000", "max_steps: 4"))
    rerun = sweep("run", config, "--trials", 3, "--workers", 2)
    assert rerun.exit_code == 0, rerun.output
    states = trial_states("tiny")
    assert states.count("COMPLETE") == 3 and "RUNNING" not in states
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED"
    assert "RUNNING" not in {c.info.status for c in children}


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_rerun_closes_trials_left_running_by_workers_that_died_with_their_orchestrator(write_config):
    """The other half of kill -9: workers that could not close their trials (killed too)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from tests.test_sweep import Path

    config = write_config()
    assert sweep("run", config, "--trials", 1).exit_code == 0
    study = optuna.load_study(
        study_name="tiny",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend("mlruns/optuna/tiny.journal")
        ),
    )
    parent, _ = runs("tiny")
    client = MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    for _ in range(2):  # two trials of two dead workers, claimed by a dead orchestrator
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        orphan = study.ask()
        orphan.set_user_attr("host", os.uname().nodename)
        orphan.set_user_attr("pid", dead.pid)
        run = client.create_run(
            parent.info.experiment_id,
            tags={"mlflow.parentRunId": parent.info.run_id, "sweep.role": "trial", "sweep.study": "tiny"},
        )
        orphan.set_user_attr("mlflow_run_id", run.info.run_id)
    client.update_run(parent.info.run_id, status="RUNNING")

    assert sweep("run", config, "--trials", 3, "--workers", 2).exit_code == 0
    states = trial_states("tiny")
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 2 and "RUNNING" not in states
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED"
    assert sorted(c.info.status for c in children).count("FAILED") == 2
    assert "RUNNING" not in {c.info.status for c in children}


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_two_sweeps_of_one_space_started_at_once_both_succeed_with_n_distinct_trials(write_config, project):
    config = write_config(training="max_steps: 2\nper_device_batch_size: 8\ncutoff_len: 48")
    command = [sys.executable, "-m", "sweeps.cli", "run", str(config), "--trials", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    history = trials("tiny")
    finished = [t for t in history if t.state.name == "COMPLETE"]
    assert len(finished) == 4 and len(history) == 4
    assert len({tuple(sorted(t.params.items())) for t in history}) == len(history)
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    # Nothing reached for MLflow's default store on the way out (its tables made in ./mlflow.db,
    # by both processes at once: one of them failed there).
    assert not (project / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_torn_last_journal_record_is_cut_with_a_warning_and_the_sweep_goes_on(write_config, project):
    config = write_config(training="max_steps: 2\nper_device_batch_size: 8\ncutoff_len: 48")
    assert sweep("run", config, "--trials", 1).exit_code == 0
    journal = project / "mlruns" / "optuna" / "tiny.journal"
    whole = journal.read_bytes()
    torn_line = len(whole.splitlines()) + 1
    journal.write_bytes(whole + b'{"op_code":4,"worker_id":"x","study_id":0,"datetime_sta')  # no newline
    result = sweep("run", config, "--trials", 2)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{journal}:{torn_line}: removed a torn last record" in warnings[0]
    assert trial_states("tiny") == ["COMPLETE", "COMPLETE"]

    journal.write_bytes(journal.read_bytes() + b"garbage\n")  # a whole line, but not JSON
    assert sweep("run", config, "--trials", 2).exit_code == 0
    assert trial_states("tiny") == ["COMPLETE", "COMPLETE"]


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_journal_damaged_before_its_last_record_exits_2_naming_file_and_line(write_config, project):
    from tests.test_sweep import one_line_error

    config = write_config(training="max_steps: 2\nper_device_batch_size: 8\ncutoff_len: 48")
    assert sweep("run", config, "--trials", 1).exit_code == 0
    journal = project / "mlruns" / "optuna" / "tiny.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"op_code": 5, "trial_id"\n'
    damaged = b"".join(lines)
    journal.write_bytes(damaged)
    for command in (("run", config, "--trials", 2), ("status", config)):
        result = sweep(*command)
        assert result.exit_code == 2, result.output
        assert f"{journal}:3: the Optuna journal is damaged here" in one_line_error(result)
    assert journal.read_bytes() == damaged  # never "repaired" by guessing


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_promote_with_mlflow_db_deleted_says_what_is_missing_in_one_line(write_config, project):
    from tests.test_sweep import one_line_error

    config = write_config(space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    assert sweep("run", config, "--trials", 1).exit_code == 0
    database = project / "mlruns" / "mlflow.db"
    database.unlink()
    result = sweep("promote", config)
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert f"the MLflow database {database} holding its run" in line and "is missing" in line
    assert not database.exists()  # not created afresh just to find the run missing


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_ctrl_c_of_a_two_worker_sweep_kills_its_trials_in_mlflow_and_fails_them_in_optuna(
    write_config, project
):
    """Ctrl-C reaches the whole process group: the orchestrator and both workers get SIGINT."""
    config = write_config(training=ENDLESS)
    command = [sys.executable, "-m", "sweeps.cli", "run", str(config), "--trials", "3", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        command,
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    scratch = project / "mlruns" / "trials" / "tiny"
    wait_for(lambda: (scratch / "trial-0").exists() and (scratch / "trial-1").exists(), 300)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert trial_states("tiny") == ["FAIL", "FAIL"]
    parent, children = runs("tiny")
    assert parent.info.status == "KILLED"
    assert sorted(c.info.status for c in children) == ["KILLED", "KILLED"]
    assert {c.data.tags["optuna.state"] for c in children} == {"FAIL"}
