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
