"""Tests for objectives.ndcg: the lenient parser, the KDD Cup 2024 parser and scorer rule by rule
(hand-computed values), and counting the candidates a prompt lists."""

import pytest

from objectives.ndcg import (
    Kdd2024Answer,
    kdd2024_ndcg,
    listed_candidates,
    ndcg,
    parse_kdd2024,
    parse_ranking,
    score_rankings,
)

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


# --- parser kdd2024: the competition's rule -------------------------------------------------------
# Five candidates numbered 1..5 with relevances [3, 2, 0, 1, 0]: gains 2**rel - 1 = [7, 3, 0, 1, 0].
# Discounts 1 / log2(i + 1) for positions 1..5: 1, 0.630930, 0.5, 0.430677, 0.386853.
# IDCG (gains sorted: 7, 3, 1, 0, 0) = 7 + 3*0.630930 + 1*0.5 = 9.392789.
KDD_RELEVANCES = [3.0, 2.0, 0.0, 1.0, 0.0]
# One of the KDD Cup 2024 development rows (task12) of the issue: relevances in listed order.
KDD_ROW_RELEVANCES = [1.0, 0.01, 0.1, 1.0, 0.0]


def kdd_score(answer: str, relevances: list[float] = KDD_RELEVANCES) -> float:
    return kdd2024_ndcg(parse_kdd2024(answer, 5).ranking, relevances)


def test_kdd2024_comma_separated_numbers_score_in_listed_order() -> None:
    # 1,2,3,4,5: gains 7, 3, 0, 1, 0 -> DCG = 7 + 1.892789 + 0 + 0.430677 = 9.323466; / 9.392789
    assert parse_kdd2024("1,2,3,4,5") == Kdd2024Answer((1, 2, 3, 4, 5))
    assert kdd_score("1,2,3,4,5") == pytest.approx(0.992620, abs=1e-6)


def test_kdd2024_numbers_separated_by_spaces_only_are_one_unparseable_piece() -> None:
    # "1 2 3 4 5" has no comma: one piece, which int() rejects, so nothing is kept.
    assert parse_kdd2024("1 2 3 4 5") == Kdd2024Answer((), "parse_failure")
    assert kdd_score("1 2 3 4 5") == 0.0


def test_kdd2024_a_repeated_number_empties_the_answer() -> None:
    assert parse_kdd2024("1,1,2,3,4") == Kdd2024Answer((), "repeats")
    assert kdd_score("1,1,2,3,4") == 0.0


def test_kdd2024_issue_examples_score_zero_where_lenient_scores_088() -> None:
    # The issue's row: lenient reads "1 2 3 4 5" as 1..5 (and "1,1,2,3,4" as 1, 2, 3, 4, the repeat
    # dropped); the official rule rejects both.
    # Lenient "1 2 3 4 5": gains 1, 0.006956, 0.071773, 1, 0 -> DCG 1.470952; IDCG 1.669812.
    lenient = score_rankings(["1 2 3 4 5"], [KDD_ROW_RELEVANCES], parser="lenient")
    assert lenient.ndcg == pytest.approx(0.880909, abs=1e-6)
    official = score_rankings(["1 2 3 4 5", "1,1,2,3,4"], [KDD_ROW_RELEVANCES] * 2, parser="kdd2024")
    assert official.per_item == (0.0, 0.0)


def test_kdd2024_numbers_above_the_candidate_count_are_skipped() -> None:
    # 6 is dropped, leaving 2, 1: gains 3, 7 -> DCG = 3 + 7*0.630930 = 7.416508; / 9.392789
    assert parse_kdd2024("6,2,1") == Kdd2024Answer((2, 1))
    assert kdd_score("6,2,1") == pytest.approx(0.789596, abs=1e-6)


def test_kdd2024_candidate_count_comes_from_the_row() -> None:
    # With 6 candidates, 6 is kept.
    assert parse_kdd2024("6,2,1", n_candidates=6) == Kdd2024Answer((6, 2, 1))


def test_kdd2024_words_around_the_numbers_are_removed() -> None:
    # Letters go, spaces stay: "I rank 2 first, then 1" -> "  2 ,  1" -> pieces "  2 ", "  1".
    assert parse_kdd2024("I rank 2 first, then 1") == Kdd2024Answer((2, 1))
    assert kdd_score("Ranking: [2, 1].") == pytest.approx(0.789596, abs=1e-6)


def test_kdd2024_a_number_in_the_surrounding_text_joins_the_first_piece() -> None:
    # "Top 5: 2, 1" -> " 5 2, 1": the piece " 5 2" is not an integer, so only 1 is kept.
    assert parse_kdd2024("Top 5: 2, 1") == Kdd2024Answer((1,))


def test_kdd2024_letters_are_no_answer() -> None:
    assert parse_kdd2024("C, A, B") == Kdd2024Answer((), "parse_failure")


def test_kdd2024_empty_answer_scores_zero() -> None:
    assert parse_kdd2024("") == Kdd2024Answer((), "parse_failure")
    assert kdd2024_ndcg((), KDD_RELEVANCES) == 0.0


