"""Whisper ASR hypotheses for stage 1: short turns packed into shared 30-s windows.

Whisper's decoder reads 30 s of encoder output, however short the turn: for a turn of a few seconds
the 30-s encoder pass is most of the cost of its transcript (decoding from a true-length encoder
output instead breaks the ASR: it loops). So turns are packed, in order, into windows of at most
``window_s`` seconds with ``gap_s`` of silence after each, several windows share a batched encoder
pass, and each window is decoded with timestamps. Each timestamped segment goes to the turn its time
span overlaps most. A turn gets its own window instead (a *fallback*, counted) when its window's
segments cannot be split cleanly: a segment overlapping a second turn by more than ``tolerance_s``,
a segment left open by the token limit, or no segment at all.

``packed=False`` is the one-window-per-turn path (no timestamps), kept for comparison and for audio
that is not short turns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import whisper
from whisper.model import Whisper

from speechllm.features import SAMPLE_RATE

SECONDS_PER_TIMESTAMP = 0.02  # Whisper's timestamp tokens count 20-ms steps


@dataclass(frozen=True)
class Packing:
    """How turns share a window; the defaults keep the WER of one window per turn (docs/recipes.md)."""

    window_s: float = 28.0  # under Whisper's 30 s, so the last segment's closing timestamp fits
    gap_s: float = 1.0  # silence after each turn: Whisper starts a new segment at a pause
    tolerance_s: float = 0.4  # a segment may reach this far into the next turn (timestamps are coarse)


def pack(durations: list[float], packing: Packing) -> list[list[int]]:
    """Consecutive turns grouped into windows of at most ``window_s`` (a longer turn gets a window alone)."""
    windows: list[list[int]] = []
    used = packing.window_s
    for i, seconds in enumerate(durations):
        if used + seconds > packing.window_s:
            windows.append([])
            used = 0.0
        windows[-1].append(i)
        used += seconds + packing.gap_s
    return windows


def segments(tokens: list[int], timestamp_begin: int) -> tuple[list[tuple[float, float, list[int]]], bool]:
    """The ``(start, end, text tokens)`` segments of a timestamped decode, and whether the last one closed."""
    out, start, text = [], None, []
    for token in tokens:
        if token < timestamp_begin:
            text.append(token)
            continue
        seconds = (token - timestamp_begin) * SECONDS_PER_TIMESTAMP
        if start is None:
            start = seconds
        else:
            out.append((start, seconds, text))
            start, text = None, []
    return out, start is None and not text


def assign(spans: list[tuple[float, float]], segs: list[tuple[float, float, list[int]]], closed: bool,
           tolerance_s: float) -> tuple[list[list[int]], set[int]]:
    """Each turn's text tokens from the window's segments, and the turns that need a window of their own."""
    texts: list[list[int]] = [[] for _ in spans]
    unsure: set[int] = set()
    for start, end, text in segs:
        overlaps = sorted(((min(end, b) - max(start, a), i) for i, (a, b) in enumerate(spans)), reverse=True)
        if overlaps[0][0] <= 0:
            continue  # a segment in a gap: no speech of any turn is there
        if len(overlaps) > 1 and overlaps[1][0] > tolerance_s:
            unsure.update(i for overlap, i in overlaps if overlap > 0)
        texts[overlaps[0][1]].extend(text)
    if not closed:  # the token limit cut the window off: later turns are incomplete or missing
        last = segs[-1][1] if segs else 0.0
        unsure.update(i for i, (_, b) in enumerate(spans) if b > last)
    unsure.update(i for i, text in enumerate(texts) if not text)
    return texts, unsure


def _decode(model: Whisper, audios: list[np.ndarray], timestamps: bool, max_tokens: int | None) -> list:
    """One batched encoder pass over the 30-s windows of ``audios``, then a batched greedy decode."""
    device = next(model.parameters()).device
    mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(a), model.dims.n_mels) for a in audios])
    options = whisper.DecodingOptions(language="en", without_timestamps=not timestamps,
                                      fp16=device.type == "cuda", sample_len=max_tokens)
    with torch.no_grad():
        encoded = model.encoder(mel.to(device, model.encoder.conv1.weight.dtype))
        return whisper.decode(model, encoded, options)  # takes encoder outputs as they are


def _text(tokenizer, tokens: list[int]) -> str:
    return " ".join(tokenizer.decode(tokens).split())


def transcribe_turns(model: Whisper, audios: list[np.ndarray], packing: Packing | None = Packing(),
                     max_tokens: int | None = None) -> tuple[list[str], int]:
    """Greedy English transcripts of short turns (each <= 30 s), and how many fell back to a window of their
    own; ``packing=None``: every turn in its own window."""
    if not audios:
        return [], 0
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages,
                                                language="en", task="transcribe")
    alone = list(range(len(audios)))
    hyps = [""] * len(audios)
    if packing is not None:
        windows = pack([len(a) / SAMPLE_RATE for a in audios], packing)
        gap = np.zeros(round(packing.gap_s * SAMPLE_RATE), dtype=np.float32)
        joined, spans = [], []
        for window in windows:
            starts = np.cumsum([0] + [len(audios[i]) + len(gap) for i in window[:-1]]) / SAMPLE_RATE
            spans.append([(s, s + len(audios[i]) / SAMPLE_RATE) for s, i in zip(starts, window)])
            joined.append(np.concatenate([piece for i in window for piece in (audios[i], gap)]))
        alone = []
        for window, span, result in zip(windows, spans, _decode(model, joined, True, max_tokens)):
            texts, unsure = assign(span, *segments(result.tokens, tokenizer.timestamp_begin), packing.tolerance_s)
            for k, i in enumerate(window):
                if k in unsure:
                    alone.append(i)
                else:
                    hyps[i] = _text(tokenizer, texts[k])
    if alone:
        for i, result in zip(alone, _decode(model, [audios[i] for i in alone], False, max_tokens)):
            hyps[i] = _text(tokenizer, result.tokens)
    return hyps, len(alone) if packing is not None else 0


def transcribe(model: Whisper, audio: np.ndarray, max_tokens: int | None = None) -> str:
    """Greedy English transcript of one turn (<= 30 s) in its own window."""
    return transcribe_turns(model, [audio], None, max_tokens)[0][0]
