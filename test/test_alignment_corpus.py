"""The alignment corpus: a seeded stream with large value inventories, spoken by many voices, and read
by the alignment phase without a sentence of the held-out sets."""

import json
import shutil
from random import Random

import kaldiio
import numpy as np
import pytest

from speechllm.align import corpus_turns, wer_text
from speechllm.corpus import values as V
from speechllm.corpus.alignment import alignment_call, wide_inventory, write_corpus
from speechllm.corpus.callcenter import generate_call
from speechllm.corpus.synth import ACCENTS, VARIANTS, synthesize
from speechllm.io_utils import InputError
from speechllm.novelty import SeenText
from speechllm.slots import filled_pairs


def test_calls_are_a_pure_function_of_seed_and_index():
    assert alignment_call(1, 7) == alignment_call(1, 7)
    assert alignment_call(1, 7) != alignment_call(2, 7) and alignment_call(1, 7) != alignment_call(1, 8)
    # a stream of its own: not the recipe's call of the same seed and index, even with the same names
    with V.drawing_from(wide_inventory()):
        recipe = [[t["text"] for t in generate_call(1, i)["turns"] if t["slots"]] for i in range(3)]
    assert all([t["text"] for t in alignment_call(1, i)["turns"]] != recipe[i] for i in range(3))


def test_every_turn_carries_values_that_its_text_holds():
    for index in range(50):
        call = alignment_call(3, index)
        assert call["split"] == "align" and call["conv_id"] == f"al03{index:06d}"
        for turn in call["turns"]:
            assert turn["slots"] and all(value in turn["text"] for _, value in filled_pairs(turn["slots"]))


def test_value_inventories_are_large_and_drawn_from():
    names = wide_inventory()
    assert len(names.first_names) > 1500 and len(names.last_names) > 3000 and len(names.cities) > 500
    assert all(n.replace(" ", "").isalpha() and n.isascii() for n in names.first_names + names.cities)
    values = {value for index in range(400) for turn in alignment_call(1, index)["turns"]
              for _, value in filled_pairs(turn["slots"])}
    first = {v.split()[0] for v in values if v.split()[0] in names.first_names}
    assert len(first) > 250, len(first)  # in 400 calls; the recipe's own calls know 30
    # the wide inventory only inside the block: the recipe's calls keep theirs
    rare = [n for n in names.first_names if n not in V.FIRST_NAMES]
    with V.drawing_from(V.Inventory(tuple(rare), names.last_names, names.streets, names.cities)):
        assert V.full_name(Random(0)).split()[0] in rare
    assert V.full_name(Random(0)).split()[0] in V.FIRST_NAMES


