"""`sweep run` with packed trials (`workers.pack`), end to end on CPU: the loop, the pack, both stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.test_sweep import REPO, runs, sweep, trial_states, wait_for

pytestmark = pytest.mark.slow

LORA_SPACE = """
learning_rate: {type: float, low: 1.0e-5, high: 5.0e-1, log: true}
lora_rank: {type: categorical, choices: [2, 4, 8]}
use_rslora: {type: bool}
"""
PACK = "workers: {pack: 3}"
HYPERBAND = (
    "pruner: {type: hyperband, min_resource: 2, reduction_factor: 2, eval_every_steps: 2, eval_samples: 8}"
)


def client() -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")


def test_a_packed_sweep_with_hyperband_finishes_n_monitored_trials_and_refills_pruned_slots(write_config):
    config = write_config(
        space=LORA_SPACE,
        training="max_steps: 8\nper_device_batch_size: 8\ncutoff_len: 48",
        extra=f"{PACK}\n{HYPERBAND}\ntracking: {{system_metrics: true, system_metrics_interval: 0.2}}",
    )
    result = sweep("run", config, "--trials", 7)
    assert result.exit_code == 0, result.output
    states = trial_states("tiny")
    assert states.count("COMPLETE") + states.count("PRUNED") == 7 and "RUNNING" not in states
    assert "PRUNED" in states and "COMPLETE" in states
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED" and len(children) == 7
    assert all(c.info.status == "FINISHED" for c in children)
    # Seven trials through three slots: slots were refilled as trials ended, pruned ones included.
    assert {c.data.metrics["pack_size"] for c in children} <= {1.0, 2.0, 3.0}
    assert max(c.data.metrics["pack_size"] for c in children) == 3.0
    first_end = min(c.info.end_time for c in children)
    assert sum(c.info.start_time >= first_end for c in children) >= 4
    for child in children:
        curve = client().get_metric_history(child.info.run_id, "train_loss")
        assert len(curve) >= 2 and curve[0].step == 1
        # Each packed trial's run has the machine's time series while it was in the pack.
        assert client().get_metric_history(child.info.run_id, "system/cpu_utilization_percentage")
        if child.data.tags["optuna.state"] == "COMPLETE":
            files = {f.path for f in client().list_artifacts(child.info.run_id, "adapter")}
            assert "adapter/adapter_model.safetensors" in files and "adapter/adapter_config.json" in files


def test_sigint_mid_pack_then_rerun_resumes_to_n_with_nothing_running(write_config, project):
    config = write_config(
        space=LORA_SPACE,
        training="max_steps: 80\nper_device_batch_size: 8\ncutoff_len: 48",
        extra=PACK,
    )
    command = [sys.executable, "-m", "sweeps.cli", "run", str(config), "--trials", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = project / "mlruns" / "optuna" / "tiny.journal"

    def pack_is_full() -> bool:
        if not journal.exists():
            return False
        ops = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        return sum(op.get("op_code") == 4 for op in ops) >= 3  # 4: CREATE_TRIAL

    wait_for(pack_is_full, 180)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    states = trial_states("tiny")
    assert "RUNNING" not in states and states.count("FAIL") >= 3
    parent, children = runs("tiny")
    assert parent.info.status == "KILLED"
    assert sum(c.info.status == "KILLED" for c in children) >= 3

    short = config.read_text().replace("max_steps: 80", "max_steps: 4")
    config.write_text(short)
    rerun = subprocess.run(
        command, check=False, cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert trial_states("tiny").count("COMPLETE") == 4
    parent, children = runs("tiny")
    assert "RUNNING" not in [parent.info.status, *(c.info.status for c in children)]
