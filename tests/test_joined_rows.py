"""Joined rows: a pack step's rows laid end to end per trial, with attention told where each row starts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from core.eval import IGNORE_INDEX
from runners.attention import joined_rows, model_unsupported, varlen_reference
from runners.packed import PackBatch, _label_loss_sums

ROWS = [
    # trial 0: two rows of 3 and 2 tokens; trial 1: one row of 4 tokens
    {"input_ids": [11, 12, 13], "labels": [IGNORE_INDEX, 12, 13]},
    {"input_ids": [14, 15], "labels": [IGNORE_INDEX, 15]},
    {"input_ids": [21, 22, 23, 24], "labels": [IGNORE_INDEX, IGNORE_INDEX, 23, 24]},
]


def joined_batch() -> PackBatch:
    return PackBatch.joined(ROWS, [0, 0, 1], slots=[5, 2], divisor=[3, 2], pad_id=0, device="cpu")


def test_each_trial_is_one_batch_row_of_its_rows_joined_and_padded_to_the_longest_trial():
    batch = joined_batch()
    assert batch.input_ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 24, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.attention_mask is None
    # Rows (and trial 1's one-token padding tail) as boundaries over the flattened 2 x 5 tokens.
    assert batch.bounds.tolist() == [0, 3, 5, 9, 10] and batch.bounds.dtype == torch.int32
    assert batch.longest == 4
    assert batch.route.tolist() == [5, 2] and batch.grouped


def test_a_position_predicts_the_next_label_of_its_own_row_only():
    batch = joined_batch()
    # Flat position -> target: 0->12, 1->13, 3->15 (trial 0), 6->23, 7->24 (trial 1); the last token
    # of a row (2, 4, 8) never predicts the next row's first token.
    assert batch.positions.tolist() == [0, 1, 3, 6, 7]
    assert batch.targets.tolist() == [12, 13, 15, 23, 24]
    assert batch.owner.tolist() == [0, 0, 0, 1, 1]
    assert batch.divisor.tolist() == [3, 2]


def test_a_pack_of_one_trial_joins_its_rows_without_routing():
    batch = PackBatch.joined(ROWS[:2], [0, 0], slots=[3], divisor=[3], pad_id=0, device="cpu")
    assert batch.input_ids.tolist() == [[11, 12, 13, 14, 15]]
    assert batch.bounds.tolist() == [0, 3, 5]
    assert batch.route is None


def test_per_row_attention_equals_block_diagonal_causal_attention():
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2]
    q = torch.randn(sum(lengths), 4, 8, generator=generator)
    k, v = (torch.randn(sum(lengths), 2, 8, generator=generator) for _ in range(2))
    bounds = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    got = varlen_reference(q, k, v, bounds, max(lengths), 8**-0.5)
    row = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    allowed = (row[:, None] == row[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, enable_gqa=True
    ).transpose(0, 1)
    assert torch.allclose(got, want, atol=1e-6)


TINY = {
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_llama(**overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**TINY, **overrides)).eval()


def test_a_joined_forward_gives_each_row_the_logits_it_gets_alone():
    torch.manual_seed(0)
    model = tiny_llama()
    batch = joined_batch()
    with torch.no_grad(), joined_rows(model):
        joined = model(**batch.model_inputs()).logits
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row["input_ids"]])).logits[0] for row in ROWS]
    assert torch.allclose(joined[0, :3], alone[0], atol=1e-5)
    assert torch.allclose(joined[0, 3:5], alone[1], atol=1e-5)
    assert torch.allclose(joined[1, :4], alone[2], atol=1e-5)


def test_the_model_gets_its_own_attention_back_after_joined_rows():
    model = tiny_llama(attn_implementation="sdpa")
    with joined_rows(model):
        assert model.config._attn_implementation != "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_models_that_cannot_take_joined_rows_say_why():
    assert model_unsupported(tiny_llama()) is None
    assert "dropout" in model_unsupported(tiny_llama(attention_dropout=0.1))
    sliding = Qwen2ForCausalLM(
        Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    )
    assert "sliding-window" in model_unsupported(sliding)


def test_the_plain_logits_loss_of_joined_rows_equals_the_labelled_positions_loss():
    # Models that rescale logits (softcapping, logit_scale) take the plain path over all logits.
    torch.manual_seed(0)
    model = tiny_llama()
    batch = joined_batch()
    with torch.no_grad(), joined_rows(model):
        labelled = _label_loss_sums(model, batch, trials=2)
        model.config.logit_scale = 1.0  # only steers the path: Llama's head never reads it
        plain = _label_loss_sums(model, batch, trials=2)
    assert labelled.shape == (2,) and torch.all(labelled > 0)
    assert torch.allclose(plain, labelled, rtol=1e-5)