def test_write_corpus_extends_a_smaller_corpus(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    write_corpus(small, 5, seed=1)
    n = write_corpus(large, 12, seed=1)
    lines = (large / "conversations.jsonl").read_text().splitlines()
    assert (small / "conversations.jsonl").read_text().splitlines() == lines[:5]
    assert n == sum(len(json.loads(line)["turns"]) for line in lines)
    assert "customer_name" in json.loads((large / "slot_inventory.json").read_text())


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_every_wide_voice_is_a_real_espeak_variant():
    """espeak-ng reads an unknown variant as the plain voice, silently: each one must sound different."""
    plain = synthesize("Lucas Campbell", "en-us", 160, 50)
    for variant in VARIANTS:
        audio = synthesize("Lucas Campbell", f"en-us+{variant}", 160, 50)
        assert len(audio) != len(plain) or not np.array_equal(audio, plain), variant
    sounds = [synthesize("Lucas Campbell", accent, 160, 50) for accent in ACCENTS]
    assert len({a.tobytes() for a in sounds}) == len(ACCENTS)


def _corpus(root, texts, whisper="base"):
    """A stage-1 alignment corpus dir of ``texts`` with random features."""
    data, dump = root / "data" / "align", root / "dump"
    data.mkdir(parents=True)
    dump.mkdir(parents=True)
    utts = [f"al01{i:06d}_customer_000" for i in range(len(texts))]
    (data / "text").write_text("".join(f"{u} {t}\n" for u, t in zip(utts, texts)))
    (data / "slots.jsonl").write_text("".join(json.dumps({"utt_id": u, "slots": {"x": t.split()[-1]}}) + "\n"
                                              for u, t in zip(utts, texts)))
    with kaldiio.WriteHelper(f"ark,scp:{dump}/feats.ark,{dump}/feats.scp") as writer:
        for u in utts:
            writer(u, np.zeros((30, 4), dtype=np.float32))
    (dump / "utt2num_frames").write_text("".join(f"{u} 30\n" for u in utts))
    (dump / "whisper").write_text(whisper + "\n")
    return utts


def test_the_phase_reads_the_corpus_without_any_sentence_of_the_held_out_sets(tmp_path):
    held_out = ["Yes, it's the debit card.", "My name is Rosa Brown."]
    texts = ["It's the debit card.", "yes, it's the DEBIT card", "My name is Lucas Campbell.", "my name is rosa brown"]
    utts = _corpus(tmp_path, texts)
    turns = corpus_turns(tmp_path, held_out, "base")
    assert [t.utt_id for t in turns] == [utts[0], utts[2]]  # compared as the WER compares text
    assert turns[0].text == texts[0] and turns[0].slots == {"x": "card."} and turns[0].n_frames == 30
    assert not {wer_text(t.text) for t in turns} & {wer_text(t) for t in held_out}
    with pytest.raises(InputError, match="Whisper 'base'.*'small'"):
        corpus_turns(tmp_path, held_out, "small")
    with pytest.raises(InputError, match="--align_calls"):
        corpus_turns(tmp_path / "none", held_out, "base")


def test_every_row_of_the_held_out_files_leaves_the_corpus_not_only_those_measured(tmp_path):
    """The dev set is measured on its first rows (``valid_max_examples``), but none of its sentences may
    be trained on; and two held-out sets of one name are refused, not one silently dropped."""
    from conftest import make_tiny_speechllm, write_examples
    from speechllm.align import alignment_data
    from speechllm.data import tokenized

    dev = ["My name is Rosa Brown.", "The limit is five thousand."]
    rows = [{"utt_id": f"d{i}", "prompt": "<audio>\nFind slots.", "target": "{}", "slots": {}, "text": t}
            for i, t in enumerate(dev)]
    (tmp_path / "dev").mkdir()
    jsonl = write_examples(tmp_path / "dev", rows)
    model, _, _ = make_tiny_speechllm(tmp_path, dev * 5)
    valid = tokenized(model, jsonl, tmp_path / "tokens", limit=1)  # measured on its first row only
    utts = _corpus(tmp_path / "corpus", ["the limit is five thousand", "My name is Lucas Campbell."])
    data = alignment_data(tmp_path / "align", valid, valid, tmp_path / "corpus", whisper="base")
    assert [e.utt_id for e in data.evals["valid"]] == ["d0"]
    assert [t.utt_id for t in data.turns if t.utt_id.startswith("al")] == [utts[1]]
    (tmp_path / "test").mkdir()
    test = write_examples(tmp_path / "test", [dict(r, utt_id=f"t{i}") for i, r in enumerate(rows)])
    other = tmp_path / "other" / "test"
    other.mkdir(parents=True)
    (other / "x.jsonl").write_text(test.read_text())
    with pytest.raises(InputError, match=rf"{other / 'x.jsonl'}: a second held-out set named 'test'"):
        alignment_data(tmp_path / "align", valid, valid, tmp_path / "corpus", [test, other / "x.jsonl"], "base")


def test_the_real_corpus_never_reaches_training_with_a_test_sentence(tmp_path):
    """The recipe's own test calls share categorical answers ("It's the debit card.") with the stream:
    the reader drops exactly those."""
    test_texts = [t["text"] for index in range(30) for t in generate_call(1, index)["turns"]]
    stream = [t["text"] for index in range(300) for t in alignment_call(1, index)["turns"]]
    shared = {wer_text(t) for t in stream} & {wer_text(t) for t in test_texts}
    assert shared  # so the filter has something to do
    _corpus(tmp_path, stream)
    turns = corpus_turns(tmp_path, test_texts, "base")
    assert len(turns) == sum(wer_text(t) not in shared for t in stream)
    assert not {wer_text(t.text) for t in turns} & {wer_text(t) for t in test_texts}


def test_novel_values_are_those_no_training_text_holds():
    seen = SeenText(["My name is Lucas Campbell.", "It's $1,300 a month.", "call me on 4 7 2 9 1 1 0"])
    assert seen.seen("Lucas Campbell") and seen.seen("lucas") and seen.seen("1300 dollars")
    assert not seen.seen("Lucas Brown") and not seen.seen("$130")
    # digit strings are one number, as the metrics read them: a part of one is not seen
    assert seen.seen("4 7 2 9 1 1 0") and not seen.seen("4 7 2 9")
    assert seen.novel_values({"name": "Lucas Brown", "amount": "$1,300"}) == ["Lucas Brown"]
    assert not seen.novel_turn({"name": "Lucas Brown", "amount": "$1,300"})
    assert seen.novel_turn({"name": "Rosa Brown"}) and not seen.novel_turn({}) and not seen.novel_turn({"x": "None"})
    long = SeenText(["a b c d e f g h i j"], max_len=4)
    assert long.seen("b c d e f g") and not long.seen("b c d e f x")
