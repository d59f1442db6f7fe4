"""How a pack sizes itself: how many trials an `auto` pack holds, and how a step's rows are cut."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from core.trial import TrialParams, TrialResult, TrialStatus
from runners.memory import PeakMemory
from runners.packed import CUT_COST_TOKENS, plan_chunks, plan_parts, split_trials
from sweeps.executors.base import TrialJob
from sweeps.executors.packed import AUTO_MAX, Packed, auto_capacity

GB = 10**9


def test_a_pack_grows_to_what_the_measured_share_per_trial_fits_on_the_card() -> None:
    # 4 trials peaked at 42 GB over a 2 GB base: 10 GB each; 85% of 85 GB holds 7 after the base.
    assert auto_capacity(2 * GB, 42 * GB, active=4, total_bytes=85 * GB, current=4) == 7


def test_a_pack_never_more_than_doubles_in_one_go() -> None:
    assert auto_capacity(2 * GB, 3 * GB, active=2, total_bytes=85 * GB, current=2) == 4


def test_a_pack_shrinks_when_its_steps_no_longer_fit() -> None:
    assert auto_capacity(2 * GB, 78 * GB, active=8, total_bytes=85 * GB, current=8) == 7


def test_a_pack_keeps_at_least_one_trial_and_at_most_the_maximum() -> None:
    assert auto_capacity(2 * GB, 84 * GB, active=1, total_bytes=85 * GB, current=1) == 1
    assert auto_capacity(2 * GB, int(2.1 * GB), active=16, total_bytes=85 * GB, current=16) == AUTO_MAX


def test_a_joined_step_over_its_token_budget_runs_as_groups_of_whole_trials() -> None:
    # Joined, a group costs (trials x its widest trial's tokens).
    assert split_trials([100, 300, 200, 250], budget=600) == [range(2), range(2, 4)]
    assert split_trials([100, 300, 200, 250], budget=1200) == [range(4)]
    assert split_trials([100, 300, 200, 250], budget=None) == [range(4)]


def test_a_trial_wider_than_the_budget_still_runs_alone() -> None:
    assert split_trials([900, 100, 100], budget=500) == [range(1), range(1, 3)]


def test_rows_of_very_different_lengths_are_cut_where_padding_costs_more_than_a_forward() -> None:
    lengths = [400, 90] * 8  # 8 short and 8 long rows, interleaved as trials hand them in
    chunks = plan_chunks(lengths, cut_cost_tokens=1000)
    assert chunks is not None and [sorted(lengths[i] for i in chunk) for chunk in chunks] == [
        [90] * 8,
        [400] * 8,
    ]
    assert sorted(i for chunk in chunks for i in chunk) == list(range(16))


def test_rows_stay_one_batch_when_a_cut_saves_less_than_it_costs() -> None:
    # A cut saves 8 x 310 padded tokens here.
    assert plan_chunks([400, 90] * 8, cut_cost_tokens=8 * 310 + 1) is None
    assert plan_chunks([200] * 32, cut_cost_tokens=0) is None


def test_a_pack_of_six_trials_of_mixed_lengths_stays_one_chunk_at_the_measured_cut_cost() -> None:
    # Six trials x 16 rows of 100..400 tokens: on an H100 one chunk took 0.60 s a step, cut in two 0.79 s.
    lengths = [100 + (i * 37) % 301 for i in range(96)]
    assert plan_chunks(lengths, CUT_COST_TOKENS) is None
    assert plan_parts([lengths[i : i + 16] for i in range(0, 96, 16)], CUT_COST_TOKENS) is None


def test_equal_micro_batches_are_cut_into_length_parts_that_keep_one_run_per_trial() -> None:
    # Two trials (rows 0-3 and 4-7), two short and two long rows each: halves of the short rows of
    # both trials (4 x 100 tokens), then of the long ones (4 x 410), save 1240 tokens of padding.
    lengths = [[400, 90, 410, 80], [100, 390, 95, 405]]
    assert plan_parts(lengths, cut_cost_tokens=500) == [[3, 1, 6, 4], [0, 2, 5, 7]]


def test_a_micro_batch_stays_whole_when_cutting_it_saves_less_than_a_forward_costs() -> None:
    assert plan_parts([[400, 90, 410, 80], [100, 390, 95, 405]], cut_cost_tokens=1300) is None


class FakePack:
    """A pack whose trials never end; `oom` packs run out of memory at every step."""

    oom = False

    def __init__(self, runner, capacity: int) -> None:
        self.capacity = capacity
        self.trials: list[int] = []
        # An exception being handled while the pack is built keeps its traceback's tensors alive.
        self.built_during = sys.exc_info()[1]
        self.closed = False
        self.advanced: list[int | None] = []

    def close(self) -> None:
        self.closed = True

    def active(self) -> list[int]:
        return list(self.trials)

    def add(self, params, output_dir, callbacks, number: int) -> None:
        self.trials.append(number)

    def advance(self, max_steps: int | None = None) -> list:
        self.advanced.append(max_steps)
        if self.oom:
            raise torch.OutOfMemoryError("a step of this pack does not fit")
        return []

    step_peak_mb: float | None = None

    def take_step_peak_mb(self) -> float | None:
        return self.step_peak_mb


@pytest.fixture
def make_executor(monkeypatch):
    """A `Packed` executor of a fixed `capacity` over `FakePack`s (`executor.fake_packs`)."""
    packs: list[FakePack] = []
    monkeypatch.setattr(
        "sweeps.executors.packed.PackedRunner",
        lambda runner, capacity: packs.append(FakePack(runner, capacity)) or packs[-1],
    )
    discarded: list[str] = []
    tracker = SimpleNamespace(
        monitor_system=lambda run_id: None,
        discard_pending=discarded.append,
        flush=lambda run_id: None,
        discarded=discarded,
    )
    host = SimpleNamespace(callbacks=lambda job, on_step: None, tracker=tracker)
    monkeypatch.setattr("sweeps.executors.packed.TrialHost", lambda config, store, runner: host)

    def make(capacity: int) -> Packed:
        executor = Packed(
            SimpleNamespace(), SimpleNamespace(), None, on_step=lambda *a: None, capacity=capacity
        )
        executor.fake_packs = packs
        executor.discarded = discarded
        return executor

    return make


def job(number: int) -> TrialJob:
    return TrialJob(
        number=number, trial_id=number, params=TrialParams(), run_id=f"run-{number}", work_dir="."
    )


def run_out_of_memory(executor: Packed, trials: int, monkeypatch) -> list:
    """Submit `trials` trials and wait once, every pack step running out of memory."""
    for number in range(trials):
        executor.submit(job(number))
    monkeypatch.setattr(FakePack, "oom", True)
    return executor.wait(timeout=1.0)


def test_a_pack_step_out_of_memory_halves_the_pack_and_every_trial_goes_on(make_executor, monkeypatch):
    executor = make_executor(8)
    events = run_out_of_memory(executor, 8, monkeypatch)
    assert events == []  # no trial failed: the pack was too big, not the trials
    first, second = executor.fake_packs
    assert first.closed and second.capacity == 4 and second.trials == [0, 1, 2, 3]
    assert [waiting.number for waiting in executor.waiting] == [4, 5, 6, 7]


def test_trials_a_pack_restarts_drop_their_unwritten_curve_and_count_the_restart(make_executor, monkeypatch):
    executor = make_executor(4)
    run_out_of_memory(executor, 4, monkeypatch)
    monkeypatch.setattr(FakePack, "oom", False)
    complete = TrialResult(status=TrialStatus.COMPLETE, objective=1.0)
    monkeypatch.setattr(FakePack, "advance", lambda pack, max_steps=None: [(0, complete), (1, complete)])

    events = executor.wait(timeout=1.0)

    assert executor.discarded == ["run-0", "run-1", "run-2", "run-3"]
    assert [event.result.metrics["pack_restarts"] for event in events] == [1.0, 1.0]


def test_the_smaller_pack_is_built_after_the_out_of_memory_error_is_released(make_executor, monkeypatch):
    # Built while the error is being handled, its traceback would still hold the failed step's
    # activations, and the new pack's first allocations would run out of memory again.
    executor = make_executor(8)
    run_out_of_memory(executor, 8, monkeypatch)
    assert executor.fake_packs[1].built_during is None


@pytest.fixture
def auto_on_a_gpu(make_executor, monkeypatch):
    """An `auto` executor that sees an 85 GB card, a 1 GB base and 4 trials' steps peaking at 22 GB."""
    executor = make_executor(capacity=None)
    weights = SimpleNamespace(numel=lambda: GB // 2, element_size=lambda: 2)  # a 1 GB bf16 base
    base = SimpleNamespace(parameters=lambda: [weights])
    executor.runner = SimpleNamespace(models=SimpleNamespace(base=lambda quantized: base))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 76 * GB)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=85 * GB)
    )
    monkeypatch.setattr(FakePack, "step_peak_mb", 22 * GB / 2**20)
    return executor


