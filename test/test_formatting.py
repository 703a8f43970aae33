"""Stage-2 sampling: context sizes, distractor counts, the 40 templates, targets and hybrid tags."""

import json
import re
from collections import Counter
from random import Random

import pytest

from speechllm import prompts
from speechllm.formatting import build_examples, draw_prompt, reasoning_target, regular_target
from speechllm.io_utils import InputError
from speechllm.parsing import parse_slots

INVENTORY = [f"label_{i}" for i in range(30)]


def test_context_sizes_and_distractor_counts_cover_their_ranges():
    contexts, distractors, templates = Counter(), Counter(), set()
    history = ["turn one", "turn two", "turn three", "turn four"]
    for i in range(3000):
        rng = Random(i)
        n_hist = i % 5  # 0..4 previous turns available
        gold = {"label_1": "x"} if i % 2 else {}
        draw = draw_prompt(rng, history[:n_hist], gold, INVENTORY, query_prob=0.5)
        n_ctx = draw.prompt.count("\n- ") + draw.prompt.startswith("- ")
        assert n_ctx <= min(3, n_hist)
        contexts[n_ctx] += 1
        if draw.queried is not None:
            assert set(gold) <= set(draw.queried)
            distractors[len(draw.queried) - len(gold)] += 1
        for case, options in prompts.TEMPLATES.items():
            for k, template in enumerate(options):
                pattern = re.escape(template).replace(re.escape("{audio}"), re.escape(prompts.AUDIO))
                pattern = pattern.replace(re.escape("{context}"), "(?s:.*)").replace(re.escape("{labels}"), ".*")
                if re.fullmatch(pattern, draw.prompt):
                    templates.add((case, k))
    assert set(contexts) == {0, 1, 2, 3}
    assert set(distractors) == {1, 2, 3, 4, 5}
    assert len(templates) == 40


def test_targets_list_every_queried_label():
    queried = ("new_limit", "payment_amount", "review_period")
    gold = {"payment_amount": "€30"}
    assert json.loads(regular_target(gold, queried)) == {"new_limit": "None", "payment_amount": "€30",
                                                         "review_period": "None"}
    assert json.loads(regular_target(gold, None)) == {"payment_amount": "€30"}
    reasoning = reasoning_target("I pay €30 a month.", gold, queried, {"payment_amount": "amount of a payment"})
    assert reasoning.startswith("<thinking>\nI hear the utterance in the audio clip is \"I pay €30 a month.\"")
    assert "mentions in the utterance are €30." in reasoning
    assert "The labels queried for are new_limit, payment_amount, review_period." in reasoning
    assert "payment_amount (amount of a payment)" in reasoning and "The others are all 'None'." in reasoning
    assert parse_slots(reasoning).slots == json.loads(regular_target(gold, queried))


def test_a_label_with_several_values_is_a_list_in_both_targets():
    gold = {"account_type": ["checking", "savings"], "amount": "$40"}
    regular = regular_target(gold, ("amount", "account_type", "new_limit"))
    assert json.loads(regular) == {"amount": "$40", "account_type": ["checking", "savings"], "new_limit": "None"}
    reasoning = reasoning_target("Move $40 from checking to savings.", gold, None, {"account_type": "an account"})
    assert "mentions in the utterance are checking | savings | $40." in reasoning
    assert '"checking" and "savings" are the account_type (an account); "$40" is the amount' in reasoning
    assert parse_slots(reasoning).slots == gold


def test_absent_values_never_reach_a_target(tmp_path):
    data, dump, utts = _data_dir(tmp_path)
    slots = {"a": ["x", "None", ""], "b": "N/A", "c": None}
    (data / "slots.jsonl").write_text("".join(json.dumps({"utt_id": u, "slots": slots}) + "\n" for u in utts))
    for row in build_examples(data, dump, query_prob=0.0)["regular"]:
        assert row["slots"] == {"a": "x"} and json.loads(row["target"]) == {"a": "x"}


