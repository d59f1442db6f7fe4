"""The ready-made GSM8K and KDD ranking spaces: they parse, stop in one line naming a missing data
file, and (slow) the GSM8K one runs to the end on the tiny model with real GSM8K rows.

Each test runs a copy of the shipped YAML written to tmp_path, so its relative data paths point
into an empty folder. The copies swap the hub model for the tiny test model (nothing may reach the
hub) and drop QLoRA from the method choices (it needs CUDA; preflight says so before anything else).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from core.config import load_config
from sweeps.cli import app

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
GSM8K_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def local_copy(name: str, folder: Path, model: Path, **sections) -> Path:
    """`search_spaces/<name>` written to `folder`, on `model`, LoRA only, `sections` merged in."""
    config = yaml.safe_load((SPACES / name).read_text(encoding="utf-8"))
    config["model"].update(name_or_path=str(model), dtype="float32")
    config["space"]["method"]["choices"] = ["lora"]
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["gsm8k.yaml", "kdd_ranking.yaml"])
def test_shipped_space_parses(name):
    config = load_config(SPACES / name)
    assert config.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert set(config.space["method"].choices) == {"lora", "qlora"}


def test_gsm8k_space_scores_lm_evals_5_shot_on_a_250_item_subset():
    objective = load_config(SPACES / "gsm8k.yaml").objective
    assert (objective.name, objective.num_fewshot, objective.fewshot) == ("gsm8k", 5, "lm_eval")
    assert objective.max_samples == 250


def test_kdd_space_scores_with_the_competition_parser():
    objective = load_config(SPACES / "kdd_ranking.yaml").objective
    assert (objective.name, objective.parser) == ("ndcg", "kdd2024")


@pytest.mark.parametrize(
    ("name", "missing"), [("gsm8k.yaml", "gsm8k/train.jsonl"), ("kdd_ranking.yaml", "kdd/train.jsonl")]
)
def test_space_without_its_data_stops_in_one_line_naming_the_missing_file(name, missing, project, tiny_model):
    path = local_copy(name, project, tiny_model)
    result = CliRunner().invoke(app, ["run", str(path), "--trials", "1"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert str(project / missing) in line
    assert "not found" in line


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
@pytest.mark.skipif(
    not (GSM8K_DATA / "train.jsonl").is_file(),
    reason=f"real GSM8K rows not found in {GSM8K_DATA} (see ../shared/data/README.md)",
)
def test_gsm8k_space_runs_two_trials_on_the_tiny_model_and_real_rows(project, tiny_model):
    train, test = str(GSM8K_DATA / "train.jsonl"), str(GSM8K_DATA / "test.jsonl")
    path = local_copy(
        "gsm8k.yaml",
        project,
        tiny_model,
        data={"train_file": train, "eval_file": test, "max_samples": 32},
        objective={
            "eval_file": test,
            "fewshot_file": train,
            "max_samples": 4,
            "max_new_tokens": 16,
            "max_length": 512,  # the tiny model's context
        },
    )
    # The shipped cutoff lengths are for Qwen's tokenizer; the tiny one spends a token per few letters.
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["space"]["cutoff_len"]["choices"] = [128, 256]
    config["space"]["num_epochs"].update(low=1, high=1)
    config["training"]["per_device_batch_size"] = 4
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    result = CliRunner().invoke(app, ["run", str(path), "--trials", "2"])
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(project / 'mlruns' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name(config["name"])
    trials = [
        run
        for run in client.search_runs([experiment.experiment_id])
        if run.data.tags.get("sweep.role") == "trial"
    ]
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FINISHED", trial.data.tags.get("error")
        assert trial.data.metrics["eval_items"] == 4
        assert 0.0 <= trial.data.metrics["flexible_extract"] <= 1.0
