"""SFT data: read alpaca / sharegpt / messages / gsm8k rows, turn them into chat messages, tokenize once.

Rows are validated line by line before any model is loaded, so a malformed row is reported as
`file:line: ...` instead of surfacing as a KeyError in the middle of a trial. Tokenization is the
one data cost a sweep pays: it is done once per (tokenizer, template, data) and each cutoff_len
view is derived from that by slicing, in memory and on disk across invocations.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_from_disk

from objectives.gsm8k import chat_messages, row_problem
from sweeps.config import DataConfig
from sweeps.errors import InputError

Message = dict[str, str]

IGNORE_INDEX = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Example:
    """One SFT conversation; the loss covers the assistant turns only."""

    messages: tuple[Message, ...]


def _read_rows(path: Path) -> Iterable[tuple[int | None, int, Any]]:
    """Yield (line, row index, parsed row); line is None for a JSON array file."""
    if not path.is_file():
        raise InputError(path, "data file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"invalid JSON: {exc.msg}", line=exc.lineno) from None
        if not isinstance(rows, list):
            raise InputError(
                path, "a .json data file must hold a list of rows (or use .jsonl, one row a line)"
            )
        for index, row in enumerate(rows):
            yield None, index, row
        return
    index = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"invalid JSON: {exc.msg}", line=line_no) from None
        yield line_no, index, row
        index += 1


def _text(row: dict, key: str, fail, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        fail(f"field {key!r} must be a non-empty string")
    return value


def _alpaca(row: dict, fail) -> list[Message]:
    missing = [key for key in ("instruction", "output") if key not in row]
    if missing:
        fail(f"alpaca row needs 'instruction' and 'output' (optional: input, system); missing {missing}")
    prompt = _text(row, "instruction", fail)
    extra = _text(row, "input", fail, required=False)
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _text(row, "output", fail)},
    ]
    system = _text(row, "system", fail, required=False)
    return ([{"role": "system", "content": system}] if system else []) + messages


def _turns(turns: Any, role_key: str, text_key: str, roles: dict[str, str], fail) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        fail("needs a non-empty list of turns")
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            fail(f"turn {position} needs {role_key!r} and {text_key!r}")
        role = roles.get(turn[role_key])
        if role is None:
            fail(f"turn {position}: unknown {role_key} {turn[role_key]!r}; allowed: {', '.join(roles)}")
        if not isinstance(turn[text_key], str):
            fail(f"turn {position}: {text_key!r} must be a string")
        messages.append({"role": role, "content": turn[text_key]})
    return messages


def _sharegpt(row: dict, fail) -> list[Message]:
    if "conversations" not in row:
        fail("sharegpt row needs 'conversations': [{from: human|gpt|system, value: ...}]")
    messages = _turns(row["conversations"], "from", "value", _SHAREGPT_ROLES, fail)
    system = _text(row, "system", fail, required=False)
    return ([{"role": "system", "content": system}] if system else []) + messages


def _messages(row: dict, fail) -> list[Message]:
    if "messages" not in row:
        fail("messages row needs 'messages': [{role: system|user|assistant, content: ...}]")
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    return _turns(row["messages"], "role", "content", roles, fail)


def _gsm8k(row: dict, fail) -> list[Message]:
    # The user turn is the one the gsm8k objective's chat format sends, so a model trained on these
    # rows is scored on the prompt it learned from.
    problem = row_problem(row)
    if problem:
        fail(problem)
    return [*chat_messages(row["question"], None), {"role": "assistant", "content": row["answer"]}]


_CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages, "gsm8k": _gsm8k}


def read_examples(
    path: Path, data_format: str, system_prompt: str | None, max_samples: int | None
) -> list[Example]:
    """Validate every row of `path` and convert it to an `Example`; the first bad row raises `InputError`."""
    convert = _CONVERTERS[data_format]
    examples = []
    for line, index, row in _read_rows(path):

        def fail(message: str, line=line, index=index):
            where = None if line is not None else f"row {index}"
            raise InputError(path, message, where, line)

        if not isinstance(row, dict):
            fail(f"a {data_format} row must be a JSON object")
        messages = convert(row, fail)
        if messages[-1]["role"] != "assistant":
            fail("the last turn must be the assistant's reply (it is what the model learns)")
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        examples.append(Example(tuple(messages)))
        if max_samples is not None and len(examples) >= max_samples:
            break
    if not examples:
        raise InputError(path, "holds no rows")
    return examples


@dataclass(frozen=True)
class SplitExamples:
    train: list[Example]
    eval: list[Example]


def load_splits(data: DataConfig) -> SplitExamples:
    """Train and eval examples: from their own files, or a seeded hold-out of train."""
    train = read_examples(data.train_file, data.format, data.system_prompt, data.max_samples)
    if data.eval_file is not None:
        return SplitExamples(
            train, read_examples(data.eval_file, data.format, data.system_prompt, data.max_samples)
        )
    if len(train) < 2:
        raise InputError(
            data.train_file, "needs at least 2 rows to hold out an eval split", "data.eval_split"
        )
    order = list(range(len(train)))
    random.Random(data.seed).shuffle(order)
    n_eval = max(1, round(len(train) * data.eval_split))
    held = set(order[:n_eval])
    return SplitExamples(
        [ex for i, ex in enumerate(train) if i not in held], [ex for i, ex in enumerate(train) if i in held]
    )


def resolve_chat_template(tokenizer, chat_template: str | None) -> str:
    """The Jinja template to render with: a named one, the config's own, or the tokenizer's."""
    if chat_template is not None:
        return NAMED_TEMPLATES.get(chat_template, chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "config",
            "the model's tokenizer has no chat template; set 'chatml' or a Jinja template",
            "data.chat_template",
        )
    return tokenizer.chat_template


def _render(tokenizer, template: str, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _segments(tokenizer, template: str, messages: tuple[Message, ...]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) pieces; assistant replies are trained.

    Rendering each prefix and diffing is the template-agnostic way to find where replies start;
    templates that rewrite earlier turns (e.g. drop past reasoning) break the prefix property, and
    for those only the final reply is trained.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, template, messages[:k], add_generation_prompt=True)
        full = _render(tokenizer, template, messages[: k + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            prompt = _render(tokenizer, template, messages[:-1], add_generation_prompt=True)
            full = _render(tokenizer, template, messages, add_generation_prompt=False)
            return [(prompt, False), (full[len(prompt) :], True)]
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def tokenize_example(tokenizer, template: str, example: Example) -> dict[str, list[int]]:
    """input_ids and labels (-100 on everything but assistant replies) for one conversation."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in _segments(tokenizer, template, example.messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def prompt_text(tokenizer, template: str, example: Example) -> str:
    """The conversation up to the last reply, ready for generation."""
    return _render(tokenizer, template, example.messages[:-1], add_generation_prompt=True)


