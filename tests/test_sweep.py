"""`sweep run` end to end: MLflow records, Optuna trials, resume, failures, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from core.config import load_config
from sweeps.cli import app

REPO = Path(__file__).resolve().parent.parent


def sweep(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def runs(experiment: str) -> tuple[object, list]:
    client = MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in found if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1
    return parents[0], [r for r in found if r.data.tags.get("sweep.role") == "trial"]


def trial_states(name: str) -> list[str]:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"mlruns/optuna/{name}.journal")
    )
    return [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]


@pytest.mark.slow
def test_a_sweep_records_one_parent_and_one_child_run_per_trial(write_config):
    result = sweep("run", write_config(), "--trials", 3)
    assert result.exit_code == 0, result.output
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_complete"] == 3
    assert "best_value" in parent.data.metrics and "best.params" in parent.data.tags
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2]
    client = MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "config")] == ["config/tiny.yaml"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna.state"] == "COMPLETE"
        assert {"learning_rate", "method", "lora_rank", "cutoff_len", "use_rslora"} <= set(child.data.params)
        assert {
            "objective",
            "eval_loss",
            "peak_memory_mb",
            "time_load_s",
            "time_train_s",
            "time_eval_s",
            "train_tokens_per_s",
        } <= set(child.data.metrics)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [1, 2, 3, 4]
        artifact = "model" if child.data.params["method"] == "full" else "adapter"
        names = {Path(a.path).name for a in client.list_artifacts(child.info.run_id, artifact)}
        assert names & {"adapter_model.safetensors", "model.safetensors"}
    assert trial_states("tiny") == ["COMPLETE"] * 3


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_rerunning_a_finished_sweep_runs_nothing_and_exits_zero(write_config):
    config = write_config()
    sweep("run", config, "--trials", 2)
    again = sweep("run", config, "--trials", 2)
    assert again.exit_code == 0
    assert "already has 2/2 finished trials" in again.output
    assert len(runs("tiny")[1]) == 2


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_asking_for_more_trials_runs_only_the_missing_ones(write_config):
    config = write_config()
    sweep("run", config, "--trials", 2)
    assert sweep("run", config, "--trials", 3).exit_code == 0
    parent, children = runs("tiny")
    assert len(children) == 3 and parent.info.status == "FINISHED"
    assert trial_states("tiny") == ["COMPLETE"] * 3


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_status_and_best_report_the_sweep(write_config):
    config = write_config()
    sweep("run", config, "--trials", 2)
    status = sweep("status", config)
    assert status.exit_code == 0 and "2 complete, 0 pruned, 0 failed" in status.output
    best = sweep("best", config)
    assert best.exit_code == 0
    assert "adapter" in best.output and "file://" in best.output


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_failed_trials_are_recorded_and_the_sweep_stops_at_max_failed(write_config):
    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}",
        training="max_steps: 2\ncutoff_len: 8",
        extra="budget: {max_failed_trials: 2}",
    )
    result = sweep("run", config, "--trials", 5)
    assert result.exit_code == 1
    assert "2 trials failed in this run (budget.max_failed_trials = 2)" in result.output
    parent, children = runs("tiny")
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert all("cutoff_len=8 leaves no reply token" in c.data.tags["error"] for c in children)
    assert parent.info.status == "FAILED"
    assert trial_states("tiny") == ["FAIL", "FAIL"]


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_trial_orphaned_by_a_killed_process_is_closed_on_resume(write_config):
    config = write_config()
    sweep("run", config, "--trials", 1)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend("mlruns/optuna/tiny.journal")
    )
    study = optuna.load_study(study_name="tiny", storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask()
    orphan.set_user_attr("host", os.uname().nodename)
    orphan.set_user_attr("pid", dead.pid)
    client = MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    parent, _ = runs("tiny")
    client.create_run(
        parent.info.experiment_id, tags={"mlflow.parentRunId": parent.info.run_id, "sweep.role": "trial"}
    )

    assert sweep("run", config, "--trials", 2).exit_code == 0
    assert trial_states("tiny") == ["COMPLETE", "FAIL", "COMPLETE"]
    statuses = sorted(c.info.status for c in runs("tiny")[1])
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_missing_model_path_exits_2_before_anything_is_recorded(write_config, project):
    config = write_config()
    config.write_text(config.read_text().replace("name_or_path: /", "name_or_path: /no/such/"))
    result = sweep("run", config)
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "tiny.yaml:3: model.name_or_path: model path '/no/such/" in line and "does not exist" in line
    assert not (project / "mlruns" / "mlflow.db").exists()


def test_a_malformed_data_row_exits_2_naming_file_and_line(write_config, project):
    bad = project / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    config = write_config()
    text = config.read_text()
    train_line = next(line for line in text.splitlines() if "train_file" in line)
    config.write_text(text.replace(train_line, f"  train_file: {bad}"))
    result = sweep("run", config)
    assert result.exit_code == 2
    assert f"{bad}:2: alpaca row needs 'instruction' and 'output'" in one_line_error(result)


def test_a_config_typo_exits_2_with_file_line_and_field(write_config):
    config = write_config(extra="samplr: {type: tpe}")
    result = sweep("run", config)
    assert result.exit_code == 2
    assert (
        "tiny.yaml:" in one_line_error(result) and "samplr: unknown field 'samplr'; allowed:" in result.output
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
def test_qlora_on_a_machine_without_cuda_exits_2_before_loading(write_config):
    config = write_config(space="method: {type: categorical, choices: [lora, qlora]}")
    result = sweep("run", config)
    assert result.exit_code == 2
    assert "space.method.choices: method qlora needs a CUDA GPU" in one_line_error(result)


def wait_for(predicate, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_sigint_during_the_second_trial_then_rerun_completes_without_running_runs(write_config, project):
    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}",
        training="max_steps: 100\nper_device_batch_size: 8\ncutoff_len: 48",
    )
    command = [sys.executable, "-m", "sweeps.cli", "run", str(config), "--trials", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # The trainer makes the trial's folder as it starts: the signal lands with its 100 steps ahead.
    wait_for((project / "mlruns" / "trials" / "tiny" / "trial-1").exists, 120)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, output
    assert trial_states("tiny") == ["COMPLETE", "FAIL"]
    assert sorted(c.info.status for c in runs("tiny")[1]) == ["FINISHED", "KILLED"]

    # The rerun only has to finish what is missing: short trials, and in this process, which has
    # already paid for the imports a fresh `sweep` process would make.
    config.write_text(config.read_text().replace("max_steps: 100", "max_steps: 4"))
    rerun = sweep("run", config, "--trials", 3)
    assert rerun.exit_code == 0, rerun.output
    assert trial_states("tiny").count("COMPLETE") == 3
    parent, children = runs("tiny")
    assert "RUNNING" not in [parent.info.status, *(c.info.status for c in children)]


@pytest.mark.parametrize(("user_setting", "seen"), [(None, "1"), ("2", "2")])
def test_the_demo_runs_torch_on_one_thread_unless_the_user_sets_it(monkeypatch, user_setting, seen):
    if user_setting is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user_setting)
    threads_at_start: list[str | None] = []
    monkeypatch.setattr(
        "sweeps.cli._run", lambda *a, **k: threads_at_start.append(os.environ.get("OMP_NUM_THREADS"))
    )
    assert sweep("demo").exit_code == 0
    assert threads_at_start == [seen]


@pytest.mark.slow
def test_the_demo_space_runs_offline_and_finds_a_best_trial(project):
    result = sweep("demo")
    assert result.exit_code == 0, result.output
    assert "best trial of 'demo'" in result.output
    # The demo must show a sweep deciding something: one trial solves the word problems, one does not.
    accuracies = [c.data.metrics["objective"] for c in runs("demo")[1]]
    assert len(accuracies) == load_config(REPO / "search_spaces" / "demo.yaml").budget.trials
    assert max(accuracies) >= 0.9 and min(accuracies) <= 0.3, accuracies
    assert "sweep report" in result.output and "sweep ui" in result.output


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_hyperband_pruner_prunes_bad_trials_and_mlflow_shows_them_pruned(write_config):
    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-6, high: 3.0e-2, log: true}",
        training="max_steps: 12\nper_device_batch_size: 8\ncutoff_len: 48\nmethod: full",
        extra="pruner: {type: hyperband, min_resource: 2, reduction_factor: 2, eval_every_steps: 2, eval_samples: 8}",
    )
    result = sweep("run", config, "--trials", 8)
    assert result.exit_code == 0, result.output
    states = trial_states("tiny")
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 1
    client = MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    pruned = [c for c in runs("tiny")[1] if c.data.tags["optuna.state"] == "PRUNED"]
    assert pruned and all(c.info.status == "FINISHED" for c in pruned)
    for run in pruned:
        curve = client.get_metric_history(run.info.run_id, "intermediate_objective")
        assert len(curve) >= 1
        assert run.data.metrics["pruned_at_step"] == curve[-1].step
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")][-1] == curve[
            -1
        ].step


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_minimising_peak_memory_too_gives_a_pareto_front(write_config):
    config = write_config(
        extra="sampler: {type: nsga2, seed: 0}\nobjective_extra: null",
    )
    config.write_text(
        config.read_text()
        .replace("objective_extra: null\n", "")
        .replace("  name: eval_loss\n", "  name: eval_loss\n  minimize_peak_memory: true\n")
        .replace("sampler:\n  type: random\n  seed: 0\n", "")
    )
    result = sweep("run", config, "--trials", 3)
    assert result.exit_code == 0, result.output
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend("mlruns/optuna/tiny.journal")
    )
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.directions) == 2
    assert all(len(t.values) == 2 and t.values[1] > 0 for t in study.trials)
    best = sweep("best", config)
    assert best.exit_code == 0 and "Pareto front" in best.output


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_grid_sweep_covers_each_point_once_and_stops(write_config):
    config = write_config(
        space="learning_rate: {type: categorical, choices: [0.001, 0.01]}",
        extra="sampler: {type: grid}",
    )
    config.write_text(config.read_text().replace("sampler:\n  type: random\n  seed: 0\n", ""))
    result = sweep("run", config, "--trials", 5)
    assert result.exit_code == 0, result.output
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend("mlruns/optuna/tiny.journal")
    )
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert sorted(t.params["learning_rate"] for t in trials) == [0.001, 0.01]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
