"""The trial runner: real TRL SFT on the tiny model, paying model load and tokenization once."""

from __future__ import annotations

import json

import pytest
import torch

from core.config import parse_config
from core.trial import TrialParams, TrialStatus
from runners.sft import TrialCallbacks, TrialRunner
from tests.conftest import DEFAULT_SPACE, DEFAULT_TRAINING, config_text

pytestmark = pytest.mark.slow  # every test trains the tiny model through TRL


@pytest.fixture(scope="module")
def runner(tiny_model, sort_data, tmp_path_factory) -> TrialRunner:
    folder = tmp_path_factory.mktemp("runner")
    text = config_text(tiny_model, *sort_data, "runner", DEFAULT_SPACE, DEFAULT_TRAINING, "")
    runner = TrialRunner(parse_config(text, folder / "runner.yaml"))
    runner.prepare()
    return runner


def params(**overrides) -> TrialParams:
    return TrialParams(**{"max_steps": 4, "per_device_batch_size": 8, "cutoff_len": 48, **overrides})


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_lora_trials_reuse_the_loaded_base_and_the_tokenized_data(runner, tmp_path):
    for rank in (2, 4, 8):
        assert runner.run(params(lora_rank=rank), tmp_path / f"r{rank}").status == TrialStatus.COMPLETE
    assert runner.models.loads == 1
    assert runner.tokenized.builds == 2  # the train split and the eval split, once each


def test_a_lora_trial_leaves_the_shared_base_untouched(runner, tmp_path):
    base = runner.models.base()
    before = snapshot(base)
    runner.run(params(learning_rate=1e-2), tmp_path)
    after = snapshot(base)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any("lora_" in name for name, _ in base.named_modules())


def test_a_full_fine_tuning_trial_trains_a_copy(runner, tmp_path):
    before = snapshot(runner.models.base())
    result = runner.run(params(method="full", learning_rate=1e-2), tmp_path)
    assert result.status == TrialStatus.COMPLETE
    assert all(torch.equal(before[k], v) for k, v in snapshot(runner.models.base()).items())
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_full_fine_tuning_after_a_lora_trial_trains_its_own_weights(runner, tmp_path):
    runner.run(params(), tmp_path / "lora")
    base_score = runner.run(params(method="full", learning_rate=1e-9), tmp_path / "frozen").objective
    trained = runner.run(params(method="full", learning_rate=1e-2), tmp_path / "full").objective
    assert abs(trained - base_score) > 0.05
    assert "forward" not in vars(runner.models.base())


def test_learning_rate_moves_the_objective(runner, tmp_path):
    slow = runner.run(params(learning_rate=1e-5, max_steps=6), tmp_path / "slow").objective
    fast = runner.run(params(learning_rate=2e-2, max_steps=6), tmp_path / "fast").objective
    assert abs(slow - fast) > 0.05


def test_result_reports_timings_memory_and_throughput(runner, tmp_path):
    result = runner.run(params(), tmp_path)
    assert result.timings.train_s > 0 and result.timings.eval_s > 0 and result.timings.load_s >= 0
    assert result.peak_memory_mb > 0 and result.memory_kind == "cpu_peak_rss"
    assert result.train_tokens > 0 and result.train_tokens_per_s > 0
    assert set(result.metrics) >= {"eval_loss", "eval_perplexity", "truncated_rows"}


def test_the_loss_curve_reaches_the_callbacks(runner, tmp_path):
    logged, steps = [], []
    callbacks = TrialCallbacks(
        on_step=lambda s, t: steps.append((s, t)), on_log=lambda m, s: logged.append((s, m))
    )
    runner.run(params(max_steps=3), tmp_path, callbacks)
    assert [s for s, m in logged if "train_loss" in m] == [1, 2, 3]
    assert steps[-1] == (3, 3)


def test_adapter_is_saved_as_safetensors_with_its_rslora_setting(runner, tmp_path):
    result = runner.run(params(use_rslora=True, lora_rank=4), tmp_path)
    adapter = tmp_path / "adapter"
    assert result.adapter_path == str(adapter)
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 4
    assert not (tmp_path / "adapter.partial").exists()


def test_cutoff_len_truncation_is_counted(runner, tmp_path):
    result = runner.run(params(cutoff_len=36), tmp_path)
    assert result.status == TrialStatus.COMPLETE
    assert result.truncated_rows > 0
    assert result.metrics["truncated_rows"] == result.truncated_rows


def test_a_failing_trial_comes_back_failed_and_the_next_one_runs(runner, tmp_path):
    failed = runner.run(params(target_modules="no_such_proj"), tmp_path / "bad")
    assert failed.status == TrialStatus.FAILED
    assert "no_such_proj" in failed.error
    assert failed.peak_memory_mb > 0
    assert runner.run(params(), tmp_path / "good").status == TrialStatus.COMPLETE


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_qlora_without_cuda_fails_with_a_clear_reason(runner, tmp_path):
    result = runner.run(params(method="qlora"), tmp_path)
    assert result.status == TrialStatus.FAILED
    assert "QLoRAUnavailable: method qlora needs a CUDA GPU" in result.error


def test_a_cutoff_that_leaves_no_reply_fails_the_trial_with_the_reason(runner, tmp_path):
    result = runner.run(params(cutoff_len=8), tmp_path)
    assert result.status == TrialStatus.FAILED
    assert "cutoff_len=8 leaves no reply token" in result.error
