"""NDCG scoring of LLM product rankings (Amazon KDD Cup 2024, ShopBench ranking tasks).

The model is shown candidates labelled either A, B, C, ... or 1, 2, 3, ... and
asked to order them by relevance. `parse_ranking` turns its free-text answer
into 0-based candidate indices, `ndcg` scores one ranking against graded
relevances, and `score_rankings` averages over a batch, counting answers that
could not be parsed as parse failures scored 0.

`Ndcg` is the `ndcg` objective built on them: it shows the trained model each
ranking row's prompt, generates through objectives.generation and scores the
rankings it writes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from core.config import ObjectiveConfig
from core.errors import InputError
from core.eval import EvalData, Score
from core.rows import EvalRow, read_eval_rows
from objectives.generation import (
    fixed_subset,
    generate_for_objective,
    require_backend,
)

# A token is a lone letter or a lone run of digits: "C" in "C > E" but not the
# "C" of "Candidates", and "12" but not the "1" of "x1".
_TOKEN = re.compile(
    r"(?P<letter>(?<![A-Za-z0-9_])[A-Za-z](?![A-Za-z0-9_]))"
    r"|(?P<number>(?<![A-Za-z0-9_])[0-9]+(?![A-Za-z0-9_]))"
)
# Text allowed between two ids of one list: "C, E", "C > E", "C -> E",
# "['C', 'E']", "3 | 5", "A, then B", "D and E", one id per line. Any other
# word, or a colon, ends the list, so "Ranking: C > E" yields "C > E" alone.
_LIST_SEPARATOR = re.compile(r"(?:[\s,;|>\-→'\"()\[\]]|\band\b|\bthen\b)+", re.IGNORECASE)
# Models often answer with a numbered list ("1. C\n2. E"); the position
# numbers would otherwise be read as candidate ids.
_ENUMERATION_MARKER = re.compile(r"^[ \t]*[0-9]+[.)][ \t]+(?=\S)", re.MULTILINE)


@dataclass(frozen=True)
class RankingScore:
    """Mean NDCG over a batch of ranking answers.

    `ndcg` averages `per_item`, in which an unparseable answer scores 0.0;
    `parse_failures` counts those answers.
    """

    ndcg: float
    parse_failures: int
    per_item: tuple[float, ...]


def _letter_index(token: str) -> int:
    return ord(token.upper()) - ord("A")


def _number_index(token: str) -> int:
    return int(token) - 1


def parse_ranking(text: str, n_candidates: int) -> list[int] | None:
    """Parse a model's ranking answer into 0-based candidate indices, best first.

    Candidate ids are letters (A = 0, case-insensitive) or 1-based numbers
    (1 = 0). The rule for choosing between them, and for ignoring surrounding
    text, is:

    1. Position markers that open a line of a numbered list ("1. ", "2) ")
       are removed.
    2. The text is split into lists: maximal runs of ids of one kind (all
       letters or all numbers) separated only by whitespace, commas,
       semicolons, "|", ">", "-", "→", quotes, brackets, "and" or "then".
       Any other text, such as another word or a colon, ends a list.
    3. Each list keeps, in order, the first occurrence of each id that names a
       candidate; repeated ids and ids outside the candidates (e.g. "F" or "6"
       when there are 5) are dropped.
    4. The list keeping the most ids is the answer; on a tie, the earliest.
       So "I think: C, E, D, A, B" gives C, E, D, A, B, not the lone "I".

    The result may be a prefix of a full permutation. Returns None when no
    list keeps any id, which callers count as a parse failure.

    Raises:
        ValueError: if `n_candidates` is less than 1.
    """
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be at least 1, got {n_candidates}")
    text = _ENUMERATION_MARKER.sub("", text)

    lists: list[list[int]] = []
    previous_kind: str | None = None
    previous_end = 0
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        gap = text[previous_end : match.start()]
        if kind != previous_kind or not _LIST_SEPARATOR.fullmatch(gap):
            lists.append([])
        index = _letter_index(match.group()) if kind == "letter" else _number_index(match.group())
        if 0 <= index < n_candidates and index not in lists[-1]:
            lists[-1].append(index)
        previous_kind, previous_end = kind, match.end()
    # max keeps the first of equally long lists.
    best = max(lists, key=len, default=[])
    return best or None


def _dcg(relevances_in_order: list[float]) -> float:
    # Position i (1-based) is discounted by log2(i + 1); enumerate is 0-based.
    return sum(
        (math.pow(2.0, rel) - 1.0) / math.log2(position + 2)
        for position, rel in enumerate(relevances_in_order)
    )


def ndcg(ranking: list[int], relevances: list[float], k: int | None = None) -> float:
    """Normalised discounted cumulative gain of `ranking`, optionally cut at `k`.

    DCG sums (2**rel - 1) / log2(i + 1) over the ranked candidates at 1-based
    positions i <= k; candidates missing from `ranking` contribute nothing,
    so a partial ranking is scored as if they came last with no credit. IDCG
    is the DCG of the relevances sorted in descending order, cut at the same
    k. When IDCG is 0 (no candidate has positive relevance) every ranking is
    equally good and the score is defined as 0.0, so batch means stay finite.

    Args:
        ranking: distinct 0-based candidate indices, best first.
        relevances: graded relevance of each candidate, indexed like `ranking`.
        k: number of leading positions scored; None scores them all.

    Raises:
        ValueError: if `ranking` repeats an index or names one outside
            `relevances`, or `k` is less than 1.
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"ranking repeats a candidate: {ranking}")
    if any(not 0 <= index < len(relevances) for index in ranking):
        raise ValueError(f"ranking {ranking} names a candidate outside 0..{len(relevances) - 1}")
    ideal = _dcg(sorted(relevances, reverse=True)[:k])
    if ideal == 0.0:
        return 0.0
    return _dcg([relevances[index] for index in ranking[:k]]) / ideal


