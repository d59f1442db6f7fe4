"""Packed trials: K LoRA trials on one base train exactly as they would one at a time (CPU, float32)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import get_scheduler

from core.config import ObjectiveConfig, parse_config
from core.eval import IGNORE_INDEX, EvalData, pad_right
from core.trial import TrialParams, TrialResult, TrialStatus
from objectives.eval_loss import EvalLoss
from objectives.generation import generate_for_adapters, generate_for_objective
from runners import attention
from runners import packed as packed_module
from runners.multilora import MultiAdamW, MultiLoRA, MultiLoRALinear, distinct_equal_runs, lora_config
from runners.packed import CUT_COST_TOKENS, SCORE_WAIT_STEPS, PackedRunner, total_steps
from runners.sft import TrialCallbacks, TrialRunner
from tests.conftest import DEFAULT_SPACE, DEFAULT_TRAINING, config_text

pytestmark = pytest.mark.slow  # every test trains the tiny model, packed and alone


def make_runner(tiny_model, sort_data, folder: Path, extra: str = "") -> TrialRunner:
    text = config_text(tiny_model, *sort_data, "packed", DEFAULT_SPACE, DEFAULT_TRAINING, extra)
    runner = TrialRunner(parse_config(text, folder / "packed.yaml"))
    runner.prepare()
    return runner


@pytest.fixture(scope="module")
def runner(tiny_model, sort_data, tmp_path_factory) -> TrialRunner:
    return make_runner(tiny_model, sort_data, tmp_path_factory.mktemp("packed"))


def params(**overrides) -> TrialParams:
    return TrialParams(**{"max_steps": 4, "per_device_batch_size": 4, "cutoff_len": 48, **overrides})


# Four trials that differ in everything a slot holds: learning rate, rank, alpha, rsLoRA, targets,
# plus schedule, warmup, weight decay, clipping and seed.
FOUR = {
    0: params(learning_rate=3e-3, lora_rank=2, lora_alpha=4, target_modules="q_proj,v_proj"),
    1: params(
        learning_rate=1e-2,
        lora_rank=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules="all-linear",
        warmup_ratio=0.3,
        weight_decay=0.05,
        max_grad_norm=0.05,
        seed=7,
    ),
    2: params(
        learning_rate=5e-3,
        lora_rank=8,
        lora_alpha=16,
        target_modules="q_proj,k_proj,o_proj",
        lr_scheduler="cosine",
        seed=3,
    ),
    3: params(
        learning_rate=2e-2,
        lora_rank=3,
        lora_alpha=3,
        use_rslora=True,
        target_modules="gate_proj,up_proj,down_proj",
        lr_scheduler="constant",
        seed=11,
    ),
}


class Recorder:
    """A trial's callbacks, keeping its train-loss curve."""

    def __init__(self, prune_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.reports: list[tuple[float, int]] = []
        self.prune_at = prune_at

    def callbacks(self) -> TrialCallbacks:
        def on_log(metrics: dict[str, float], step: int) -> None:
            if "train_loss" in metrics:
                self.losses[step] = metrics["train_loss"]

        def report(value: float, step: int) -> bool:
            self.reports.append((value, step))
            return step != self.prune_at

        return TrialCallbacks(on_log=on_log, report=report)


def run_pack(
    runner: TrialRunner,
    trials: dict[int, TrialParams],
    capacity: int,
    folder: Path,
    packed: PackedRunner | None = None,
) -> dict[int, tuple[TrialResult, dict[int, float]]]:
    """Run `trials` through a pack of `capacity`, refilling freed slots in order; results and loss curves."""
    pack = packed or PackedRunner(runner, capacity)
    queue = list(trials.items())
    recorders: dict[int, Recorder] = {}
    done: dict[int, tuple[TrialResult, dict[int, float]]] = {}
    try:
        while queue or pack.active():
            while queue and len(pack.active()) < capacity:
                number, trial = queue.pop(0)
                recorders[number] = Recorder()
                pack.add(trial, folder / f"trial-{number}", recorders[number].callbacks(), number)
            for number, result in pack.advance():
                done[number] = (result, recorders[number].losses)
    finally:
        pack.close()
    return done


def one_at_a_time(runner, trials, folder):
    return {n: run_pack(runner, {n: p}, 1, folder / f"solo-{n}")[n] for n, p in trials.items()}


def assert_same_training(got, expected):
    result, losses = got
    expected_result, expected_losses = expected
    assert result.status == expected_result.status == TrialStatus.COMPLETE
    assert losses.keys() == expected_losses.keys()
    for step, loss in expected_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    assert result.objective == pytest.approx(expected_result.objective, rel=1e-4)
    weights = load_file(Path(result.adapter_path) / "adapter_model.safetensors")
    reference = load_file(Path(expected_result.adapter_path) / "adapter_model.safetensors")
    assert weights.keys() == reference.keys()
    # The adapter as one vector: Adam turns float noise in the near-zero q/k gradients of a random
    # model into relative noise of a few 1e-5 in single small tensors, not in the adapter.
    got = torch.cat([weights[key].flatten() for key in sorted(reference)])
    want = torch.cat([reference[key].flatten() for key in sorted(reference)])
    assert torch.linalg.norm(got - want) <= 1e-5 * torch.linalg.norm(want)


@pytest.fixture(scope="module")
def solo(runner, tmp_path_factory):
    """The four trials run one at a time (a pack of one each)."""
    return one_at_a_time(runner, FOUR, tmp_path_factory.mktemp("solo"))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(isinstance(module, MultiLoRALinear) for module in model.modules())


def test_four_packed_trials_train_exactly_as_one_at_a_time(runner, solo, tmp_path):
    packed = run_pack(runner, FOUR, 4, tmp_path)
    assert all(result.metrics["pack_size"] == 4 for result, _ in packed.values())
    for number in FOUR:
        assert_same_training(packed[number], solo[number])


def test_a_pack_step_cut_into_length_sorted_parts_trains_as_one_at_a_time(runner, solo, tmp_path):
    pack = PackedRunner(runner, 4)
    pack.cut_cost_tokens = 0  # every cut pays: each step becomes one chunk per row of each trial
    packed = run_pack(runner, FOUR, 4, tmp_path, pack)
    for number in FOUR:
        assert_same_training(packed[number], solo[number])


def test_a_pack_step_of_joined_rows_trains_as_one_at_a_time(runner, solo, tmp_path, monkeypatch):
    # On CPU, one SDPA call per row stands in for the CUDA varlen kernel; count the rows it sees.
    per_row, rows_seen = attention.varlen_reference, []
    monkeypatch.setattr(
        attention,
        "varlen_reference",
        lambda q, k, v, cu, *rest: rows_seen.append(cu.numel() - 1) or per_row(q, k, v, cu, *rest),
    )
    before = runner.models.base().config._attn_implementation
    pack = PackedRunner(runner, 4)
    pack.join_rows = True
    packed = run_pack(runner, FOUR, 4, tmp_path, pack)
    for number in FOUR:
        assert_same_training(packed[number], solo[number])
    # 4 steps x 2 layers, each over the 4 trials' 4 rows plus the padding tails of the shorter trials.
    assert len(rows_seen) == 4 * 2 and all(16 <= rows <= 16 + 3 for rows in rows_seen)
    assert runner.models.base().config._attn_implementation == before


def test_a_joined_step_split_into_forwards_under_a_token_budget_trains_as_one_at_a_time(
    runner, solo, tmp_path, monkeypatch
):
    forwards: list[int] = []
    real = packed_module._label_loss_sums
    monkeypatch.setattr(
        packed_module,
        "_label_loss_sums",
        lambda model, batch, trials: forwards.append(trials) or real(model, batch, trials),
    )
    pack = PackedRunner(runner, 4)
    pack.join_rows = True
    pack.max_forward_tokens = 4 * 48  # about a trial's 4 rows: every step runs in several forwards
    packed = run_pack(runner, FOUR, 4, tmp_path, pack)
    for number in FOUR:
        assert_same_training(packed[number], solo[number])
    # 4 steps: at least two forwards each, and none of them holds all four trials.
    assert len(forwards) >= 2 * 4 and max(forwards) < 4


def test_the_forward_token_budget_is_what_the_card_holds_at_the_memory_per_token_of_large_steps(
    runner, monkeypatch
):
    mib, gib = 2**20, 2**30
    held = 3 * gib  # weights, adapters and optimizer state before a step's forwards
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: held)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * gib)
    )
    pack = PackedRunner(runner, 4)
    pack._adapters = SimpleNamespace(device=torch.device("cuda", 0))
    room = 80 * gib * 0.85 - held

    def step(tokens: int, activation_bytes: float) -> int | None:
        pack._forward_tokens, pack._held_bytes = tokens, held
        pack._fit_forward_tokens(held + activation_bytes)
        return pack._forward_budget()

    assert pack._forward_budget() is None  # nothing measured yet: one forward
    assert step(10_000, 10_000 * mib) == int(room / mib)  # 1 MiB a token
    # One trial stepping alone: mostly a forward's fixed costs (4 GiB for 300 tokens); ignored.
    assert step(300, 4 * gib) == int(room / mib)
    assert step(9_000, 9_000 * 1.1 * mib) == int(room / (1.1 * mib))  # a dearer large step counts
    assert step(20_000, 20_000 * 0.5 * mib) == int(room / (0.5 * mib))  # twice the largest: afresh
    pack._checkpointing = True  # checkpointed forwards are measured on their own
    assert pack._forward_budget() is None


