"""MLflow as its users expect it: the experiment's kind, datasets as inputs, system metrics, links."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from core.config import load_config
from core.trial import TrialParams
from sweeps.cli import app
from sweeps.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, SweepTracker

# These tests read what a tracker writes into a project's store; none is about MLflow making its schema.
pytestmark = pytest.mark.usefixtures("mlflow_db")


def client() -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")


def opened(config_path: Path) -> tuple[SweepTracker, str]:
    """A tracker with the sweep's parent run open and one trial's child run started."""
    tracker = SweepTracker(load_config(config_path))
    tracker.open_sweep()
    return tracker, tracker.start_trial(0, TrialParams(), {})


def inputs_of(run_id: str) -> dict[str, object]:
    """The run's dataset inputs by context tag (training / eval)."""
    run = client().get_run(run_id)
    return {
        {tag.key: tag.value for tag in found.tags}["mlflow.data.context"]: found.dataset
        for found in run.inputs.dataset_inputs
    }


def test_the_experiment_is_marked_as_model_training(write_config):
    tracker, _ = opened(write_config())
    experiment = client().get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_experiment_made_before_the_kind_existed_gets_it(write_config):
    client().create_experiment("tiny")
    tracker = SweepTracker(load_config(write_config()))
    assert client().get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_parent_run_has_train_and_eval_files_as_dataset_inputs(write_config, sort_data):
    tracker, _ = opened(write_config())
    found = inputs_of(tracker.parent_id)
    assert set(found) == {"training", "eval"}
    for context, path in zip(("training", "eval"), sort_data):
        dataset = found[context]
        assert dataset.name == path.name
        assert dataset.source_type == "local"
        assert json.loads(dataset.source) == {"uri": str(path.resolve())}
        assert len(dataset.digest) == 12
    assert json.loads(found["training"].profile)["num_rows"] == 48
    assert json.loads(found["eval"].profile)["num_rows"] == 16


def test_each_trial_run_has_the_same_dataset_inputs_as_the_parent(write_config):
    tracker, run_id = opened(write_config())
    child, parent = inputs_of(run_id), inputs_of(tracker.parent_id)
    assert {c: (d.name, d.digest, d.source) for c, d in child.items()} == {
        c: (d.name, d.digest, d.source) for c, d in parent.items()
    }


def test_the_digest_follows_the_data_not_the_file_name(write_config, sort_data, project):
    first, _ = opened(write_config(name="one"))
    train = sort_data[0]
    copy = project / "copy.jsonl"
    copy.write_text(train.read_text())
    second = SweepTracker(load_config(write_config(name="two")))
    second.config.data.train_file = copy
    digests = [inputs_of(first.parent_id)["training"].digest, second.dataset_inputs()[0].dataset.digest]
    assert digests[0] == digests[1]
    copy.write_text(train.read_text().replace("1", "7"))
    third = SweepTracker(load_config(write_config(name="three")))
    third.config.data.train_file = copy
    assert third.dataset_inputs()[0].dataset.digest != digests[0]


def test_a_held_out_eval_split_names_the_train_file_and_the_split(write_config, sort_data, project):
    path = write_config()
    path.write_text("\n".join(line for line in path.read_text().splitlines() if "eval_file" not in line))
    tracker, _ = opened(path)
    evaluation = inputs_of(tracker.parent_id)["eval"]
    assert json.loads(evaluation.source)["uri"] == str(sort_data[0].resolve())
    assert evaluation.name == "train.jsonl (held-out 0.1, seed 0)"


def test_system_metrics_monitor_logs_cpu_and_ram_on_a_trial_run(write_config):
    path = write_config(extra="tracking:\n  system_metrics: true\n  system_metrics_interval: 0.2")
    tracker, run_id = opened(path)
    monitor = tracker.monitor_system(run_id)
    deadline = time.monotonic() + 30
    # The monitor's own first sample; `stop` then logs the last one.
    while not client().get_metric_history(run_id, "system/cpu_utilization_percentage"):
        assert time.monotonic() < deadline, "the monitor logged no sample while running"
        time.sleep(0.05)
    monitor.stop()
    history = client().get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2  # a time series, not one number
    assert client().get_run(run_id).data.metrics["system/system_memory_usage_megabytes"] > 0


def test_a_trial_shorter_than_one_interval_still_gets_a_sample(write_config):
    path = write_config(extra="tracking:\n  system_metrics: true\n  system_metrics_interval: 60")
    tracker, run_id = opened(path)
    monitor = tracker.monitor_system(run_id)
    monitor.stop()
    assert "system/cpu_utilization_percentage" in client().get_run(run_id).data.metrics


def test_system_metrics_auto_is_off_without_a_gpu_and_false_turns_them_off(write_config):
    pytest.importorskip("torch")
    import torch

    tracker, run_id = opened(write_config())
    assert (tracker.monitor_system(run_id) is not None) == torch.cuda.is_available()
    off = SweepTracker(load_config(write_config(extra="tracking:\n  system_metrics: false")))
    assert off.monitor_system(run_id) is None


