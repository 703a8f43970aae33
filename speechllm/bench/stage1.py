"""Stage 1's cost by path: the true-length encoder (the features) against 30-s padding, and ASR with one
window per turn against turns packed into shared windows, with the WER of each."""

from __future__ import annotations

import time
from pathlib import Path

import jiwer
import numpy as np
from whisper.normalizers import EnglishTextNormalizer

from speechllm.asr import transcribe_turns
from speechllm.features import SAMPLE_RATE, check_audio, encode_audio, load_whisper, whisper_config
from speechllm.io_utils import read_kaldi_map


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _speed(seconds: float, n_utts: int, audio_s: float) -> dict:
    return {"seconds": round(seconds, 3), "s_per_utt": round(seconds / n_utts, 4), "rtf": round(seconds / audio_s, 4)}


def measure_stage1(whisper: str, wav_scp: Path, text: Path | None, n_utts: int, device: str = "cpu") -> dict:
    """The first ``n_utts`` usable turns of ``wav_scp``; WER against ``text`` (Kaldi ``<utt> <text>``) if given."""
    cfg = whisper_config(whisper)
    model = load_whisper(cfg, device)
    keys, audios = [], []
    for key, path in read_kaldi_map(wav_scp).items():
        audio, _ = check_audio(path)
        if audio is not None:
            keys.append(key)
            audios.append(audio)
        if len(audios) == n_utts:
            break
    if not audios:
        raise ValueError(f"{wav_scp}: no usable turn to measure")
    n, audio_s = len(audios), sum(len(a) for a in audios) / SAMPLE_RATE
    encode_audio(model, audios[0])  # untimed: one-time costs (allocator, kernels) are no path's
    true_len, true_s = _timed(lambda: [encode_audio(model, a) for a in audios])
    padded, padded_s = _timed(lambda: [encode_audio(model, a, pad_30s=True) for a in audios])
    diff = max(float(np.abs(t - p).max()) for t, p in zip(true_len, padded))
    cosine = float(np.mean([np.mean(np.sum(t * p, 1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(p, axis=1)))
                            for t, p in zip(true_len, padded)]))
    (per_turn, _), per_turn_s = _timed(transcribe_turns, model, audios, None, cfg.asr_max_tokens)
    (packed, fallbacks), packed_s = _timed(transcribe_turns, model, audios, max_tokens=cfg.asr_max_tokens)
    result = {
        "whisper": whisper, "n_utts": n, "audio_s": round(audio_s, 2),
        "encoder_true_length": _speed(true_s, n, audio_s), "encoder_30s": _speed(padded_s, n, audio_s),
        "shared_frames": {"max_abs_diff": round(diff, 4), "mean_cosine": round(cosine, 5)},
        "asr_per_turn": _speed(per_turn_s, n, audio_s),
        "asr_packed": {**_speed(packed_s, n, audio_s), "fallbacks": fallbacks},
    }
    if text is not None:
        refs, normalize = read_kaldi_map(text), EnglishTextNormalizer()
        missing = [k for k in keys if k not in refs]
        if missing:
            raise ValueError(f"{text}: no reference for {len(missing)} turns (first: {missing[0]})")

        def wer(hyps: list[str]) -> float:
            pairs = [(normalize(refs[k]), normalize(h)) for k, h in zip(keys, hyps)]
            return round(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]), 4)

        result["asr_per_turn"]["wer"], result["asr_packed"]["wer"] = wer(per_turn), wer(packed)
    return result
