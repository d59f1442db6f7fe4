"""GSM8K prompting and scoring, matching lm-evaluation-harness's `gsm8k` task.

Every constant is copied from lm_eval/tasks/gsm8k/gsm8k.yaml of lm-eval 0.4.13,
or, where that file sets nothing, from the default it inherits, so that
scores here equal the `exact_match,strict-match` and
`exact_match,flexible-extract` numbers lm-eval reports for the same
generations. tests/test_gsm8k_scoring.py checks this against lm-eval's own
task, filter and metric code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# gsm8k.yaml: generation_kwargs.until. lm-eval cuts each generation at the
# first of these (lm_eval/models/utils.py: postprocess_generated_text).
STOP_SEQUENCES: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")

# gsm8k.yaml: doc_to_text "Question: {{question}}\nAnswer:".
_QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
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
        _QUESTION_TEMPLATE.format(question=shot["question"]) + _TARGET_DELIMITER + shot["answer"]
        for shot in shots
    ]
    turns.append(_QUESTION_TEMPLATE.format(question=question))
    return _FEWSHOT_DELIMITER.join(turns)


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
    messages.append({"role": "user", "content": _QUESTION_TEMPLATE.format(question=question)})
    return messages


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
