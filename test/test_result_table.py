"""Stage 5's plain-text table: ``format_table`` of a score dict, and the ``result.txt`` that
``speechllm.bin.score`` writes beside ``scores.json``, on hand-worked numbers."""

import json

import pytest

from speechllm.bin import score as score_bin
from speechllm.metrics import format_table


def prf(precision, recall, f1, tp, fp, fn):
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def test_format_table_of_a_small_score_dict():
    result = {"partial": prf(0.75, 0.6, 2 / 3, 3, 1, 2), "exact": prf(0.5, 0.4, 4 / 9, 2, 2, 3),
              "slu_f1": prf(0.123456, 0.98766, 0.5, 1, 1, 1), "span_f1": prf(0.0, 0.0, 0.0, 0, 4, 5),
              "n_utts": 3, "n_missing": 0, "n_unparseable": 2,
              "per_slot": {"amount": {"partial": prf(1.0, 0.5, 2 / 3, 1, 0, 1), "exact": prf(0, 0, 0, 0, 1, 2)},
                           "a_very_long_label_name_of_32_chr": {"partial": prf(0.5, 1.0, 2 / 3, 2, 2, 0),
                                                                "exact": prf(0, 0, 0, 0, 0, 0)}}}
    assert format_table(result) == (
        "metric           P       R      F1\n"
        "partial     0.7500  0.6000  0.6667\n"
        "exact       0.5000  0.4000  0.4444\n"
        "slu_f1      0.1235  0.9877  0.5000\n"
        "span_f1     0.0000  0.0000  0.0000\n"
        "utterances 3, missing 0, unparseable 2\n"
        "\n"
        "slot (partial)                         P       R      F1  n_ref\n"
        "amount                            1.0000  0.5000  0.6667      2\n"
        "a_very_long_label_name_of_32_chr  0.5000  1.0000  0.6667      2\n")  # per-slot rows in the dict's order
    assert format_table(result, "exp/x/decode_test_regular").startswith("exp/x/decode_test_regular\nmetric ")


# Four turns: u1 an exact amount and a partial frequency, u2 a name that matches exactly but not as SLURP's
# span (SLURP lower-cases the reference only), u3 without a hypothesis, u4 unparseable.
REFS = {"u1": {"amount": "30 dollars", "frequency": "monthly"}, "u2": {"name": "John Smith"},
        "u3": {"amount": "5"}, "u4": {"frequency": "weekly"}}
PROMPTS = {"u1": "<audio>\nFill the slots amount, frequency.",
           "u2": "Dialogue history:\n- I am John Smith.\nCurrent audio: <audio>\nFind the slots.",
           "u3": "<audio>\nFind the slots.", "u4": "<audio>\nFind the slots."}
HYPS = [{"id": "u1", "slots": {"amount": "30 dollars", "frequency": "monthly payment"}, "parseable": True},
        {"id": "u2", "slots": {"name": "John Smith"}, "parseable": True},
        {"id": "u4", "slots": {}, "parseable": False}]
GROUPS = {"u1": "seen", "u2": "seen", "u3": "unseen", "u4": "unseen"}

# By hand. Reference pairs 5, predicted 3.
#   partial: amount, frequency (contained, no number differs), name: TP 3, FP 0, FN 2 (u3, u4)
#   exact:   amount, name: TP 2, FP 1 ("monthly payment"), FN 3
#   span:    amount only ("john smith" != "John Smith"): TP 1, FP 2, FN 4
#   SLU-F1, word run (WER): amount 0, frequency 1 (one insertion), name 1 (two substitutions):
#            TP 3, FP 0+1+1 = 2, FN 2+1+1 = 4
#           char run (normalised Levenshtein): frequency 8/15 (8 insertions, 15 chars), name 2/10:
#            TP 3, FP 8/15+3/15 = 11/15, FN 2+11/15 = 41/15
#           both: TP 6, FP 41/15, FN 101/15 -> P 90/131, R 90/191, F1 12/(12+142/15) = 180/322
#   matches in the prompt: only u2's "John Smith": exact 1 of 2, partial 1 of 3
#   groups: seen (u1, u2) all 3 partial matches; unseen (u3, u4) FN 2 only
#   per slot (partial): amount TP 1 FN 1, frequency TP 1 FN 1, name TP 1
EXPECTED = {"partial": (1.0, 0.6, 0.75), "exact": (2 / 3, 0.4, 0.5), "span_f1": (1 / 3, 0.2, 0.25),
            "slu_f1": (90 / 131, 90 / 191, 180 / 322)}
TITLE = "exp/tiny_llama_regular/decode_test_regular"
TABLE = (f"{TITLE}\n"
         "metric           P       R      F1\n"
         "partial     1.0000  0.6000  0.7500\n"
         "exact       0.6667  0.4000  0.5000\n"
         "slu_f1      0.6870  0.4712  0.5590\n"
         "span_f1     0.3333  0.2000  0.2500\n"
         "utterances 4, missing 1, unparseable 1\n"
         "matches whose value is also in the prompt's text: exact 1 of 2, partial 1 of 3\n"
         "group seen: partial 1.0000 1.0000 1.0000 (2 utterances)\n"
         "group unseen: partial 0.0000 0.0000 0.0000 (2 utterances)\n"
         "\n"
         "slot (partial)                         P       R      F1  n_ref\n"
         "amount                            1.0000  0.5000  0.6667      2\n"
         "frequency                         1.0000  0.5000  0.6667      2\n"
         "name                              1.0000  1.0000  1.0000      1\n")


@pytest.mark.parametrize("truncated", [False, True], ids=["complete outputs", "two truncated"])
def test_result_txt_is_the_table_of_scores_json(tmp_path, monkeypatch, capsys, truncated):
    monkeypatch.setattr(score_bin, "setup_logging", lambda: None)
    ref = tmp_path / "dump" / "test" / "regular.jsonl"
    ref.parent.mkdir(parents=True)
    ref.write_text("".join(json.dumps({"id": u, "utt_id": u, "mode": "regular", "feats": None, "prompt": PROMPTS[u],
                                       "target": json.dumps(s), "slots": s, "text": ""}) + "\n"
                           for u, s in REFS.items()))
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text("".join(json.dumps({**h, "truncated": truncated and h["id"] != "u2"}) + "\n" for h in HYPS))
    (tmp_path / "utt2group").write_text("".join(f"{u} {g}\n" for u, g in GROUPS.items()))
    outdir = tmp_path / "score"
    score_bin.main(["--ref_jsonl", str(ref), "--hyp_jsonl", str(hyp), "--outdir", str(outdir), "--mode", "regular",
                    "--title", TITLE, "--utt2group", str(tmp_path / "utt2group"), "--allow_missing"])

    scores = json.loads((outdir / "scores.json").read_text())
    for metric, (p, r, f1) in EXPECTED.items():
        got = scores[metric]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f1), abs=1e-12), metric
    assert (scores["n_utts"], scores["n_missing"], scores["n_unparseable"], scores["n_truncated"]) == \
        (4, 1, 1, 2 if truncated else 0)
    truncation = ("truncated: 2 outputs hit decoding's cap on new tokens (raise --max_new_tokens of stage 4)\n"
                  if truncated else "")
    text = (outdir / "result.txt").read_text()
    assert text == TABLE + truncation
    assert text == format_table(scores, TITLE) + truncation  # the same table as scores.json
    assert capsys.readouterr().out == text  # and what the stage prints
