"""How a pack sizes itself: how many trials an `auto` pack holds, and how a step's rows are cut."""

from __future__ import annotations

from runners.packed import plan_chunks
from sweeps.executors.packed import AUTO_MAX, auto_capacity

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


def test_rows_of_very_different_lengths_are_cut_where_padding_costs_more_than_a_forward() -> None:
    lengths = [400, 90] * 8  # 8 short and 8 long rows, interleaved as trials hand them in
    chunks = plan_chunks(lengths, cost_tokens=1000)
    assert chunks is not None and [sorted(lengths[i] for i in chunk) for chunk in chunks] == [
        [90] * 8,
        [400] * 8,
    ]
    assert sorted(i for chunk in chunks for i in chunk) == list(range(16))


def test_rows_stay_one_batch_when_a_cut_saves_less_than_it_costs() -> None:
    assert plan_chunks([400, 90] * 8, cost_tokens=8 * 310 + 1) is None
    assert plan_chunks([200] * 32, cost_tokens=0) is None
