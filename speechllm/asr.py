"""Whisper ASR hypotheses for stage 1: short turns packed into shared 30-s windows.

Whisper's decoder reads 30 s of encoder output, however short the turn: for a turn of a few seconds
the 30-s encoder pass is most of the cost of its transcript (decoding from a true-length encoder
output instead breaks the ASR: it loops). So turns are packed, in order, into windows of at most
``window_s`` seconds with ``gap_s`` of silence after each, several windows share a batched encoder
pass, and each window is decoded with timestamps. Each timestamped segment goes to the turn its time
span overlaps most. A turn gets its own window instead (a *fallback*, counted) when its window's
segments cannot be split cleanly: a segment overlapping a second turn by more than ``tolerance_s``,
a window cut off by the token limit before the turn, or no segment at all. A turn alone in its window
(too long to share one) is decoded without timestamps, as are the fallbacks.

``packing=None`` is the one-window-per-turn path, kept for comparison and for audio that is not short
turns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import whisper
from whisper.decoding import DecodingResult
from whisper.model import Whisper
from whisper.tokenizer import Tokenizer

from speechllm.features import SAMPLE_RATE

SECONDS_PER_TIMESTAMP = 0.02  # Whisper's timestamp tokens count 20-ms steps


@dataclass(frozen=True)
class Packing:
    """How turns share a window (the bench's ``stage1`` section compares the WER with one window per turn)."""

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
    """The ``(start, end, text tokens)`` segments of a timestamped decode, and whether text was left without
    its closing timestamp (a lone timestamp before the end is allowed and carries nothing)."""
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
    return out, bool(text)


def assign(spans: list[tuple[float, float]], segs: list[tuple[float, float, list[int]]], cut: bool,
           tolerance_s: float) -> tuple[list[list[int]], set[int]]:
    """Each turn's text tokens from the window's segments, and the turns that need a window of their own.

    A segment in a gap between turns is dropped (Whisper's words for silence). ``cut``: the decode ended
    at the token limit, so the turns after its last segment may be incomplete or missing."""
    texts: list[list[int]] = [[] for _ in spans]
    unsure: set[int] = set()
    for start, end, text in segs:
        overlaps = sorted(((min(end, b) - max(start, a), i) for i, (a, b) in enumerate(spans)), reverse=True)
        if overlaps[0][0] <= 0:
            continue
        if len(overlaps) > 1 and overlaps[1][0] > tolerance_s:
            unsure.update(i for overlap, i in overlaps if overlap > 0)
        texts[overlaps[0][1]].extend(text)
    if cut:
        last = segs[-1][1] if segs else 0.0
        unsure.update(i for i, (_, b) in enumerate(spans) if b > last)
    unsure.update(i for i, text in enumerate(texts) if not text)
    return texts, unsure


def _decode(model: Whisper, audios: list[np.ndarray], timestamps: bool, sample_len: int) -> list[DecodingResult]:
    """One batched encoder pass over the 30-s windows of ``audios``, then a batched greedy decode (float16
    on a GPU, as openai-whisper's own ``transcribe``)."""
    device = next(model.parameters()).device
    mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(a), model.dims.n_mels) for a in audios])
    fp16 = device.type == "cuda"
    options = whisper.DecodingOptions(language="en", without_timestamps=not timestamps, fp16=fp16,
                                      sample_len=sample_len)
    with torch.no_grad():  # whisper's layers compute in their input's dtype
        encoded = model.encoder(mel.to(device, torch.float16 if fp16 else torch.float32))
        return whisper.decode(model, encoded, options)  # takes encoder outputs as they are


def _text(tokenizer: Tokenizer, tokens: list[int]) -> str:
    return " ".join(tokenizer.decode(tokens).split())


def transcribe_turns(model: Whisper, audios: list[np.ndarray], packing: Packing | None = Packing(),
                     max_tokens: int | None = None) -> tuple[list[str], int]:
    """Greedy English transcripts of short turns (each <= 30 s), and how many of the turns packed with others
    fell back to a window of their own; ``packing=None``: every turn in its own window.

    ``max_tokens`` caps each turn's transcript (Whisper's default: half its text context); a shared
    window gets the caps of its turns, plus two timestamps each, up to that default."""
    if not audios:
        return [], 0
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages,
                                                language="en", task="transcribe")
    limit = model.dims.n_text_ctx // 2
    windows = pack([len(a) / SAMPLE_RATE for a in audios], packing) if packing else [[i] for i in range(len(audios))]
    alone = [w[0] for w in windows if len(w) == 1]
    shared = [w for w in windows if len(w) > 1]
    hyps, fallbacks = [""] * len(audios), 0
    if shared:
        gap = np.zeros(round(packing.gap_s * SAMPLE_RATE), dtype=np.float32)
        joined, spans = [], []
        for window in shared:
            starts = np.cumsum([0] + [len(audios[i]) + len(gap) for i in window[:-1]]) / SAMPLE_RATE
            spans.append([(s, s + len(audios[i]) / SAMPLE_RATE) for s, i in zip(starts, window)])
            joined.append(np.concatenate([piece for i in window for piece in (audios[i], gap)]))
        sample_len = limit if max_tokens is None else min(limit, (max_tokens + 2) * max(map(len, shared)))
        for window, span, result in zip(shared, spans, _decode(model, joined, True, sample_len)):
            segs, open_text = segments(result.tokens, tokenizer.timestamp_begin)
            texts, unsure = assign(span, segs, open_text or len(result.tokens) >= sample_len, packing.tolerance_s)
            fallbacks += len(unsure)
            for k, i in enumerate(window):
                if k in unsure:
                    alone.append(i)
                else:
                    hyps[i] = _text(tokenizer, texts[k])
    if alone:
        for i, result in zip(alone, _decode(model, [audios[i] for i in alone], False, max_tokens or limit)):
            hyps[i] = _text(tokenizer, result.tokens)
    return hyps, fallbacks


def transcribe(model: Whisper, audio: np.ndarray, max_tokens: int | None = None) -> str:
    """Greedy English transcript of one turn (<= 30 s) in its own window."""
    return transcribe_turns(model, [audio], None, max_tokens)[0][0]
