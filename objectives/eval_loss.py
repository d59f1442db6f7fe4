"""Eval loss: mean cross-entropy per assistant token on the eval split, masked like training."""

from __future__ import annotations

import math

import torch

from objectives.base import EvalData, Score
from runners.data import IGNORE_INDEX
from sweeps.config import ObjectiveConfig


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
            batch = rows[start : start + self.batch_size]
            width = max(len(row["input_ids"]) for row in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, row in enumerate(batch):
                n = len(row["input_ids"])
                ids[i, :n] = torch.tensor(row["input_ids"])
                labels[i, :n] = torch.tensor(row["labels"])
                mask[i, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shifted = labels[:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                shifted.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total_loss += loss.item()
            total_tokens += int((shifted != IGNORE_INDEX).sum())
        if was_training:
            model.train()
        mean = total_loss / max(total_tokens, 1)
        return Score(
            mean,
            {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": total_tokens},
        )
