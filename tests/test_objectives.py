"""Generation objectives end to end on the tiny model, their config checks, and a sweep with each."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from core.config import ObjectiveConfig, parse_config
from core.errors import InputError
from core.eval import EvalData
from core.rows import Example, read_examples
from objectives.gsm8k import Gsm8k, fewshot_prompt
from objectives.lm_eval_task import LmEvalTask
from objectives.ndcg import Ndcg
from objectives.rouge import RougeL
from runners.data import CHATML_TEMPLATE, TokenizedCache
from sweeps.cli import app
from sweeps.demo import sort_rows

GSM8K_TRAIN = [
    {"question": "Ann has 3 pens and buys 2 more. How many pens?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
    {"question": "A box holds 4 eggs. How many in 3 boxes?", "answer": "4 * 3 = <<4*3=12>>12\n#### 12"},
    {"question": "Bo had 10 cards and gave away 4. How many left?", "answer": "10 - 4 = <<10-4=6>>6\n#### 6"},
    {"question": "A pen costs $2. What do 5 pens cost?", "answer": "2 * 5 = <<2*5=10>>10\n#### 10"},
]
GSM8K_TEST = [
    {"question": "Cy reads 4 pages a day for 3 days. Total?", "answer": "4 * 3 = <<4*3=12>>12\n#### 12"},
    {"question": "Di has 7 apples and eats 2. How many left?", "answer": "7 - 2 = <<7-2=5>>5\n#### 5"},
    {"question": "Ed saves $1,000 twice. How much?", "answer": "1,000 * 2 = 2,000\n#### 2,000"},
    {"question": "Flo has 9 hats and buys 1. How many?", "answer": "9 + 1 = <<9+1=10>>10\n#### 10"},
]
RANKING = [
    {"input_field": "Rank A: red shoe, B: blue hat, C: red boot for 'red shoes'.", "output_field": [3, 0, 2]},
    {
        "input_field": "Rank 1: phone, 2: charger for 'phone'.",
        "output_field": "[2, 1]",
        "task_type": "ranking",
    },
    {"input_field": "Which is cheaper?", "output_field": "A", "task_type": "multiple-choice"},
    {"input_field": "Rank A: tea, B: coffee, C: mug, D: cup for 'tea'.", "output_field": [3, 1, 0, 0]},
]
TASK_YAML = """\
task: tiny_repeat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Repeat: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("objective-data")
    tasks = root / "tasks"
    tasks.mkdir()
    repeat = write_jsonl(
        root / "repeat.jsonl", [{"question": "1 2 3", "answer": "1 2 3"}, {"question": "7", "answer": "7"}]
    )
    (tasks / "tiny_repeat.yaml").write_text(TASK_YAML.format(data=repeat))
    dataset = root / "gsm8k_dataset"
    dataset.mkdir()
    write_jsonl(dataset / "train.jsonl", GSM8K_TRAIN)
    write_jsonl(dataset / "test.jsonl", GSM8K_TEST)
    return {
        "gsm8k_train": write_jsonl(root / "gsm8k_train.jsonl", GSM8K_TRAIN),
        "gsm8k_test": write_jsonl(root / "gsm8k_test.jsonl", GSM8K_TEST),
        "gsm8k_dataset": dataset,
        "ranking": write_jsonl(root / "ranking.jsonl", RANKING),
        "tasks": tasks,
    }


