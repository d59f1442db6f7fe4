"""NDCG scoring of LLM product rankings (Amazon KDD Cup 2024, ShopBench ranking tasks).

Two parsers turn the model's free-text answer into a ranking:

- `kdd2024` (the objective's default) is the competition's own rule, from its starter kit
  (`parsers.py` and `metrics.py`): `parse_kdd2024` and `kdd2024_ndcg` reproduce it answer for
  answer, quirks included, so a sweep picks the model the leaderboard would pick.
- `lenient` is this project's tolerant parser, `parse_ranking`: letters or numbers, any text
  around them, repeats dropped; `ndcg` scores its 0-based ranking.

`score_rankings` averages over a batch with either parser, counting answers a rule rejected.
`Ndcg` is the `ndcg` objective built on them: it shows the trained model each ranking row's prompt,
generates through objectives.generation and scores the rankings it writes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core.config import ObjectiveConfig
from core.errors import InputError
from core.eval import EvalData, RowRouter, Score
from core.rows import EvalRow, read_eval_rows
from objectives.generation import (
    fixed_subset,
    generate_for_adapters,
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

    `ndcg` averages `per_item`, in which a rejected answer scores 0.0. `parse_failures` counts the
    answers in which the parser found no candidate, `repeats` those the kdd2024 parser emptied
    because they named a candidate twice (always 0 with the lenient parser, which drops repeats).
    """

    ndcg: float
    parse_failures: int
    per_item: tuple[float, ...]
    repeats: int = 0


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


# The official rule of KDD Cup 2024 (starter kit parsers.py `_parse_ranking`, metrics.py `ndcg`).
Parser = Literal["kdd2024", "lenient"]


@dataclass(frozen=True)
class Kdd2024Answer:
    """What the KDD Cup 2024 parser makes of one answer.

    `ranking` holds the kept 1-based candidate numbers, best first; it is empty when the answer was
    rejected, and `rejected` says by which rule: "parse_failure" (no number kept) or "repeats".
    """

    ranking: tuple[int, ...]
    rejected: Literal["parse_failure", "repeats"] | None = None


def parse_kdd2024(text: str, n_candidates: int = 5) -> Kdd2024Answer:
    """Parse an answer exactly as the KDD Cup 2024 scorer does, with `n_candidates` for its 5.

    1. Keep only the characters that are numeric (`str.isnumeric`), commas and spaces.
    2. Split on commas; each piece that `int()` accepts (surrounding spaces allowed, none inside) and
       that is <= `n_candidates` is kept, in order; other pieces are skipped. So "1 2 3" is one
       piece that is not an integer, and "Top 5: 2, 1" keeps only 1 ("5 2" is not an integer).
    3. Keep the first `n_candidates` kept numbers; if any of them repeats, the answer is empty.

    0 passes the `<= n` test and is kept (see `kdd2024_ndcg` for what it scores).

    Raises:
        ValueError: if `n_candidates` is less than 1.
    """
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be at least 1, got {n_candidates}")
    cleaned = "".join(c for c in text if c.isnumeric() or c in ", ")
    kept: list[int] = []
    for piece in cleaned.split(","):
        try:
            number = int(piece)
        except ValueError:
            continue  # the official parser skips what does not parse
        if number <= n_candidates:
            kept.append(number)
    kept = kept[:n_candidates]
    if not kept:
        return Kdd2024Answer((), "parse_failure")
    if len(set(kept)) != len(kept):
        return Kdd2024Answer((), "repeats")
    return Kdd2024Answer(tuple(kept))


