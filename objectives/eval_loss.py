"""Eval loss: mean cross-entropy per assistant token on the eval split, masked like training."""

from __future__ import annotations

import math

import torch

from core.config import ObjectiveConfig
from core.eval import IGNORE_INDEX, EvalData, Score, pad_right

_CHUNK_TOKENS = 1024


def _summed_loss(model, ids: torch.Tensor, mask: torch.Tensor, shifted: torch.Tensor) -> float:
    """Summed cross-entropy of the labelled positions, projecting only those through the LM head.

    Full fp32 logits of a 150k vocabulary cost about 5 GB per 8 x 1024 batch, more than training
    itself at small batches; taking the last hidden states and projecting the labelled positions in
    chunks keeps eval memory small. Models that rescale logits (softcapping) take the plain path.
    """
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
    outputs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    keep = shifted != IGNORE_INDEX
    head = model.get_output_embeddings()
    # After a mixed-precision trainer ran, accelerate's forward wrapper hands back fp32 outputs,
    # hidden states included; the head takes them in its own dtype.
    hidden = outputs.hidden_states[-1][:, :-1][keep].to(next(head.parameters()).dtype)
    targets = shifted[keep]
    total = 0.0
    for start in range(0, hidden.size(0), _CHUNK_TOKENS):
        logits = head(hidden[start : start + _CHUNK_TOKENS]).float()
        total += torch.nn.functional.cross_entropy(
            logits, targets[start : start + _CHUNK_TOKENS], reduction="sum"
        ).item()
    return total


class EvalLoss:
    """Token-weighted loss (and perplexity) over every eval conversation's assistant replies.

    Weighting by tokens rather than averaging per batch keeps the value independent of batch size
    and padding, so trials with different settings compare fairly.
    """

    def __init__(self, config: ObjectiveConfig):
        self.batch_size = config.batch_size

    @torch.no_grad()
    def score(self, model, tokenizer, data: EvalData) -> Score:
        rows = sorted(data.tokenized.dataset, key=lambda row: len(row["input_ids"]))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total_loss, total_tokens = 0.0, 0
        for start in range(0, len(rows), self.batch_size):
            batch = pad_right(rows[start : start + self.batch_size], tokenizer.pad_token_id)
            shifted = batch["labels"][:, 1:].to(device)
            total_loss += _summed_loss(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device), shifted
            )
            total_tokens += int((shifted != IGNORE_INDEX).sum())
        if was_training:
            model.train()
        mean = total_loss / max(total_tokens, 1)
        return Score(
            mean,
            {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": total_tokens},
        )