@pytest.fixture(scope="module")
def loaded(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tokenizer


@pytest.fixture(scope="module")
def eval_data(loaded) -> EvalData:
    """The demo's sorting conversations, as the runner hands them to an objective."""
    examples = [
        Example(
            (
                {"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
                {"role": "assistant", "content": row["output"]},
            )
        )
        for row in sort_rows(6, 3)
    ]
    tokenized = TokenizedCache().get(loaded[1], CHATML_TEMPLATE, examples, 128)
    return EvalData(examples, tokenized, CHATML_TEMPLATE)


def objective(**fields) -> ObjectiveConfig:
    return ObjectiveConfig(**{"max_new_tokens": 12, "max_length": 512, **fields})


def prompts_sent(objective_class, config, model_and_tokenizer, data, monkeypatch) -> list[str]:
    """The prompts an objective hands to generation (which answers nothing useful)."""
    sent: list[str] = []

    def record(config, model, tokenizer, prompts, stop):
        sent.extend(prompts)
        return ["-"] * len(prompts)

    monkeypatch.setattr(f"{objective_class.__module__}.generate_for_objective", record)
    objective_class(config).score(*model_and_tokenizer, data)
    return sent


def test_gsm8k_scores_the_model_with_both_filters(loaded, eval_data, files):
    config = objective(
        name="gsm8k",
        eval_file=str(files["gsm8k_test"]),
        fewshot_file=str(files["gsm8k_train"]),
        num_fewshot=2,
    )
    score = Gsm8k(config).score(*loaded, eval_data)
    assert set(score.metrics) == {"strict_match", "flexible_extract", "eval_items"}
    assert 0.0 <= score.metrics["strict_match"] <= 1.0 and 0.0 <= score.metrics["flexible_extract"] <= 1.0
    assert score.value == score.metrics["flexible_extract"]
    assert score.metrics["eval_items"] == 4


def test_gsm8k_prompts_are_lm_eval_n_shot_and_the_metric_picks_the_value(
    loaded, eval_data, files, monkeypatch
):
    seen = {}

    def answer_every_other(config, model, tokenizer, prompts, stop):
        seen["prompts"], seen["stop"] = prompts, stop
        # Right answers in strict format for items 0 and 2; item 1 ends on the right number unmarked.
        return ["so #### 12", "it is 5", "#### 2,000", "no idea"]

    monkeypatch.setattr("objectives.gsm8k.generate_for_objective", answer_every_other)
    config = objective(
        name="gsm8k",
        eval_file=str(files["gsm8k_test"]),
        fewshot_file=str(files["gsm8k_train"]),
        num_fewshot=3,
        metric="strict_match",
    )
    score = Gsm8k(config).score(*loaded, eval_data)
    assert score.value == score.metrics["strict_match"] == 0.5
    assert score.metrics["flexible_extract"] == 0.75
    first = seen["prompts"][0]
    assert first.count("Question: ") == 4 and first.endswith(
        f"Question: {GSM8K_TEST[0]['question']}\nAnswer:"
    )
    assert seen["stop"] == ("Question:", "</s>", "<|im_end|>")


def test_gsm8k_chat_prompts_use_the_chat_template(loaded, eval_data, files, monkeypatch):
    config = objective(
        name="gsm8k", eval_file=str(files["gsm8k_test"]), prompt_format="chat", system_prompt="Solve it."
    )
    prompts = prompts_sent(Gsm8k, config, loaded, eval_data, monkeypatch)
    assert prompts[1] == (
        "<|im_start|>system\nSolve it.<|im_end|>\n"
        f"<|im_start|>user\nQuestion: {GSM8K_TEST[1]['question']}\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_gsm8k_reads_a_datasets_folder_with_its_train_split_as_shots(loaded, eval_data, files, monkeypatch):
    config = objective(name="gsm8k", eval_file=str(files["gsm8k_dataset"]), num_fewshot=1)
    prompts = prompts_sent(Gsm8k, config, loaded, eval_data, monkeypatch)
    train_questions = {f"Question: {row['question']}" for row in GSM8K_TRAIN}
    assert len(prompts) == len(GSM8K_TEST)
    assert all(prompt.split("\nAnswer:")[0] in train_questions for prompt in prompts)
    assert [prompt.rsplit("\n\n", 1)[1] for prompt in prompts] == [
        f"Question: {row['question']}\nAnswer:" for row in GSM8K_TEST
    ]


def test_gsm8k_max_samples_scores_the_same_seeded_subset(loaded, eval_data, files, monkeypatch):
    def questions(seed: int) -> list[str]:
        config = objective(
            name="gsm8k", eval_file=str(files["gsm8k_test"]), num_fewshot=0, max_samples=2, seed=seed
        )
        return prompts_sent(Gsm8k, config, loaded, eval_data, monkeypatch)

    first = questions(1)
    assert first == questions(1)
    assert len(first) == 2
    assert set(first) <= {f"Question: {row['question']}\nAnswer:" for row in GSM8K_TEST}


def test_gsm8k_shots_default_to_lm_evals_own_draw(loaded, eval_data, files, monkeypatch):
    from lm_eval.api.samplers import ContextSampler

    # lm-eval's gsm8k task: one ContextSampler over the train split, seeded 1234 by simple_evaluate,
    # drawing each test question's shots in turn.
    sampler = ContextSampler(GSM8K_TRAIN, rnd=1234)
    expected = [fewshot_prompt(row["question"], list(sampler.sample(2))) for row in GSM8K_TEST]
    config = objective(
        name="gsm8k",
        eval_file=str(files["gsm8k_test"]),
        fewshot_file=str(files["gsm8k_train"]),
        num_fewshot=2,
    )
    assert prompts_sent(Gsm8k, config, loaded, eval_data, monkeypatch) == expected


def test_gsm8k_seeded_shots_follow_the_objective_seed(loaded, eval_data, files, monkeypatch):
    def prompts(fewshot: str, seed: int) -> list[str]:
        config = objective(
            name="gsm8k",
            eval_file=str(files["gsm8k_test"]),
            fewshot_file=str(files["gsm8k_train"]),
            num_fewshot=2,
            fewshot=fewshot,
            seed=seed,
        )
        return prompts_sent(Gsm8k, config, loaded, eval_data, monkeypatch)

    assert prompts("seeded", 0) != prompts("seeded", 1)
    assert prompts("lm_eval", 0) == prompts("lm_eval", 1)


def test_gsm8k_malformed_eval_row_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "test.jsonl", [GSM8K_TEST[0], {"question": "q", "answer": "no final line"}])
    with pytest.raises(InputError) as caught:
        Gsm8k(objective(name="gsm8k", eval_file=str(bad), num_fewshot=0)).validate()
    assert str(caught.value) == f"{bad}:2: gsm8k 'answer' must end with a line '#### <number>'"


def test_gsm8k_malformed_shot_row_names_its_file_and_line(tmp_path, files):
    shots = write_jsonl(tmp_path / "train.jsonl", [GSM8K_TRAIN[0], GSM8K_TRAIN[1], {"answer": "#### 1"}])
    config = objective(
        name="gsm8k", eval_file=str(files["gsm8k_test"]), fewshot_file=str(shots), num_fewshot=1
    )
    with pytest.raises(InputError) as caught:
        Gsm8k(config).validate()
    assert str(caught.value).startswith(f"{shots}:3: gsm8k row needs 'question' and 'answer'")


def test_gsm8k_too_few_shots_is_an_input_error(files, tmp_path):
    shots = write_jsonl(tmp_path / "train.jsonl", GSM8K_TRAIN[:2])
    config = objective(
        name="gsm8k", eval_file=str(files["gsm8k_test"]), fewshot_file=str(shots), num_fewshot=3
    )
    with pytest.raises(InputError, match="3-shot prompts need at least 3"):
        Gsm8k(config).validate()


def test_ndcg_scores_ranking_rows_and_skips_other_tasks(loaded, eval_data, files):
    score = Ndcg(objective(name="ndcg", eval_file=str(files["ranking"]))).score(*loaded, eval_data)
    assert score.metrics["eval_items"] == 3
    assert 0.0 <= score.value == score.metrics["ndcg"] <= 1.0
    assert score.metrics["parse_failures"] in {0.0, 1 / 3, 2 / 3, 1.0}
    assert score.metrics["repeats"] in {0.0, 1 / 3, 2 / 3, 1.0}


def test_ndcg_lenient_relevances_follow_the_listed_order(loaded, eval_data, files, monkeypatch):
    monkeypatch.setattr(
        "objectives.ndcg.generate_for_objective",
        lambda config, model, tokenizer, prompts, stop: ["A, C, B", "1, 2", "I cannot tell"],
    )
    config = objective(name="ndcg", eval_file=str(files["ranking"]), parser="lenient")
    score = Ndcg(config).score(*loaded, eval_data)
    assert score.metrics["parse_failures"] == pytest.approx(1 / 3)
    assert score.value == pytest.approx(2 / 3)


def kdd_row(relevances: list[float], n_listed: int = 5) -> dict:
    """A ranking row in the KDD Cup 2024 form: products numbered one a line, one relevance each."""
    products = "".join(f"{i}. product {i}\n" for i in range(1, n_listed + 1))
    return {
        "input_field": f"Rank the products for 'tea'. \nProduct List: \n{products}Output: ",
        "output_field": relevances,
        "task_name": "task12",
        "task_type": "ranking",
        "metric": "ndcg",
    }


def test_ndcg_scores_with_the_kdd2024_parser_by_default(loaded, eval_data, tmp_path, monkeypatch):
    # Relevances [3, 2, 0, 1, 0]: "1,2,3,4,5" scores 0.992620 (tests/test_ndcg.py); the space-separated
    # answer is a parse failure and the repeated one is emptied, both scoring 0.
    path = write_jsonl(tmp_path / "dev.jsonl", [kdd_row([3, 2, 0, 1, 0])] * 4)
    monkeypatch.setattr(
        "objectives.ndcg.generate_for_objective",
        lambda config, model, tokenizer, prompts, stop: ["1,2,3,4,5", "1 2 3 4 5", "1,1,2,3,4", "1,2,3,4,5"],
    )
    score = Ndcg(objective(name="ndcg", eval_file=str(path))).score(*loaded, eval_data)
    assert score.value == pytest.approx(2 * 0.992620 / 4, abs=1e-6)
    assert score.metrics["parse_failures"] == 0.25
    assert score.metrics["repeats"] == 0.25


def test_ndcg_row_with_fewer_relevances_than_listed_candidates_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "dev.jsonl", [kdd_row([1, 0, 0, 0, 0]), kdd_row([1, 0, 0])])
    with pytest.raises(InputError) as caught:
        Ndcg(objective(name="ndcg", eval_file=str(bad))).validate()
    assert str(caught.value) == (
        f"{bad}:2: field 'output_field' has 3 relevances but field 'input_field' lists 5 candidates "
        "(1. to 5.); give one relevance per candidate, in listed order"
    )


def test_ndcg_kdd2024_parser_rejects_prompts_that_letter_their_candidates(tmp_path):
    row = {"input_field": "Rank for 'tea':\nA. green tea\nB. mug\nC. kettle", "output_field": [1, 0, 0]}
    path = write_jsonl(tmp_path / "dev.jsonl", [row])
    with pytest.raises(InputError, match=r"dev.jsonl:1: .* labels its candidates A to C, but parser kdd2024"):
        Ndcg(objective(name="ndcg", eval_file=str(path))).validate()
    Ndcg(objective(name="ndcg", eval_file=str(path), parser="lenient")).validate()


def test_ndcg_bad_relevances_name_file_and_line(tmp_path):
    bad = write_jsonl(
        tmp_path / "rank.jsonl", [RANKING[0], {"input_field": "Rank A, B", "output_field": [1, "x"]}]
    )
    with pytest.raises(InputError) as caught:
        Ndcg(objective(name="ndcg", eval_file=str(bad))).validate()
    assert str(caught.value).startswith(f"{bad}:2: field 'output_field' must list each candidate's relevance")


def test_ndcg_reads_configured_field_names(loaded, eval_data, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "rank.jsonl", [{"prompt": "Rank A: tea, B: mug", "weights": [0, 1]}])
    monkeypatch.setattr(
        "objectives.ndcg.generate_for_objective", lambda config, model, tokenizer, prompts, stop: ["B, A"]
    )
    config = objective(
        name="ndcg", eval_file=str(path), input_field="prompt", output_field="weights", parser="lenient"
    )
    assert Ndcg(config).score(*loaded, eval_data).value == 1.0


def test_rouge_l_scores_replies_against_the_eval_split(loaded, eval_data):
    score = RougeL(objective(name="rouge_l")).score(*loaded, eval_data)
    assert 0.0 <= score.value == score.metrics["rouge_l"] <= 1.0
    assert 0.0 <= score.metrics["rouge_l_exact"] <= 1.0
    assert score.metrics["eval_items"] == len(eval_data.examples)


def test_rouge_l_of_exact_replies_is_one(loaded, eval_data, monkeypatch):
    references = [example.messages[-1]["content"] for example in eval_data.examples]
    monkeypatch.setattr(
        "objectives.rouge.generate_for_objective", lambda config, model, tokenizer, prompts, stop: references
    )
    score = RougeL(objective(name="rouge_l", metric="rouge_l_exact")).score(*loaded, eval_data)
    assert score.value == score.metrics["rouge_l_exact"] == 1.0 and score.metrics["rouge_l"] == 1.0


def test_lm_eval_runs_a_local_task_on_the_model_in_memory(loaded, eval_data, files):
    config = ObjectiveConfig(
        name="lm_eval", task="tiny_repeat", task_path=str(files["tasks"]), metric="exact_match"
    )
    score = LmEvalTask(config).score(*loaded, eval_data)
    assert score.value == score.metrics["exact_match/none"]
    assert 0.0 <= score.value <= 1.0


def test_lm_eval_unknown_task_is_an_input_error(files):
    config = ObjectiveConfig(name="lm_eval", task="nope", task_path=str(files["tasks"]), metric="acc")
    with pytest.raises(InputError, match="objective.task: no task 'nope' in"):
        LmEvalTask(config).validate()


def test_lm_eval_unknown_metric_lists_what_the_task_reports(loaded, eval_data, files):
    config = ObjectiveConfig(name="lm_eval", task="tiny_repeat", task_path=str(files["tasks"]), metric="acc")
    with pytest.raises(ValueError, match="reports no metric 'acc,none'; it reports: exact_match,none"):
        LmEvalTask(config).score(*loaded, eval_data)


def test_gsm8k_training_rows_become_question_and_worked_answer(files):
    (first, *_) = read_examples(files["gsm8k_train"], "gsm8k", None, None)
    assert first.messages == (
        {"role": "user", "content": f"Question: {GSM8K_TRAIN[0]['question']}\nAnswer:"},
        {"role": "assistant", "content": GSM8K_TRAIN[0]["answer"]},
    )


def test_gsm8k_training_row_without_answer_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "train.jsonl", [GSM8K_TRAIN[0], {"question": "q"}])
    with pytest.raises(InputError) as caught:
        read_examples(bad, "gsm8k", None, None)
    assert str(caught.value).startswith(f"{bad}:2: gsm8k row needs 'question' and 'answer'")


