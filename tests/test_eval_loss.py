"""Eval loss: projecting only the labelled positions gives the plain full-logits loss."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.utils import convert_outputs_to_fp32
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.config import ObjectiveConfig
from core.eval import IGNORE_INDEX, EvalData
from core.rows import read_examples
from objectives.eval_loss import EvalLoss
from runners.data import CHATML_TEMPLATE, TokenizedCache


@pytest.fixture(scope="module")
def eval_data(tiny_model, sort_data) -> EvalData:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = read_examples(sort_data[1], "alpaca", None, None)
    return EvalData(
        examples, TokenizedCache().get(tokenizer, CHATML_TEMPLATE, examples, 2048), CHATML_TEMPLATE
    )


def plain_loss(model, data: EvalData) -> float:
    total, tokens = 0.0, 0
    for row in data.tokenized.dataset:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])[:, 1:]
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()[:, :-1]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        tokens += int((labels != IGNORE_INDEX).sum())
    return total / tokens


def test_eval_loss_equals_the_full_logits_loss(tiny_model, eval_data):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    score = EvalLoss(ObjectiveConfig(name="eval_loss", batch_size=4)).score(
        model, _tok(tiny_model), eval_data
    )
    assert score.value == pytest.approx(plain_loss(model, eval_data), rel=1e-5)
    assert score.metrics["eval_perplexity"] == pytest.approx(math.exp(score.value))


def test_eval_loss_takes_fp32_outputs_of_a_mixed_precision_wrapper(tiny_model, eval_data):
    # What accelerate leaves on a model a bf16 trainer prepared: fp32 outputs over bf16 weights.
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model.forward = convert_outputs_to_fp32(model.forward)
    score = EvalLoss(ObjectiveConfig(name="eval_loss")).score(model, _tok(tiny_model), eval_data)
    assert math.isfinite(score.value) and score.value > 0


def _tok(path):
    return AutoTokenizer.from_pretrained(path)
