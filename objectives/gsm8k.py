"""GSM8K prompting and scoring, matching lm-evaluation-harness's `gsm8k` task.

Every constant is copied from lm_eval/tasks/gsm8k/gsm8k.yaml of lm-eval 0.4.13,
or, where that file sets nothing, from the default it inherits, so that
scores here equal the `exact_match,strict-match` and
`exact_match,flexible-extract` numbers lm-eval reports for the same
generations. tests/test_gsm8k_scoring.py checks this against lm-eval's own
task, filter and metric code.

`Gsm8k` is the `gsm8k` objective built on them: it prompts the trained model
with the eval questions, generates through objectives.generation and scores
the answers. The SFT data reader uses `row_problem` and `chat_messages` for
GSM8K training rows.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import InputError
from core.eval import EvalData, RowRouter, Score
from core.rows import QUESTION_TEMPLATE, EvalRow, chat_messages, read_eval_rows, row_problem
from objectives.generation import (
    fixed_subset,
    generate_for_adapters,
    generate_for_objective,
    require_backend,
)

if TYPE_CHECKING:
    from core.config import ObjectiveConfig

# gsm8k.yaml: generation_kwargs.until. lm-eval cuts each generation at the
# first of these (lm_eval/models/utils.py: postprocess_generated_text).
STOP_SEQUENCES: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")

# gsm8k.yaml: doc_to_text "Question: {{question}}\nAnswer:".
# gsm8k.yaml sets neither delimiter; these are TaskConfig's defaults
# (lm_eval/config/task.py).
_TARGET_DELIMITER = " "
_FEWSHOT_DELIMITER = "\n\n"

# gsm8k.yaml: filter_list, each a regex filter followed by take_first.
_STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE_EXTRACT = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# RegexFilter's default fallback (lm_eval/filters/extraction.py), returned when
# the regex finds nothing; no GSM8K reference equals it.
_INVALID = "[invalid]"

# gsm8k.yaml: metric_list exact_match regexes_to_ignore, applied in this
# order to prediction and reference alike; then ignore_case: true.
# ignore_punctuation is false there, so punctuation is kept.
_REGEXES_TO_IGNORE = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))
# The reference is cut at the last "#### ", as the "(?s).*#### " regex does.
_ANSWER_MARKER = "#### "
# gsm8k.yaml: num_fewshot.
DEFAULT_NUM_FEWSHOT = 5
# lm_eval.simple_evaluate's default fewshot_random_seed; gsm8k.yaml sets no fewshot_config, so the
# task's default ContextSampler draws every question's shots from one random.Random(1234).
LM_EVAL_FEWSHOT_SEED = 1234
# The last line of an official GSM8K answer field: "#### 72".


@dataclass(frozen=True)
class Gsm8kScore:
    """Exact-match accuracy under lm-eval's two gsm8k answer filters.

    `strict_match` and `flexible_extract` are the means of the per-item
    results, as lm-eval reports `exact_match,strict-match` and
    `exact_match,flexible-extract`.
    """

    strict_match: float
    flexible_extract: float
    per_item_strict: tuple[bool, ...]
    per_item_flexible: tuple[bool, ...]


def reference_answer(answer_field: str) -> str:
    """Final answer of a GSM8K `answer` field: the text after its last '#### '.

    lm-eval's doc_to_target is the whole `answer` field (worked solution
    included); its exact_match then strips everything up to the last '#### '.
    This returns that tail unstripped, so `exact_match` treats it exactly as
    lm-eval treats the whole field. A field without the marker is returned
    whole, as lm-eval would compare it.
    """
    return answer_field.rpartition(_ANSWER_MARKER)[2]


def fewshot_prompt(question: str, shots: list[dict[str, str]]) -> str:
    """The plain-text n-shot prompt lm-eval builds for `question`.

    Each shot is a GSM8K train row with "question" and "answer" keys; its full
    answer field, worked solution and '#### N' line included, is the target.
    Shots are rendered in the given order (lm-eval samples them from the train
    split with its own seed). With no shots the prompt is the bare question.
    """
    turns = [
        QUESTION_TEMPLATE.format(question=shot["question"]) + _TARGET_DELIMITER + shot["answer"]
        for shot in shots
    ]
    turns.append(QUESTION_TEMPLATE.format(question=question))
    return _FEWSHOT_DELIMITER.join(turns)


def truncate_at_stop(generation: str) -> str:
    """Cut `generation` at the first stop sequence, as lm-eval does before filtering.

    Needed when the generator did not stop on STOP_SEQUENCES itself, or kept
    the stop text: a model that goes on to write the next "Question:" would
    otherwise have that question's numbers read by flexible-extract.
    """
    for stop in STOP_SEQUENCES:
        generation = generation.partition(stop)[0]
    return generation


def _first_match_or_invalid(pattern: re.Pattern[str], generation: str, group_select: int) -> str:
    # Mirrors RegexFilter.apply: findall yields tuples when the pattern has
    # several groups, and the first non-empty group of the selected match wins.
    # RegexFilter also strips the result, a no-op here since neither pattern
    # can capture whitespace.
    matches = pattern.findall(generation)
    if not matches:
        return _INVALID
    selected: str | tuple[str, ...] = matches[group_select]
    if isinstance(selected, tuple):
        selected = next((group for group in selected if group), _INVALID)
    return selected


def strict_match(generation: str) -> str:
    """The answer lm-eval's gsm8k `strict-match` filter extracts.

    That is the number after the first '#### ', or "[invalid]" when there is
    none.
    """
    return _first_match_or_invalid(_STRICT_MATCH, generation, group_select=0)


def flexible_extract(generation: str) -> str:
    """The answer lm-eval's gsm8k `flexible-extract` filter extracts.

    That is the last number-like run in the text (digits possibly with '-',
    '$', '.', ','), or "[invalid]" when there is none.
    """
    return _first_match_or_invalid(_FLEXIBLE_EXTRACT, generation, group_select=-1)


def _normalise(text: str) -> str:
    for pattern in _REGEXES_TO_IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's gsm8k exact_match of one extracted answer against one reference.

    Both sides drop commas, then '$', then everything up to the last '#### ',
    then one trailing '.', and are lowercased before comparison. `reference`
    may be the whole GSM8K answer field or `reference_answer` of it.
    """
    return _normalise(prediction) == _normalise(reference)