CONFIG = """\
name: x
model: {{name_or_path: org/model}}
data: {{format: alpaca, train_file: train.jsonl}}
objective:
{objective}
space:
  learning_rate: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
"""


def config_error(objective_body: str) -> str:
    text = CONFIG.format(objective=textwrap.indent(textwrap.dedent(objective_body).strip(), "  "))
    with pytest.raises(InputError) as caught:
        parse_config(text, Path("x.yaml"))
    return str(caught.value)


def test_a_field_the_objective_does_not_read_is_an_error_at_its_line():
    assert config_error("name: gsm8k\neval_file: t.jsonl\nnum_fewshot: 0\ntask: gsm8k") == (
        "x.yaml:8: objective.task: does not apply to objective 'gsm8k'; it is read by: lm_eval"
    )


def test_a_missing_required_field_is_named():
    assert config_error("name: ndcg") == "x.yaml:4: objective.eval_file: is required for objective 'ndcg'"


def test_an_unknown_metric_lists_the_objective_metrics():
    assert config_error("name: rouge_l\nmetric: bleu").endswith(
        "objective.metric: rouge_l reports no metric 'bleu'; allowed: rouge_l, rouge_l_exact"
    )


def test_parser_applies_only_to_ndcg():
    assert config_error("name: rouge_l\nparser: lenient").endswith(
        "objective.parser: does not apply to objective 'rouge_l'; it is read by: ndcg"
    )