def test_a_bad_system_metrics_value_is_a_one_line_error_at_its_line(write_config):
    path = write_config(extra="tracking:\n  system_metrics: sometimes")
    result = CliRunner().invoke(app, ["status", str(path)])
    assert result.exit_code == 2
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "system_metrics" in text)
    assert f"{path.name}:{line}: tracking.system_metrics" in result.output


@pytest.mark.slow
def test_a_cpu_sweep_trial_run_shows_system_metrics_and_datasets(write_config):
    path = write_config(
        space="learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}",
        extra="tracking:\n  system_metrics: true\n  system_metrics_interval: 0.5",
    )
    result = CliRunner().invoke(app, ["run", str(path), "--trials", "1"])
    assert result.exit_code == 0, result.output
    (child,) = [
        r
        for r in client().search_runs([client().get_experiment_by_name("tiny").experiment_id])
        if r.data.tags.get("sweep.role") == "trial"
    ]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        child.data.metrics
    )
    assert {"training", "eval"} == set(inputs_of(child.info.run_id))


def test_ui_link_points_at_the_sweeps_experiment(write_config):
    from sweeps.cli import _experiment_link
    from sweeps.tracking import resolve_uri

    config = load_config(write_config())
    uri = resolve_uri(config.tracking.uri)
    assert "no MLflow experiment 'tiny' yet" in _experiment_link(config, uri, "127.0.0.1", 5000)
    tracker = SweepTracker(config)
    link = _experiment_link(config, uri, "0.0.0.0", 5001)
    assert link.endswith(f"http://127.0.0.1:5001/#/experiments/{tracker.experiment_id}")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_dashboard_without_optuna_dashboard_says_how_to_install_it(write_config, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as if not installed
    result = CliRunner().invoke(app, ["dashboard", str(write_config())])
    assert result.exit_code == 2
    assert "pip install 'sweep[dashboard]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_dashboard_before_any_run_exits_2_without_creating_a_study(write_config, project):
    result = CliRunner().invoke(app, ["dashboard", str(write_config())])
    assert result.exit_code == 2
    assert "no study named 'tiny' yet" in result.output
    assert not (project / "mlruns" / "optuna" / "tiny.journal").exists()


def test_dashboard_serves_the_sweeps_study_on_loopback(write_config, project):
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    import optuna

    pytest.importorskip("optuna_dashboard")
    from core.store import Store
    from sweeps.study import open_storage

    path = write_config()
    optuna.create_study(study_name="tiny", storage=open_storage(load_config(path), Store.at()))
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", "dashboard", str(path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as reply:
                    studies = json.loads(reply.read())["study_summaries"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "dashboard did not start"
                time.sleep(0.1)
        assert [study["study_name"] for study in studies] == ["tiny"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            output, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert f"http://127.0.0.1:{port}/dashboard/studies/" in output
    assert server.returncode == 130


@pytest.mark.slow
def test_a_lora_adapter_saved_as_servable_loads_in_pyfunc_and_generates_as_trained(tmp_path, tiny_model):
    import mlflow.pyfunc
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sweeps.tracking import save_servable

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lora = peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).eval()
    prompt = "Sort: 3 1 2"
    ids = tokenizer(prompt, return_tensors="pt")
    expected = tokenizer.decode(
        model.generate(**ids, do_sample=False, max_new_tokens=8)[0][ids["input_ids"].shape[1] :],
        skip_special_tokens=True,
    )
    assert expected.strip()  # a real answer to compare, not two empty strings
    folder = save_servable(model, tokenizer, tmp_path / "servable", prompt, base_model_path=str(tiny_model))
    assert (folder / "MLmodel").is_file()
    assert not (folder / "model").exists()  # the adapter alone; the base stays in its folder
    loaded = mlflow.pyfunc.load_model(str(folder))
    (answer,) = loaded.predict([prompt], params={"max_new_tokens": 8, "do_sample": False})
    assert answer.removeprefix(prompt).strip() == expected.strip()


def test_an_objectives_own_eval_file_is_an_input_too(write_config, project):
    rows = [{"question": f"{i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(5)]
    scored = project / "scored.jsonl"
    scored.write_text("".join(json.dumps(row) + "\n" for row in rows))
    objective = f"name: gsm8k\neval_file: {scored}\nprompt_format: chat\nmax_new_tokens: 8\nmax_length: 64"
    _, run_id = opened(write_config(objective=objective))
    dataset = inputs_of(run_id)["objective"]
    assert (dataset.name, json.loads(dataset.source)["uri"]) == ("scored.jsonl", str(scored))
    assert json.loads(dataset.profile) == {"num_rows": 5, "objective": "gsm8k"}
