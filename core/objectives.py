"""The catalogue of objectives a config may name: their natural direction and the settings they take.

Plain data, so a config is validated without importing torch or any objective's code;
`objectives.registry.load_objective` imports an implementation only when a trial needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# ObjectiveConfig fields every generation objective reads.
_GENERATION = frozenset(
    {"max_length", "max_new_tokens", "generation_batch_size", "max_samples", "seed", "backend"}
)
# ObjectiveConfig fields of objectives that read their own eval rows (a file or a `datasets` id).
_EVAL_ROWS = frozenset({"eval_file", "dataset_config", "split"})


@dataclass(frozen=True)
class ObjectiveEntry:
    """Where an objective lives, which way is better, and which config fields it takes.

    `metrics` are the values `objective.metric` may pick, the first being the default; empty means
    the objective reports whatever its task defines and `metric` must name one. `options` are the
    `ObjectiveConfig` fields it reads besides name, direction and metric; `required` must be set.
    """

    module: str
    attribute: str
    direction: Literal["minimize", "maximize"]
    description: str
    metrics: tuple[str, ...] = ()
    options: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()


OBJECTIVES: dict[str, ObjectiveEntry] = {
    "eval_loss": ObjectiveEntry(
        "objectives.eval_loss",
        "EvalLoss",
        "minimize",
        "mean loss per assistant token on the eval split",
        metrics=("eval_loss",),
        options=frozenset({"batch_size", "max_length"}),
    ),
    "gsm8k": ObjectiveEntry(
        "objectives.gsm8k",
        "Gsm8k",
        "maximize",
        "GSM8K exact match (lm-eval's strict-match / flexible-extract) of greedy answers",
        metrics=("flexible_extract", "strict_match"),
        options=_GENERATION
        | _EVAL_ROWS
        | {"fewshot_file", "fewshot_split", "num_fewshot", "fewshot", "prompt_format", "system_prompt"},
        required=frozenset({"eval_file"}),
    ),
    "ndcg": ObjectiveEntry(
        "objectives.ndcg",
        "Ndcg",
        "maximize",
        "mean NDCG of the rankings the model writes for candidate lists",
        metrics=("ndcg",),
        options=_GENERATION | _EVAL_ROWS | {"input_field", "output_field", "parser", "system_prompt"},
        required=frozenset({"eval_file"}),
    ),
    "rouge_l": ObjectiveEntry(
        "objectives.rouge",
        "RougeL",
        "maximize",
        "ROUGE-L F1 of greedy replies against the eval split's assistant replies",
        metrics=("rouge_l", "rouge_l_exact"),
        options=_GENERATION,
    ),
    "lm_eval": ObjectiveEntry(
        "objectives.lm_eval_task",
        "LmEvalTask",
        "maximize",
        "any lm-evaluation-harness task, run on the trained model in memory",
        options=frozenset(
            {
                "max_length",
                "generation_batch_size",
                "max_samples",
                "seed",
                "task",
                "task_path",
                "num_fewshot",
                "prompt_format",
                "system_prompt",
            }
        ),
        required=frozenset({"task", "metric"}),
    ),
}