def score_rankings(outputs: list[str], relevances: list[list[float]]) -> RankingScore:
    """Parse and score a batch of ranking answers.

    `outputs[j]` is the model's answer for item j and `relevances[j]` the
    relevance of each of its candidates; the number of candidates is
    `len(relevances[j])`. Unparseable answers score 0.0 and are counted in
    `parse_failures`.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    if len(outputs) != len(relevances):
        raise ValueError(f"{len(outputs)} outputs but {len(relevances)} relevance lists")
    if not outputs:
        raise ValueError("cannot score an empty batch")
    per_item: list[float] = []
    parse_failures = 0
    for output, item_relevances in zip(outputs, relevances, strict=True):
        ranking = parse_ranking(output, len(item_relevances))
        if ranking is None:
            parse_failures += 1
            per_item.append(0.0)
        else:
            per_item.append(ndcg(ranking, item_relevances))
    return RankingScore(
        ndcg=sum(per_item) / len(per_item),
        parse_failures=parse_failures,
        per_item=tuple(per_item),
    )


class Ndcg:
    """The `ndcg` objective: mean NDCG of the rankings the model writes for its eval rows.

    Each row holds the prompt listing the candidates under `input_field` and the candidates'
    relevance weights, in listed order, under `output_field` (a list, or a string holding a JSON
    list); rows whose `task_type` is set to anything but "ranking" are skipped. The prompt is sent
    as the user turn of the sweep's chat template, after `system_prompt` if one is set. Reports
    `ndcg` (optimised) and `parse_failures`.
    """

    def __init__(self, config: ObjectiveConfig):
        self.config = config
        self._prompts: list[str] | None = None
        self._relevances: list[list[float]] = []

    def validate(self) -> None:
        """Read and check the eval rows once; a bad row raises `InputError` (file:line)."""
        if self._prompts is not None:
            return
        require_backend(self.config)
        items = []
        for row in read_eval_rows(self.config.eval_file, self.config.split, self.config.dataset_config):
            if not isinstance(row.data, dict):
                raise row.error("a ranking row must be a JSON object")
            if row.data.get("task_type", "ranking") != "ranking":
                continue
            items.append((self._prompt(row), self._row_relevances(row)))
        if not items:
            raise InputError(
                self.config.eval_file,
                f"holds no ranking rows (rows with {self.config.input_field!r}, {self.config.output_field!r} "
                "and, if set, task_type 'ranking')",
            )
        picked = [items[i] for i in fixed_subset(len(items), self.config.max_samples, self.config.seed)]
        self._relevances = [relevances for _, relevances in picked]
        self._prompts = [prompt for prompt, _ in picked]

    def _prompt(self, row: EvalRow) -> str:
        prompt = row.data.get(self.config.input_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise row.error(
                f"field {self.config.input_field!r} (the prompt listing the candidates) "
                "must be a non-empty string"
            )
        return prompt

    def _row_relevances(self, row: EvalRow) -> list[float]:
        field = self.config.output_field
        value: Any = row.data.get(field)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        numbers = isinstance(value, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
            for x in value
        )
        if not numbers or not value:
            raise row.error(
                f"field {field!r} must list each candidate's relevance, in listed order, as numbers >= 0 "
                '(e.g. [3, 0, 1] or "[3, 0, 1]")'
            )
        return [float(x) for x in value]

    def score(self, model, tokenizer, data: EvalData) -> Score:
        """Mean NDCG of the greedy rankings; unparseable answers score 0 and count as parse failures."""
        self.validate()
        system = (
            [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        )
        prompts = [
            tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": prompt}],
                chat_template=data.chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
            for prompt in self._prompts[: data.limit]
        ]
        outputs = generate_for_objective(self.config, model, tokenizer, prompts, ())
        result = score_rankings(outputs, self._relevances[: data.limit])
        metrics = {
            "ndcg": result.ndcg,
            "parse_failures": float(result.parse_failures),
            "eval_items": float(len(prompts)),
        }
        return Score(metrics[self.config.target_metric], metrics)