@pytest.mark.parametrize("join_rows", [False, True], ids=["padded", "joined-rows"])
def test_a_pack_checkpoints_activations_while_a_trial_asks_and_trains_the_same(
    runner, solo, tmp_path, monkeypatch, join_rows
):
    # A module inside a checkpointed decoder layer runs again in the backward pass (forward hooks
    # do not see that rerun, so its forward is counted).
    mlp = runner.models.base().model.layers[0].mlp
    forward, calls = mlp.forward, []
    monkeypatch.setattr(mlp, "forward", lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs))
    trials = {0: FOUR[0].model_copy(update={"gradient_checkpointing": True}), 1: FOUR[1]}
    pack = PackedRunner(runner, 2)
    pack.join_rows = join_rows  # joined, the rerun forward must see the row boundaries again
    packed = run_pack(runner, trials, 2, tmp_path, pack)
    for number in trials:
        assert_same_training(packed[number], solo[number])
    # Each of the 4 steps ran the layer twice (again in the backward); then 2 eval batches.
    assert len(calls) == 4 * 2 + 2
    assert not any(
        getattr(module, "gradient_checkpointing", False) for module in runner.models.base().modules()
    )


def test_trl_packing_cannot_join_a_pack(runner, tmp_path):
    pack = PackedRunner(runner, 2)
    with pytest.raises(ValueError, match="TRL packing"):
        pack.add(params(packing=True), tmp_path, TrialCallbacks(), 0)


