"""Bad input gets one line `error: file:line: field: message` and exit 2, before any trial (issue 9).

Each test feeds one kind of mistake to `sweep run` (or `sweep promote`) and checks the line's file,
line and field, that nothing else was printed (no traceback, no rich box) and that no trial ran.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from core.config import load_config
from core.errors import InputError
from core.store import Store
from runners.models import check_model_source
from sweeps.cli import app
from tests.conftest import DEFAULT_TRAINING, config_text

REPO = Path(__file__).resolve().parent.parent
SPACE = "method: {type: categorical, choices: [lora]}\nlearning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}"


def sweep(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one line the command printed, checked to be a plain `error:` line with exit code 2."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def line_of(path: Path, text: str) -> int:
    """1-based line of the first line of `path` containing `text`."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def no_trial_ran(project: Path) -> bool:
    return not (project / "mlruns" / "trials").exists() and not list(project.glob("mlruns/optuna/*.journal"))


@pytest.fixture
def space_file(project, tiny_model, sort_data):
    """Write a sweep YAML into the project; `model`, `data` (extra data keys) and `train` vary the defaults."""

    def write(
        space: str = SPACE,
        training: str = DEFAULT_TRAINING,
        extra: str = "",
        model: Path | None = None,
        data: str = "",
        train: Path | None = None,
        data_format: str = "alpaca",
        name: str = "bad",
        file: str = "bad.yaml",
    ) -> Path:
        text = config_text(
            model or tiny_model, train or sort_data[0], sort_data[1], name, space, training, extra
        )
        text = text.replace("  format: alpaca\n", f"  format: {data_format}\n{data}")
        path = project / file
        path.write_text(text)
        return path

    return write


@pytest.fixture
def model_copy(project, tiny_model) -> Path:
    """A copy of the tiny model inside the project, to break."""
    return Path(shutil.copytree(tiny_model, project / "model"))


def run_error(config: Path) -> str:
    return error_line(sweep("run", config, "--trials", 1))


# 1. conditionals


def test_cyclic_when_names_both_parameters(space_file, project):
    config = space_file(
        SPACE
        + "\nlora_rank: {type: categorical, choices: [4, 8], when: {lora_alpha: [8]}}"
        + "\nlora_alpha: {type: categorical, choices: [8, 16], when: {lora_rank: [4]}}"
    )
    line = run_error(config)
    assert line.startswith(f"error: {config}:{line_of(config, 'lora_rank:')}: space.lora_rank.when: ")
    assert "cycle: lora_rank -> lora_alpha -> lora_rank" in line
    assert no_trial_ran(project)


# 2, 13. grid and steps


def test_grid_sampler_with_a_float_without_step(space_file):
    config = space_file("learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2}")
    config.write_text(config.read_text().replace("type: random", "type: grid"))
    line = run_error(config)
    assert line.startswith(f"error: {config}:{line_of(config, 'learning_rate:')}: space.learning_rate: ")
    assert "grid sampler needs a step" in line


def test_a_float_step_that_does_not_divide_the_range(space_file):
    config = space_file(SPACE + "\nweight_decay: {type: float, low: 0.0, high: 1.0, step: 0.3}")
    line = run_error(config)
    assert line.startswith(f"error: {config}:{line_of(config, 'weight_decay:')}: space.weight_decay.step: ")
    assert "does not divide the range" in line and "high: 0.9" in line


# 3, 4, 5, 14, 16. the model


def test_model_folder_without_tokenizer_files(space_file, model_copy, project):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    config = space_file(model=model_copy)
    line = run_error(config)
    assert line.startswith(f"error: {config}:{line_of(config, 'name_or_path:')}: model.name_or_path: ")
    assert "no tokenizer files" in line
    assert no_trial_ran(project)


