"""LLaMA-Factory datasets: alpaca `history`, `mask_history`, and dataset_info.json entries.

The dataset_info.json entries are written in the form LLaMA-Factory documents in its data/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from core.config import load_config
from core.errors import InputError
from core.eval import IGNORE_INDEX
from core.rows import load_splits, read_examples
from runners.data import CHATML_TEMPLATE, TokenizedCache, tokenize_example
from sweeps.cli import app

HISTORY_ROW = {
    "instruction": "And 3 + 4?",
    "input": "",
    "output": "seven",
    "history": [["What is 1 + 1?", "two"], ["And 2 + 2?", "four"]],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sweep_yaml(folder: Path, data: str) -> Path:
    """A sweep YAML whose data section is `data` (indented under `data:`)."""
    path = folder / "sweep.yaml"
    body = "".join(f"  {line}\n" for line in data.strip().splitlines())
    path.write_text(
        "name: lf\nmodel:\n  name_or_path: gpt2\ndata:\n"
        + body
        + "objective:\n  name: eval_loss\n"
        + "space:\n  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
    )
    return path


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def trained_text(tokenizer, example) -> str:
    encoded = tokenize_example(tokenizer, CHATML_TEMPLATE, example)
    return tokenizer.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    )


# -- alpaca history -------------------------------------------------------------------------------


def test_alpaca_history_becomes_earlier_turns(tmp_path):
    (example,) = read_examples(jsonl(tmp_path / "a.jsonl", [HISTORY_ROW]), "alpaca", None, None)
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("user", "What is 1 + 1?"),
        ("assistant", "two"),
        ("user", "And 2 + 2?"),
        ("assistant", "four"),
        ("user", "And 3 + 4?"),
        ("assistant", "seven"),
    ]


def test_every_assistant_turn_is_trained_by_default(tmp_path, tokenizer):
    (example,) = read_examples(jsonl(tmp_path / "a.jsonl", [HISTORY_ROW]), "alpaca", None, None)
    trained = trained_text(tokenizer, example)
    assert "two" in trained and "four" in trained and "seven" in trained
    assert "What is" not in trained and "And" not in trained


def test_mask_history_trains_the_last_turn_only(tmp_path, tokenizer):
    jsonl(tmp_path / "train.jsonl", [HISTORY_ROW] * 4)
    config = load_config(sweep_yaml(tmp_path, "format: alpaca\ntrain_file: train.jsonl\nmask_history: true"))
    example = load_splits(config.data).train[0]
    trained = trained_text(tokenizer, example)
    assert "seven" in trained and "two" not in trained and "four" not in trained


def test_masked_and_unmasked_examples_are_tokenized_and_cached_apart(tmp_path, tokenizer):
    path = jsonl(tmp_path / "a.jsonl", [HISTORY_ROW])
    cache = TokenizedCache()
    full = cache.get(tokenizer, CHATML_TEMPLATE, read_examples(path, "alpaca", None, None), 512)
    masked = cache.get(
        tokenizer, CHATML_TEMPLATE, read_examples(path, "alpaca", None, None, mask_history=True), 512
    )
    assert cache.builds == 2
    count = lambda split: sum(label != IGNORE_INDEX for label in split.dataset[0]["labels"])
    assert count(masked) < count(full)


def test_a_malformed_history_names_file_and_line(tmp_path):
    bad = {**HISTORY_ROW, "history": [["only the question"]]}
    path = jsonl(tmp_path / "a.jsonl", [HISTORY_ROW, bad])
    with pytest.raises(InputError) as caught:
        read_examples(path, "alpaca", None, None)
    assert str(caught.value) == f"{path}:2: history[0] must be a pair of strings [instruction, response]"


# -- dataset_info.json ----------------------------------------------------------------------------


def registry(folder: Path, entries: dict) -> Path:
    path = folder / "dataset_info.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


def test_an_alpaca_entry_with_renamed_columns_is_read(tmp_path):
    row = {
        "question": "Sort.",
        "numbers": "3 1",
        "sorted": "1 3",
        "persona": "terse",
        "turns": [["hi", "hello"]],
    }
    jsonl(tmp_path / "sorting.jsonl", [row, row])
    registry(
        tmp_path,
        {
            "sorting": {
                "file_name": "sorting.jsonl",
                "columns": {
                    "prompt": "question",
                    "query": "numbers",
                    "response": "sorted",
                    "system": "persona",
                    "history": "turns",
                },
            }
        },
    )
    config = load_config(sweep_yaml(tmp_path, "dataset_info: dataset_info.json\ndataset: sorting"))
    assert (config.data.format, config.data.train_file) == ("alpaca", (tmp_path / "sorting.jsonl").resolve())
    (example, _) = load_splits(config.data).train + load_splits(config.data).eval
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("system", "terse"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "Sort.\n3 1"),  # LLaMA-Factory's "prompt\nquery"
        ("assistant", "1 3"),
    ]


def test_an_alpaca_entry_reads_system_and_history_only_when_mapped(tmp_path):
    # LLaMA-Factory's defaults: prompt=instruction, query=input, response=output; no system, no history.
    jsonl(tmp_path / "data.jsonl", [{**HISTORY_ROW, "system": "ignored"}] * 2)
    registry(tmp_path, {"plain": {"file_name": "data.jsonl"}})
    config = load_config(sweep_yaml(tmp_path, "dataset_info: dataset_info.json\ndataset: plain"))
    example = load_splits(config.data).train[0]
    assert [m["role"] for m in example.messages] == ["user", "assistant"]


def test_a_sharegpt_entry_in_openai_form_is_read(tmp_path):
    # The "OpenAI Format" entry of LLaMA-Factory's data/README.md, word for word.
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    (tmp_path / "data.json").write_text(json.dumps([row, row]))
    registry(
        tmp_path,
        {
            "chat": {
                "file_name": "data.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                    "system_tag": "system",
                },
            }
        },
    )
    config = load_config(sweep_yaml(tmp_path, "dataset_info: dataset_info.json\ndataset: chat"))
    example = load_splits(config.data).train[0]
    assert example.messages == tuple(row["messages"])


def test_a_sharegpt_entry_with_renamed_tags_and_columns_is_read(tmp_path):
    row = {
        "dialogue": [
            {"speaker": "customer", "text": "my order?"},
            {"speaker": "agent", "text": "on its way"},
            {"speaker": "customer", "text": "when?"},
            {"speaker": "agent", "text": "tomorrow"},
        ],
        "brief": "you are support",
    }
    jsonl(tmp_path / "support.jsonl", [row, row])
    registry(
        tmp_path,
        {
            "support": {
                "file_name": "support.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "dialogue", "system": "brief"},
                "tags": {
                    "role_tag": "speaker",
                    "content_tag": "text",
                    "user_tag": "customer",
                    "assistant_tag": "agent",
                },
            }
        },
    )
    config = load_config(sweep_yaml(tmp_path, "dataset_info: dataset_info.json\ndataset: support"))
    example = load_splits(config.data).train[0]
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("system", "you are support"),
        ("user", "my order?"),
        ("assistant", "on its way"),
        ("user", "when?"),
        ("assistant", "tomorrow"),
    ]


def test_a_sharegpt_turn_with_a_role_outside_the_tags_names_file_line_and_roles(tmp_path):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    tool = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]}
    path = jsonl(tmp_path / "data.jsonl", [good, tool])
    registry(tmp_path, {"calls": {"file_name": "data.jsonl", "formatting": "sharegpt"}})
    config = load_config(sweep_yaml(tmp_path, "dataset_info: dataset_info.json\ndataset: calls"))
    with pytest.raises(InputError) as caught:
        load_splits(config.data)
    assert str(caught.value) == (
        f"{path.resolve()}:2: turn 1: unknown from 'function_call'; allowed: human, gpt, system"
    )


def test_an_eval_dataset_entry_gives_the_eval_file(tmp_path):
    jsonl(tmp_path / "train.jsonl", [{"instruction": "q", "output": "a"}])
    jsonl(tmp_path / "dev.jsonl", [{"instruction": "q2", "output": "a2"}])
    registry(tmp_path, {"tr": {"file_name": "train.jsonl"}, "dev": {"file_name": "dev.jsonl"}})
    config = load_config(
        sweep_yaml(tmp_path, "dataset_info: dataset_info.json\ndataset: tr\neval_dataset: dev")
    )
    splits = load_splits(config.data)
    assert [ex.messages[-1]["content"] for ex in splits.eval] == ["a2"]


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"hf_hub_url": "org/data", "ranking": True}, "hf_hub_url, ranking"),
        (
            {"file_name": "d.json", "columns": {"prompt": "q", "images": "pics"}},
            "columns not supported for alpaca: images",
        ),
        (
            {"file_name": "d.json", "formatting": "sharegpt", "tags": {"observation_tag": "tool"}},
            "tags not supported: observation_tag",
        ),
        ({"file_name": "d.json", "formatting": "pretrain"}, "formatting 'pretrain' is not supported"),
    ],
)
def test_unsupported_entry_keys_are_one_error_at_the_dataset_line(tmp_path, entry, named):
    registry(tmp_path, {"x": entry})
    path = sweep_yaml(tmp_path, "dataset_info: dataset_info.json\ndataset: x")
    with pytest.raises(InputError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line_of(path, 'dataset: x')}: data.dataset: dataset 'x' of ")
    assert named in message and "\n" not in message


def test_an_unsupported_entry_exits_2_through_the_cli(tmp_path):
    registry(tmp_path, {"hub": {"hf_hub_url": "org/data"}})
    path = sweep_yaml(tmp_path, "dataset_info: dataset_info.json\ndataset: hub")
    result = CliRunner().invoke(app, ["status", str(path)])
    assert result.exit_code == 2
    assert "data.dataset:" in result.output and "hf_hub_url" in result.output


def test_an_unknown_dataset_lists_the_registry_names(tmp_path):
    registry(tmp_path, {"alpha": {"file_name": "a.json"}, "beta": {"file_name": "b.json"}})
    path = sweep_yaml(tmp_path, "dataset_info: dataset_info.json\ndataset: gamma")
    with pytest.raises(InputError, match="has no dataset 'gamma'; it has: alpha, beta"):
        load_config(path)


def test_format_and_dataset_info_together_are_an_error_at_format(tmp_path):
    registry(tmp_path, {"alpha": {"file_name": "a.json"}})
    path = sweep_yaml(tmp_path, "format: alpaca\ndataset_info: dataset_info.json\ndataset: alpha")
    with pytest.raises(InputError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}:{line_of(path, 'format:')}: data.format: comes from")


def test_without_dataset_info_format_is_still_required(tmp_path):
    path = sweep_yaml(tmp_path, "train_file: t.jsonl")
    with pytest.raises(InputError, match=r"data\.format: is required"):
        load_config(path)
