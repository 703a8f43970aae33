"""Scores on hand-worked examples (the numbers are worked out by hand in the comments)."""

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from speechllm.metrics import (SlotScorer, char_distance, exact_match, in_text, matches_in_prompt,
                               normalize_value, partial_match, score_corpus, slurp_distance_counts,
                               word_distance)
from speechllm.parsing import parse_slots

REPO = Path(__file__).resolve().parents[1]

# (reference, hypothesis, exact TPs, partial TPs, why): every row is scored as one slot of one turn
# by score_corpus. docs/scoring.md shows this table and the README some of its rows (test_docs_tables_...).
TABLE = [
    ("$1,300", "$300", 0, 0, "a different amount: numbers are kept whole"),
    ("2.5%", "5%", 0, 0, "a different rate"),
    ("8 6 7 9 4 3 2", "5 5 5 1 2 3 4", 0, 0, "different digit strings (8679432, 5551234)"),
    ("John Smith", "John Doe", 0, 0, "a different person: a shared word is not enough"),
    ("10 am", "10 pm", 0, 0, "a different time"),
    ("30 dollars", "50 dollars", 0, 0, "a different amount: a shared unit is not enough"),
    ("thirty dollars", "$30", 1, 1, "number words become digits, `$30` reads 30 dollars"),
    ("monthly", "monthly payment", 0, 1, "contained, and no number differs"),
    ("30", "30 dollars", 0, 1, "contained, the same number"),
    ("€30", "$30", 0, 0, "a different currency"),
    ("$1,300.00", "1300 dollars", 1, 1, "thousands separator and zero cents"),
    ("five thousand", "5,000", 1, 1, "number words"),
    ("twenty-one", "21", 1, 1, "number words"),
    ("9 3 8 3 0", "93830", 1, 1, "a run of single digits is one number"),
    ("867-9432", "eight six seven nine four three two", 1, 1, "digit groups and spelled-out digits"),
    ("March third", "march 3rd", 1, 1, "ordinals: third, 3rd and 3 are one number"),
    ("March 3", "March 3 2024", 0, 0, "contained, but 2024 is a number the reference lacks"),
    ("10:00 a.m.", "10 am", 1, 1, "clock times, a.m."),
    ("ten thirty", "10:30", 1, 1, "clock times"),
    ("2.50%", "2.5 percent", 1, 1, "decimals and the percent sign"),
    ("497,07 euros", "497.07 euros", 1, 1, "a decimal comma"),
    ("Monthly Payment!", "monthly payment", 1, 1, "case and punctuation"),
    ("Lucas Campbell", "Kevin Campbell", 0, 0, "a different person"),
    ("Family Share plan", "family share", 0, 1, "contained"),
    ("the bank", "the", 0, 0, "the contained part holds no content word"),
    ("the 15th of October", "October 15", 0, 0, "word order is not normalised: a miss"),
    ("zero three two zero seven", "03207", 1, 1, "spelled-out digits with zeros"),
    ("$1.4 million", "one point four million dollars", 1, 1, "scale words fold into the number"),
    ("$5 million", "$5", 0, 0, "a different amount"),
    ("3-5 days", "35 days", 0, 0, "a short hyphenated group is a range, not a digit string"),
    (".5%", "5%", 0, 0, "a different rate"),
    ("5th Street", "5th", 0, 1, "contained"),
    ("5th Street", "5th Avenue", 0, 0, "a different street"),
    (["checking", "savings"], ["savings account", "checking"], 1, 2, "two values: each pair counts, in any order"),
    (["monthly", "monthly payment"], ["monthly payment", "monthly fee"], 1, 2,
     "a maximum matching: a greedy one would pair monthly payment with monthly and lose a match"),
    (["checking", "savings"], "checking", 1, 1, "one of two values found"),
]


def _counts(result: dict, metric: str) -> tuple[float, float, float]:
    return result[metric]["tp"], result[metric]["fp"], result[metric]["fn"]


@pytest.mark.parametrize("ref,hyp,exact,partial,why", TABLE, ids=[f"{r}|{h}" for r, h, *_ in TABLE])
def test_partial_and_exact_verdicts(ref, hyp, exact, partial, why):
    result = score_corpus({"u": {"x": ref}}, {"u": ({"x": hyp}, True)})
    n_ref, n_hyp = (len(v) if isinstance(v, list) else 1 for v in (ref, hyp))
    assert _counts(result, "exact") == (exact, n_hyp - exact, n_ref - exact)
    assert _counts(result, "partial") == (partial, n_hyp - partial, n_ref - partial)
    if not isinstance(ref, list):  # the match functions are symmetric
        assert (exact_match(ref, hyp), partial_match(ref, hyp)) == (bool(exact), bool(partial))
        assert (exact_match(hyp, ref), partial_match(hyp, ref)) == (bool(exact), bool(partial))


def _cell(text: str):
    text = text.strip().strip("`")
    return json.loads(text) if text.startswith("[") else text


