"""The call-centre generator: determinism, inventory, values in text; espeak-ng data dirs."""

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from speechllm.corpus.callcenter import generate_call, generate_corpus, slot_inventory
from speechllm.corpus.callcenter_domains import DOMAINS
from speechllm.corpus.synth import build_data_dirs, voice_for
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


def test_each_call_names_each_concept_its_own_way():
    calls = [generate_call(1, i) for i in range(200)]
    inventory = slot_inventory()
    names_of: dict[str, set[str]] = {}
    for call in calls:
        used: dict[str, str] = {}  # concept -> the name this call uses
        for t in call["turns"]:
            for label in t["slots"]:
                entry = inventory[label]
                assert call["domain"] in entry["domains"]
                assert used.setdefault(entry["concept"], label) == label  # one name per concept in a call
                names_of.setdefault(entry["concept"], set()).add(label)
    assert len(names_of) >= 50 and sum(len(n) >= 2 for n in names_of.values()) >= 0.9 * len(names_of)
    assert {"payment_amount", "amount_paid", "payment_sum"} == names_of["payment_amount"]
    assert generate_call(1, 7) == generate_call(1, 7)  # seeded
    # the names are drawn apart from the call: its text and values are those of any other naming
    same = generate_call(1, 7)
    for named, other in zip(same["turns"], generate_call(1, 7)["turns"]):
        assert named["text"] == other["text"] and list(named["slots"].values()) == list(other["slots"].values())
    assert all(inventory[n]["description"] == inventory[c]["description"] for c, ns in names_of.items() for n in ns)


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


def espeak(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng's own rendering of ``text`` as 16-bit samples at 16 kHz (it speaks at 22.05 kHz)."""
    out = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                         capture_output=True, check=True).stdout
    audio, sr = sf.read(io.BytesIO(out), dtype="float32")
    assert sr == 22050
    return np.clip(np.round(resample_poly(audio, 320, 441) * 32768), -32768, 32767).astype(np.int16)


def test_synthesis_writes_kaldi_data_dirs(tmp_path):
    if shutil.which("espeak-ng") is None:  # CI installs it: a missing one is a failure, never a skip
        pytest.fail("espeak-ng is missing: run tools/install.sh (as root it installs it)")
    generate_corpus(tmp_path / "db", 3, 1, 1, seed=2)
    counts = build_data_dirs(tmp_path / "db/conversations.jsonl", tmp_path / "db/slot_inventory.json",
                             tmp_path / "wav", tmp_path / "data", nj=2, seed=2)
    calls = [json.loads(line) for line in (tmp_path / "db/conversations.jsonl").read_text().splitlines()]
    assert counts == {split: sum(len(c["turns"]) for c in calls if c["split"] == split)
                      for split in ("train", "dev", "test")}
    listed = set()
    for split in counts:
        d = tmp_path / "data" / split
        wav, text, slots = read_kaldi_map(d / "wav.scp"), read_kaldi_map(d / "text"), read_slots(d / "slots.jsonl")
        utt2spk, utt2conv, utt2turn = (read_kaldi_map(d / f) for f in ("utt2spk", "utt2conv", "utt2turn"))
        turns = {f"{c['conv_id']}_{t['speaker']}_{i:03d}": (c["conv_id"], i, t)
                 for c in calls if c["split"] == split for i, t in enumerate(c["turns"])}
        assert set(wav) == set(text) == set(slots) == set(utt2spk) == set(utt2conv) == set(utt2turn) == set(turns)
        for utt, (conv, i, turn) in turns.items():
            assert text[utt] == " ".join(turn["text"].split()) and slots[utt] == turn["slots"]
            assert (utt2conv[utt], utt2turn[utt], utt2spk[utt]) == (conv, str(i), f"{conv}_{turn['speaker']}")
            # every wav: 16 kHz, not empty, and espeak-ng speaking this turn's text in its call side's voice
            audio, sr = sf.read(wav[utt], dtype="int16")
            assert sr == 16000 and audio.ndim == 1 and len(audio) > 0 and np.abs(audio).max() > 0, utt
            expected = espeak(turn["text"], *voice_for(conv, turn["speaker"], 2))
            assert len(audio) == len(expected), utt
            assert np.abs(audio.astype(np.int32) - expected).max() <= 1, utt
        listed |= {Path(p) for p in wav.values()}
    assert listed == set((tmp_path / "wav").resolve().glob("*.wav"))  # one wav per turn, each listed once


def test_a_changed_turn_is_spoken_again_and_the_others_kept(tmp_path, monkeypatch):
    """A wav is reused only if it says its turn's text in its voice: a generator that changed a turn
    must not leave it paired with the old audio."""
    from speechllm.corpus import synth

    spoken = []
    monkeypatch.setattr(synth, "synthesize", lambda text, *voice: spoken.append(text) or np.ones(160, np.float32))
    generate_corpus(tmp_path / "db", 2, 0, 0, seed=2)
    conversations = tmp_path / "db/conversations.jsonl"
    args = (conversations, tmp_path / "db/slot_inventory.json", tmp_path / "wav", tmp_path / "data")
    build_data_dirs(*args, nj=1, seed=2)
    n_turns = len(spoken)
    build_data_dirs(*args, nj=1, seed=2)
    assert len(spoken) == n_turns  # nothing to speak again
    calls = [json.loads(line) for line in conversations.read_text().splitlines()]
    calls[1]["turns"][2]["text"] = "A changed turn."
    conversations.write_text("".join(json.dumps(c) + "\n" for c in calls))
    build_data_dirs(*args, nj=1, seed=2)
    assert spoken[n_turns:] == ["A changed turn."]
    (tmp_path / "wav" / "spoken.jsonl").unlink()  # wavs of unknown making: spoken again, all of them
    build_data_dirs(*args, nj=1, seed=2)
    assert len(spoken) == 2 * n_turns + 1

    # killed while speaking a changed turn: it is not taken for its old self when the change is undone
    calls[1]["turns"][2]["text"] = "Another change."
    conversations.write_text("".join(json.dumps(c) + "\n" for c in calls))

    class Killed(Exception):
        pass

    def killed(text, *voice):
        raise Killed

    monkeypatch.setattr(synth, "synthesize", killed)
    with pytest.raises(Killed):
        build_data_dirs(*args, nj=1, seed=2)
    monkeypatch.setattr(synth, "synthesize", lambda text, *voice: spoken.append(text) or np.ones(160, np.float32))
    calls[1]["turns"][2]["text"] = "A changed turn."  # what the wav said before the killed run
    conversations.write_text("".join(json.dumps(c) + "\n" for c in calls))
    build_data_dirs(*args, nj=1, seed=2)
    assert spoken[2 * n_turns + 1:] == ["A changed turn."]