def _data_dir(tmp_path):
    data, dump = tmp_path / "data", tmp_path / "dump"
    data.mkdir()
    dump.mkdir()
    utts = [f"c1_{'agent' if t % 2 == 0 else 'customer'}_{t:03d}" for t in range(6)]
    (data / "text").write_text("".join(f"{u} text of turn {i}\n" for i, u in enumerate(utts)))
    (data / "utt2conv").write_text("".join(f"{u} c1\n" for u in utts))
    (data / "utt2turn").write_text("".join(f"{u} {i}\n" for i, u in enumerate(utts)))
    (data / "slots.jsonl").write_text("".join(json.dumps({"utt_id": u, "slots": {"a": "turn"} if i % 2 else {}})
                                              + "\n" for i, u in enumerate(utts)))
    (data / "slot_inventory.json").write_text(json.dumps({"a": "desc a", "b": "desc b", "c": "desc c"}))
    (dump / "feats.scp").write_text("".join(f"{u} feats.ark:{i}\n" for i, u in enumerate(utts)))
    (dump / "text_asr").write_text("".join(f"{u} asr of turn {i}\n" for i, u in enumerate(utts)))
    return data, dump, utts


def test_build_examples_is_seeded_and_modes_share_prompts(tmp_path):
    data, dump, utts = _data_dir(tmp_path)
    a = build_examples(data, dump, seed=3)
    b = build_examples(data, dump, seed=3)
    assert a == b
    assert a != build_examples(data, dump, seed=4)
    assert len(a["regular"]) == len(a["reasoning"]) == len(utts) and len(a["hybrid"]) == 2 * len(utts)
    for reg, rea in zip(a["regular"], a["reasoning"]):
        assert reg["prompt"] == rea["prompt"] and reg["slots"] == rea["slots"]
        assert "asr of turn" in reg["prompt"] or "- " not in reg["prompt"]  # context from ASR
    tags = Counter(row["prompt"].rsplit(" ", 1)[1] for row in a["hybrid"])
    assert tags == {prompts.THINK: len(utts), prompts.NO_THINK: len(utts)}
    for row in a["hybrid"]:
        assert row["target"].startswith("<thinking>") == row["prompt"].endswith(prompts.THINK)


def test_context_comes_from_previous_turns_only(tmp_path):
    data, dump, utts = _data_dir(tmp_path)
    rows = build_examples(data, dump, seed=1, context_source="reference")["regular"]
    for row in rows:
        i = int(row["utt_id"].rsplit("_", 1)[1])  # rows are in id order; this is the turn index
        mentioned = [int(m) for m in re.findall(r"- text of turn (\d+)", row["prompt"])]
        assert all(t < i for t in mentioned) and len(mentioned) <= 3
        assert mentioned == sorted(mentioned) and (not mentioned or mentioned[-1] == i - 1)


def test_cascade_rows_put_the_turns_transcript_in_the_audios_place(tmp_path):
    data, dump, utts = _data_dir(tmp_path)
    rows = build_examples(data, dump, seed=2)
    assert len(rows["cascade"]) == len(utts)
    for reg, casc in zip(rows["regular"], rows["cascade"]):
        i = int(reg["utt_id"].rsplit("_", 1)[1])
        assert casc["prompt"] == reg["prompt"].replace(prompts.AUDIO, f'(transcript) "asr of turn {i}"')
        assert prompts.AUDIO not in casc["prompt"] and casc["feats"] is None and casc["mode"] == "cascade"
        assert casc["target"] == reg["target"] and casc["slots"] == reg["slots"]

    (dump / "text_asr").unlink()  # stage 1 with --asr false: no transcripts, so no cascade
    rows = build_examples(data, dump, seed=2, context_source="reference")
    assert "cascade" not in rows and len(rows["regular"]) == len(utts)


def test_a_slot_value_of_the_wrong_type_names_file_line_and_label(tmp_path):
    data, dump, utts = _data_dir(tmp_path)
    with open(data / "slots.jsonl", "a") as f:
        f.write(json.dumps({"utt_id": "x", "slots": {"amount": 30}}) + "\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(data / 'slots.jsonl'))}:7: the value of 'amount' must be"):
        build_examples(data, dump)