def test_an_unknown_parser_lists_the_parsers():
    assert "'kdd2024' or 'lenient'" in config_error("name: ndcg\neval_file: r.jsonl\nparser: strict")


def test_chat_prompts_take_no_fewshot_draw():
    assert "objective.fewshot: chat prompts are zero-shot" in config_error(
        "name: gsm8k\neval_file: t.jsonl\nprompt_format: chat\nfewshot: seeded"
    )


def test_chat_prompts_take_no_shots():
    assert "objective.num_fewshot: chat prompts are zero-shot" in config_error(
        "name: gsm8k\neval_file: t.jsonl\nprompt_format: chat\nnum_fewshot: 5"
    )


def test_n_shot_from_a_local_file_needs_a_shot_file():
    assert "objective.num_fewshot: 5-shot prompts need fewshot_file" in config_error(
        "name: gsm8k\neval_file: t.jsonl"
    )


def test_max_new_tokens_must_leave_room_for_the_prompt():
    assert "objective.max_new_tokens: must be less than max_length (256)" in config_error(
        "name: rouge_l\nmax_length: 256\nmax_new_tokens: 256"
    )


def test_split_does_not_apply_to_a_jsonl_eval_file():
    assert "objective.split: applies to a datasets id or folder" in config_error(
        "name: gsm8k\neval_file: t.jsonl\nnum_fewshot: 0\nsplit: train"
    )


