"""The contract between a trained model and its score."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from runners.data import Example, TokenizedSplit


@dataclass(frozen=True)
class Score:
    """An objective's verdict: the value the study optimises and any extra metrics worth logging."""

    value: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalData:
    """What an objective may look at: the eval conversations, tokenized and as messages."""

    examples: list[Example]
    tokenized: TokenizedSplit
    chat_template: str
    limit: int | None = None
    """Score only the first `limit` items of the objective's eval set (intermediate evaluations)."""

    def head(self, n: int) -> EvalData:
        """The first `n` items: what intermediate (pruning) evaluations score."""
        rows = min(n, self.tokenized.rows)
        tokenized = replace(self.tokenized, dataset=self.tokenized.dataset.select(range(rows)), rows=rows)
        return EvalData(self.examples[:n], tokenized, self.chat_template, limit=n)


class Objective(Protocol):
    """Scores a trained model; knows nothing of how it was trained."""

    def score(self, model, tokenizer, data: EvalData) -> Score: ...
