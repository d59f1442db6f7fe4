"""SFT data: read alpaca / sharegpt / messages / gsm8k rows, turn them into chat messages, tokenize once.

Rows are validated line by line before any model is loaded, so a malformed row is reported as
`file:line: ...` instead of surfacing as a KeyError in the middle of a trial. Tokenization is the
one data cost a sweep pays: it is done once per (tokenizer, template, data) and each cutoff_len
view is derived from that by slicing, in memory and on disk across invocations.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk

from core.errors import InputError
from core.eval import IGNORE_INDEX, TokenizedSplit, render_chat
from core.rows import Example, Message

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}


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


def _last_turn(tokenizer, template: str, messages: tuple[Message, ...]) -> list[tuple[str, bool]]:
    prompt = render_chat(tokenizer, template, messages[:-1], add_generation_prompt=True)
    full = render_chat(tokenizer, template, messages, add_generation_prompt=False)
    return [(prompt, False), (full[len(prompt) :], True)]


def _segments(
    tokenizer, template: str, messages: tuple[Message, ...], last_turn_only: bool = False
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) pieces; assistant replies are trained.

    Every assistant reply is trained (as LLaMA-Factory does, history included), or with
    `last_turn_only` (`data.mask_history`) the final one alone. Rendering each prefix and diffing is
    the template-agnostic way to find where replies start; templates that rewrite earlier turns
    (e.g. drop past reasoning) break the prefix property, and for those only the final reply is
    trained.
    """
    if last_turn_only:
        return _last_turn(tokenizer, template, messages)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, template, messages[:k], add_generation_prompt=True)
        full = render_chat(tokenizer, template, messages[: k + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return _last_turn(tokenizer, template, messages)
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def tokenize_example(tokenizer, template: str, example: Example) -> dict[str, list[int]]:
    """input_ids and labels (-100 on everything but the trained assistant replies) for one conversation."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in _segments(tokenizer, template, example.messages, example.last_turn_only):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


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
        # An example masked to its last turn keys differently; unmasked ones keep their old keys.
        return _fingerprint(
            tokenizer_fingerprint(tokenizer),
            template,
            [(ex.messages, True) if ex.last_turn_only else ex.messages for ex in examples],
        )

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