def test_targets_list_gold_labels_first_and_only_the_prompt_is_shuffled(tmp_path):
    gold = {"label_7": "x", "label_3": "y"}
    differ = 0
    for seed in range(40):
        figure3 = draw_prompt(Random(seed), [], gold, INVENTORY, 1.0)
        as_shown = draw_prompt(Random(seed), [], gold, INVENTORY, 1.0, label_order="prompt")
        assert figure3.prompt == as_shown.prompt  # the same draws: only the target's order differs
        assert ", ".join(as_shown.queried) in as_shown.prompt  # "prompt": the order the prompt lists
        assert figure3.queried[:2] == ("label_7", "label_3")  # gold first, in the reference's order
        assert sorted(figure3.queried) == sorted(as_shown.queried)
        differ += figure3.queried != as_shown.queried
    assert differ > 30  # the prompt's order is shuffled, the target's is not
    with pytest.raises(ValueError, match="label_order must be one of"):
        draw_prompt(Random(0), [], gold, INVENTORY, 1.0, label_order="sorted")
    # in the rows: the regular JSON, the trace's label list and the reasoning answer follow that order
    data, dump, utts = _data_dir(tmp_path)
    rows = build_examples(data, dump, query_prob=1.0)
    for reg, rea in zip(rows["regular"], rows["reasoning"]):
        queried = list(reg["queried"])
        filled = [k for k, v in reg["slots"].items() if v != "None"]
        assert queried[: len(filled)] == filled and len(queried) > len(filled)
        assert list(json.loads(reg["target"])) == queried
        assert f"The labels queried for are {', '.join(reg['queried'])}." in rea["target"]
        assert list(parse_slots(rea["target"]).slots) == queried


def test_distractors_come_from_the_turn_s_domain_at_the_share_asked_and_never_rename_a_gold_slot():
    own = {f"label_{i}" for i in range(10)}  # the turn's domain; label_10 ... label_29 are the others'
    gold = {"label_1": "x"}
    synonyms = {"label_2", "label_15"}  # other names of label_1's concept
    for share in (0.0, 0.5, 0.8, 1.0):
        drawn = [label for seed in range(600)
                 for label in draw_prompt(Random(seed), [], gold, INVENTORY, 1.0, exclude=synonyms, own_domain=own,
                                          own_share=share).queried[1:]]
        assert not set(drawn) & (synonyms | set(gold))
        observed = sum(label in own for label in drawn) / len(drawn)
        assert abs(observed - share) < 0.05, (share, observed)


def test_stage2_counts_the_own_domain_share_and_reads_both_inventory_forms(tmp_path, caplog):
    data, dump, utts = _data_dir(tmp_path)
    (data / "slot_inventory.json").write_text(json.dumps({
        "a": {"description": "desc a", "domains": ["retail"], "concept": "a"},
        "a_other_name": {"description": "desc a", "domains": ["retail"], "concept": "a"},
        "b": {"description": "desc b", "domains": ["retail"]}, "c": "desc c",
        "d": {"description": "desc d", "domains": ["banking"]}}))
    (data / "utt2domain").write_text("".join(f"{u} retail\n" for u in utts))
    caplog.set_level("INFO")
    rows = build_examples(data, dump, query_prob=1.0, own_domain_share=1.0)
    with_a = [r for r in rows["regular"] if r["slots"].get("a", "None") != "None"]
    assert with_a and not any("a_other_name" in r["queried"] for r in with_a)  # never another name of a gold slot
    drawn = [label for r in rows["regular"] for label in r["queried"] if r["slots"][label] == "None"]
    own = sum(label in ("a", "a_other_name", "b") for label in drawn)
    assert own < len(drawn)  # c (no domain) and d are drawn once the turn's own labels run out
    assert f"{len(drawn)} distractor labels drawn, {own} (" in caplog.text
    reasoning = next(r for r in rows["reasoning"] if r["utt_id"] == with_a[0]["utt_id"])
    assert "a (desc a)" in reasoning["target"]  # the description of an object entry
    (data / "slot_inventory.json").write_text(json.dumps({"a": {"domains": ["retail"]}}))
    with pytest.raises(InputError, match=r"slot_inventory.json: 'a': expected a description, or an object"):
        build_examples(data, dump)
