"""Tests for objectives.gsm8k against lm-eval's own gsm8k task, filters and metric.

lm-eval's side is configured from the gsm8k.yaml installed with lm-eval, not
from objectives.gsm8k's constants, so a drift in either shows up here. Its
task is built on a small in-memory dataset, so nothing is downloaded.
"""

from collections.abc import Callable
from importlib.resources import files
from typing import Any

import datasets
import pytest
import yaml
from lm_eval.api.metrics import exact_match_fn
from lm_eval.api.task import ConfigurableTask
from lm_eval.filters.extraction import RegexFilter
from lm_eval.filters.selection import TakeFirstFilter
from lm_eval.models.utils import postprocess_generated_text

from core.rows import chat_messages
from objectives.gsm8k import (
    STOP_SEQUENCES,
    exact_match,
    fewshot_prompt,
    flexible_extract,
    reference_answer,
    score_generations,
    strict_match,
    truncate_at_stop,
)

GSM8K_CONFIG: dict[str, Any] = yaml.safe_load(
    (files("lm_eval.tasks") / "gsm8k" / "gsm8k.yaml").read_text(encoding="utf-8")
)

# (generation, final answer of the reference). Each probes one corner of the
# filters or of the exact_match normalisation.
TRICKY_CASES: list[tuple[str, str]] = [
    ("The answer is 1,000.", "1000"),
    ("$5", "5"),
    ("#### -3", "-3"),
    ("so 12.", "12"),
    ("I am not sure how to solve this.", "4"),
    ("3 apples and 4 pears make 7", "7"),
    ("#### 1,234", "1234"),
    ("#### 5\n\nQuestion: Tom has 8 apples and eats 2.", "5"),
    ("0.5", "0.5"),
    ("-$4", "-4"),
    ("", "0"),
    ("She pays 2 * $3 = $6.\n#### 6", "6"),
    ("#### 72.", "72"),
    ("The total is $1,234.50", "1234.50"),
    ("#### 5 and later #### 6", "6"),
    ("Answer: 18 dollars", "18"),
    ("1", "1"),
    ("####  7", "7"),
    ("It costs 5...", "5"),
    ("Total: 40</s>junk 99", "40"),
    ("The answer is 9<|im_end|>", "9"),
]
CASE_IDS = [repr(generation)[:40] for generation, _ in TRICKY_CASES]


def _solution(final_answer: str) -> str:
    """A GSM8K-style answer field: worked solution, then '#### answer'."""
    return f"Add 1,000 + $2 = <<1000+2=1002>>1002.\n#### {final_answer}"


def _lm_eval_filter(name: str) -> Callable[[str], str]:
    """One of gsm8k.yaml's filter pipelines, run by lm-eval's filter classes."""
    (spec,) = [entry for entry in GSM8K_CONFIG["filter_list"] if entry["name"] == name]
    regex_step, take_first_step = spec["filter"]
    assert regex_step["function"] == "regex"
    assert take_first_step == {"function": "take_first"}
    regex = RegexFilter(**{key: value for key, value in regex_step.items() if key != "function"})

    def apply(generation: str) -> str:
        # Filters work on one list of responses per document.
        (filtered,) = TakeFirstFilter().apply(regex.apply([[generation]], [{}]), [{}])
        assert isinstance(filtered, str)
        return filtered

    return apply