def test_relative_objective_paths_resolve_against_the_yaml_folder(tmp_path):
    config = ObjectiveConfig(
        name="gsm8k", eval_file="data/t.jsonl", fewshot_file="openai/gsm8k", num_fewshot=1
    )
    config.resolve_paths(tmp_path)
    assert config.eval_file == str(tmp_path / "data" / "t.jsonl")
    assert config.fewshot_file == "openai/gsm8k"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[Path]:
    """One working folder for this module's sweeps (overriding conftest's, one per test).

    Creating MLflow's SQLite store takes seconds; the sweeps here share it, each its own experiment.
    """
    folder = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield folder


def sweep_metrics(experiment: str) -> dict[str, float]:
    """The metrics of the one trial of `experiment`."""
    client = MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (trial,) = [run for run in runs if run.data.tags.get("sweep.role") == "trial"]
    assert trial.info.status == "FINISHED", trial.data.tags.get("error")
    return trial.data.metrics


def run_sweep(config: Path) -> dict[str, float]:
    result = CliRunner().invoke(app, ["run", str(config), "--trials", "1"])
    assert result.exit_code == 0, result.output
    return sweep_metrics(config.stem)


LORA_SPACE = "learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}"
SHORT_TRAINING = "max_steps: 2\nper_device_batch_size: 8\ncutoff_len: 96"