def test_a_packed_trial_is_plain_peft_lora_training(runner, solo):
    """Trial 1 (rsLoRA, all-linear, warmup, weight decay, active clipping) against a plain PEFT loop."""
    trial = FOUR[1]
    tokenizer = runner.models.tokenizer()
    train = runner.tokenized.get(tokenizer, runner._template, runner._splits.train, trial.cutoff_len)
    base = runner.models.base()
    torch.manual_seed(trial.seed)
    model = get_peft_model(base, lora_config(trial))
    try:
        lora = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora, lr=trial.learning_rate, weight_decay=trial.weight_decay)
        steps = trial.max_steps
        scheduler = get_scheduler(trial.lr_scheduler, optimizer, math.ceil(steps * trial.warmup_ratio), steps)
        generator = torch.Generator().manual_seed(trial.seed)
        order = torch.randperm(train.rows, generator=generator).tolist()
        model.train()
        losses = {}
        for step in range(1, steps + 1):
            rows = train.dataset[order[(step - 1) * 4 : step * 4]]
            batch = pad_right(
                [{"input_ids": i, "labels": l} for i, l in zip(rows["input_ids"], rows["labels"])],
                tokenizer.pad_token_id,
            )
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora, trial.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses[step] = loss.item()
        evaluation = runner.tokenized.get(
            tokenizer, runner._template, runner._splits.eval, runner.config.objective.max_length
        )
        objective = runner.objective.score(
            model, tokenizer, EvalData(runner._splits.eval, evaluation, runner._template)
        )
        weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    finally:
        model.unload()
    result, packed_losses = solo[1]
    assert packed_losses == pytest.approx(losses, rel=1e-4)
    assert result.objective == pytest.approx(objective.value, rel=1e-4)
    exported = load_file(Path(result.adapter_path) / "adapter_model.safetensors")
    assert len(exported) == len(weights)
    for name, tensor in weights.items():
        key = name.replace(".default.weight", ".weight")
        assert torch.linalg.norm(exported[key] - tensor) <= 1e-5 * torch.linalg.norm(tensor), key


