"""The Ray backend: the same trials, the same MLflow structure, on a local Ray."""

from __future__ import annotations

import importlib.util

import pytest

from tests.test_sweep import runs, sweep, trial_states

pytestmark = [
    pytest.mark.slow,  # every test runs trials on local Ray
    # Looked up, not imported: importing Ray takes seconds of every run's collection, fast tier included.
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed"),
    pytest.mark.usefixtures("mlflow_db"),
]


@pytest.mark.slow
def test_a_ray_sweep_records_the_same_structure_as_the_local_backend(write_config):
    config = write_config(extra="backend: ray\nray: {num_cpus: 2, num_gpus: 0, cpus_per_trial: 1}")
    result = sweep("run", config, "--trials", 3)
    assert result.exit_code == 0, result.output
    assert trial_states("tiny") == ["COMPLETE"] * 3
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 3
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"objective", "eval_loss", "peak_memory_mb", "time_train_s", "train_tokens_per_s"} <= set(
            child.data.metrics
        )
    best = sweep("best", config)
    assert best.exit_code == 0 and "file://" in best.output


@pytest.mark.slow
def test_the_sweeps_pruner_prunes_ray_trials_and_leaves_no_run_running(write_config):
    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-6, high: 3.0e-2, log: true}",
        training="max_steps: 12\nper_device_batch_size: 8\ncutoff_len: 48\nmethod: full",
        extra=(
            "backend: ray\nray: {num_cpus: 2, num_gpus: 0, cpus_per_trial: 1}\n"
            "pruner: {type: hyperband, min_resource: 1, reduction_factor: 2, eval_every_steps: 2, eval_samples: 8}"
        ),
    )
    result = sweep("run", config, "--trials", 4)
    assert result.exit_code == 0, result.output
    states = trial_states("tiny")
    assert len(states) == 4 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    pruned = [c for c in children if c.data.tags["optuna.state"] == "PRUNED"]
    assert len(pruned) == states.count("PRUNED")


RAY = "backend: ray\nray: {num_cpus: 2, num_gpus: 0, cpus_per_trial: 1}"


@pytest.mark.slow
def test_on_ray_an_orphaned_trial_is_closed_and_the_failure_budget_stops_the_sweep(
    write_config, project, monkeypatch
):
    import os
    import subprocess
    import sys

    import optuna

    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}",
        training="max_steps: 2\nper_device_batch_size: 8\ncutoff_len: 48",
        # One trial at a time, so the budget is met exactly (with two, the second slot's trial runs on).
        extra=(
            "backend: ray\nray: {num_cpus: 2, num_gpus: 0, cpus_per_trial: 1, max_concurrent_trials: 1}\n"
            "budget: {max_failed_trials: 2}"
        ),
    )
    # A trial left RUNNING by a sweep process that died (kill -9) before this one started.
    (project / "mlruns" / "optuna").mkdir(parents=True)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend("mlruns/optuna/tiny.journal")
    )
    orphan = optuna.create_study(study_name="tiny", storage=storage).ask()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan.set_user_attr("host", os.uname().nodename)
    orphan.set_user_attr("pid", dead.pid)

    # Trial 0 is the orphan; every trial after it fails (the orphan's retry first).
    monkeypatch.setenv("SWEEP_FAULTS", ",".join(f"{n}:raise@1" for n in range(1, 6)))
    result = sweep("run", config, "--trials", 5)
    assert result.exit_code == 1, result.output
    assert "2 trials failed in this run (budget.max_failed_trials = 2)" in result.output
    assert trial_states("tiny") == ["FAIL", "FAIL", "FAIL"]  # the orphan closed, then two failures
    parent, children = runs("tiny")
    assert parent.info.status == "FAILED"
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert all("injected failure at step 1" in c.data.tags["error"] for c in children)


@pytest.mark.slow
def test_on_ray_an_oom_trial_is_retried_at_half_the_batch_and_a_dead_actors_trial_is_retried(
    write_config, monkeypatch
):
    monkeypatch.setenv("SWEEP_FAULTS", "0:oom@1,1:sigkill@1")
    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}",
        training="max_steps: 3\nper_device_batch_size: 8\ncutoff_len: 48",
        extra=RAY,
    )
    result = sweep("run", config, "--trials", 2)
    assert result.exit_code == 0, result.output
    from tests.test_faults import by_number, trials

    history = trials("tiny")
    assert [t.state.name for t in history[:2]] == ["FAIL", "FAIL"]
    assert sorted(t.state.name for t in history[2:]) == ["COMPLETE", "COMPLETE"]
    retries = {t.user_attrs["retry_of"]: t for t in history[2:]}
    assert set(retries) == {0, 1}
    assert all(retries[n].params == history[n].params for n in (0, 1))
    parent, children = runs("tiny")
    children = by_number(children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["worker_restarts"] == 1
    assert children[0].info.status == "FAILED" and "OutOfMemoryError" in children[0].data.tags["error"]
    assert children[1].info.status == "FAILED" and children[1].data.tags["error"].startswith("Ray actor died")
    halved = children[retries[0].number].data.params
    assert (halved["per_device_batch_size"], halved["gradient_accumulation_steps"]) == ("4", "2")
    assert all(children[t.number].info.status == "FINISHED" for t in history[2:])
