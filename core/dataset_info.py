"""LLaMA-Factory's dataset registry (`dataset_info.json`) and the row layout an entry describes.

An entry names a file next to the registry, its `formatting` (alpaca or sharegpt), which row keys
hold what (`columns`) and, for sharegpt, which keys and values mark a turn's role and text (`tags`),
as documented in LLaMA-Factory's data/README.md. What this tool cannot train on (hub datasets,
preference pairs, images, tool calls) is refused by name, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError

# The plain `format: sharegpt` accepts both ShareGPT's and OpenAI's role names.
LENIENT_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class RowLayout:
    """Which keys of a row hold what. The defaults are the plain `data.format` rows' keys.

    `roles` maps a turn's role value to user / assistant / system; None means the lenient map above.
    A column set to None is not read.
    """

    prompt: str = "instruction"
    query: str | None = "input"
    response: str = "output"
    history: str | None = "history"
    system: str | None = "system"
    messages: str = "conversations"
    tools: str | None = None
    role_tag: str = "from"
    content_tag: str = "value"
    roles: dict[str, str] | None = field(default=None, hash=False)
    # Between prompt and query: LLaMA-Factory joins them with one newline; plain alpaca rows here
    # have always had a blank line.
    query_separator: str = "\n\n"

    def role_map(self) -> dict[str, str]:
        return self.roles if self.roles is not None else LENIENT_SHAREGPT_ROLES


@dataclass(frozen=True)
class DatasetEntry:
    """One resolved entry of a dataset_info.json: the file to read, its format and layout."""

    name: str
    file: Path
    format: str
    layout: RowLayout


class EntryProblem(Exception):
    """What is wrong with a dataset_info entry, one line; the config loader puts it at the YAML field."""


_ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "ranking"}
_COLUMNS = {
    "alpaca": {"prompt", "query", "response", "history", "system"},
    "sharegpt": {"messages", "system", "tools"},
}
_TAGS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag"}
_SHAREGPT_TAG_DEFAULTS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
}


def read_registry(path: Path) -> dict[str, Any]:
    """The parsed dataset_info.json; a missing file or invalid JSON is an `InputError` at its line."""
    if not path.is_file():
        raise InputError(path, "dataset_info file not found")
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON: {exc.msg}", line=exc.lineno) from None
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8; save the file as UTF-8") from None
    if not isinstance(registry, dict):
        raise InputError(path, "a dataset_info.json must map dataset names to their descriptions")
    return registry


def _names(keys) -> str:
    return ", ".join(sorted(keys))


def resolve_entry(path: Path, name: str) -> DatasetEntry:
    """Entry `name` of the registry at `path`, checked.

    Raises:
        InputError: from `read_registry`, at the registry file.
        EntryProblem: what is wrong with the entry, one line, to be reported at the YAML field.
    """
    registry = read_registry(path)
    if name not in registry:
        known = list(registry)
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        raise EntryProblem(f"{path} has no dataset {name!r}; it has: {shown or 'none'}")
    entry = registry[name]
    where = f"dataset {name!r} of {path}"
    if not isinstance(entry, dict):
        raise EntryProblem(f"{where} must be an object with file_name, formatting, columns, tags")
    unsupported = set(entry) - _ENTRY_KEYS
    if entry.get("ranking"):
        unsupported.add("ranking")
    if unsupported:
        raise EntryProblem(
            f"{where} uses what this tool does not support: {_names(unsupported)} "
            f"(supported: a local file_name, formatting alpaca|sharegpt, columns, tags)"
        )
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise EntryProblem(f"{where} needs a file_name (a .json or .jsonl file next to the registry)")
    file = (path.parent / file_name).resolve()
    if file.suffix not in (".json", ".jsonl"):
        raise EntryProblem(f"{where}: file_name {file_name!r} must be a .json or .jsonl file")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in _COLUMNS:
        raise EntryProblem(f"{where}: formatting {formatting!r} is not supported; allowed: alpaca, sharegpt")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    for label, value in (("columns", columns), ("tags", tags)):
        if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
            raise EntryProblem(f"{where}: {label} must map names to non-empty strings")
    bad = set(columns) - _COLUMNS[formatting]
    if bad:
        raise EntryProblem(
            f"{where}: columns not supported for {formatting}: {_names(bad)} "
            f"(supported: {_names(_COLUMNS[formatting])})"
        )
    if formatting == "alpaca":
        if tags:
            raise EntryProblem(f"{where}: tags apply to the sharegpt formatting only")
        # LLaMA-Factory's defaults: history and system are read only when their column is named.
        layout = RowLayout(
            prompt=columns.get("prompt", "instruction"),
            query=columns.get("query", "input"),
            response=columns.get("response", "output"),
            history=columns.get("history"),
            system=columns.get("system"),
            query_separator="\n",
        )
        return DatasetEntry(name, file, "alpaca", layout)
    bad = set(tags) - _TAGS
    if bad:
        raise EntryProblem(
            f"{where}: tags not supported: {_names(bad)} (supported: {_names(_TAGS)}; "
            "tool calls and observations are not trained on)"
        )
    tag = {**_SHAREGPT_TAG_DEFAULTS, **tags}
    roles = {tag["user_tag"]: "user", tag["assistant_tag"]: "assistant", tag["system_tag"]: "system"}
    if len(roles) < 3:
        raise EntryProblem(f"{where}: user_tag, assistant_tag and system_tag must differ")
    layout = RowLayout(
        messages=columns.get("messages", "conversations"),
        system=columns.get("system"),
        tools=columns.get("tools"),
        role_tag=tag["role_tag"],
        content_tag=tag["content_tag"],
        roles=roles,
    )
    return DatasetEntry(name, file, "sharegpt", layout)