@pytest.mark.parametrize(
    ("cut_cost_tokens", "join_rows"),
    [(CUT_COST_TOKENS, False), (0, False), (CUT_COST_TOKENS, True)],
    ids=["one-chunk", "length-sorted-chunks", "joined-rows"],
)
def test_trials_with_different_batch_accumulation_and_steps_share_a_pack(
    runner, tmp_path, cut_cost_tokens, join_rows
):
    trials = {
        10: params(per_device_batch_size=2, gradient_accumulation_steps=3, max_steps=2, lora_rank=2),
        11: params(per_device_batch_size=5, max_steps=5, learning_rate=1e-2, seed=5),
        12: params(
            per_device_batch_size=3, gradient_accumulation_steps=2, max_steps=-1, num_epochs=0.25, seed=9
        ),
    }
    assert total_steps(trials[12], 48) == 2  # 16 micro-batches, 8 steps an epoch, a quarter of it
    pack = PackedRunner(runner, 3)
    pack.cut_cost_tokens = cut_cost_tokens  # at 0, steps are cut into chunks of rows of mixed trials
    pack.join_rows = join_rows
    packed = run_pack(runner, trials, 3, tmp_path / "packed", pack)
    solo = one_at_a_time(runner, trials, tmp_path)
    for number in trials:
        assert_same_training(packed[number], solo[number])
    assert [len(packed[n][1]) for n in trials] == [2, 5, 2]


def test_a_freed_slot_takes_the_next_trial_mid_pack(runner, solo, tmp_path):
    trials = {0: FOUR[0].model_copy(update={"max_steps": 2}), 2: FOUR[2], 3: FOUR[3]}
    pack = PackedRunner(runner, 2)
    pack.score_wait_steps = 0  # trial 2 completes two steps after trial 0: no waiting for it
    packed = run_pack(runner, trials, 2, tmp_path, pack)
    assert packed[3][0].metrics["pack_size"] == 2  # trained beside trial 2 after trial 0 left
    for number in (2, 3):
        assert_same_training(packed[number], solo[number])


def test_a_trial_completing_steps_before_another_waits_and_both_are_scored_in_one_pass(
    runner, solo, tmp_path, monkeypatch
):
    trials = {0: FOUR[0].model_copy(update={"max_steps": FOUR[2].max_steps - 2}), 2: FOUR[2]}
    pack = PackedRunner(runner, 2)
    passes: list[int] = []
    score_many = runner.objective.score_many
    monkeypatch.setattr(
        runner.objective,
        "score_many",
        lambda model, tokenizer, data, adapters, route: (
            passes.append(adapters) or score_many(model, tokenizer, data, adapters, route)
        ),
    )
    packed = run_pack(runner, trials, 2, tmp_path, pack)
    assert passes == [2]
    # Waiting, trial 0 took no further step: its training is the trial's alone, unchanged.
    assert len(packed[0][1]) == FOUR[2].max_steps - 2
    assert_same_training(packed[2], solo[2])


def test_an_out_of_memory_step_while_a_trial_waits_returns_it_scored_then_raises(
    runner, tmp_path, monkeypatch
):
    pack = PackedRunner(runner, 2)
    pack.add(FOUR[0].model_copy(update={"max_steps": 2}), tmp_path / "trial-0", TrialCallbacks(), 0)
    pack.add(FOUR[2], tmp_path / "trial-2", TrialCallbacks(), 2)
    steps = {"n": 0}
    forward_backward = pack._forward_backward

    def third_step_out_of_memory(trials, batches):
        steps["n"] += 1
        if steps["n"] >= 3:  # trial 0 completed at step 2 and waits for trial 2
            raise torch.OutOfMemoryError("a step of this pack does not fit")
        return forward_backward(trials, batches)

    monkeypatch.setattr(pack, "_forward_backward", third_step_out_of_memory)
    try:
        [(number, result)] = pack.advance()
        # Its training was done: scored and saved, not thrown away with the failed step.
        assert number == 0 and result.status == TrialStatus.COMPLETE
        assert (Path(result.adapter_path) / "adapter_model.safetensors").exists()
        assert pack.active() == [2]
        with pytest.raises(torch.OutOfMemoryError):
            pack.advance()
    finally:
        pack.close()


