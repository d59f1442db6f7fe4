"""ROUGE-L of greedy replies against the eval split's assistant replies."""

from __future__ import annotations

from importlib.util import find_spec

from core.config import ObjectiveConfig
from core.errors import InputError
from core.eval import EvalData, Score, prompt_text
from objectives.generation import fixed_subset, generate_for_objective, require_backend

# A reply this close to its reference counts as reproducing it.
EXACT_THRESHOLD = 0.99


class RougeL:
    """The `rouge_l` objective: ROUGE-L F1 (the rouge-score package) of each eval conversation's reply.

    The model continues every eval conversation of the sweep's data up to its last reply, and its
    greedy reply is compared with that reply. Reports the mean `rouge_l` and `rouge_l_exact`, the
    share of replies scoring above 0.99. rouge-score's tokenizer keeps only ASCII letters and digits
    (lowercased), so text in other scripts scores 0; use it for Latin-script or numeric replies.
    With `max_samples` every trial answers the same seeded subset of conversations.
    """

    def __init__(self, config: ObjectiveConfig):
        self.config = config
        self._scorer = None

    def validate(self) -> None:
        """Check that rouge-score and the configured backend are installed."""
        if find_spec("rouge_score") is None:
            raise InputError(
                "config", "objective rouge_l needs rouge-score: pip install rouge-score", "objective.name"
            )
        require_backend(self.config)

    def score(self, model, tokenizer, data: EvalData) -> Score:
        """Mean ROUGE-L F1 of the greedy replies, and the share that reproduce their reference."""
        if self._scorer is None:
            self.validate()
            from rouge_score.rouge_scorer import RougeScorer

            self._scorer = RougeScorer(["rougeL"])
        picked = fixed_subset(len(data.examples), self.config.max_samples, self.config.seed)
        examples = [data.examples[i] for i in picked]
        prompts = [prompt_text(tokenizer, data.chat_template, example) for example in examples]
        replies = generate_for_objective(self.config, model, tokenizer, prompts, ())
        f1 = [
            self._scorer.score(example.messages[-1]["content"], reply)["rougeL"].fmeasure
            for example, reply in zip(examples, replies, strict=True)
        ]
        metrics = {
            "rouge_l": sum(f1) / len(f1),
            "rouge_l_exact": sum(value > EXACT_THRESHOLD for value in f1) / len(f1),
            "eval_items": float(len(f1)),
        }
        return Score(metrics[self.config.target_metric], metrics)
