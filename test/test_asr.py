"""Packed ASR: turns share windows, timestamped segments go back to their turns, and a window that cannot
be split gives its turns windows of their own."""

from __future__ import annotations

import numpy as np
import pytest

from speechllm import asr
from speechllm.asr import Packing, assign, pack, segments, transcribe_turns
from speechllm.features import WhisperConfig, load_whisper

TS = 1000  # a stand-in timestamp_begin: token TS + k is k x 20 ms


def test_pack_fills_windows_in_order():
    packing = Packing(window_s=10.0, gap_s=1.0)
    # 3+1, 4+1 -> 9 s; 2 more would make 11
    assert pack([3.0, 4.0, 2.0, 12.0, 1.0], packing) == [[0, 1], [2], [3], [4]]
    assert pack([], packing) == []


def test_segments_read_timestamp_pairs():
    tokens = [TS + 0, 1, 2, TS + 50, TS + 100, 3, TS + 150]
    assert segments(tokens, TS) == ([(0.0, 1.0, [1, 2]), (2.0, 3.0, [3])], False)
    assert segments(tokens + [TS + 160], TS) == ([(0.0, 1.0, [1, 2]), (2.0, 3.0, [3])], False)  # a lone timestamp
    assert segments(tokens + [TS + 160, 4], TS) == ([(0.0, 1.0, [1, 2]), (2.0, 3.0, [3])], True)  # text left open


def test_assign_gives_each_segment_to_its_turn_and_flags_the_unclear_ones():
    spans = [(0.0, 3.0), (4.0, 6.0), (7.0, 9.0)]
    # segment 1 reaches 0.3 s into turn 1 (within tolerance); turn 2 gets two segments
    segs = [(0.0, 4.3, [1]), (4.2, 5.0, [2]), (5.0, 6.0, [3]), (7.0, 9.0, [4])]
    assert assign(spans, segs, False, 0.4) == ([[1], [2, 3], [4]], set())
    # a segment across turns 0 and 1: both are unsure; turn 2 has no segment; a segment in a gap is dropped
    texts, unsure = assign(spans, [(1.0, 5.5, [1]), (6.1, 6.9, [5])], False, 0.4)
    assert unsure == {0, 1, 2} and 5 not in sum(texts, [])
    # cut off after 8 s: turn 2 (ends at 9 s) is unsure even with text
    assert assign(spans, [(0.0, 3.0, [1]), (4.0, 6.0, [2]), (7.0, 8.0, [3])], True, 0.4)[1] == {2}


@pytest.fixture(scope="module")
def tiny_whisper():
    dims = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1, n_vocab=51864,
                n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    return load_whisper(WhisperConfig(random_init_dims=dims))


def test_packed_windows_are_split_by_their_timestamps(tiny_whisper, monkeypatch):
    """Three turns in one window: the decode's timestamped segments come back as each turn's text, one
    encoder pass for the window; a turn its window cannot place is decoded alone."""
    rng = np.random.default_rng(0)
    audios = [rng.standard_normal(int(s * 16000)).astype(np.float32) * 0.1 for s in (2.0, 3.0, 1.5)]
    tok = asr.whisper.tokenizer.get_tokenizer(False, language="en", task="transcribe")
    words = [tok.encode(" one"), tok.encode(" two"), tok.encode(" three")]
    t0 = tok.timestamp_begin
    calls = []

    def fake_decode(model, windows, timestamps, max_tokens):
        calls.append((len(windows), [round(len(w) / 16000, 2) for w in windows], timestamps))
        if timestamps:  # turns at 0-2 s, 3-6 s, 7-8.5 s; the third turn gets no segment
            return [type("R", (), {"tokens": [t0, *words[0], t0 + 100, t0 + 150, *words[1], t0 + 300]})]
        return [type("R", (), {"tokens": words[2]})] * len(windows)

    monkeypatch.setattr(asr, "_decode", fake_decode)
    hyps, fallbacks = transcribe_turns(tiny_whisper, audios)
    assert hyps == ["one", "two", "three"] and fallbacks == 1
    assert calls == [(1, [9.5], True), (1, [1.5], False)]  # 2+1+3+1+1.5+1 s in one window


def test_real_decodes_of_a_random_whisper_give_a_text_per_turn(tiny_whisper, monkeypatch):
    """The unmocked decoder: a shared window with timestamps and a cap of (8 + 2) tokens per turn, then the
    turns it could not place in their own windows, each with the hypothesis it gets alone; without packing,
    every turn is its own window's."""
    rng = np.random.default_rng(1)
    audios = [rng.standard_normal(int(s * 16000)).astype(np.float32) * 0.1 for s in (1.0, 2.0)]
    alone, none = transcribe_turns(tiny_whisper, audios, None, max_tokens=8)
    assert none == 0
    assert alone == [transcribe_turns(tiny_whisper, [a], None, max_tokens=8)[0][0] for a in audios]
    calls, real = [], asr._decode

    def spy(model, windows, timestamps, sample_len):
        calls.append((len(windows), timestamps, sample_len))
        return real(model, windows, timestamps, sample_len)

    monkeypatch.setattr(asr, "_decode", spy)
    packed, fallbacks = transcribe_turns(tiny_whisper, audios, max_tokens=8)
    assert calls[0] == (1, True, 20)
    assert calls[1:] == ([(fallbacks, False, 8)] if fallbacks else [])
    if fallbacks == 2:  # both turns decoded alone: their own windows' hypotheses
        assert packed == alone
    assert len(packed) == 2 and all(isinstance(h, str) for h in packed)