def test_a_completed_trial_waits_no_longer_than_the_window(runner, tmp_path, monkeypatch):
    trials = {0: FOUR[0].model_copy(update={"max_steps": 1}), 2: FOUR[2]}
    assert FOUR[2].max_steps - 1 > SCORE_WAIT_STEPS
    pack = PackedRunner(runner, 2)
    passes: list[int] = []
    score_many = runner.objective.score_many
    monkeypatch.setattr(
        runner.objective,
        "score_many",
        lambda model, tokenizer, data, adapters, route: (
            passes.append(adapters) or score_many(model, tokenizer, data, adapters, route)
        ),
    )
    run_pack(runner, trials, 2, tmp_path, pack)
    assert passes == []  # each scored alone, as it completed


def test_a_diverging_trial_fails_alone(runner, solo, tmp_path):
    trials = {0: FOUR[0], 9: params(learning_rate=1e30, seed=1)}
    packed = run_pack(runner, trials, 2, tmp_path)
    failed = packed[9][0]
    assert failed.status == TrialStatus.FAILED and failed.failure_kind == "nonfinite"
    assert "train loss became" in failed.error
    assert_same_training(packed[0], solo[0])


def test_out_of_memory_propagates_and_the_pack_goes_on_unchanged(runner, solo, tmp_path, monkeypatch):
    pack = PackedRunner(runner, 2)
    recorders = {n: Recorder() for n in (0, 2)}
    for n in (0, 2):
        pack.add(FOUR[n], tmp_path / f"trial-{n}", recorders[n].callbacks(), n)
    model = runner.models.base()
    real_forward = type(model).forward
    calls = {"n": 0}

    def forward_once_out_of_memory(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("injected")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward_once_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        pack.advance()
    monkeypatch.setattr(type(model), "forward", real_forward)
    ended = dict(pack.advance())
    pack.close()
    for n in (0, 2):
        assert_same_training((ended[n], recorders[n].losses), solo[n])


def test_full_fine_tuning_cannot_join_a_pack(runner, tmp_path):
    pack = PackedRunner(runner, 2)
    with pytest.raises(ValueError, match="full fine-tuning"):
        pack.add(params(method="full"), tmp_path, TrialCallbacks(), 0)
    pack.close()


def test_a_pruned_trial_ends_with_its_last_intermediate_value(tiny_model, sort_data, tmp_path):
    runner = make_runner(
        tiny_model, sort_data, tmp_path, "pruner:\n  type: median\n  eval_every_steps: 2\n  eval_samples: 4"
    )
    pack = PackedRunner(runner, 2)
    recorders = {0: Recorder(prune_at=2), 1: Recorder()}
    for n, recorder in recorders.items():
        pack.add(params(max_steps=5, seed=n), tmp_path / f"trial-{n}", recorder.callbacks(), n)
    ended = dict(pack.advance())
    pack.close()
    assert list(ended) == [0]
    assert ended[0].status == TrialStatus.PRUNED
    assert ended[0].metrics["pruned_at_step"] == 2
    assert ended[0].objective == recorders[0].reports[-1][0]


def test_a_completed_trial_reports_what_the_trial_runner_reports(solo):
    result, _ = solo[0]
    assert set(result.metrics) >= {
        "eval_loss",
        "eval_perplexity",
        "train_rows",
        "truncated_rows",
        "dropped_rows",
        "pack_size",
    }
    assert result.timings.train_s > 0 and result.timings.eval_s > 0
    assert result.train_tokens > 0 and result.train_tokens_per_s > 0
    assert result.peak_memory_mb > 0 and result.memory_kind == "cpu_peak_rss"
    assert Path(result.adapter_path).name == "adapter"


def test_the_base_is_bit_identical_after_a_pack_closes(runner, tmp_path):
    base = runner.models.base()
    before = snapshot(base)
    run_pack(runner, {0: FOUR[0], 1: FOUR[1]}, 2, tmp_path)
    assert_bit_identical(base, before)


def trained_slots(model: torch.nn.Module, configs: list) -> MultiLoRA:
    """Slots with non-zero A and B (a fresh LoRA has B = 0 and would hide routing mistakes)."""
    adapters = MultiLoRA(model, len(configs))
    for slot, config in enumerate(configs):
        adapters.assign(slot, config, seed=slot)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapters.layers.values():
            for slot in range(len(configs)):
                if layer.targets[slot]:
                    rank = adapters.slots[slot].rank
                    layer.B[slot, :rank] = torch.randn(layer.B[slot, :rank].shape, generator=generator)
    return adapters


def test_merged_evaluation_restores_the_bf16_base_bit_for_bit(runner):
    model = copy.deepcopy(runner.models.base()).to(torch.bfloat16)
    before = snapshot(model)
    adapters = trained_slots(model, [lora_config(FOUR[1])])
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = model(input_ids=ids).logits
    with adapters.merged(0):
        merged = model(input_ids=ids).logits
    assert not torch.equal(plain, merged)
    adapters.remove()
    assert_bit_identical(model, before)


def test_an_exported_slot_loads_in_peft_with_the_same_logits(runner, tmp_path):
    model = copy.deepcopy(runner.models.base())
    adapters = trained_slots(model, [lora_config(FOUR[0]), lora_config(FOUR[1]), lora_config(FOUR[3])])
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5], [4, 4, 5, 5, 6]])
    with torch.no_grad(), adapters.routing.by_row(torch.tensor([2, 1, 0])):
        mixed = model(input_ids=ids).logits
    with torch.no_grad(), adapters.routing.one_slot(1):
        alone = model(input_ids=ids).logits
    adapters.export(1, tmp_path / "adapter")
    adapters.remove()
    peft_model = PeftModel.from_pretrained(model, tmp_path / "adapter")
    with torch.no_grad():
        loaded = peft_model(input_ids=ids).logits
    torch.testing.assert_close(loaded, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone[1], rtol=1e-5, atol=1e-5)