def score_generations(generations: list[str], references: list[str]) -> Gsm8kScore:
    """Score model generations against GSM8K references as lm-eval's gsm8k task does.

    Each generation is cut at STOP_SEQUENCES, passed through both filters and
    compared with `exact_match`. `references[j]` is the answer field of item j
    or `reference_answer` of it.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations but {len(references)} references")
    if not generations:
        raise ValueError("cannot score an empty batch")
    answers = [truncate_at_stop(generation) for generation in generations]
    per_item_strict = tuple(
        exact_match(strict_match(answer), reference)
        for answer, reference in zip(answers, references, strict=True)
    )
    per_item_flexible = tuple(
        exact_match(flexible_extract(answer), reference)
        for answer, reference in zip(answers, references, strict=True)
    )
    return Gsm8kScore(
        strict_match=sum(per_item_strict) / len(per_item_strict),
        flexible_extract=sum(per_item_flexible) / len(per_item_flexible),
        per_item_strict=per_item_strict,
        per_item_flexible=per_item_flexible,
    )


class Gsm8k:
    """The `gsm8k` objective: greedy answers to GSM8K questions, scored as lm-eval scores them.

    Prompts are lm-eval's n-shot text, with `num_fewshot` shots (default 5, as gsm8k.yaml; 0
    allowed) for each question: with `fewshot: lm_eval` (default) the very shots lm-eval's gsm8k
    task draws for that question (`lm_eval_shots`), with `fewshot: seeded` shots drawn with `seed`
    from the shot rows; or, with `prompt_format: chat`, lm-eval's zero-shot chat turn rendered by
    the sweep's chat template. Generation stops at lm-eval's `until` strings or EOS. Both
    `strict_match` and `flexible_extract` are reported; `metric` picks the one the study optimises.
    With `max_samples` every trial answers the same seeded subset of questions.
    """

    def __init__(self, config: ObjectiveConfig):
        self.config = config
        self.chat = config.prompt_format == "chat"
        if self.chat:
            self.num_fewshot = 0
        else:
            self.num_fewshot = DEFAULT_NUM_FEWSHOT if config.num_fewshot is None else config.num_fewshot
        self._questions: list[str] | None = None
        self._references: list[str] = []
        self._nshot_prompts: list[str] = []

    def _rows(self, source: str, split: str) -> list[dict[str, str]]:
        rows = read_eval_rows(source, split, self.config.dataset_config)
        if not rows:
            raise InputError(source, "holds no rows")
        return [_checked(row) for row in rows]

    def validate(self) -> None:
        """Read and check the eval rows and shot rows once; a bad row raises `InputError` (file:line)."""
        if self._questions is not None:
            return
        require_backend(self.config)
        rows = self._rows(self.config.eval_file, self.config.split)
        picked = fixed_subset(len(rows), self.config.max_samples, self.config.seed)
        items = [rows[i] for i in picked]
        shots: list[list[dict[str, str]]] = [[] for _ in items]
        if self.num_fewshot:
            source = self.config.fewshot_file or self.config.eval_file
            pool = self._rows(source, self.config.fewshot_split)
            if self.config.fewshot == "lm_eval":
                # lm-eval keeps a question out of its own shots only when shots and questions come
                # from the same split; a local file has no splits, so the same file means the same.
                same_rows = source == self.config.eval_file and (
                    source.endswith((".json", ".jsonl")) or self.config.fewshot_split == self.config.split
                )
                shots = lm_eval_shots(pool, rows, picked, self.num_fewshot, same_rows, source)
            else:
                shots = _draw_shots(
                    pool, [item["question"] for item in items], self.num_fewshot, self.config.seed, source
                )
        self._references = [reference_answer(item["answer"]) for item in items]
        self._nshot_prompts = [
            fewshot_prompt(item["question"], item_shots)
            for item, item_shots in zip(items, shots, strict=True)
        ]
        self._questions = [item["question"] for item in items]

    def _prompts(self, tokenizer, chat_template: str) -> list[str]:
        if not self.chat:
            return self._nshot_prompts
        return [
            tokenizer.apply_chat_template(
                chat_messages(question, self.config.system_prompt),
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
            for question in self._questions
        ]

    def score(self, model, tokenizer, data: EvalData) -> Score:
        """Accuracy of the model's greedy answers; the value is the configured metric."""
        self.validate()
        prompts = self._prompts(tokenizer, data.chat_template)[: data.limit]
        generations = generate_for_objective(self.config, model, tokenizer, prompts, STOP_SEQUENCES)
        return self._scored(generations)

    def score_many(self, model, tokenizer, data: EvalData, adapters: int, route: RowRouter) -> list[Score]:
        """`score` for each of `adapters` adapters of one model, decoded together (see `RowRouter`)."""
        self.validate()
        prompts = self._prompts(tokenizer, data.chat_template)[: data.limit]
        outputs = generate_for_adapters(
            self.config, model, tokenizer, prompts, STOP_SEQUENCES, adapters, route
        )
        return [self._scored(generations) for generations in outputs]

    def _scored(self, generations: list[str]) -> Score:
        result = score_generations(generations, self._references[: len(generations)])
        metrics = {
            "strict_match": result.strict_match,
            "flexible_extract": result.flexible_extract,
            "eval_items": float(len(generations)),
        }
        return Score(metrics[self.config.target_metric], metrics)