def test_kdd2024_short_answer_scores_only_its_positions() -> None:
    # Just 1: DCG = 7; 7 / 9.392789
    assert kdd_score("1") == pytest.approx(0.745253, abs=1e-6)


def test_kdd2024_only_the_first_five_kept_numbers_count() -> None:
    # 2,1,4,3,5 are kept; the sixth number (a repeat of 1) is past the cut, so no repeat.
    # Gains 3, 7, 1, 0, 0 -> DCG = 3 + 4.416508 + 0.5 = 7.916508; / 9.392789
    assert parse_kdd2024("2,1,4,3,5,1") == Kdd2024Answer((2, 1, 4, 3, 5))
    assert kdd_score("2,1,4,3,5,1") == pytest.approx(0.842828, abs=1e-6)


def test_kdd2024_positions_beyond_the_relevance_list_are_trimmed() -> None:
    # Relevances [1, 0]: 2, 3, 1 is cut to 2, 3 (gains 0 and 0: 3 is past the list); untrimmed,
    # candidate 1 at position 3 would add 1 * 0.5.
    assert kdd2024_ndcg((2, 3, 1), [1.0, 0.0]) == 0.0


def test_kdd2024_a_number_past_the_relevance_list_has_gain_zero() -> None:
    # Relevances [0, 1]: 3 has no relevance (gain 0) at position 1, 2 has gain 1 at position 2.
    # DCG = 0.630930; IDCG = 1.
    assert kdd2024_ndcg((3, 2), [0.0, 1.0]) == pytest.approx(0.630930, abs=1e-6)


def test_kdd2024_zero_reads_the_last_candidate_as_the_official_code_does() -> None:
    # Relevances [3, 2, 0, 1, 2]: gains [7, 3, 0, 1, 3]; IDCG = 7 + 3*0.630930 + 3*0.5 + 1*0.430677
    # = 10.823466. "0" scores the last candidate's gain 3: 3 / 10.823466.
    relevances = [3.0, 2.0, 0.0, 1.0, 2.0]
    assert parse_kdd2024("0") == Kdd2024Answer((0,))
    assert kdd_score("0", relevances) == pytest.approx(0.277176, abs=1e-6)
    # 5 and 0 are different numbers for the repeat rule, so the last candidate counts twice:
    # (3 + 3*0.630930) / 10.823466.
    assert kdd_score("5,0", relevances) == pytest.approx(0.452054, abs=1e-6)


def test_kdd2024_all_zero_relevances_score_zero() -> None:
    assert kdd_score("1,2,3,4,5", [0.0] * 5) == 0.0


def test_kdd2024_rejects_zero_candidates() -> None:
    with pytest.raises(ValueError, match="n_candidates"):
        parse_kdd2024("1", 0)


def test_score_rankings_kdd2024_counts_each_rule_rejection() -> None:
    score = score_rankings(
        ["1,2,3,4,5", "1 2 3 4 5", "1,1,2", "no idea"], [KDD_RELEVANCES] * 4, parser="kdd2024"
    )
    assert score.parse_failures == 2
    assert score.repeats == 1
    assert score.per_item == pytest.approx((0.992620, 0.0, 0.0, 0.0), abs=1e-6)


def test_score_rankings_kdd2024_takes_each_items_candidate_count() -> None:
    # Item 1 lists 6 candidates, so its "6" is kept (gain of relevance 1 = 1, IDCG 1): NDCG 1.
    score = score_rankings(["6"], [[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], parser="kdd2024", n_candidates=[6])
    assert score.per_item == (1.0,)
    skipped = score_rankings(["6"], [[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], parser="kdd2024", n_candidates=[5])
    assert skipped.parse_failures == 1


# --- candidates listed in a prompt ------------------------------------------------------------------
KDD_PROMPT = (
    "A user has made a query with keyword 'blue shampoo aveda'. Given the following numbered list of 5 "
    "products, please rank the products according their relevance with the query. \nProduct List: \n"
    "1. Organic Blue Mallow Flowers\n2. Aveda Clove Shampoo, 33.8 Oz\n3. 2 New Aveda Bottle Pumps\n"
    "4. Joico Color Balance Blue Shampoo\n5. AVEDA by Aveda: Blue Malva Color Shampoo 33.8 OZ\n"
    "You should output a permutation of 1 to 5. There should be a comma separating two numbers.\nOutput: "
)


def test_listed_candidates_counts_the_numbered_product_lines_of_a_kdd_prompt() -> None:
    listed = listed_candidates(KDD_PROMPT)
    assert (listed.count, listed.kind) == (5, "number")


def test_listed_candidates_counts_lettered_lines() -> None:
    listed = listed_candidates("Rank for 'tea':\n(A) green tea\n(B) mug\n(C) kettle")
    assert (listed.count, listed.kind) == (3, "letter")


def test_listed_candidates_prefers_the_longest_run_over_numbered_instructions() -> None:
    prompt = "Steps:\n1. read\n2. rank\nProducts:\n1) a\n2) b\n3) c\n4) d"
    assert listed_candidates(prompt).count == 4


def test_listed_candidates_is_none_for_candidates_on_one_line() -> None:
    assert listed_candidates("Rank A: tea, B: coffee, C: mug for 'tea'.") is None