def test_an_auto_pack_grows_from_its_steps_peak_not_from_the_scoring_between_them(auto_on_a_gpu):
    # A generation objective sizes its batches to the free memory, so the card's overall peak says
    # "full" (76 GB here) whatever the pack; the steps of 4 trials peaked at 22 GB over a 1 GB base.
    executor = auto_on_a_gpu
    for number in range(4):
        executor.submit(job(number))
    executor.wait(timeout=1.0)
    # (22 - 1) / 4 = 5.25 GB a trial; 85% of 85 GB less the base holds 13, at most double: 8.
    assert executor.capacity == 8


def test_an_auto_pack_resizes_after_its_first_step_not_when_its_first_trials_end(auto_on_a_gpu):
    executor = auto_on_a_gpu
    for number in range(4):
        executor.submit(job(number))
    executor.wait(timeout=1.0)
    pack = executor.fake_packs[0]
    # One step, then back to the loop with room for 4 more while the first 4 are still training.
    assert pack.advanced == [1] and executor.capacity == 8 and pack.active() == [0, 1, 2, 3]


def test_a_pack_holding_more_trials_than_any_measured_step_probes_again_then_runs_on(auto_on_a_gpu):
    executor = auto_on_a_gpu
    for number in range(4):
        executor.submit(job(number))
    executor.wait(timeout=1.0)
    for number in range(4, 8):
        executor.submit(job(number))
    executor.wait(timeout=1.0)  # 8 trials: a size no step has measured yet
    executor.wait(timeout=1.0)  # 8 again: measured, so it runs until a trial ends
    assert executor.fake_packs[0].advanced == [1, 1, None]