def _table_rows(path: Path) -> list[tuple]:
    rows = re.findall(r"^\| (`.*?`) \| (`.*?`) \| (yes|no|\d of \d) \| (yes|no|\d of \d) \| (.*?) \|$",
                      path.read_text(encoding="utf-8"), re.MULTILINE)
    verdict = {"yes": 1, "no": 0}
    return [(_cell(r), _cell(h), verdict.get(e, e), verdict.get(p, p), why) for r, h, e, p, why in rows]


def test_docs_tables_are_the_tested_table():
    expected = []
    for ref, hyp, exact, partial, why in TABLE:
        n = len(ref) if isinstance(ref, list) else 1
        show = (lambda k: f"{k} of {n}") if isinstance(ref, list) else (lambda k: k)
        expected.append((ref, hyp, show(exact), show(partial), why))
    assert _table_rows(REPO / "docs" / "scoring.md") == expected
    readme = _table_rows(REPO / "README.md")
    assert len(readme) >= 5 and all(row in expected for row in readme)


def test_normalisation():
    assert normalize_value("  €30. ") == "30 euros"
    assert normalize_value("$1,300.50") == "1300.5 dollars"
    assert normalize_value("1.300.000") == "1300000"
    assert normalize_value("Monthly  Payment!") == "monthly payment"
    assert normalize_value("nine three eight three zero") == "93830"
    assert normalize_value("one o'clock") == "1 oclock"


@pytest.mark.parametrize("absent", [None, "None", "none", "null", "N/A", "NONE", "", "  "])
def test_absent_values_mean_no_value_in_references_and_hypotheses(absent):
    result = score_corpus({"u": {"a": absent, "b": "x"}}, {"u": ({"a": absent, "c": absent}, True)})
    # only the reference "b" counts: one FN; the absent values are neither FP nor FN
    assert _counts(result, "exact") == (0, 0, 1) and _counts(result, "slu_f1") == (0, 0, 2)
    assert set(result["per_slot"]) == {"b"}
    listed = score_corpus({"u": {"a": ["x", absent]}}, {"u": ({"a": [absent, "x"]}, True)})
    assert _counts(listed, "exact") == (1, 0, 0)


def test_exact_and_partial_with_none_values():
    ref = {"payment_frequency": "monthly", "payment_amount": "€30", "new_limit": "None"}
    hyp = {"payment_frequency": "monthly payment", "payment_amount": "€30.", "new_limit": "None",
           "review_period": "None"}
    s = SlotScorer()
    s.add(ref, hyp)
    r = s.result()
    # 'None' never counts. exact: amount matches (30 euros); frequency is 1 FP + 1 FN.
    assert _counts(r, "exact") == (1, 1, 1)
    assert r["exact"]["f1"] == pytest.approx(0.5)
    # partial: "monthly" is contained in "monthly payment": both match.
    assert _counts(r, "partial") == (2, 0, 0)
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
    assert _counts(r, "exact") == (1, 0, 3)
    assert r["exact"]["precision"] == 1.0 and r["exact"]["recall"] == pytest.approx(0.25)


def test_matches_in_prompt_separates_copied_values_from_heard_ones():
    refs = {"u1": {"monthly_fee": "130 dollars", "card_type": "None"},
            "u2": {"customer_name": "Lucas Campbell"},
            "u3": {"callback_number": "8 6 7 9"},
            "u4": {"account_type": ["checking", "savings"]}}
    hyps = {"u1": ({"monthly_fee": "$130", "card_type": "debit card"}, True),  # exact, in the context
            "u2": ({"customer_name": "Campbell"}, True),                      # partial, heard
            "u3": ({"callback_number": "8 6 7 9"}, True),                     # exact, heard ("8 6 7" is no copy)
            "u4": ({"account_type": ["savings", "checking"]}, True)}          # exact twice, one in the context
    prompts = {"u1": "Previous turns:\n- The monthly fee is 130 dollars.\nCurrent turn: <audio>",
               "u2": "<audio> Slots?",
               "u3": "Previous turns:\n- Call 8 6 7.\nCurrent turn: <audio>",
               "u4": "Previous turns:\n- Is that your savings?\nCurrent turn: <audio>"}
    assert matches_in_prompt(refs, hyps, prompts) == {"exact": {"matches": 4, "in_prompt": 2},
                                                      "partial": {"matches": 5, "in_prompt": 2}}


def test_in_text_ignores_how_a_value_is_written():
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
    ref = [("date", "march third"), ("date", "june fifth"), ("time", "noon")]
    hyp = [("date", "june fifth"), ("place", "paris")]
    c = slurp_distance_counts(ref, hyp, word_distance)
    # "june fifth" takes the second date reference (distance 0): TP 1; "place" unknown: FP 1;
    # leftovers "march third" and "noon": FN 1 each.
    assert (c["date"].tp, c["date"].fp, c["date"].fn) == (1, 0, 1)
    assert (c["place"].tp, c["place"].fp) == (0, 1)
    assert c["time"].fn == 1


