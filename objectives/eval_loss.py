"""Eval loss: mean cross-entropy per assistant token on the eval split, masked like training."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from core.config import ObjectiveConfig
from core.eval import IGNORE_INDEX, EvalData, RowRouter, Score, head_loss_sums, pad_right


def _row_losses(model, ids: torch.Tensor, mask: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each row's labelled positions, projecting only those through the LM head.

    Full fp32 logits of a 150k vocabulary cost about 5 GB per 8 x 1024 batch, more than training
    itself at small batches (`head_loss_sums`). Models that rescale logits (softcapping) take the
    plain path.
    """
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        return per_token.view(shifted.shape).sum(dim=1)
    outputs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    keep = shifted != IGNORE_INDEX
    # After a mixed-precision trainer ran, accelerate's forward wrapper hands back fp32 outputs,
    # hidden states included; `head_loss_sums` casts them to the head's dtype.
    hidden = outputs.hidden_states[-1][:, :-1][keep]
    owner = keep.nonzero(as_tuple=True)[0]
    return head_loss_sums(model.get_output_embeddings(), hidden, shifted[keep], owner, ids.shape[0])


class EvalLoss:
    """Token-weighted loss (and perplexity) over every eval conversation's assistant replies.

    Weighting by tokens rather than averaging per batch keeps the value independent of batch size
    and padding, so trials with different settings compare fairly.
    """

    def __init__(self, config: ObjectiveConfig):
        self.batch_size = config.batch_size

    def score(self, model, tokenizer, data: EvalData) -> Score:
        return self._losses(model, tokenizer, data, 1, None)[0]

    def score_many(self, model, tokenizer, data: EvalData, adapters: int, route: RowRouter) -> list[Score]:
        """`score` for each of `adapters` adapters of one model; each batch holds its rows once per adapter."""
        return self._losses(model, tokenizer, data, adapters, route)

    @torch.no_grad()
    def _losses(
        self, model, tokenizer, data: EvalData, adapters: int, route: RowRouter | None
    ) -> list[Score]:
        rows = sorted(data.tokenized.dataset, key=lambda row: len(row["input_ids"]))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        totals = torch.zeros(adapters, dtype=torch.float64)
        total_tokens = 0
        for start in range(0, len(rows), self.batch_size):
            batch = pad_right(rows[start : start + self.batch_size], tokenizer.pad_token_id)
            n = batch["input_ids"].shape[0]
            shifted = batch["labels"][:, 1:]
            repeated = {key: value.repeat(adapters, 1).to(device) for key, value in batch.items()}
            with route([k for k in range(adapters) for _ in range(n)]) if route else nullcontext():
                per_row = _row_losses(
                    model, repeated["input_ids"], repeated["attention_mask"], repeated["labels"][:, 1:]
                )
            totals += per_row.view(adapters, n).sum(dim=1).double().cpu()
            total_tokens += int((shifted != IGNORE_INDEX).sum())
        if was_training:
            model.train()
        return [self._scored(float(total) / max(total_tokens, 1), total_tokens) for total in totals]

    @staticmethod
    def _scored(mean: float, tokens: int) -> Score:
        return Score(
            mean,
            {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": tokens},
        )