def kdd2024_ndcg(ranking: Sequence[int], relevances: Sequence[float]) -> float:
    """NDCG of 1-based candidate numbers exactly as the KDD Cup 2024 scorer computes it.

    Positions beyond the relevance list are trimmed; the candidate numbered k has relevance
    `relevances[k - 1]`, or 0 when k is past the list. Gain is 2**rel - 1, the discount of
    position i (1-based) log2(i + 1), and IDCG that of the relevances sorted descending. An empty
    ranking, or relevances whose IDCG is 0, score 0.0 (the official code would divide by zero).
    """
    ranking = list(ranking)[: len(relevances)]
    if not ranking:
        return 0.0
    ideal = _dcg(sorted(relevances, reverse=True))
    if ideal == 0.0:
        return 0.0
    gains = []
    for number in ranking:
        # The official code reads weight[number - 1] whenever number - 1 < len(weight). For 0,
        # which its parser keeps (0 <= 5), that is weight[-1]: the *last* candidate's relevance.
        # Reproduced on purpose, so that "0" scores here what it scores on the leaderboard.
        gains.append(relevances[number - 1] if number - 1 < len(relevances) else 0.0)
    return _dcg(gains) / ideal


def score_rankings(
    outputs: list[str],
    relevances: list[list[float]],
    parser: Parser = "lenient",
    n_candidates: list[int] | None = None,
) -> RankingScore:
    """Parse and score a batch of ranking answers.

    `outputs[j]` is the model's answer for item j and `relevances[j]` the relevance of each of its
    candidates, in listed order. `n_candidates[j]` is the number of candidates item j lists (the
    kdd2024 parser keeps numbers up to it); None means `len(relevances[j])`, which is also what the
    lenient parser always uses. Rejected answers score 0.0 and are counted in `parse_failures` or
    `repeats`.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    if len(outputs) != len(relevances):
        raise ValueError(f"{len(outputs)} outputs but {len(relevances)} relevance lists")
    if n_candidates is not None and len(n_candidates) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(n_candidates)} candidate counts")
    if not outputs:
        raise ValueError("cannot score an empty batch")
    counts = n_candidates or [len(item) for item in relevances]
    per_item: list[float] = []
    rejected = {"parse_failure": 0, "repeats": 0}
    for output, item_relevances, count in zip(outputs, relevances, counts, strict=True):
        if parser == "kdd2024":
            answer = parse_kdd2024(output, count)
            if answer.rejected:
                rejected[answer.rejected] += 1
            per_item.append(kdd2024_ndcg(answer.ranking, item_relevances))
            continue
        ranking = parse_ranking(output, len(item_relevances))
        if ranking is None:
            rejected["parse_failure"] += 1
            per_item.append(0.0)
        else:
            per_item.append(ndcg(ranking, item_relevances))
    return RankingScore(
        ndcg=sum(per_item) / len(per_item),
        parse_failures=rejected["parse_failure"],
        per_item=tuple(per_item),
        repeats=rejected["repeats"],
    )


# One line of a list of candidates: "1. ", "2) ", "(3) ", "[4] ", "5: ", or the same with a letter.
_CANDIDATE_LINE = re.compile(r"^[ \t]*[(\[]?(?P<label>[0-9]+|[A-Za-z])[.):\]][ \t]+\S", re.MULTILINE)


@dataclass(frozen=True)
class ListedCandidates:
    """The candidate list found in a ranking prompt: how many, and whether labelled by number or letter."""

    count: int
    kind: Literal["number", "letter"]


def listed_candidates(prompt: str) -> ListedCandidates | None:
    """The candidates a prompt lists, one a line: the longest run of lines labelled 1, 2, 3, ... or A, B, C, ...

    A candidate line starts with its label followed by ".", ")", ":" or "]" (optionally opened by
    "(" or "["), then a space and text: "1. Aveda Shampoo", "(B) blue hat". Labels must count up
    from 1 (or A) one line after another, other lines between them allowed; a later run that
    starts again at 1 replaces a shorter earlier one, so numbered instructions before the product
    list do not count. A run needs at least two lines. Returns None when the prompt lists no
    candidates this way (e.g. "A: tea, B: mug" on one line), in which case the relevance list
    alone says how many candidates there are.
    """
    best: ListedCandidates | None = None
    kind: Literal["number", "letter"] | None = None
    run = 0
    for match in _CANDIDATE_LINE.finditer(prompt):
        label = match.group("label")
        if label.isdigit():
            label_kind: Literal["number", "letter"] = "number"
            position = int(label)
        else:
            label_kind = "letter"
            position = ord(label.upper()) - ord("A") + 1
        if position == 1:
            kind, run = label_kind, 1
        elif label_kind == kind and position == run + 1:
            run += 1
        else:
            continue
        if run >= 2 and (best is None or run > best.count):
            best = ListedCandidates(run, label_kind)
    return best


class Ndcg:
    """The `ndcg` objective: mean NDCG of the rankings the model writes for its eval rows.

    Each row holds the prompt listing the candidates under `input_field` and the candidates'
    relevance weights, in listed order, under `output_field` (a list, or a string holding a JSON
    list); rows whose `task_type` is set to anything but "ranking" are skipped. The prompt is sent
    as the user turn of the sweep's chat template, after `system_prompt` if one is set. `parser`
    picks the KDD Cup 2024 rule (default) or the lenient one. Reports `ndcg` (optimised) and the
    shares of answers rejected for want of a candidate (`parse_failures`) or for a repeat
    (`repeats`).
    """

    def __init__(self, config: ObjectiveConfig):
        self.config = config
        self._prompts: list[str] | None = None
        self._relevances: list[list[float]] = []
        self._n_candidates: list[int] = []

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
            prompt = self._prompt(row)
            relevances = self._row_relevances(row)
            items.append((prompt, relevances, self._candidate_count(row, prompt, relevances)))
        if not items:
            raise InputError(
                self.config.eval_file,
                f"holds no ranking rows (rows with {self.config.input_field!r}, {self.config.output_field!r} "
                "and, if set, task_type 'ranking')",
            )
        picked = [items[i] for i in fixed_subset(len(items), self.config.max_samples, self.config.seed)]
        self._relevances = [relevances for _, relevances, _ in picked]
        self._n_candidates = [count for _, _, count in picked]
        self._prompts = [prompt for prompt, _, _ in picked]

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

    def _candidate_count(self, row: EvalRow, prompt: str, relevances: list[float]) -> int:
        """How many candidates the row ranks: those its prompt lists one a line, else its relevances."""
        listed = listed_candidates(prompt)
        if listed is None:
            return len(relevances)
        labels = "1." if listed.kind == "number" else "A."
        last = str(listed.count) if listed.kind == "number" else chr(ord("A") + listed.count - 1)
        if len(relevances) < listed.count:
            raise row.error(
                f"field {self.config.output_field!r} has {len(relevances)} relevances but field "
                f"{self.config.input_field!r} lists {listed.count} candidates ({labels} to {last}.); "
                "give one relevance per candidate, in listed order"
            )
        if listed.kind == "letter" and self.config.parser == "kdd2024":
            raise row.error(
                f"field {self.config.input_field!r} labels its candidates A to {last}, but parser kdd2024 "
                "(the KDD Cup scorer) reads only numbers; number them or set objective.parser: lenient"
            )
        return listed.count

    def score(self, model, tokenizer, data: EvalData) -> Score:
        """Mean NDCG of the greedy rankings; rejected answers score 0 and are counted by rule."""
        self.validate()
        prompts = self._chat_prompts(tokenizer, data)
        return self._scored(generate_for_objective(self.config, model, tokenizer, prompts, ()))

    def score_many(self, model, tokenizer, data: EvalData, adapters: int, route: RowRouter) -> list[Score]:
        """`score` for each of `adapters` adapters of one model, decoded together (see `RowRouter`)."""
        self.validate()
        prompts = self._chat_prompts(tokenizer, data)
        outputs = generate_for_adapters(self.config, model, tokenizer, prompts, (), adapters, route)
        return [self._scored(generations) for generations in outputs]

    def _chat_prompts(self, tokenizer, data: EvalData) -> list[str]:
        system = (
            [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        )
        return [
            tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": prompt}],
                chat_template=data.chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
            for prompt in self._prompts[: data.limit]
        ]

    def _scored(self, outputs: list[str]) -> Score:
        n = len(outputs)
        result = score_rankings(outputs, self._relevances[:n], self.config.parser, self._n_candidates[:n])
        metrics = {
            "ndcg": result.ndcg,
            "parse_failures": result.parse_failures / n,
            "repeats": result.repeats / n,
            "eval_items": float(n),
        }
        return Score(metrics[self.config.target_metric], metrics)
