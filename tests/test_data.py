"""SFT data: row formats, line-precise errors, assistant-only labels, the tokenization cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from core.errors import InputError
from core.eval import IGNORE_INDEX
from core.rows import Example, read_examples
from runners.data import CHATML_TEMPLATE, TokenizedCache, tokenize_example


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_alpaca_row_becomes_user_and_assistant_messages(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"instruction": "Sort.", "input": "3 1", "output": "1 3"}])
    (example,) = read_examples(path, "alpaca", None, None)
    assert example.messages == (
        {"role": "user", "content": "Sort.\n\n3 1"},
        {"role": "assistant", "content": "1 3"},
    )


def test_sharegpt_roles_are_mapped(tmp_path):
    row = {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        "system": "be brief",
    }
    (example,) = read_examples(write(tmp_path / "s.jsonl", [row]), "sharegpt", None, None)
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant"]


def test_config_system_prompt_is_prepended(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (example,) = read_examples(write(tmp_path / "m.jsonl", [row]), "messages", "You sort numbers.", None)
    assert example.messages[0] == {"role": "system", "content": "You sort numbers."}


def test_max_samples_keeps_the_first_rows(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    examples = read_examples(write(tmp_path / "a.jsonl", rows), "alpaca", None, 3)
    assert [ex.messages[-1]["content"] for ex in examples] == ["a0", "a1", "a2"]


def test_row_missing_a_field_names_file_and_line(tmp_path):
    good = {"instruction": "q", "output": "a"}
    path = write(tmp_path / "bad.jsonl", [good, good, {"instruction": "q", "answer": "a"}])
    with pytest.raises(InputError) as caught:
        read_examples(path, "alpaca", None, None)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert "missing ['output']" in str(caught.value)


def test_invalid_json_line_is_reported_with_its_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", ['{"instruction": "q", "output": "a"}', "{not json"])
    with pytest.raises(InputError, match=r"bad.jsonl:2: invalid JSON"):
        read_examples(path, "alpaca", None, None)


def test_conversation_must_end_with_the_assistant(tmp_path):
    row = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}
    with pytest.raises(InputError, match="last turn must be the assistant"):
        read_examples(write(tmp_path / "m.jsonl", [row]), "messages", None, None)


def test_unknown_sharegpt_role_lists_the_allowed_ones(tmp_path):
    row = {"conversations": [{"from": "bot", "value": "x"}]}
    with pytest.raises(InputError, match="unknown from 'bot'; allowed: human, user, gpt"):
        read_examples(write(tmp_path / "s.jsonl", [row]), "sharegpt", None, None)


def test_missing_data_file_is_reported(tmp_path):
    with pytest.raises(InputError, match="data file not found"):
        read_examples(tmp_path / "nope.jsonl", "alpaca", None, None)


def test_labels_cover_only_the_assistant_reply(tokenizer):
    example = Example(({"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}))
    encoded = tokenize_example(tokenizer, CHATML_TEMPLATE, example)
    trained = [tok for tok, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "1 2 3<|im_end|>\n"
    assert encoded["labels"][0] == IGNORE_INDEX


def test_every_assistant_turn_of_a_multi_turn_chat_is_trained(tokenizer):
    messages = (
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    )
    encoded = tokenize_example(tokenizer, CHATML_TEMPLATE, Example(messages))
    trained = [tok for tok, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "first<|im_end|>\nsecond<|im_end|>\n"


def examples(n: int) -> list[Example]:
    return [
        Example(
            (
                {"role": "user", "content": "Sort " + " ".join(map(str, range(i + 5)))},
                {"role": "assistant", "content": "ok"},
            )
        )
        for i in range(n)
    ]


def test_truncation_is_counted_and_rows_without_a_trained_token_dropped(tokenizer):
    cache = TokenizedCache()
    full = cache.get(tokenizer, CHATML_TEMPLATE, examples(6), cutoff_len=4096)
    lengths = [len(ids) for ids in full.dataset["input_ids"]]
    reply_starts = [
        next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        for labels in full.dataset["labels"]
    ]
    cutoff = sorted(reply_starts)[3]
    view = cache.get(tokenizer, CHATML_TEMPLATE, examples(6), cutoff_len=cutoff)
    assert view.truncated_rows == sum(n > cutoff for n in lengths) > 0
    assert view.dropped_rows == sum(start >= cutoff for start in reply_starts) > 0
    assert view.rows == 6 - view.dropped_rows
    assert max(len(ids) for ids in view.dataset["input_ids"]) <= cutoff


def test_tokenization_runs_once_across_cutoff_lengths(tokenizer):
    cache = TokenizedCache()
    for cutoff in (16, 32, 64, 32):
        cache.get(tokenizer, CHATML_TEMPLATE, examples(4), cutoff)
    assert cache.builds == 1


def test_disk_cache_is_reused_by_a_new_process(tokenizer, tmp_path):
    TokenizedCache(tmp_path).get(tokenizer, CHATML_TEMPLATE, examples(4), 64)
    again = TokenizedCache(tmp_path)
    view = again.get(tokenizer, CHATML_TEMPLATE, examples(4), 64)
    assert again.builds == 0
    assert view.rows == 4


def test_a_different_template_is_tokenized_again(tokenizer):
    cache = TokenizedCache()
    cache.get(tokenizer, CHATML_TEMPLATE, examples(4), 64)
    cache.get(tokenizer, CHATML_TEMPLATE.replace("<|im_start|>", "<|im_start|> "), examples(4), 64)
    assert cache.builds == 2
