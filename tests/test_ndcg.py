"""Tests for objectives.ndcg: ranking parsing and NDCG with 2**rel - 1 gains."""

import pytest

from objectives.ndcg import ndcg, parse_ranking, score_rankings

# Candidates A..F (indices 0..5). Gains 2**rel - 1 = [7, 3, 7, 0, 1, 3].
RELEVANCES = [3.0, 2.0, 3.0, 0.0, 1.0, 2.0]
# Discounts 1 / log2(i + 1) for positions i = 1..6:
#   1, 0.630930, 0.5, 0.430677, 0.386853, 0.356207
# Ideal order has relevances [3, 3, 2, 2, 1, 0], gains [7, 7, 3, 3, 1, 0]:
#   IDCG = 7 + 7*0.630930 + 3*0.5 + 3*0.430677 + 1*0.386853 + 0*0.356207
#        = 7 + 4.416508 + 1.5 + 1.292030 + 0.386853 = 14.595391
IDCG = 14.595391


def test_perfect_ranking_scores_one() -> None:
    # C, A, F, B, E, D has relevances 3, 3, 2, 2, 1, 0: the ideal order.
    assert ndcg([2, 0, 5, 1, 4, 3], RELEVANCES) == pytest.approx(1.0)


def test_given_order_matches_hand_computed_value() -> None:
    # A..F in order, gains [7, 3, 7, 0, 1, 3]:
    #   DCG = 7 + 3*0.630930 + 7*0.5 + 0*0.430677 + 1*0.386853 + 3*0.356207
    #       = 7 + 1.892789 + 3.5 + 0 + 0.386853 + 1.068622 = 13.848264
    #   NDCG = 13.848264 / 14.595391 = 0.948811
    assert ndcg([0, 1, 2, 3, 4, 5], RELEVANCES) == pytest.approx(13.848264 / IDCG, abs=1e-6)
    assert ndcg([0, 1, 2, 3, 4, 5], RELEVANCES) == pytest.approx(0.948811, abs=1e-6)


def test_reversed_order_matches_hand_computed_value() -> None:
    # F..A, gains [3, 1, 0, 7, 3, 7]:
    #   DCG = 3 + 1*0.630930 + 0*0.5 + 7*0.430677 + 3*0.386853 + 7*0.356207
    #       = 3 + 0.630930 + 0 + 3.014736 + 1.160558 + 2.493450 = 10.299674
    #   NDCG = 10.299674 / 14.595391 = 0.705680
    assert ndcg([5, 4, 3, 2, 1, 0], RELEVANCES) == pytest.approx(0.705680, abs=1e-6)


def test_cutoff_k_truncates_both_dcg_and_idcg() -> None:
    # k = 3, A, B, C: DCG@3 = 7 + 3*0.630930 + 7*0.5 = 12.392789
    # IDCG@3 = 7 + 7*0.630930 + 3*0.5 = 12.916508; NDCG@3 = 0.959454
    assert ndcg([0, 1, 2, 3, 4, 5], RELEVANCES, k=3) == pytest.approx(0.959454, abs=1e-6)


def test_candidates_missing_from_ranking_contribute_nothing() -> None:
    # Only C, E: DCG = 7 + 1*0.630930 = 7.630930; NDCG = 7.630930 / 14.595391 = 0.522831
    assert ndcg([2, 4], RELEVANCES) == pytest.approx(0.522831, abs=1e-6)


def test_zero_idcg_scores_zero() -> None:
    assert ndcg([1, 0, 2], [0.0, 0.0, 0.0]) == 0.0


def test_ndcg_rejects_repeated_candidate() -> None:
    with pytest.raises(ValueError, match="repeats"):
        ndcg([0, 0], RELEVANCES)


def test_ndcg_rejects_candidate_outside_relevances() -> None:
    with pytest.raises(ValueError, match="outside"):
        ndcg([0, 6], RELEVANCES)


def test_parse_comma_separated_letters() -> None:
    assert parse_ranking("C, E, D, A, B", 5) == [2, 4, 3, 0, 1]


def test_parse_lowercase_letters() -> None:
    assert parse_ranking("c, e, d, a, b", 5) == [2, 4, 3, 0, 1]


def test_parse_one_based_numbers() -> None:
    assert parse_ranking("3,5,4,1,2", 5) == [2, 4, 3, 0, 1]


def test_parse_ignores_label_before_arrow_list() -> None:
    # "Ranking" is a word, not the lone letter that a candidate id must be.
    assert parse_ranking("Ranking: C > E > D", 5) == [2, 4, 3]


def test_parse_tolerates_text_and_brackets_around_numbers() -> None:
    # The "5" of "top 5" is a list of its own, shorter than the bracketed one.
    assert parse_ranking("Here is my top 5:\n[3, 5, 4, 1, 2]\nHope it helps.", 5) == [
        2,
        4,
        3,
        0,
        1,
    ]


def test_parse_prefers_longest_list_over_stray_letter() -> None:
    # "I" is a lone letter naming candidate 8, but the later list keeps more ids.
    assert parse_ranking("I would rank them C, E, D, A, B", 10) == [2, 4, 3, 0, 1]


def test_parse_ties_go_to_earliest_list() -> None:
    # Three lists: "B > A", "A > B", "C"; the first two tie.
    assert parse_ranking("B > A, or A > B, or C", 3) == [1, 0]


def test_parse_accepts_and_then_between_ids() -> None:
    assert parse_ranking("C, then E, D, A and B", 5) == [2, 4, 3, 0, 1]


def test_parse_strips_numbered_list_positions() -> None:
    assert parse_ranking("1. C\n2. E\n3. D", 5) == [2, 4, 3]


def test_parse_drops_repeated_ids_keeping_first() -> None:
    assert parse_ranking("C, E, C, D, E", 5) == [2, 4, 3]


def test_parse_drops_unknown_letters() -> None:
    # With 5 candidates only A..E exist.
    assert parse_ranking("C, F, E, Z, D", 5) == [2, 4, 3]


def test_parse_drops_out_of_range_numbers() -> None:
    # Numbers are 1-based: 0 and 6 name no candidate among 5.
    assert parse_ranking("3, 0, 5, 6, 4", 5) == [2, 4, 3]


def test_parse_returns_none_without_ids() -> None:
    assert parse_ranking("I cannot rank these products.", 5) is None


def test_parse_returns_none_when_every_id_is_unknown() -> None:
    assert parse_ranking("7, 8, 9", 5) is None


def test_parse_rejects_zero_candidates() -> None:
    with pytest.raises(ValueError, match="n_candidates"):
        parse_ranking("A", 0)


def test_score_rankings_counts_unparseable_as_zero_and_failure() -> None:
    score = score_rankings(
        ["C, A, F, B, E, D", "no idea"],
        [RELEVANCES, RELEVANCES],
    )
    assert score.parse_failures == 1
    assert score.per_item == pytest.approx((1.0, 0.0))
    assert score.ndcg == pytest.approx(0.5)


def test_score_rankings_averages_per_item_scores() -> None:
    # Item 1 (relevances 2, 1, 0 in order) is perfect; item 2 is F..A reversed (0.705680, see above).
    score = score_rankings(["3 2 1", "6,5,4,3,2,1"], [[0.0, 1.0, 2.0], RELEVANCES])
    assert score.per_item == pytest.approx((1.0, 0.705680), abs=1e-6)
    assert score.ndcg == pytest.approx((1.0 + 0.705680) / 2, abs=1e-6)
    assert score.parse_failures == 0


def test_score_rankings_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="relevance lists"):
        score_rankings(["A"], [])


def test_score_rankings_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty"):
        score_rankings([], [])
