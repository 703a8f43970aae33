"""Stage 1, one job: frozen Whisper encoder outputs to ark/scp and Whisper ASR hypotheses.

Job ``J`` of ``N`` takes the J-th contiguous chunk of the sorted ``wav.scp``; the recipe merges the
per-job ``feats.J.scp``, ``text_asr.J`` and ``skipped.J`` files. Unusable turns (missing, corrupt,
empty, over 30 s) are skipped, listed with the reason, and counted in the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import kaldiio
import torch
from tqdm import tqdm

from speechllm.features import check_audio, encode, load_whisper_spec, transcribe
from speechllm.io_utils import atomic_write, read_kaldi_map
from speechllm.logging_utils import setup_logging

log = logging.getLogger(__name__)


def job_slice(keys: list[str], job: int, nj: int) -> list[str]:
    """Contiguous chunk ``job`` (1-based) of ``nj`` over sorted keys."""
    keys = sorted(keys)
    size, rest = divmod(len(keys), nj)
    start = (job - 1) * size + min(job - 1, rest)
    return keys[start : start + size + (1 if job <= rest else 0)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--outdir", type=Path, required=True, help="where feats.J.{ark,scp}, text_asr.J go")
    parser.add_argument("--whisper", required=True, help="Whisper name, checkpoint path or YAML config")
    parser.add_argument("--job", type=int, default=1)
    parser.add_argument("--nj", type=int, default=1)
    parser.add_argument("--asr", type=lambda s: s.lower() == "true", default=True,
                        help="also write Whisper ASR hypotheses (true/false)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    wav_scp = read_kaldi_map(args.data_dir / "wav.scp")
    keys = job_slice(list(wav_scp), args.job, args.nj)
    model, cfg = load_whisper_spec(args.whisper, args.device)
    args.outdir.mkdir(parents=True, exist_ok=True)
    ark, scp = args.outdir / f"feats.{args.job}.ark", args.outdir / f"feats.{args.job}.scp"
    skipped: dict[str, str] = {}
    hyps: dict[str, str] = {}
    num_frames: dict[str, int] = {}
    audio_seconds, start = 0.0, time.time()
    with kaldiio.WriteHelper(f"ark,scp:{ark}.partial,{scp}.partial") as writer:
        for key in tqdm(keys, desc=f"dump job {args.job}/{args.nj}", unit="utt"):
            audio, reason = check_audio(wav_scp[key])
            if audio is None:
                skipped[key] = reason
                log.warning("skipping %s (%s): %s", key, wav_scp[key], reason)
                continue
            audio_seconds += len(audio) / 16000
            feats = encode(model, audio, cfg.pad_30s)
            writer(key, feats)
            num_frames[key] = len(feats)
            if args.asr:
                hyps[key] = transcribe(model, audio, cfg.asr_max_tokens)
    # the scp names the ark it indexes: rewrite it for the final ark name, then publish both
    with open(f"{scp}.partial", encoding="utf-8") as f, atomic_write(scp) as out:
        for line in f:
            key, loc = line.rstrip("\n").split(" ", 1)
            out.write(f"{key} {loc.replace(f'{ark}.partial', str(ark))}\n")
    os.replace(f"{ark}.partial", ark)
    os.remove(f"{scp}.partial")
    with atomic_write(args.outdir / f"text_asr.{args.job}") as f:
        f.writelines(f"{k} {hyps[k]}\n" for k in sorted(hyps))
    with atomic_write(args.outdir / f"utt2num_frames.{args.job}") as f:
        f.writelines(f"{k} {num_frames[k]}\n" for k in sorted(num_frames))
    with atomic_write(args.outdir / f"skipped.{args.job}") as f:
        f.writelines(f"{k} {skipped[k]}\n" for k in sorted(skipped))
    elapsed = time.time() - start
    log.info("job %d/%d: %d utterances encoded, %d skipped, %.1f s audio in %.1f s (RTF %.3f)",
             args.job, args.nj, len(keys) - len(skipped), len(skipped), audio_seconds, elapsed,
             elapsed / max(audio_seconds, 1e-9))


if __name__ == "__main__":
    main()
