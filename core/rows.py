"""Reading data rows: SFT rows (alpaca / sharegpt / messages / gsm8k) as chat messages, and
objectives' own eval rows, each validated with the file and line of a bad row.

Rows are checked before any model is loaded, so a malformed row is reported as `file:line: ...`
instead of surfacing as a KeyError in the middle of a trial.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import DataConfig, decode_utf8
from core.dataset_info import RowLayout
from core.errors import InputError

# GSM8K's prompt (lm-eval's gsm8k.yaml doc_to_text). Training rows of `data.format: gsm8k` use it as
# the user turn, so a model trained on them is scored on the prompt it learned from.
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
FINAL_ANSWER_LINE = re.compile(r"(?:^|\n)#### \S[^\n]*\s*$")


Message = dict[str, str]

PLAIN_LAYOUT = RowLayout()


@dataclass(frozen=True)
class Example:
    """One SFT conversation; the loss covers the assistant turns only (the last one only with
    `last_turn_only`, `data.mask_history`)."""

    messages: tuple[Message, ...]
    last_turn_only: bool = False


def _read_rows(path: Path) -> Iterable[tuple[int | None, int, Any]]:
    """Yield (line, row index, parsed row); line is None for a JSON array file."""
    if not path.is_file():
        raise InputError(path, "data file not found")
    text = decode_utf8(path.read_bytes(), path)
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


def _history(row: dict, key: str | None, fail) -> list[Message]:
    """Alpaca's `history`: [instruction, response] pairs of the turns before the row's own."""
    value = row.get(key) if key else None
    if value is None:
        return []
    if not isinstance(value, list):
        fail(f"field {key!r} must be a list of [instruction, response] pairs")
    messages = []
    for position, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            fail(f"{key}[{position}] must be a pair of strings [instruction, response]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _alpaca(row: dict, fail, layout: RowLayout) -> list[Message]:
    missing = [key for key in (layout.prompt, layout.response) if key not in row]
    if missing:
        optional = ", ".join(k for k in (layout.query, layout.system, layout.history) if k)
        fail(
            f"alpaca row needs {layout.prompt!r} and {layout.response!r} (optional: {optional}); "
            f"missing {missing}"
        )
    prompt = _text(row, layout.prompt, fail)
    extra = _text(row, layout.query, fail, required=False) if layout.query else None
    if extra:
        prompt = f"{prompt}{layout.query_separator}{extra}"
    messages = [
        *_history(row, layout.history, fail),
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _text(row, layout.response, fail)},
    ]
    system = _text(row, layout.system, fail, required=False) if layout.system else None
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


def _sharegpt(row: dict, fail, layout: RowLayout) -> list[Message]:
    roles = layout.role_map()
    if layout.messages not in row:
        fail(
            f"sharegpt row needs {layout.messages!r}: "
            f"[{{{layout.role_tag}: {'|'.join(roles)}, {layout.content_tag}: ...}}]"
        )
    if layout.tools and row.get(layout.tools):
        fail(f"field {layout.tools!r}: tool descriptions are not supported; remove them or the row")
    messages = _turns(row[layout.messages], layout.role_tag, layout.content_tag, roles, fail)
    if not any(message["role"] == "user" for message in messages):
        # Chat templates render a reply with no prompt oddly or not at all; the model would learn
        # to answer nothing.
        user = next(value for value, role in roles.items() if role == "user")
        fail(
            f"sharegpt row has no user turn ({layout.role_tag!r}: {user!r}); "
            "a conversation needs a prompt to reply to"
        )
    system = _text(row, layout.system, fail, required=False) if layout.system else None
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _messages(row: dict, fail, layout: RowLayout) -> list[Message]:
    if "messages" not in row:
        fail("messages row needs 'messages': [{role: system|user|assistant, content: ...}]")
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    messages = _turns(row["messages"], "role", "content", roles, fail)
    if not any(message["role"] == "user" for message in messages):
        fail("messages row has no user turn ('role': 'user'); a conversation needs a prompt to reply to")
    return messages


def _gsm8k(row: dict, fail, layout: RowLayout) -> list[Message]:
    # The user turn is the one the gsm8k objective's chat format sends, so a model trained on these
    # rows is scored on the prompt it learned from.
    problem = row_problem(row)
    if problem:
        fail(problem)
    return [*chat_messages(row["question"], None), {"role": "assistant", "content": row["answer"]}]


_CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages, "gsm8k": _gsm8k}


def read_examples(
    path: Path,
    data_format: str,
    system_prompt: str | None,
    max_samples: int | None,
    layout: RowLayout = PLAIN_LAYOUT,
    mask_history: bool = False,
) -> list[Example]:
    """Validate every row of `path` and convert it to an `Example`; the first bad row raises `InputError`.

    `layout` names the row keys (a LLaMA-Factory dataset_info entry's columns and tags);
    `mask_history` trains each conversation's last assistant turn only.
    """
    convert = _CONVERTERS[data_format]
    examples = []
    for line, index, row in _read_rows(path):

        def fail(message: str, line=line, index=index):
            where = None if line is not None else f"row {index}"
            raise InputError(path, message, where, line)

        if not isinstance(row, dict):
            fail(f"a {data_format} row must be a JSON object")
        messages = convert(row, fail, layout)
        if messages[-1]["role"] != "assistant":
            fail("the last turn must be the assistant's reply (it is what the model learns)")
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        multi_turn = sum(message["role"] == "assistant" for message in messages) > 1
        examples.append(Example(tuple(messages), last_turn_only=mask_history and multi_turn))
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
    train_format, train_layout = data.row_format("train")
    train = read_examples(
        data.train_file, train_format, data.system_prompt, data.max_samples, train_layout, data.mask_history
    )
    if data.eval_file is not None:
        eval_format, eval_layout = data.row_format("eval")
        return SplitExamples(
            train,
            read_examples(
                data.eval_file,
                eval_format,
                data.system_prompt,
                data.max_samples,
                eval_layout,
                data.mask_history,
            ),
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


def chat_messages(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    """Zero-shot chat messages, as lm-eval's --apply_chat_template builds them.

    The user turn is the plain zero-shot prompt, ending in "Answer:"; the
    system turn is present only for a non-empty `system_prompt` (lm-eval's
    --system_instruction). Render with the tokenizer's chat template and
    add_generation_prompt=True.
    """
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": QUESTION_TEMPLATE.format(question=question)})
    return messages


def row_problem(row: Any) -> str | None:
    """Why `row` is not a GSM8K row, or None when it is one.

    A row is a JSON object with a non-empty `question` and an `answer` whose last line is
    '#### <final answer>', as in the official jsonl files.
    """
    if not isinstance(row, dict):
        return "a gsm8k row must be a JSON object with 'question' and 'answer'"
    missing = [key for key in ("question", "answer") if key not in row]
    if missing:
        return (
            "gsm8k row needs 'question' and 'answer' (a worked solution ending '#### <number>'); "
            f"missing {missing}"
        )
    for key in ("question", "answer"):
        if not isinstance(row[key], str) or not row[key].strip():
            return f"field {key!r} must be a non-empty string"
    if not FINAL_ANSWER_LINE.search(row["answer"]):
        return "gsm8k 'answer' must end with a line '#### <number>'"
    return None


@dataclass(frozen=True)
class EvalRow:
    """One row of an objective's own eval rows, with where it came from."""

    source: str
    line: int | None  # 1-based line in a .jsonl file; None for a .json list or a dataset
    index: int
    data: Any

    def error(self, message: str) -> InputError:
        """An `InputError` naming this row's file and line (or its index)."""
        return InputError(
            self.source, message, None if self.line is not None else f"row {self.index}", self.line
        )


def read_eval_rows(source: str, split: str, dataset_config: str | None) -> list[EvalRow]:
    """Rows of a local .jsonl/.json file, or of `split` of a `datasets` id or folder.

    Raises:
        InputError: for a missing file, invalid JSON, or a dataset that cannot be loaded.
    """
    if source.endswith((".json", ".jsonl")):
        return [EvalRow(source, line, index, row) for line, index, row in _read_rows(Path(source))]
    # Imported here: loading datasets is slow, and the benchmark uses this module without it.
    import datasets

    try:
        rows = datasets.load_dataset(source, dataset_config, split=split)
    except Exception as exc:  # noqa: BLE001  (datasets raises many types; all mean "cannot load")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        config = f", config {dataset_config!r}" if dataset_config else ""
        raise InputError(source, f"cannot load split {split!r}{config} as a dataset: {first_line}") from None
    return [EvalRow(source, None, index, row) for index, row in enumerate(rows)]
