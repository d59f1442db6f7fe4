"""Shared fixtures: one tiny model and tokenizer for the whole session, built offline."""

from __future__ import annotations

import gc
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from sweeps.demo import build_tiny_model, sort_rows, write_jsonl

# Nothing in the suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One OpenMP thread a process, here and in every process a test starts (set before torch is imported).
# The tiny model's matrices are too small to split, and on two cores a second thread spins against
# every other busy process (sweep workers, Ray actors, the MLflow server): with two, one of its matrix
# products took 200 times as long and the generation tests 7 times.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown():
    """Collect what the test left, then freeze the survivors out of every later collection.

    Every trial calls `gc.collect()` two or three times (the runner, accelerate's memory release), and
    each of those walks the whole heap of this process: torch, transformers, MLflow, lm-eval and what
    earlier tests built. Frozen, they are skipped, and a collection walks only the objects of the
    test at hand: 0.7 s a call became a few milliseconds, and the in-process sweeps of test_sweep.py
    took half the time. Objects frozen while alive are still freed by reference counting; only
    cycles among them that die later (module fixtures) stay in memory until the session ends.
    """
    result = yield
    gc.collect()
    gc.freeze()
    return result


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised two-layer Llama with a BPE tokenizer and a ChatML template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", pretrain_steps=0)


@pytest.fixture(scope="session")
def sort_data(tmp_path_factory) -> tuple[Path, Path]:
    """Small train and eval files of the demo's sorting task, in alpaca format."""
    root = tmp_path_factory.mktemp("data")
    return write_jsonl(root / "train.jsonl", sort_rows(48, 1)), write_jsonl(
        root / "eval.jsonl", sort_rows(16, 2)
    )


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder as the working directory, so mlruns/ lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow sqlite file with its schema, made once: creating the schema takes seconds, a copy does not."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # MLflow's default experiment points at ./mlruns: keep it out of the repo
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def copy_mlflow_db(template: Path, project: Path) -> Path:
    """A copy of `template` (see `empty_mlflow_db`) where a sweep in `project` keeps its runs by default."""
    path = project / "mlruns" / "mlflow.db"
    path.parent.mkdir(exist_ok=True)
    shutil.copy(template, path)
    return path


@pytest.fixture
def mlflow_db(project, empty_mlflow_db) -> Path:
    """The project's MLflow database (the default mlruns/mlflow.db) with its schema already made.

    For tests of what a sweep records, not of MLflow making its schema: each copy saves the seconds
    of MLflow's migrations. Tests of a first `sweep run` in an empty folder leave it out.
    """
    return copy_mlflow_db(empty_mlflow_db, project)


DEFAULT_SPACE = """
method: {type: categorical, choices: [lora, full]}
learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
lora_rank: {type: int, low: 2, high: 8, step: 2, when: {method: [lora]}}
"""
DEFAULT_TRAINING = """
max_steps: 4
per_device_batch_size: 8
cutoff_len: 48
"""


def config_text(
    model: Path,
    train: Path,
    evaluation: Path,
    name: str,
    space: str,
    training: str,
    extra: str,
    objective: str = "name: eval_loss",
) -> str:
    """A sweep YAML over the tiny model and sorting data, `objective` being its objective section."""
    return f"""\
name: {name}
model:
  name_or_path: {model}
  dtype: float32
data:
  format: alpaca
  train_file: {train}
  eval_file: {evaluation}
objective:
{textwrap.indent(textwrap.dedent(objective).strip(), "  ")}
space:
{textwrap.indent(textwrap.dedent(space).strip(), "  ")}
training:
{textwrap.indent(textwrap.dedent(training).strip(), "  ")}
sampler:
  type: random
  seed: 0
{textwrap.dedent(extra).strip()}
"""


@pytest.fixture
def write_config(project, tiny_model, sort_data):
    """Write a sweep YAML for the tiny model into the project; `extra` adds top-level sections.

    `objective` replaces the body of the objective section (default: eval_loss).
    """

    def write(
        name: str = "tiny",
        space: str = DEFAULT_SPACE,
        training: str = DEFAULT_TRAINING,
        extra: str = "",
        objective: str = "name: eval_loss",
    ) -> Path:
        path = project / f"{name}.yaml"
        path.write_text(config_text(tiny_model, *sort_data, name, space, training, extra, objective))
        return path

    return write