@pytest.mark.slow
def test_a_sweep_trains_on_gsm8k_rows_and_scores_gsm8k(project, tiny_model, files):
    config = project / "gsm8k.yaml"
    config.write_text(
        f"""\
name: gsm8k
model: {{name_or_path: {tiny_model}, dtype: float32}}
data: {{format: gsm8k, train_file: {files["gsm8k_train"]}, eval_file: {files["gsm8k_test"]}}}
objective:
  name: gsm8k
  eval_file: {files["gsm8k_test"]}
  fewshot_file: {files["gsm8k_train"]}
  num_fewshot: 1
  max_new_tokens: 12
  max_length: 512
space:
  {LORA_SPACE}
training: {{max_steps: 2, per_device_batch_size: 4, cutoff_len: 96}}
"""
    )
    metrics = run_sweep(config)
    assert 0.0 <= metrics["objective"] == metrics["flexible_extract"] <= 1.0
    assert "strict_match" in metrics


@pytest.mark.slow
def test_a_sweep_scores_ndcg(write_config, files):
    metrics = run_sweep(
        write_config(
            name="ndcg",
            space=LORA_SPACE,
            training=SHORT_TRAINING,
            objective=f"name: ndcg\neval_file: {files['ranking']}\nmax_new_tokens: 8\nmax_length: 512",
        )
    )
    assert 0.0 <= metrics["objective"] == metrics["ndcg"] <= 1.0
    assert "parse_failures" in metrics


@pytest.mark.slow
def test_a_sweep_scores_rouge_l(write_config):
    metrics = run_sweep(
        write_config(
            name="rouge",
            space=LORA_SPACE,
            training=SHORT_TRAINING,
            objective="name: rouge_l\nmax_new_tokens: 8\nmax_samples: 4",
        )
    )
    assert 0.0 <= metrics["objective"] == metrics["rouge_l"] <= 1.0
    assert metrics["eval_items"] == 4


@pytest.mark.slow
def test_a_sweep_scores_an_lm_eval_task(write_config, files):
    metrics = run_sweep(
        write_config(
            name="harness",
            space=LORA_SPACE,
            training=SHORT_TRAINING,
            objective=f"name: lm_eval\ntask: tiny_repeat\ntask_path: {files['tasks']}\nmetric: exact_match",
        )
    )
    assert 0.0 <= metrics["objective"] == metrics["exact_match/none"] <= 1.0
