"""What an objective is handed and what it returns: tokenized eval data, the conversations, a score.

Shared by the runners (which build it) and the objectives (which read it), so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch
import torch.utils.checkpoint

from core.rows import Example

if TYPE_CHECKING:
    from datasets import Dataset

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedSplit:
    """A split ready for the trainer, with what truncation cost."""

    dataset: Dataset
    rows: int
    tokens: int
    truncated_rows: int
    dropped_rows: int


def render_chat(tokenizer, template: str, messages, add_generation_prompt: bool) -> str:
    """`messages` rendered with the Jinja chat `template` (a generation prompt appended when asked)."""
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_text(tokenizer, template: str, example: Example) -> str:
    """The conversation up to the last reply, ready for generation."""
    return render_chat(tokenizer, template, example.messages[:-1], add_generation_prompt=True)


def pad_right(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Tokenized rows as one right-padded batch: input_ids, attention_mask, and labels when rows have them.

    Padding positions get `pad_id` in input_ids and IGNORE_INDEX in labels, so they never count.
    """
    width = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    if "labels" in rows[0]:
        batch["labels"] = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
        batch["attention_mask"][i, :n] = 1
        if "labels" in batch:
            batch["labels"][i, :n] = torch.tensor(row["labels"])
    return batch


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


LOSS_CHUNK = 2048
"""Labelled positions projected through the LM head at once (a 150k vocabulary: 1.2 GB of fp32 logits)."""


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")


class _FusedHeadLossSums(torch.autograd.Function):
    """Per-group cross-entropy sums whose gradient for the hidden states is computed in the forward.

    A frozen LM head needs no weight gradient, so each chunk's logits serve twice before they are
    freed: for the loss, and turned in place into softmax - one-hot, the loss's gradient, which
    one matmul brings back to hidden size. The backward then only scales each position by its
    group's incoming gradient. Checkpointing instead recomputes every chunk's logits, log-softmax
    and their backward: half the LM head's work in a pack step over a 150k vocabulary. Written
    here because the libraries that fuse this (Liger's fused linear cross-entropy) give one sum or
    mean, not a sum per group (a pack's trials), and need Triton, which CPUs lack.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, owner, groups: int):
        sums = torch.zeros(groups, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, targets.numel(), LOSS_CHUNK):
            end = start + LOSS_CHUNK
            logits = torch.nn.functional.linear(hidden[start:end], weight, bias).float()
            picked = targets[start:end].unsqueeze(1)
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            sums.index_add_(0, owner[start:end], (lse - logits.gather(1, picked)).squeeze(1))
            probs = logits.sub_(lse).exp_()
            probs.scatter_add_(1, picked, torch.full_like(picked, -1.0, dtype=probs.dtype))
            grad[start:end] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad, owner)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        grad, owner = ctx.saved_tensors
        # Scaled in fp32: a half-precision 1/divisor would bias a whole trial's gradient.
        scale = grad_sums.float().index_select(0, owner).unsqueeze(1)
        return (grad.float() * scale).to(grad.dtype), None, None, None, None, None


def _fusable(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """A plain frozen linear head over hidden states that need a gradient: what the fused loss covers."""
    return (
        type(head) is torch.nn.Linear
        and not any(p.requires_grad for p in head.parameters())
        and hidden.requires_grad
    )


def head_loss_sums(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, groups: int
) -> torch.Tensor:
    """Summed cross-entropy per group (`owner[i]` of position i) of labelled hidden states.

    Only labelled positions go through the LM head, `LOSS_CHUNK` at a time: a whole batch's logits
    would be rows x tokens x vocabulary in fp32, tens of GB for a 150k vocabulary. With gradients
    on, a frozen linear head computes the hidden states' gradient chunk by chunk in the forward
    (`_FusedHeadLossSums`); any other head's chunks are checkpointed (logits recomputed in the
    backward pass rather than kept).
    """
    hidden = hidden.to(next(head.parameters()).dtype)
    if torch.is_grad_enabled() and _fusable(head, hidden):
        return _FusedHeadLossSums.apply(hidden, head.weight, head.bias, targets, owner, groups)
    sums = torch.zeros(groups, device=hidden.device)
    for start in range(0, targets.numel(), LOSS_CHUNK):
        end = start + LOSS_CHUNK
        if torch.is_grad_enabled():
            losses = torch.utils.checkpoint.checkpoint(
                _chunk_loss, head, hidden[start:end], targets[start:end], use_reentrant=False
            )
        else:
            losses = _chunk_loss(head, hidden[start:end], targets[start:end])
        sums = sums.index_add(0, owner[start:end], losses)
    return sums


RowRouter = Callable[[Sequence[int]], AbstractContextManager]
"""Given which of several adapters each row of the next batch is for (0, 1, ...), a context in
which the model runs each row through that adapter: how packed trials are scored together."""


class Objective(Protocol):
    """Scores a trained model; knows nothing of how it was trained.

    An objective may also offer `score_many(model, tokenizer, data, adapters, route) -> list[Score]`:
    the scores of `adapters` adapters held by one model at once, each batch holding rows for
    several of them, routed by `route`. Packed trials that finish together are scored that way.
    """

    def score(self, model, tokenizer, data: EvalData) -> Score: ...
