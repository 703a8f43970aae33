"""Scores on hand-worked examples (numbers computed by hand in the comments)."""

import math

import pytest

from speechllm.metrics import (SlotScorer, char_distance, normalize_value, partial_match, score_corpus,
                               slurp_distance_counts, word_distance)
from speechllm.parsing import parse_slots


def test_normalisation_folds_case_space_and_punctuation():
    assert normalize_value("  €30. ") == "30"
    assert normalize_value("Monthly  Payment!") == "monthly payment"


@pytest.mark.parametrize("ref,hyp,expected", [
    ("monthly", "monthly payment", True),   # contained word sequence
    ("30 euros", "€30", True),              # shared content word "30"
    ("the bank", "the card", False),        # only a stop word in common
    ("March 3rd", "April 4th", False),
    ("4 7 2 9", "4 7 2 9", True),
])
def test_partial_rule(ref, hyp, expected):
    assert partial_match(ref, hyp) is expected


def test_exact_and_partial_with_none_values():
    ref = {"payment_frequency": "monthly", "payment_amount": "€30", "new_limit": "None"}
    hyp = {"payment_frequency": "monthly payment", "payment_amount": "€30.", "new_limit": "None",
           "review_period": "None"}
    s = SlotScorer()
    s.add(ref, hyp)
    r = s.result()
    # 'None' never counts. exact: amount matches (30 == 30); frequency is 1 FP + 1 FN.
    assert (r["exact"]["tp"], r["exact"]["fp"], r["exact"]["fn"]) == (1, 1, 1)
    assert r["exact"]["f1"] == pytest.approx(0.5)
    # partial: "monthly payment" overlaps "monthly": both match.
    assert (r["partial"]["tp"], r["partial"]["fp"], r["partial"]["fn"]) == (2, 0, 0)
    assert r["partial"]["f1"] == 1.0
    assert r["per_slot"]["payment_frequency"]["exact"]["f1"] == 0.0
    assert r["per_slot"]["payment_frequency"]["partial"]["f1"] == 1.0


def test_missing_hypothesis_and_unparseable_output():
    refs = {"u1": {"a": "x", "b": "y"}, "u2": {"c": "z"}, "u3": {"d": "w"}}
    garbage = parse_slots("this is not a dict at all")
    assert not garbage.parseable and garbage.slots == {}
    hyps = {"u2": ({"c": "z"}, True), "u3": (garbage.slots, garbage.parseable)}  # u1 never decoded
    r = score_corpus(refs, hyps)
    assert r["n_utts"] == 3 and r["n_missing"] == 1 and r["n_unparseable"] == 1
    # one TP (u2), FN: 2 (u1, missing) + 1 (u3, unparseable)
    assert (r["exact"]["tp"], r["exact"]["fp"], r["exact"]["fn"]) == (1, 0, 3)
    assert r["exact"]["precision"] == 1.0 and r["exact"]["recall"] == pytest.approx(0.25)


def test_matches_in_prompt_separates_copied_values_from_heard_ones():
    from speechllm.metrics import matches_in_prompt

    refs = {"u1": {"monthly_fee": "130 dollars", "card_type": "None"},
            "u2": {"customer_name": "Lucas Campbell"},
            "u3": {"callback_number": "8 6 7 9"}}
    hyps = {"u1": ({"monthly_fee": "130 dollars", "card_type": "debit card"}, True),  # exact, in the context
            "u2": ({"customer_name": "Kevin Campbell"}, True),               # partial, heard
            "u3": ({"callback_number": "8 6 7 9"}, True)}                    # exact, heard ("8 6 7" is no copy)
    prompts = {"u1": "Previous turns:\n- The monthly fee is 130 dollars.\nCurrent turn: <audio>",
               "u2": "<audio> Slots?",
               "u3": "Previous turns:\n- Call 8 6 7.\nCurrent turn: <audio>"}
    assert matches_in_prompt(refs, hyps, prompts) == {"exact": {"matches": 2, "in_prompt": 1},
                                                      "partial": {"matches": 3, "in_prompt": 1}}


def test_in_text_ignores_how_a_value_is_written():
    from speechllm.metrics import in_text

    assert in_text("8 6 7 9 4 3 2", "Call me on 867-9432.")
    assert in_text("130 dollars", "The monthly fee is $130.")
    assert in_text("Family Share", "the plan name is family share")
    assert not in_text("151 euros", "1,300 dollars and the policy number in 497,07 euros.")
    assert not in_text("13", "1,300 dollars")  # whole numbers only


def test_slurp_distances():
    assert word_distance("march third", "march 3rd") == pytest.approx(0.5)
    assert word_distance("a", "a b c") == pytest.approx(2.0)  # not clipped
    # third -> 3rd: delete h, delete i, substitute t->3: 3 edits over max length 11
    assert char_distance("march third", "march 3rd") == pytest.approx(3 / 11)


def test_slurp_counting_worked_example():
    ref = [("date", "March third"), ("date", "june fifth"), ("time", "noon")]
    hyp = [("date", "june fifth"), ("place", "paris")]
    c = slurp_distance_counts(ref, hyp, word_distance)
    # "june fifth" takes the second date reference (distance 0): TP 1; "place" unknown: FP 1;
    # leftovers "march third" and "noon": FN 1 each.
    assert (c["date"].tp, c["date"].fp, c["date"].fn) == (1, 0, 1)
    assert (c["place"].tp, c["place"].fp) == (0, 1)
    assert c["time"].fn == 1


def test_slurp_ties_take_the_first_reference():
    ref = [("x", "ab"), ("x", "ac")]
    c = slurp_distance_counts(ref, [("x", "ad")], char_distance)
    # both references are at distance 1/2; the first is taken, "ac" is left over
    assert c["x"].tp == 1 and c["x"].fp == pytest.approx(0.5) and c["x"].fn == pytest.approx(1.5)


def test_slu_f1_sums_word_and_char_runs():
    s = SlotScorer()
    s.add({"date": "march third"}, {"date": "March 3rd"})
    r = s.result()["slu_f1"]
    # word run: TP 1, FP 0.5, FN 0.5; char run: TP 1, FP 3/11, FN 3/11 (prediction lower-cased)
    tp, fp = 2.0, 0.5 + 3 / 11
    assert r["tp"] == pytest.approx(tp) and r["fp"] == pytest.approx(fp) and r["fn"] == pytest.approx(fp)
    assert r["f1"] == pytest.approx(tp / (tp + fp))


def test_span_f1_is_a_multiset_match():
    s = SlotScorer()
    s.add({"a": "x", "b": "y"}, {"a": "x", "b": "Y"})
    r = s.result()["span_f1"]
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
    assert math.isclose(r["f1"], 0.5)