def test_multi_adamw_steps_each_slot_as_torch_adamw_with_clipping(runner):
    generator = torch.Generator().manual_seed(0)
    A = torch.nn.Parameter(torch.randn(3, 4, 2, generator=generator))
    B = torch.nn.Parameter(torch.randn(3, 2, 5, generator=generator))
    optimizer = MultiAdamW(lambda: [A, B], 3)
    settings = {0: (1e-2, 0.1, 0.5), 2: (3e-3, 0.0, 100.0)}  # slot: lr, weight decay, max norm
    for slot, (_, decay, norm) in settings.items():
        optimizer.reset(slot, decay, norm)
    references = {}
    for slot, (lr, decay, norm) in settings.items():
        tensors = [torch.nn.Parameter(A[slot].detach().clone()), torch.nn.Parameter(B[slot].detach().clone())]
        references[slot] = (tensors, torch.optim.AdamW(tensors, lr=lr, weight_decay=decay), norm)
    untouched = A[1].detach().clone()
    for _ in range(3):
        grads = [torch.randn(A.shape, generator=generator), torch.randn(B.shape, generator=generator)]
        A.grad, B.grad = grads[0].clone(), grads[1].clone()
        optimizer.step([0, 2], [settings[0][0], settings[2][0]])
        for slot, (tensors, reference, norm) in references.items():
            for tensor, grad in zip(tensors, grads):
                tensor.grad = grad[slot].clone()
            torch.nn.utils.clip_grad_norm_(tensors, norm)
            reference.step()
    for slot, (tensors, _, _) in references.items():
        torch.testing.assert_close(A[slot], tensors[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(B[slot], tensors[1], rtol=1e-6, atol=1e-7)
    assert torch.equal(A[1], untouched)


def test_frozen_row_routing_runs_each_row_through_its_own_slot(runner):
    model = copy.deepcopy(runner.models.base())
    adapters = trained_slots(model, [lora_config(FOUR[0]), lora_config(FOUR[1]), lora_config(FOUR[3])])
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5], [4, 4, 5, 5, 6], [7, 7, 7, 7, 7]])
    slots = [2, 1, 0, 2]
    with torch.no_grad(), adapters.routing.by_row(torch.tensor(slots), frozen=True):
        mixed = model(input_ids=ids).logits
    for row, slot in enumerate(slots):
        with torch.no_grad(), adapters.routing.one_slot(slot):
            alone = model(input_ids=ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row], alone[0], rtol=1e-5, atol=1e-5)


