"""A pack slot starts from exactly the LoRA init peft gives its trial, with peft's pass paid once per target setting."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.trial import TrialParams
from runners import multilora
from runners.multilora import MultiLoRA, lora_config

TRIALS = [  # (rank, alpha, rsLoRA, seed): everything but the targets differs
    (4, 8, True, 3),
    (8, 16, False, 11),
    (2, 2, True, 5),
]


def config(rank: int, alpha: int, rslora: bool, targets: str):
    return lora_config(
        TrialParams(
            method="lora", lora_rank=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets
        )
    )


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16-base", "fp32-base"])
def adapters(request, tiny_model) -> MultiLoRA:
    return MultiLoRA(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=request.param), capacity=3)


@pytest.fixture
def peft_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = multilora.seeded_peft_model
    monkeypatch.setattr(
        multilora, "seeded_peft_model", lambda model, cfg, seed: calls.append(seed) or real(model, cfg, seed)
    )
    return calls


def assert_slot_is_peft_init(adapters: MultiLoRA, slot: int, cfg, seed: int) -> None:
    """The slot holds what peft itself initialises for (cfg, seed), and peft's resolved config."""
    init, targets = adapters._peft_init(cfg, seed)
    assert adapters.slots[slot].targets == frozenset(init)
    assert adapters.slots[slot].config.to_dict() == targets.config.to_dict()
    assert adapters.slots[slot].dtype == targets.dtype
    for name, (A, B, scale) in init.items():
        got_A, got_B = adapters.layers[name].slot_weights(slot, cfg.r)
        assert torch.equal(got_A, A) and torch.equal(got_B, B), name
        assert adapters.layers[name].scales[slot] == scale


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_later_trials_with_the_same_targets_get_peft_init_without_a_peft_pass(adapters, peft_calls, targets):
    for slot, (rank, alpha, rslora, seed) in enumerate(TRIALS):
        adapters.assign(slot, config(rank, alpha, rslora, targets), seed)
    assert peft_calls == [3]  # the first trial only
    for slot, (rank, alpha, rslora, seed) in enumerate(TRIALS):
        assert_slot_is_peft_init(adapters, slot, config(rank, alpha, rslora, targets), seed)


def test_each_target_setting_pays_its_own_first_peft_pass(adapters, peft_calls):
    adapters.assign(0, config(4, 8, True, "q_proj,v_proj"), 3)
    adapters.assign(1, config(4, 8, True, "gate_proj,up_proj,down_proj"), 4)
    adapters.assign(2, config(8, 8, False, "v_proj,q_proj"), 5)  # the same set as slot 0's
    assert peft_calls == [3, 4]
    assert_slot_is_peft_init(adapters, 2, config(8, 8, False, "v_proj,q_proj"), 5)


def test_when_the_drawn_init_is_not_peft_s_every_trial_goes_through_peft(adapters, peft_calls, monkeypatch):
    # As if another peft release initialised differently: the check at the first trial catches it.
    drawn = multilora.draw_lora_init
    monkeypatch.setattr(
        multilora,
        "draw_lora_init",
        lambda shapes, cfg, seed: {
            name: (A + 1, B, s) for name, (A, B, s) in drawn(shapes, cfg, seed).items()
        },
    )
    for slot, (rank, alpha, rslora, seed) in enumerate(TRIALS):
        adapters.assign(slot, config(rank, alpha, rslora, "all-linear"), seed)
    assert peft_calls == [3, 11, 5]
    assert_slot_is_peft_init(adapters, 1, config(8, 16, False, "all-linear"), 11)


def test_trials_sharing_rank_and_seed_reuse_one_draw_with_each_their_own_scale(
    adapters, peft_calls, monkeypatch
):
    draws: list[int] = []
    real = multilora.draw_lora_init
    monkeypatch.setattr(
        multilora, "draw_lora_init", lambda shapes, cfg, seed: draws.append(seed) or real(shapes, cfg, seed)
    )
    adapters.assign(0, config(4, 8, True, "all-linear"), 7)  # through peft, then checked by one draw
    adapters.assign(1, config(4, 16, False, "all-linear"), 7)
    with torch.no_grad():  # slot 1 trains; the kept draw that slot 2 gets must not move with it
        for layer in adapters.layers.values():
            layer.A[1] += 1.0
    adapters.assign(2, config(4, 2, True, "all-linear"), 7)

    assert peft_calls == [7]
    assert draws == [7, 7]  # the check at the first trial, then one draw for both later trials
    assert_slot_is_peft_init(adapters, 2, config(4, 2, True, "all-linear"), 7)
