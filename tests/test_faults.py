"""Faults never kill a sweep or lose a result: OOM, a killed worker, a full disk, parallel workers, SIGTERM."""

from __future__ import annotations

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


def test_fault_spec_is_parsed_per_trial():
    assert planned_faults("1:oom@2, 3:sigkill, 4:disk_full") == {
        1: Fault(1, "oom", 2),
        3: Fault(3, "sigkill", 1),
        4: Fault(4, "disk_full", 1),
    }


def test_unknown_fault_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        planned_faults("1:melt")


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


def test_two_workers_finish_exactly_n_distinct_trials(write_config):
    config = write_config()
    result = sweep("run", config, "--trials", 4, "--workers", 2)
    assert result.exit_code == 0, result.output
    history = trials("tiny")
    assert [t.state.name for t in history] == ["COMPLETE"] * 4
    assert len({tuple(sorted(t.params.items())) for t in history}) == 4
    assert len({t.user_attrs["pid"] for t in history}) == 2
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)


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

    short = config.read_text().replace("max_steps: 200", "max_steps: 4")
    config.write_text(short)
    rerun = subprocess.run(
        command, check=False, cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert trial_states("tiny").count("COMPLETE") == 3
    assert "RUNNING" not in [c.info.status for c in runs("tiny")[1]]