def _checked(row: EvalRow) -> dict[str, str]:
    problem = row_problem(row.data)
    if problem:
        raise row.error(problem)
    return {"question": row.data["question"], "answer": row.data["answer"]}


def _draw_shots(
    pool: list[dict[str, str]], questions: list[str], n: int, seed: int, source: str
) -> list[list[dict[str, str]]]:
    """`n` shots for each question, drawn from `pool` by one generator seeded with `seed`.

    Like lm-eval's sampler, each question gets its own draw, and a shot identical to the question
    it serves is skipped, so pointing the shots at the eval file never gives away the answer.
    """
    if len(pool) < n:
        raise InputError(
            source, f"has {len(pool)} rows; {n}-shot prompts need at least {n}", "objective.num_fewshot"
        )
    rng = random.Random(seed)
    drawn = []
    for question in questions:
        candidates = rng.sample(pool, min(len(pool), n + 1))
        shots = [shot for shot in candidates if shot["question"] != question][:n]
        if len(shots) < n:
            raise InputError(
                source,
                f"has {len(pool)} rows; {n}-shot prompts need {n} besides the question itself",
                "objective.num_fewshot",
            )
        drawn.append(shots)
    return drawn


def lm_eval_shots(
    pool: list[dict[str, str]],
    docs: list[dict[str, str]],
    picked: list[int],
    n: int,
    same_rows: bool,
    source: str = "fewshot_file",
) -> list[list[dict[str, str]]]:
    """The `n` shots lm-eval 0.4.13's gsm8k task puts before each of `docs[i]`, i in `picked`.

    lm-eval builds the prompts of a task's test docs in file order, and its ContextSampler draws
    every doc's shots from one `random.Random(LM_EVAL_FEWSHOT_SEED)` in turn (api/samplers.py,
    api/task.py), so the shots of doc i depend on the draws of docs 0..i-1: those draws are replayed
    here, whichever docs a `max_samples` subset keeps. Each draw is `rnd.sample(pool, n)`; when the
    shots come from the docs' own rows (`same_rows`) it is `rnd.sample(pool, n + 1)` without the doc
    itself, cut to `n`, and resampled from the pool without the doc should that leave fewer than
    `n`. `random.sample` picks positions from the population's length alone, so drawing from these
    rows picks what lm-eval picks from the same rows in the same order.

    Raises:
        InputError: if the pool holds fewer than `n` rows (besides the doc itself with `same_rows`).
    """
    needed = n + 1 if same_rows else n
    if len(pool) < needed:
        besides = " besides the question itself" if same_rows else ""
        raise InputError(
            source,
            f"has {len(pool)} rows; {n}-shot prompts need at least {n}{besides}",
            "objective.num_fewshot",
        )
    rnd = random.Random(LM_EVAL_FEWSHOT_SEED)
    wanted = set(picked)
    drawn: dict[int, list[dict[str, str]]] = {}
    for index in range(max(picked, default=-1) + 1):
        doc = docs[index]
        if same_rows:
            shots = [shot for shot in rnd.sample(pool, n + 1) if shot != doc][:n]
            if len(shots) < n:
                # The pool holds copies of the doc; lm-eval then draws again from the pool without them.
                shots = rnd.sample([shot for shot in pool if shot != doc], n)
        else:
            shots = rnd.sample(pool, n)
        if index in wanted:
            drawn[index] = shots
    return [drawn[index] for index in picked]