def test_a_call_that_ran_no_step_leaves_the_size_unmeasured(auto_on_a_gpu, monkeypatch):
    executor = auto_on_a_gpu
    for number in range(4):
        executor.submit(job(number))
    monkeypatch.setattr(FakePack, "step_peak_mb", None)  # as when advance() returned failed adds
    executor.wait(timeout=1.0)
    monkeypatch.setattr(FakePack, "step_peak_mb", 22 * GB / 2**20)
    executor.wait(timeout=1.0)
    assert executor.fake_packs[0].advanced == [1, 1] and executor.capacity == 8


def test_a_pack_of_a_fixed_size_never_stops_early_to_measure(make_executor):
    executor = make_executor(4)
    for number in range(4):
        executor.submit(job(number))
    executor.wait(timeout=1.0)
    assert executor.fake_packs[0].advanced == [None]


def test_peak_memory_folded_for_a_part_of_the_work_still_counts_the_whole(monkeypatch):
    allocated = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: allocated.update(peak=0))
    memory = PeakMemory()
    memory.reset()
    allocated["peak"] = 60 * 2**20  # scoring
    memory.fold()
    allocated["peak"] = 20 * 2**20  # the step after it
    assert memory.recent_mb() == 20
    assert memory.peak_mb() == 60
    memory.reset()
    assert memory.peak_mb() == 0


def test_an_auto_pack_out_of_memory_past_a_size_that_ran_goes_back_to_that_size(auto_on_a_gpu, monkeypatch):
    executor = auto_on_a_gpu
    for number in range(4):
        executor.submit(job(number))
    executor.wait(timeout=1.0)  # 4 trials ran: the pack may grow to 8
    for number in range(4, 8):
        executor.submit(job(number))
    monkeypatch.setattr(FakePack, "step_peak_mb", 55 * GB / 2**20)
    executor.wait(timeout=1.0)  # 8 ran, peaking at 55 GB: (55 - 1) / 8 a trial, so 10 fit
    assert executor.capacity == 10
    for number in range(8, 10):
        executor.submit(job(number))
    monkeypatch.setattr(FakePack, "oom", True)
    executor.wait(timeout=1.0)  # ... but 10 did not

    assert executor.capacity == 8 and not executor.auto  # not 5: 8 ran, and it grows no more
    assert executor.fake_packs[1].capacity == 8 and executor.fake_packs[1].trials == list(range(8))
    assert [waiting.number for waiting in executor.waiting] == [8, 9]


def test_an_auto_pack_out_of_memory_at_a_size_that_ran_before_is_halved(auto_on_a_gpu, monkeypatch):
    executor = auto_on_a_gpu
    for number in range(4):
        executor.submit(job(number))
    executor.wait(timeout=1.0)
    monkeypatch.setattr(FakePack, "oom", True)  # a later step of the same 4 trials, longer rows
    executor.wait(timeout=1.0)
    assert executor.capacity == 2  # the 4 trials that ran out of memory, halved: no size is known to fit