def test_truncated_weights_are_found_from_the_safetensors_header(space_file, model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    line = run_error(space_file(model=model_copy))
    assert ": model.name_or_path: " in line and "truncated" in line and "model.safetensors" in line


def test_garbage_weights_are_found_from_the_safetensors_header(space_file, model_copy):
    (model_copy / "model.safetensors").write_bytes(b"not a safetensors file at all" * 20)
    line = run_error(space_file(model=model_copy))
    assert ": model.name_or_path: " in line and "not safetensors" in line


def test_missing_weights(space_file, model_copy):
    (model_copy / "model.safetensors").unlink()
    line = run_error(space_file(model=model_copy))
    assert ": model.name_or_path: " in line and "holds no model weights" in line


def test_a_shard_index_naming_a_missing_shard(space_file, model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    line = run_error(space_file(model=model_copy))
    assert ": model.name_or_path: " in line and "model-00002-of-00002.safetensors, which is missing" in line


def test_an_unknown_lora_target_module(space_file, project):
    config = space_file(training=DEFAULT_TRAINING + "\ntarget_modules: q_proj,nonsense_proj")
    line = run_error(config)
    assert line.startswith(
        f"error: {config}:{line_of(config, 'target_modules:')}: training.target_modules: "
        "the model has no module named 'nonsense_proj'"
    )
    assert "q_proj" in line  # the names it does have
    assert no_trial_ran(project)


def test_an_unknown_lora_target_module_among_space_choices(space_file):
    config = space_file(
        SPACE + "\ntarget_modules: {type: categorical, choices: [all-linear, 'q_proj,qq_proj']}"
    )
    line = run_error(config)
    assert f":{line_of(config, 'target_modules:')}: space.target_modules.choices[1]: " in line
    assert "'qq_proj'" in line


@pytest.mark.parametrize(
    "name", ["./models/qwen", "/abs/missing", "'C:\\x'"], ids=["relative", "absolute", "windows"]
)
def test_a_model_path_that_is_neither_a_folder_nor_a_hub_id_is_reported_at_once(space_file, name):
    config = space_file()
    config.write_text(config.read_text().replace("name_or_path: ", f"name_or_path: {name} #", 1))
    line = run_error(config)
    assert line.startswith(f"error: {config}:3: model.name_or_path: ")
    assert "model path '" in line and "' does not exist (and it is no hub id" in line
    started = time.perf_counter()
    with pytest.raises(InputError, match="does not exist"):
        check_model_source(load_config(config).model, config)
    assert time.perf_counter() - started < 2  # no hub round trips


def test_a_model_name_that_is_no_valid_hub_id(space_file):
    config = space_file()
    config.write_text(config.read_text().replace("name_or_path: ", "name_or_path: 'my model!' #", 1))
    line = run_error(config)
    assert line == (
        f"error: {config}:3: model.name_or_path: "
        "'my model!' is neither a local folder (no such path) nor a hub id (org/name)"
    )


def test_a_missing_model_folder_names_the_yaml_line(project):
    shutil.copy(REPO / "search_spaces" / "demo.yaml", project / "demo.yaml")
    (project / "demo").mkdir()  # the data, without demo/model
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(REPO / "search_spaces" / "demo" / name, project / "demo" / name)
    line = error_line(sweep("run", "demo.yaml", "--trials", 1))
    at = line_of(project / "demo.yaml", "name_or_path:")
    assert line.startswith(
        f"error: demo.yaml:{at}: model.name_or_path: cannot load 'demo/model': no folder demo/model"
    )
    assert no_trial_ran(project)


# 6, 10. data files and YAML bytes


def test_a_non_utf8_byte_in_a_data_file_names_its_line(space_file, sort_data, project):
    lines = sort_data[0].read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"instruction": "', b'"instruction": "\xff')
    train = project / "train.jsonl"
    train.write_bytes(b"".join(lines))
    line = run_error(space_file(train=train))
    assert line.startswith(f"error: {train}:3: not UTF-8: byte 0xff")


def test_a_non_utf8_byte_in_the_yaml_names_its_line(space_file):
    config = space_file()
    dtype_line = line_of(config, "dtype:")
    config.write_bytes(config.read_bytes().replace(b"dtype: float32", b"dtype: float32 # caf\xe9"))
    line = run_error(config)
    assert line.startswith(f"error: {config}:{dtype_line}: not UTF-8: byte 0xe9")


def test_a_sharegpt_row_without_a_user_turn_names_its_line(space_file, project):
    good = {"conversations": [{"from": "human", "value": "3 1 2"}, {"from": "gpt", "value": "1 2 3"}]}
    bad = {"conversations": [{"from": "system", "value": "sort"}, {"from": "gpt", "value": "1 2 3"}]}
    train = project / "chats.jsonl"
    train.write_text("\n".join(json.dumps(row) for row in [good, good, bad, good]) + "\n")
    config = space_file(train=train, data_format="sharegpt")
    # No eval_file: the eval split is held out of this file, so the bad row is read either way.
    text = config.read_text()
    config.write_text("\n".join(line for line in text.splitlines() if "eval_file:" not in line) + "\n")
    line = run_error(config)
    assert line.startswith(f"error: {train}:3: sharegpt row has no user turn")


def test_a_chat_template_that_is_not_jinja(space_file):
    config = space_file(data="  chat_template: '{% for m in messages %}{{ m.content }'\n")
    line = run_error(config)
    assert line.startswith(
        f"error: {config}:{line_of(config, 'chat_template:')}: data.chat_template: not a valid Jinja"
    )


# 7. the sweep's name


def test_a_name_too_long_for_a_file_name(space_file):
    config = space_file(name="a" * 250)
    line = run_error(config)
    assert line.startswith(f"error: {config}:1: name: is 250 characters") and "255" in line


@pytest.mark.parametrize("name", ["'a/b'", '"a\\0b"'], ids=["slash", "nul"])
def test_a_name_with_a_separator_or_nul(space_file, name):
    config = space_file(name=name)
    line = run_error(config)
    assert line.startswith(f"error: {config}:1: name: ") and "may hold only letters" in line


# 8. where the sweep writes


@pytest.mark.parametrize(
    "extra, field, words",
    [
        ("tracking:\n  uri: sqlite:///{file}/mlflow.db", "tracking.uri", "is a file, not a folder"),
        ("tracking:\n  uri: sqlite://nohost", "tracking.uri", "names no database file"),
        ("tracking:\n  uri: 'foo://'", "tracking.uri", "unknown scheme 'foo'"),
        ("storage: sqlite:///{file}/optuna.db", "storage", "is a file, not a folder"),
        ("storage: sqlite://nohost", "storage", "names no database file"),
        (
            "tracking:\n  artifact_location: {file}/artifacts",
            "tracking.artifact_location",
            "is a file, not a folder",
        ),
        (
            "tracking:\n  artifact_location: 'foo://bucket'",
            "tracking.artifact_location",
            "must be a local folder",
        ),
    ],
    ids=[
        "uri-under-a-file",
        "uri-sqlite-nohost",
        "uri-unknown-scheme",
        "storage-under-a-file",
        "storage-sqlite-nohost",
        "artifacts-under-a-file",
        "artifacts-url",
    ],
)
def test_unwritable_or_malformed_output_locations(space_file, project, extra, field, words):
    # Tests run as root, for whom no permission bit forbids writing; a file where a folder must be is
    # the reliable way to make a location unwritable.
    blocker = project / "blocker"
    blocker.write_text("a file, not a folder")
    config = space_file(extra=extra.format(file=blocker))
    line = run_error(config)
    key = field.rsplit(".", 1)[-1] + ":"
    assert line.startswith(f"error: {config}:{line_of(config, key)}: {field}: "), line
    assert words in line
    assert no_trial_ran(project)


def test_promote_to_an_unwritable_output_folder(space_file, project):
    config = space_file()
    cfg = load_config(config)
    from sweeps.study import open_study

    study = open_study(cfg, Store.at())
    study.add_trial(
        optuna.trial.create_trial(
            value=1.0, user_attrs={"adapter_uri": "file:///nowhere", "mlflow_run_id": "none"}
        )
    )
    (project / "blocker").write_text("a file, not a folder")
    line = error_line(sweep("promote", config, "--output", project / "blocker" / "merged"))
    assert line.startswith("error: --output: cannot create ") and "blocker is a file, not a folder" in line


# 11, 12. numbers


@pytest.mark.parametrize("value", ["-5", "nan"])
def test_a_negative_or_nan_timeout_option(space_file, value):
    line = error_line(sweep("run", space_file(), "--timeout", value))
    assert line.startswith("error: --timeout: must be a finite number of seconds > 0")


def test_a_negative_timeout_in_the_yaml(space_file):
    config = space_file(extra="budget:\n  timeout: -5")
    line = run_error(config)
    assert line.startswith(f"error: {config}:{line_of(config, 'timeout:')}: budget.timeout: ")


@pytest.mark.parametrize(
    "space, extra, field",
    [
        (SPACE, "budget:\n  trials: true", "budget.trials"),
        (SPACE, "budget:\n  max_failed_trials: false", "budget.max_failed_trials"),
        (SPACE + "\nlora_rank: {type: int, low: true, high: 8}", "", "space.lora_rank.low"),
    ],
    ids=["trials", "max_failed_trials", "int-bound"],
)
def test_a_boolean_where_an_integer_belongs(space_file, space, extra, field):
    config = space_file(space, extra=extra)
    line = run_error(config)
    key = "lora_rank:" if field.startswith("space") else field.rsplit(".", 1)[-1] + ":"
    assert line.startswith(
        f"error: {config}:{line_of(config, key)}: {field}: must be a number, not the boolean"
    )


def test_a_boolean_fixed_for_an_integer_parameter(space_file):
    config = space_file(training=DEFAULT_TRAINING + "\nlora_rank: true")
    line = run_error(config)
    assert line.startswith(f"error: {config}:{line_of(config, 'lora_rank:')}: training.lora_rank: ")
    assert "not the boolean true" in line


# 15. options


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--trials", "0", "must be a whole number >= 1, got 0"),
        ("--trials", "-3", "must be a whole number >= 1, got -3"),
        ("--trials", "abc", "integer"),
        ("--workers", "0", "must be a whole number >= 1, got 0"),
    ],
    ids=["trials-0", "trials-negative", "trials-text", "workers-0"],
)
def test_a_bad_count_option_is_one_line_not_a_box(space_file, project, option, value, words):
    line = error_line(sweep("run", space_file(), option, value))
    assert line.startswith(f"error: {option}: ") and words in line
    assert no_trial_ran(project)