def _lm_eval_exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's exact_match metric with gsm8k.yaml's arguments."""
    (metric_config,) = GSM8K_CONFIG["metric_list"]
    assert metric_config["metric"] == "exact_match"
    # ConfigurableTask passes every key but these to the metric function.
    kwargs = {
        key: value
        for key, value in metric_config.items()
        if key not in ("metric", "aggregation", "higher_is_better")
    }
    return bool(exact_match_fn(references=[reference], predictions=[prediction], **kwargs)["exact_match"])


@pytest.fixture(scope="module")
def lm_eval_task() -> ConfigurableTask:
    """lm-eval's gsm8k task from its yaml, over a tiny in-memory dataset.

    The first_n sampler makes the shots the train rows in order, so the
    prompt can be compared with one built from the same shots.
    """
    train = [
        {"question": "Ann has 3 pens & buys 2 more. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
        {"question": "A <b>box</b> costs $1,200 {x}. Half?", "answer": "1,200 / 2 = 600\n#### 600"},
    ]
    test = [{"question": "Bo reads 4 pages a day for 3 days. Total?", "answer": "4 * 3 = 12\n#### 12"}]
    config = {
        **GSM8K_CONFIG,
        "custom_dataset": lambda **_: datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
        ),
        "fewshot_config": {"sampler": "first_n"},
    }
    return ConfigurableTask(config=config)


def _as_messages(messages: list[dict[str, str]], add_generation_prompt: bool) -> list[dict[str, str]]:
    """A stand-in chat template that returns the messages it is given."""
    return messages


def test_stop_sequences_match_lm_eval_config() -> None:
    assert tuple(GSM8K_CONFIG["generation_kwargs"]["until"]) == STOP_SEQUENCES


@pytest.mark.parametrize(("generation", "final_answer"), TRICKY_CASES, ids=CASE_IDS)
def test_strict_match_returns_what_lm_eval_filter_returns(generation: str, final_answer: str) -> None:
    assert strict_match(generation) == _lm_eval_filter("strict-match")(generation)


@pytest.mark.parametrize(("generation", "final_answer"), TRICKY_CASES, ids=CASE_IDS)
def test_flexible_extract_returns_what_lm_eval_filter_returns(generation: str, final_answer: str) -> None:
    assert flexible_extract(generation) == _lm_eval_filter("flexible-extract")(generation)


@pytest.mark.parametrize(("generation", "final_answer"), TRICKY_CASES, ids=CASE_IDS)
def test_exact_match_agrees_with_lm_eval_metric(generation: str, final_answer: str) -> None:
    reference = _solution(final_answer)
    for prediction in (generation, strict_match(generation), flexible_extract(generation)):
        assert exact_match(prediction, reference) == _lm_eval_exact_match(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("Twelve", "twelve"),
        ("5.", "5"),
        ("5..", "5"),
        ("5 ", "5"),
        ("$1,000", "1000"),
        ("1000", "Ten hundreds.\n#### 1,000."),
        ("#### 5", "5"),
        ("[invalid]", "[invalid]"),
    ],
)
def test_exact_match_agrees_with_lm_eval_metric_on_raw_pairs(prediction: str, reference: str) -> None:
    assert exact_match(prediction, reference) == _lm_eval_exact_match(prediction, reference)


@pytest.mark.parametrize("use_reference_answer", [True, False], ids=["final-answer", "answer-field"])
def test_score_generations_equals_lm_eval_pipeline(
    lm_eval_task: ConfigurableTask, use_reference_answer: bool
) -> None:
    generations = [generation for generation, _ in TRICKY_CASES]
    answer_fields = [_solution(final_answer) for _, final_answer in TRICKY_CASES]
    # lm-eval: cut at `until`, filter, then the task's own process_results,
    # whose gold is doc_to_target(doc), the whole answer field.
    until = GSM8K_CONFIG["generation_kwargs"]["until"]
    expected: dict[str, list[bool]] = {"strict-match": [], "flexible-extract": []}
    for generation, answer_field in zip(generations, answer_fields, strict=True):
        cut = postprocess_generated_text(generation, until, think_end_token=None)
        doc = {"question": "unused", "answer": answer_field}
        for name, results in expected.items():
            filtered = _lm_eval_filter(name)(cut)
            results.append(bool(lm_eval_task.process_results(doc, [filtered])["exact_match"]))

    references = (
        [reference_answer(field) for field in answer_fields] if use_reference_answer else answer_fields
    )
    score = score_generations(generations, references)

    assert score.per_item_strict == tuple(expected["strict-match"])
    assert score.per_item_flexible == tuple(expected["flexible-extract"])
    assert score.strict_match == pytest.approx(sum(expected["strict-match"]) / len(generations))
    assert score.flexible_extract == pytest.approx(sum(expected["flexible-extract"]) / len(generations))


def test_tricky_cases_exercise_both_outcomes_of_both_filters() -> None:
    # Guards the comparison above against a case list that could not tell
    # filters apart: each filter must both pass and fail some items.
    score = score_generations(
        [generation for generation, _ in TRICKY_CASES],
        [final_answer for _, final_answer in TRICKY_CASES],
    )
    assert 0.0 < score.strict_match < 1.0
    assert 0.0 < score.flexible_extract < 1.0
    assert score.per_item_strict != score.per_item_flexible


def test_strict_match_falls_back_to_invalid() -> None:
    assert strict_match("The answer is 7.") == "[invalid]"


def test_flexible_extract_takes_last_number() -> None:
    assert flexible_extract("3 apples and 4 pears make 7") == "7"


def test_flexible_extract_reads_into_an_uncut_continuation() -> None:
    # Why score_generations cuts at STOP_SEQUENCES first.
    assert flexible_extract("#### 5\n\nQuestion: Tom has 8 apples") == "8"


def test_truncate_at_stop_cuts_at_first_stop_sequence() -> None:
    assert truncate_at_stop("#### 5\n\nQuestion: Tom has 8 apples</s>") == "#### 5\n\n"


def test_exact_match_ignores_commas_dollar_and_final_period() -> None:
    assert exact_match("$1,000.", "1000")


def test_exact_match_ignores_case() -> None:
    assert exact_match("Twelve", "twelve")


def test_exact_match_keeps_other_formatting_differences() -> None:
    # lm-eval does no numeric comparison: 5.0 is not 5.
    assert not exact_match("5.0", "5")


def test_reference_answer_is_text_after_marker() -> None:
    assert reference_answer("Half of 2,000 is <<2000/2=1000>>1000.\n#### 1,000") == "1,000"


def test_reference_answer_without_marker_is_whole_field() -> None:
    assert reference_answer("42") == "42"


def test_fewshot_prompt_literal_format() -> None:
    shots = [
        {"question": "Q one?", "answer": "1 + 1 = 2\n#### 2"},
        {"question": "Q two?", "answer": "#### 3"},
    ]
    assert fewshot_prompt("Q three?", shots) == (
        "Question: Q one?\nAnswer: 1 + 1 = 2\n#### 2\n\n"
        "Question: Q two?\nAnswer: #### 3\n\n"
        "Question: Q three?\nAnswer:"
    )


def test_fewshot_prompt_equals_lm_eval_context(lm_eval_task: ConfigurableTask) -> None:
    doc = lm_eval_task.test_docs()[0]
    shots = list(lm_eval_task.training_docs())
    assert fewshot_prompt(doc["question"], shots) == lm_eval_task.fewshot_context(doc, len(shots))


def test_zero_shot_prompt_equals_lm_eval_context(lm_eval_task: ConfigurableTask) -> None:
    doc = lm_eval_task.test_docs()[0]
    assert fewshot_prompt(doc["question"], []) == lm_eval_task.fewshot_context(doc, 0)


def test_chat_messages_equal_lm_eval_chat_context(lm_eval_task: ConfigurableTask) -> None:
    doc = lm_eval_task.test_docs()[0]
    expected = lm_eval_task.fewshot_context(
        doc,
        0,
        system_instruction="Solve the problem.",
        apply_chat_template=True,
        chat_template=_as_messages,
    )
    assert chat_messages(doc["question"], "Solve the problem.") == expected


@pytest.mark.parametrize("system_prompt", [None, ""])
def test_chat_messages_without_system_prompt_equal_lm_eval(
    lm_eval_task: ConfigurableTask, system_prompt: str | None
) -> None:
    doc = lm_eval_task.test_docs()[0]
    expected = lm_eval_task.fewshot_context(
        doc,
        0,
        system_instruction=system_prompt,
        apply_chat_template=True,
        chat_template=_as_messages,
    )
    assert chat_messages(doc["question"], system_prompt) == expected


def test_score_generations_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="references"):
        score_generations(["#### 1"], [])


def test_score_generations_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty"):
        score_generations([], [])
