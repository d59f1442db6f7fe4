"""The gsm8k objective against lm-eval 0.4.13 itself: per item, the same prompt, shots included,
the same continuation, the same extracted answers, and the same scores.

lm-eval runs its own gsm8k task (the gsm8k.yaml installed with it, only its dataset pointed at
local files, since nothing may reach the hub) through `simple_evaluate`, on an `HFLM` wrapping the
very model object the objective scores. The rows are real GSM8K: the whole official train split
(the shots lm-eval draws depend on the pool's size) and the first test questions.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from core.config import ObjectiveConfig
from core.eval import EvalData
from objectives import gsm8k
from objectives.gsm8k import Gsm8k, flexible_extract, lm_eval_shots, strict_match, truncate_at_stop

GSM8K_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "search_spaces" / "demo" / "model"
N_QUESTIONS = 24
# Short continuations keep the test well under a minute on CPU; the demo model's context is 512.
MAX_NEW_TOKENS = 32
MAX_LENGTH = 512

needs_gsm8k = pytest.mark.skipif(
    not (GSM8K_DATA / "train.jsonl").is_file(),
    reason=f"real GSM8K rows not found in {GSM8K_DATA} (see ../shared/data/README.md)",
)


@pytest.fixture(scope="module")
def gsm8k_files(tmp_path_factory) -> tuple[Path, Path]:
    """The official train split, and the first N_QUESTIONS rows of the official test split."""
    root = tmp_path_factory.mktemp("gsm8k")
    test = root / "test.jsonl"
    with open(GSM8K_DATA / "test.jsonl", encoding="utf-8") as rows:
        test.write_text("".join(next(rows) for _ in range(N_QUESTIONS)), encoding="utf-8")
    return GSM8K_DATA / "train.jsonl", test


@pytest.fixture(scope="module")
def harness_task_folder(tmp_path_factory, gsm8k_files) -> Path:
    """lm-eval's own gsm8k.yaml, its dataset read from the local files instead of the hub."""
    train, test = gsm8k_files
    config = yaml.safe_load((files("lm_eval.tasks") / "gsm8k" / "gsm8k.yaml").read_text(encoding="utf-8"))
    config.pop("dataset_name")
    config["dataset_path"] = "json"
    config["dataset_kwargs"] = {"data_files": {"train": str(train), "test": str(test)}}
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "gsm8k.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def demo_model():
    """The demo model's shape and tokenizer with seeded random weights, drawn wide (std 0.3).

    The shipped demo weights answer every GSM8K prompt with EOS at once, and weights drawn at the
    usual std 0.02 repeat one token: either would make the continuations equal trivially. These
    write varied text with numbers in it, so continuations and flexible-extract answers differ per
    item and their equality means something. With seed 28, two of the 24 flexible-extract answers
    happen to be right, so the scores compared are not both 0.
    """
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    config = AutoConfig.from_pretrained(DEMO_MODEL)
    config.initializer_range = 0.3
    torch.manual_seed(28)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def harness_samples(demo_model, harness_task_folder) -> tuple[dict, dict[str, list[dict]]]:
    """lm-eval's results and logged samples (per filter, in doc order) for the gsm8k task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = demo_model
    output = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, max_length=MAX_LENGTH, batch_size=16),
        tasks=["gsm8k"],
        task_manager=TaskManager(include_path=str(harness_task_folder), include_defaults=False),
        gen_kwargs=f"max_gen_toks={MAX_NEW_TOKENS}",
        log_samples=True,
    )
    by_filter: dict[str, list[dict]] = {}
    for sample in output["samples"]["gsm8k"]:
        by_filter.setdefault(sample["filter"], []).append(sample)
    for samples in by_filter.values():
        samples.sort(key=lambda sample: sample["doc_id"])
    return output["results"]["gsm8k"], by_filter


@pytest.fixture(scope="module")
def objective_run(demo_model, gsm8k_files) -> tuple[list[str], list[str], dict[str, float]]:
    """The gsm8k objective's prompts, continuations and metrics on the same model and rows."""
    model, tokenizer = demo_model
    train, test = gsm8k_files
    config = ObjectiveConfig(
        name="gsm8k",
        eval_file=str(test),
        fewshot_file=str(train),
        max_new_tokens=MAX_NEW_TOKENS,
        max_length=MAX_LENGTH,
    )
    sent: list[str] = []
    written: list[str] = []
    real = gsm8k.generate_for_objective

    def record(config, model, tokenizer, prompts, stop):
        outputs = real(config, model, tokenizer, prompts, stop)
        sent.extend(prompts)
        written.extend(outputs)
        return outputs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gsm8k, "generate_for_objective", record)
        score = Gsm8k(config).score(model, tokenizer, EvalData([], None, None))
    return sent, written, score.metrics


@needs_gsm8k
@pytest.mark.slow
def test_prompts_equal_lm_eval_gsm8k_prompts_shots_included(harness_samples, objective_run):
    _, samples = harness_samples
    prompts, _, _ = objective_run
    harness_prompts = [sample["arguments"][0][0] for sample in samples["strict-match"]]
    assert len(harness_prompts) == N_QUESTIONS
    assert prompts == harness_prompts
    # Five shots, each "Question: ...\nAnswer: <worked answer>", joined by blank lines.
    assert all(prompt.count("Question: ") == 6 for prompt in prompts)


@needs_gsm8k
@pytest.mark.slow
def test_generation_stops_at_lm_eval_until_strings(harness_samples):
    _, samples = harness_samples
    (until,) = {tuple(sample["arguments"][0][1]["until"]) for sample in samples["strict-match"]}
    assert until == gsm8k.STOP_SEQUENCES


@needs_gsm8k
@pytest.mark.slow
def test_continuations_equal_lm_eval_continuations(harness_samples, objective_run):
    _, samples = harness_samples
    _, continuations, _ = objective_run
    assert continuations == [sample["resps"][0][0] for sample in samples["strict-match"]]


@needs_gsm8k
@pytest.mark.slow
def test_extracted_answers_equal_lm_eval_filtered_answers(harness_samples, objective_run):
    _, samples = harness_samples
    _, continuations, _ = objective_run
    answers = [truncate_at_stop(continuation) for continuation in continuations]
    assert [strict_match(answer) for answer in answers] == [
        sample["filtered_resps"][0] for sample in samples["strict-match"]
    ]
    assert [flexible_extract(answer) for answer in answers] == [
        sample["filtered_resps"][0] for sample in samples["flexible-extract"]
    ]


@needs_gsm8k
@pytest.mark.slow
def test_scores_equal_lm_eval_strict_match_and_flexible_extract(harness_samples, objective_run):
    results, _ = harness_samples
    _, _, metrics = objective_run
    assert metrics["strict_match"] == results["exact_match,strict-match"]
    assert metrics["flexible_extract"] == results["exact_match,flexible-extract"] == 2 / N_QUESTIONS


@needs_gsm8k
def test_a_seeded_subset_keeps_each_question_lm_evals_shots(gsm8k_files):
    """lm-eval draws the shots of question i after those of questions 0..i-1; a subset must not shift them."""
    train, test = gsm8k_files
    pool = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    docs = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    every = lm_eval_shots(pool, docs, list(range(N_QUESTIONS)), 5, same_rows=False)
    subset = lm_eval_shots(pool, docs, [3, 17], 5, same_rows=False)
    assert subset == [every[3], every[17]]
