"""Any lm-evaluation-harness task as an objective, run on the trained model in memory.

Named `lm_eval_task` rather than `lm_eval` so the module never shadows the harness's package.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from core.config import ObjectiveConfig
from core.errors import InputError
from core.eval import EvalData, Score
from objectives.generation import CPU_BATCH_SIZE


def metric_key(metric: str) -> str:
    """lm-eval's results key for `metric`: 'acc' means 'acc,none' (the metric without a filter)."""
    return metric if "," in metric else f"{metric},none"


class LmEvalTask:
    """The `lm_eval` objective: `lm_eval.simple_evaluate` of one task on the trial's model.

    The model (base + adapter, as trained) is handed to the harness as an in-memory `HFLM`, so
    nothing is saved or reloaded. `task` is any task name the harness can load; with `task_path`,
    the tasks are the YAMLs in that folder (only those: indexing the harness's own ~14k tasks takes
    seconds per sweep). `metric` names the value to optimise as lm-eval reports it, e.g.
    'exact_match,strict-match' ('acc' means 'acc,none'); every numeric result of the task is logged
    with ',' written as '/'. `max_samples` is lm-eval's `limit`: the first N documents, the same
    for every trial. `prompt_format: chat` applies the tokenizer's chat template (lm-eval's
    --apply_chat_template) and `system_prompt` is its --system_instruction.
    """

    def __init__(self, config: ObjectiveConfig):
        self.config = config
        self._tasks = None

    def validate(self) -> None:
        """Check that lm-eval is installed and knows the task; index the task folder once."""
        if self._tasks is not None:
            return
        if find_spec("lm_eval") is None:
            raise InputError(
                "config", "objective lm_eval needs lm-eval: pip install 'sweep[lm-eval]'", "objective.name"
            )
        from lm_eval.tasks import TaskManager

        task_path = self.config.task_path
        if task_path is not None and not Path(task_path).is_dir():
            raise InputError(task_path, "task folder not found", "objective.task_path")
        tasks = TaskManager(include_path=task_path, include_defaults=task_path is None)
        if self.config.task not in tasks.all_tasks:
            where = f"in {task_path}" if task_path else "among lm-eval's tasks"
            raise InputError("config", f"no task {self.config.task!r} {where}", "objective.task")
        self._tasks = tasks

    def _batch_size(self, model) -> int | str:
        # The harness's own "auto" probes batch sizes with full-length forward passes, which is
        # right on a GPU and needlessly slow on a CPU.
        size = self.config.generation_batch_size
        on_cuda = next(model.parameters()).device.type == "cuda"
        return CPU_BATCH_SIZE if size == "auto" and not on_cuda else size

    def score(self, model, tokenizer, data: EvalData) -> Score:
        """Run the task; the value is the configured metric of its results."""
        self.validate()
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        try:
            harness_model = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=self._batch_size(model),
                max_length=self.config.max_length,
            )
            seed = self.config.seed
            limits = [n for n in (self.config.max_samples, data.limit) if n is not None]
            output = simple_evaluate(
                model=harness_model,
                tasks=[self.config.task],
                num_fewshot=self.config.num_fewshot,
                limit=min(limits) if limits else None,
                task_manager=self._tasks,
                apply_chat_template=self.config.prompt_format == "chat",
                system_instruction=self.config.system_prompt,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
            )
        finally:
            model.train(was_training)
        # Metrics are keyed 'metric,filter'; other keys (alias, sample_len) and stderrs are not scores.
        numeric = {
            key: float(value)
            for key, value in output["results"][self.config.task].items()
            if "," in key
            and "_stderr," not in key
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        }
        key = metric_key(self.config.metric)
        if key not in numeric:
            raise ValueError(
                f"task {self.config.task!r} reports no metric {key!r}; "
                f"it reports: {', '.join(sorted(numeric))}"
            )
        return Score(numeric[key], {name.replace(",", "/"): value for name, value in numeric.items()})