def test_adapters_decoded_together_generate_what_each_generates_alone(runner):
    model = copy.deepcopy(runner.models.base())
    adapters = trained_slots(model, [lora_config(FOUR[0]), lora_config(FOUR[1]), lora_config(FOUR[3])])
    tokenizer = runner.models.tokenizer()
    config = ObjectiveConfig(
        name="gsm8k",
        eval_file="unused.jsonl",
        num_fewshot=0,
        max_new_tokens=6,
        max_length=160,
        generation_batch_size=4,
    )
    prompts = [f"{a} + {b} =" for a, b in [(1, 2), (3, 4), (10, 20), (7, 1), (2, 2)]]
    slots = [2, 0, 1]
    together = generate_for_adapters(
        config, model, tokenizer, prompts, (), len(slots), adapters.router(slots)
    )
    for outputs, slot in zip(together, slots):
        with adapters.routing.one_slot(slot):
            assert outputs == generate_for_objective(config, model, tokenizer, prompts, ())
    assert together[0] != together[1] != together[2]


def test_eval_loss_of_adapters_scored_together_equals_each_scored_alone(runner):
    model = copy.deepcopy(runner.models.base())
    adapters = trained_slots(model, [lora_config(FOUR[0]), lora_config(FOUR[1]), lora_config(FOUR[3])])
    tokenizer = runner.models.tokenizer()
    split = runner.tokenized.get(tokenizer, runner._template, runner._splits.eval, 2048)
    data = EvalData(runner._splits.eval, split, runner._template)
    objective = EvalLoss(ObjectiveConfig(name="eval_loss", batch_size=3))
    slots = [1, 2, 0]
    together = objective.score_many(model, tokenizer, data, len(slots), adapters.router(slots))
    for score, slot in zip(together, slots):
        with adapters.routing.one_slot(slot):
            alone = objective.score(model, tokenizer, data)
        assert score.value == pytest.approx(alone.value, rel=1e-5)
        assert score.metrics["eval_tokens"] == alone.metrics["eval_tokens"]
    assert len({round(score.value, 6) for score in together}) == 3


@pytest.mark.parametrize(
    ("owners", "runs"),
    [([1, 1, 2, 2, 0, 0], [1, 2, 0]), ([3, 3, 3], [3]), ([1, 2, 1, 2], None), ([1, 1, 2], None), ([], None)],
)
def test_a_batch_is_adapter_runs_only_when_each_run_has_one_length_and_its_own_adapter(owners, runs):
    assert distinct_equal_runs(owners) == runs


def test_eval_batches_go_a_run_at_a_time_and_interleaved_decode_rows_row_by_row(runner, monkeypatch):
    model = copy.deepcopy(runner.models.base())
    adapters = trained_slots(model, [lora_config(FOUR[0]), lora_config(FOUR[1]), lora_config(FOUR[3])])
    taken: list[str] = []
    for mode in ("by_group", "by_row", "one_slot"):
        real = getattr(adapters.routing, mode)
        monkeypatch.setattr(
            adapters.routing, mode, lambda *a, _m=mode, _r=real, **k: taken.append(_m) or _r(*a, **k)
        )
    route = adapters.router([2, 0, 1])

    with route([0, 0, 1, 1, 2, 2]):  # what `EvalLoss.score_many` sends: each eval row once per adapter
        pass
    with route([0, 1, 2, 0, 1, 2]):  # a decode batch: each prompt's copies side by side
        pass
    with route([1, 1]):
        pass
    assert taken == ["by_group", "by_row", "one_slot"]