def pad_right(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Tokenized rows as one right-padded batch: input_ids, attention_mask, and labels when rows have them.

    Padding positions get `pad_id` in input_ids and IGNORE_INDEX in labels, so they never count.
    """
    width = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    if "labels" in rows[0]:
        batch["labels"] = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["attention_mask"][i, :n] = 1
        if "labels" in batch:
            batch["labels"][i, :n] = torch.tensor(row["labels"])
    return batch


@dataclass(frozen=True)
class TokenizedSplit:
    """A split ready for the trainer, with what truncation cost."""

    dataset: Dataset
    rows: int
    tokens: int
    truncated_rows: int
    dropped_rows: int


def _fingerprint(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer by its vocabulary and rules, not by its name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return _fingerprint(body, tokenizer.all_special_tokens)


class TokenizedCache:
    """Tokenized splits, built once per (tokenizer, template, examples) and sliced per cutoff_len.

    `builds` counts full tokenizations so tests (and users) can see that a sweep paid it once.
    """

    def __init__(self, disk_dir: Path | None = None):
        self.disk_dir = disk_dir
        self.builds = 0
        self._full: dict[str, Dataset] = {}
        self._views: dict[tuple[str, int], TokenizedSplit] = {}

    @staticmethod
    def _key(tokenizer, template: str, examples: list[Example]) -> str:
        return _fingerprint(tokenizer_fingerprint(tokenizer), template, [ex.messages for ex in examples])

    def full(self, tokenizer, template: str, examples: list[Example]) -> Dataset:
        """Every example tokenized, untruncated: built once, then from memory or disk."""
        key = self._key(tokenizer, template, examples)
        if key in self._full:
            return self._full[key]
        path = self.disk_dir / key if self.disk_dir else None
        if path is not None and (path / "dataset_info.json").exists():
            dataset = load_from_disk(str(path))
        else:
            self.builds += 1
            dataset = Dataset.from_list([tokenize_example(tokenizer, template, ex) for ex in examples])
            if path is not None:
                # Workers may build the same entry at once: each writes its own folder and the
                # first rename wins; the others drop theirs and read the winner's.
                tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
                dataset.save_to_disk(str(tmp))
                try:
                    tmp.rename(path)
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)
                dataset = load_from_disk(str(path))
        self._full[key] = dataset
        return dataset

    def get(self, tokenizer, template: str, examples: list[Example], cutoff_len: int) -> TokenizedSplit:
        """The split truncated to `cutoff_len`; rows left without any trained token are dropped."""
        key = self._key(tokenizer, template, examples)
        if (key, cutoff_len) in self._views:
            return self._views[(key, cutoff_len)]
        full = self.full(tokenizer, template, examples)
        lengths = [len(ids) for ids in full["input_ids"]]
        truncated = full.map(
            lambda row: {"input_ids": row["input_ids"][:cutoff_len], "labels": row["labels"][:cutoff_len]},
            desc=f"cutoff_len={cutoff_len}",
        )
        kept = truncated.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))
        view = TokenizedSplit(
            dataset=kept,
            rows=len(kept),
            tokens=sum(len(ids) for ids in kept["input_ids"]),
            truncated_rows=sum(n > cutoff_len for n in lengths),
            dropped_rows=len(truncated) - len(kept),
        )
        self._views[(key, cutoff_len)] = view
        return view