def test_slurp_ties_take_the_first_reference():
    ref = [("x", "ab"), ("x", "ac")]
    c = slurp_distance_counts(ref, [("x", "ad"), ("x", "ac")], char_distance)
    # "ad" is at distance 1/2 from both; it takes the first, "ab", so "ac" then finds "ac" (0):
    # FP = FN = 1/2. Taking "ac" first would leave "ab" for "ac" (1/2): FP = FN = 1.
    assert c["x"].tp == 2 and c["x"].fp == pytest.approx(0.5) and c["x"].fn == pytest.approx(0.5)


def test_slurp_metrics_take_upper_case_predictions_as_they_are():
    """SLURP lower-cases the gold fillers only, so upper-case predictions pay for their case."""
    ref = {"date": "March Third", "city": "San Jose"}
    hyp = {"date": "March third", "city": "SAN JOSE", "time": "Noon"}
    r = score_corpus({"u": ref}, {"u": (hyp, True)})
    # gold becomes "march third", "san jose".
    # word run: "March third" vs "march third": WER 1/2 -> TP 1, FP 0.5, FN 0.5;
    #   "SAN JOSE" vs "san jose": WER 2/2 -> TP 1, FP 1, FN 1; "time" is no gold label -> FP 1.
    # char run: 1 substitution of 11 -> TP 1, FP 1/11, FN 1/11; 7 of 8 characters -> TP 1, FP 7/8, FN 7/8; FP 1.
    tp, fp, fn = 4.0, 2.5 + 1 / 11 + 7 / 8 + 1, 1.5 + 1 / 11 + 7 / 8
    assert _counts(r, "slu_f1") == pytest.approx((tp, fp, fn))
    p, rec = tp / (tp + fp), tp / (tp + fn)
    assert r["slu_f1"]["f1"] == pytest.approx(2 * p * rec / (p + rec))
    # span F1: exact string equality with the lower-cased gold: no prediction matches
    assert _counts(r, "span_f1") == (0, 3, 2)
    # lower-case predictions match; exact and partial ignore case either way
    lower = score_corpus({"u": ref}, {"u": ({k: v.lower() for k, v in hyp.items()}, True)})
    assert _counts(lower, "span_f1") == (2, 1, 0) and _counts(lower, "slu_f1") == (4, 2, 0)
    assert _counts(r, "exact") == _counts(lower, "exact") == (2, 1, 0)


def test_slurp_counts_every_value_of_a_repeated_label():
    r = score_corpus({"u": {"city": ["Napa", "Paris"]}}, {"u": ({"city": ["paris", "rome"]}, True)})
    # span: "paris" matches the gold "paris" (lower-cased); "rome": FP; "napa": FN
    assert _counts(r, "span_f1") == (1, 1, 1)
    # word run: "paris" takes "paris" (0), "rome" takes "napa" (1): TP 2, FP 1, FN 1;
    # char run: 0, then rome vs napa: 4 substitutions of 4 -> TP 2, FP 1, FN 1
    assert _counts(r, "slu_f1") == pytest.approx((4, 2, 2))


def test_span_f1_is_a_multiset_match():
    r = score_corpus({"u": {"a": "x", "b": "y"}}, {"u": ({"a": "x", "b": "Y"}, True)})["span_f1"]
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
    assert math.isclose(r["f1"], 0.5)


amounts = st.integers(min_value=0, max_value=10**9)
digit_strings = st.lists(st.integers(0, 9), min_size=2, max_size=12).map(lambda ds: " ".join(map(str, ds)))


@given(amounts)
def test_an_amount_however_written_is_one_value(n):
    assert exact_match(f"${n:,}", f"{n} dollars") and exact_match(f"{n:,}.00 USD", f"${n}")


@given(amounts, amounts)
def test_different_amounts_never_match(a, b):
    if a != b:
        assert not partial_match(f"${a:,}", f"${b:,}") and not partial_match(f"{a:,} dollars", f"{b} dollars")


@given(digit_strings, digit_strings)
def test_digit_strings_match_only_when_equal(a, b):
    assert exact_match(a, a.replace(" ", "")) and partial_match(a, a.replace(" ", ""))
    assert partial_match(a, b) == (a == b)


values = st.text(alphabet=st.sampled_from("abcxyz 0123456789$€%.,:-'"), max_size=20) | st.sampled_from(
    [v for row in TABLE for v in row[:2] if isinstance(v, str)])


@given(values)
def test_normalisation_is_idempotent(value):
    assert normalize_value(normalize_value(value)) == normalize_value(value)


def test_score_files_reads_list_values(tmp_path):
    from speechllm.bin.score import score_files

    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"id": "u", "utt_id": "u", "feats": None, "prompt": "", "target": "",
                               "slots": {"account_type": ["checking", "savings"]}}) + "\n")
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text(json.dumps({"id": "u", "slots": {"account_type": ["Savings", "loan"]}}) + "\n")
    result = score_files(ref, hyp)
    assert _counts(result, "exact") == (1, 1, 1) and _counts(result, "span_f1") == (0, 2, 2)
