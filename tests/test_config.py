"""Search-space YAML: what loads, and the one-line error each kind of mistake gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import FloatParam, load_config, parse_config
from core.errors import InputError

VALID = """\
name: ok
model:
  name_or_path: org/some-model
data:
  format: alpaca
  train_file: train.jsonl
objective:
  name: eval_loss
space:
  method:
    type: categorical
    choices: [lora, full]
  learning_rate:
    type: float
    low: 1e-5
    high: 1e-3
    log: true
  lora_rank:
    type: int
    low: 4
    high: 64
    step: 4
    when: {method: [lora]}
training:
  num_epochs: 2
"""

FILE = Path("spaces/x.yaml")


def error_for(text: str) -> InputError:
    with pytest.raises(InputError) as caught:
        parse_config(text, FILE)
    return caught.value


def test_valid_space_loads_with_typed_params():
    cfg = parse_config(VALID, FILE)
    assert isinstance(cfg.space["learning_rate"], FloatParam)
    assert cfg.space["lora_rank"].when == {"method": ["lora"]}
    assert cfg.training == {"num_epochs": 2}
    assert cfg.direction == "minimize"


def test_exponent_without_dot_is_a_float():
    cfg = parse_config(VALID, FILE)
    assert cfg.space["learning_rate"].low == pytest.approx(1e-5)


def test_relative_data_paths_resolve_against_the_yaml_folder():
    cfg = parse_config(VALID, FILE)
    assert cfg.data.train_file == (Path("spaces") / "train.jsonl").resolve()


def test_hub_id_is_kept_as_is():
    assert parse_config(VALID, FILE).model.name_or_path == "org/some-model"


# (what is wrong, how to make it wrong, expected line, field, words the message must hold)
BAD = [
    ("unknown top-level key", lambda t: t + "epochs: 3\n", 26, "epochs", "allowed: name, model"),
    (
        "unknown parameter type",
        lambda t: t.replace("type: float", "type: flaot"),
        14,
        "space.learning_rate.type",
        "allowed: float, int",
    ),
    (
        "low above high",
        lambda t: t.replace("low: 4", "low: 128"),
        20,
        "space.lora_rank.low",
        "must be <= high",
    ),
    (
        "log scale from zero",
        lambda t: t.replace("low: 1e-5", "low: 0"),
        15,
        "space.learning_rate.low",
        "log scale needs low > 0",
    ),
    (
        "empty categorical",
        lambda t: t.replace("choices: [lora, full]", "choices: []"),
        12,
        "space.method.choices",
        "at least one choice",
    ),
    (
        "conditional on unknown parameter",
        lambda t: t.replace("{method: [lora]}", "{mthod: [lora]}"),
        23,
        "space.lora_rank.when.mthod",
        "unknown parameter 'mthod'",
    ),
    (
        "unknown method",
        lambda t: t.replace("[lora, full]", "[lora, dora]"),
        12,
        "space.method.choices[1]",
        "'lora', 'qlora' or 'full'",
    ),
    (
        "unknown objective",
        lambda t: t.replace("name: eval_loss", "name: bleu"),
        8,
        "objective.name",
        "allowed: eval_loss",
    ),
    (
        "unknown parameter name",
        lambda t: t.replace("  lora_rank:\n", "  lora_rnak:\n"),
        18,
        "space.lora_rnak",
        "unknown parameter 'lora_rnak'; allowed: method",
    ),
    (
        "unknown field in a param",
        lambda t: t.replace("log: true", "logg: true"),
        17,
        "space.learning_rate.logg",
        "allowed: type, low, high, log",
    ),
    (
        "unknown training parameter",
        lambda t: t.replace("num_epochs: 2", "epochz: 2"),
        25,
        "training.epochz",
        "unknown parameter",
    ),
    (
        "bad training value",
        lambda t: t.replace("num_epochs: 2", "num_epochs: -1"),
        25,
        "training.num_epochs",
        "greater than 0",
    ),
    (
        "parameter both fixed and searched",
        lambda t: t.replace("num_epochs: 2", "learning_rate: 0.1"),
        25,
        "training.learning_rate",
        "both fixed here and searched",
    ),
    (
        "unknown data format",
        lambda t: t.replace("format: alpaca", "format: csv"),
        5,
        "data.format",
        "'alpaca', 'sharegpt', 'messages' or 'gsm8k'",
    ),
    (
        "missing required section",
        lambda t: t.replace("objective:\n  name: eval_loss\n", ""),
        None,
        "objective",
        "is required",
    ),
    ("duplicate key", lambda t: t + "name: again\n", 26, "name", "duplicate key"),
    (
        "conditional value not a choice",
        lambda t: t.replace("{method: [lora]}", "{method: [qlora]}"),
        23,
        "space.lora_rank.when.method",
        "'qlora' is not a choice",
    ),
    (
        "dropout out of range",
        lambda t: t + "  lora_dropout: 1.5\n",
        26,
        "training.lora_dropout",
        "less than 1",
    ),
    (
        "storage that is no database URL",
        lambda t: t + "storage: postgress//db/sweeps\n",
        26,
        "storage",
        "is not a database URL; allowed: sqlite://, postgresql://",
    ),
    (
        "unknown ray setting",
        lambda t: t + "ray: {adress: auto}\n",
        26,
        "ray.adress",
        "unknown field 'adress'; allowed: address, num_cpus",
    ),
    (
        "ray resources out of range",
        lambda t: t + "ray: {cpus_per_trial: 0}\n",
        26,
        "ray.cpus_per_trial",
        "greater than 0",
    ),
    (
        "unknown backend",
        lambda t: t + "backend: slurm\n",
        26,
        "backend",
        "'local' or 'ray'",
    ),
    (
        "int parameter with a float bound",
        lambda t: t.replace("low: 4", "low: 4.5"),
        20,
        "space.lora_rank.low",
        "valid integer",
    ),
    (
        "multi-objective with a single-objective sampler",
        lambda t: (
            t.replace("name: eval_loss", "name: eval_loss\n  minimize_peak_memory: true")
            + "sampler: {type: cmaes}\n"
        ),
        27,
        "sampler.type",
        "single-objective; with minimize_peak_memory use nsga2",
    ),
    (
        "pruner without intermediate scores",
        lambda t: t + "pruner: {type: median}\n",
        26,
        "pruner.eval_every_steps",
        "needs intermediate scores",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "line", "field", "words"), BAD, ids=[case[0] for case in BAD])
def test_bad_config_gets_one_line_naming_file_line_and_field(case, mutate, line, field, words):
    message = str(error_for(mutate(VALID)))
    assert "\n" not in message
    expected_where = f"{FILE}:{line}: " if line else f"{FILE}"
    assert message.startswith(expected_where), message
    assert f" {field}: " in message, message
    assert words in message, message


def test_invalid_yaml_names_the_line():
    err = error_for(VALID.replace("  method:\n", "  method: [\n"))
    assert err.line is not None and "invalid YAML" in err.message


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(InputError, match="search-space file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["lora", "qlora", "method", "demo"])
def test_shipped_search_spaces_are_valid(name):
    cfg = load_config(Path(__file__).parent.parent / "search_spaces" / f"{name}.yaml")
    assert cfg.name
    assert {"learning_rate"} <= set(cfg.space)
