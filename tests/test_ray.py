"""The Ray backend: the same trials, the same MLflow structure, on a local Ray."""

from __future__ import annotations

import pytest

from tests.test_sweep import runs, sweep, trial_states

pytest.importorskip("ray")


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


def test_asha_stops_trials_as_pruned_and_leaves_no_run_running(write_config):
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
