"""The call-centre generator: determinism, inventory, values in text; espeak-ng data dirs."""

import json
import shutil

import pytest
import soundfile as sf

from speechllm.corpus.callcenter import generate_call, generate_corpus, slot_inventory
from speechllm.corpus.callcenter_domains import DOMAINS
from speechllm.corpus.synth import build_data_dirs
from speechllm.io_utils import read_kaldi_map, read_slots


def test_generation_is_deterministic():
    assert [generate_call(3, i) for i in range(20)] == [generate_call(3, i) for i in range(20)]
    assert [generate_call(3, i) for i in range(20)] != [generate_call(4, i) for i in range(20)]


def test_corpus_file_is_reproducible(tmp_path):
    generate_corpus(tmp_path / "a", 12, 2, 2, seed=7)
    generate_corpus(tmp_path / "b", 12, 2, 2, seed=7)
    assert (tmp_path / "a/conversations.jsonl").read_bytes() == (tmp_path / "b/conversations.jsonl").read_bytes()
    splits = [json.loads(l)["split"] for l in open(tmp_path / "a/conversations.jsonl")]
    assert splits.count("test") == 2 and splits.count("dev") == 2 and splits.count("train") == 8


def test_domains_have_described_open_ended_slots():
    assert set(DOMAINS) == {"banking", "telecommunications", "insurance", "retail"}
    for domain in DOMAINS.values():
        labels = [s.label for s in domain.slots]
        assert len(set(labels)) >= 15, domain.name
        assert all(s.description and s.label.islower() and " " not in s.label for s in domain.slots)
    for label in ("payment_frequency", "payment_amount", "new_limit", "family_members_count", "review_period"):
        assert label in slot_inventory()


def test_calls_are_multi_turn_with_values_in_text_and_back_references():
    calls = [generate_call(1, i) for i in range(200)]
    back_refs = 0
    for call in calls:
        assert len(call["turns"]) >= 8
        assert {t["speaker"] for t in call["turns"]} == {"agent", "customer"}
        seen = {}
        for t in call["turns"]:
            for label, value in t["slots"].items():
                assert value in t["text"]
                back_refs += seen.get(label) == value
                seen[label] = value
    assert back_refs > 100  # read-backs and goodbyes repeat earlier values
    values = {v for c in calls for t in c["turns"] for v in t["slots"].values()}
    assert any(v.startswith("$") for v in values) and any(v.count(" ") >= 3 and v[0].isdigit() for v in values)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (tools/install.sh)")
def test_synthesis_writes_kaldi_data_dirs(tmp_path):
    generate_corpus(tmp_path / "db", 3, 1, 1, seed=2)
    counts = build_data_dirs(tmp_path / "db/conversations.jsonl", tmp_path / "db/slot_inventory.json",
                             tmp_path / "wav", tmp_path / "data", nj=2, seed=2)
    assert set(counts) == {"train", "dev", "test"}
    d = tmp_path / "data" / "train"
    wav, text, slots = read_kaldi_map(d / "wav.scp"), read_kaldi_map(d / "text"), read_slots(d / "slots.jsonl")
    assert set(wav) == set(text) == set(slots) == set(read_kaldi_map(d / "utt2turn"))
    utt = sorted(wav)[0]
    audio, sr = sf.read(wav[utt])
    assert sr == 16000 and len(audio) > 8000
    utt2spk = read_kaldi_map(d / "utt2spk")
    assert all(u.startswith(s) for u, s in utt2spk.items())
