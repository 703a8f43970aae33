"""Stage 1, one job: frozen Whisper encoder outputs to ark/scp and Whisper ASR hypotheses.

The job goes through its keys in chunks of ``--asr_chunk``: the chunk's turns are transcribed in one
batched call, several short turns sharing a 30-s Whisper window (:mod:`speechllm.asr`), then each
turn's true-length encoder output is written with its hypothesis.

Job ``J`` of ``N`` takes the J-th contiguous chunk of the sorted ``wav.scp``; the recipe merges the
per-job ``feats.J.scp``, ``text_asr.J`` (with ``--asr true``), ``utt2num_frames.J`` and ``skipped.J`` files, and takes
``whisper.J`` (the Whisper name, or the absolute path of a checkpoint or YAML file) as the set's
``whisper`` record, which training reads when it is given no ``--whisper``. Unusable turns
(missing, corrupt, empty, over 30 s, NaN or infinite samples or encoder outputs) are skipped, listed
with the reason, and counted in the log.

A job can be killed at any moment and rerun (same ``--outdir``, ``--job``, ``--nj``) without losing
the keys it finished. Each finished key's matrix is appended to ``feats.J.ark.partial`` and flushed,
then one JSON line is appended to ``progress.J.jsonl`` (wav path, scp offset, byte end of the
matrix, frame count, ASR text; or the skip reason), whose first line holds the settings the outputs
depend on (Whisper spec and config, the ASR settings, ``feats_dtype``). A rerun keeps the records that
are a prefix of the job's keys with unchanged wav paths, in whole chunks (a chunk's windows are then
those of an uninterrupted run), drops an unfinished last line, truncates the ark
where the last kept matrix ends and continues, so every output is byte-for-byte that of an
uninterrupted run. Other settings, a changed or rewritten wav (path, size, modification time) or a
changed key list restart the job from scratch with a warning: features of different runs are never
mixed. With ASR on, the device type is a setting (Whisper decodes in float16 on a GPU).

The final files are written from the records only once every key is done (each atomically, the ark
renamed last). ``progress.J.jsonl`` stays beside them: a rerun of a completed job with the same
settings, keys and wav paths does nothing; any difference redoes it.

``--feats_dtype float16`` halves the disk. Kaldi's binary format has no half-precision matrix, so
float16 matrices go through kaldiio's numpy writer (``NPY`` + ``.npy`` bytes), which
``kaldiio.load_mat`` reads back as float16; ``.float()`` on them gives the stored values exactly.
float32 matrices stay Kaldi binary ``FM`` matrices.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import kaldiio
import numpy as np
import torch
from tqdm import tqdm

from speechllm.asr import Packing, transcribe_turns
from speechllm.features import (SAMPLE_RATE, check_audio, encode_audio, load_whisper, whisper_config,
                                write_whisper_record)
from speechllm.io_utils import InputError, atomic_write, file_stamp, read_kaldi_map
from speechllm.jobs import job_slice
from speechllm.logging_utils import setup_logging

log = logging.getLogger(__name__)

FEATS_DTYPES = {"float32": np.float32, "float16": np.float16}


def read_progress(path: Path) -> tuple[dict | None, list[dict]]:
    """The settings line and the key records of a progress file (``None, []`` if there is none).

    A kill can leave the last line unfinished (no newline yet); it is dropped. Any other bad line
    raises :class:`InputError` naming it.
    """
    if not path.exists():
        return None, []
    lines = path.read_bytes().split(b"\n")[:-1]  # the last piece is empty or an unfinished line
    objects = []
    for lineno, line in enumerate(lines, 1):
        try:
            objects.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path}:{lineno}: malformed progress line {line[:80]!r}") from None
    return (objects[0], objects[1:]) if objects else (None, [])


def reusable_records(progress: Path, ark: Path, settings: dict, keys: list[str],
                     wav_scp: dict[str, str]) -> tuple[list[dict], str | None]:
    """The records of an earlier run of this job that this run can keep, or why it must start over."""
    try:
        old, records = read_progress(progress)
    except InputError as e:
        return [], str(e)
    if old is None:
        return [], None
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
    if changed:
        return [], f"{progress} was written with other settings ({'; '.join(changed)})"
    if len(records) > len(keys):
        return [], f"{progress} has {len(records)} records, but the job has only {len(keys)} keys"
    for lineno, (record, key) in enumerate(zip(records, keys), 2):
        if record.get("key") != key:
            return [], f"{progress}:{lineno}: key {record.get('key')!r}, expected {key!r} (wav.scp or nj changed)"
        if record.get("wav") != wav_scp[key]:
            return [], f"{progress}:{lineno}: the wav of {key} changed ({record.get('wav')} -> {wav_scp[key]})"
        if record.get("wav_stamp") != file_stamp(wav_scp[key]):
            return [], f"{progress}:{lineno}: {wav_scp[key]} was rewritten since {key} was dumped"
    size = ark.stat().st_size if ark.exists() else 0
    if records and records[-1]["end"] > size:
        return [], f"{ark} has {size} bytes, but {progress} says {records[-1]['end']} were written"
    return records, None


class JobFiles:
    """Job ``job``'s files in ``outdir``: the outputs the recipe merges (``text_asr.J`` only with ASR), and the
    state a rerun resumes from."""

    def __init__(self, outdir: Path, job: int, asr: bool) -> None:
        self.ark, self.scp = outdir / f"feats.{job}.ark", outdir / f"feats.{job}.scp"
        self.partial, self.progress = Path(f"{self.ark}.partial"), outdir / f"progress.{job}.jsonl"
        names = ("text_asr", "utt2num_frames", "skipped") if asr else ("utt2num_frames", "skipped")
        self.lists = {name: outdir / f"{name}.{job}" for name in names}
        self.whisper = outdir / f"whisper.{job}"  # the recipe's dump/<set>/whisper record


def records_to_keep(files: JobFiles, settings: dict, keys: list[str], wav_scp: dict[str, str],
                    job_name: str, chunk: int) -> list[dict] | None:
    """The records of an earlier run to continue from (logged), or ``None`` when the job is already complete."""
    complete = files.ark.exists() and not files.partial.exists()
    records, reason = reusable_records(files.progress, files.ark if complete else files.partial, settings, keys,
                                       wav_scp)
    if complete:
        if reason is None and files.progress.exists() and len(records) == len(keys):
            missing = [p.name for p in (files.scp, *files.lists.values(), files.whisper) if not p.exists()]
            if missing:  # the records hold everything they say: write them again, keep the ark
                log.warning("%s: complete, but %s missing: written again from %s", job_name, ", ".join(missing),
                            files.progress.name)
                write_lists(files, records, settings["whisper"])
            else:
                log.info("%s: already complete with the same settings, keys and wav paths: nothing to do", job_name)
            return None
        if reason is None:
            reason = (f"{files.ark} has no {files.progress.name} to check it against" if not files.progress.exists()
                      else f"it completed with {len(records)} keys, the job has {len(keys)} now")
        log.warning("%s: redoing the completed job: %s", job_name, reason)
        return []
    if reason is not None:
        log.warning("%s: restarting from scratch: %s", job_name, reason)
    elif records:
        whole = len(records) // chunk * chunk  # the chunk in progress is redone whole: the same ASR windows
        log.info("%s: resuming, %d of %d keys already done (%d kept: whole chunks of %d)", job_name, len(records),
                 len(keys), whole, chunk)
        records = records[:whole]
    return records


def start_from(files: JobFiles, settings: dict, records: list[dict]) -> int:
    """Remove the final files (they appear only when the job completes), rewrite the progress file with
    the kept records (dropping an unfinished line), then cut the ark back to where their last matrix
    ends; return that offset."""
    for path in (files.scp, *files.lists.values(), files.whisper, files.ark):
        path.unlink(missing_ok=True)
    with atomic_write(files.progress) as f:
        f.writelines(json.dumps(obj) + "\n" for obj in [settings, *records])
    end = records[-1]["end"] if records else 0
    with open(files.partial, "ab") as f:
        f.truncate(end)
    return end


def write_lists(files: JobFiles, records: list[dict], whisper: str) -> None:
    """The scp and the per-key lists the recipe merges, from the records, and the record of ``--whisper``."""
    with atomic_write(files.scp) as f:
        f.writelines(f"{r['key']} {files.ark}:{r['offset']}\n" for r in records if "offset" in r)
    fields = {"text_asr": "text", "utt2num_frames": "frames", "skipped": "skipped"}
    for name in files.lists:
        field = fields[name]
        with atomic_write(files.lists[name]) as f:
            f.writelines(f"{r['key']} {r[field]}\n" for r in records if field in r)
    write_whisper_record(files.whisper, whisper)


def write_outputs(files: JobFiles, records: list[dict], whisper: str) -> None:
    """The files the recipe merges; the ark is renamed last, marking the job complete."""
    write_lists(files, records, whisper)
    os.replace(files.partial, files.ark)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--outdir", type=Path, required=True, help="where feats.J.{ark,scp}, text_asr.J go")
    parser.add_argument("--whisper", required=True, help="Whisper name, checkpoint path or YAML config")
    parser.add_argument("--job", type=int, default=1)
    parser.add_argument("--nj", type=int, default=1)
    parser.add_argument("--asr", type=lambda s: s.lower() == "true", default=True,
                        help="also write Whisper ASR hypotheses (true/false)")
    parser.add_argument("--asr_pack", type=lambda s: s.lower() == "true", default=True,
                        help="ASR of several short turns per 30-s Whisper window (true/false); false: one window each")
    parser.add_argument("--asr_chunk", type=int, default=32,
                        help="turns per batched ASR call (packed in order); a killed job resumes at a multiple of it")
    parser.add_argument("--feats_dtype", choices=sorted(FEATS_DTYPES), default="float32",
                        help="stored precision of the features (float16: half the disk)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.asr_chunk < 1:
        parser.error(f"--asr_chunk must be at least 1, got {args.asr_chunk}")
    setup_logging()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    wav_scp = read_kaldi_map(args.data_dir / "wav.scp")
    keys = job_slice(list(wav_scp), args.job, args.nj)
    cfg = whisper_config(args.whisper)
    # Greedy ASR decodes in float16 on a GPU, so its transcripts depend on the device (the features
    # differ by rounding only).
    chunk = args.asr_chunk if args.asr else 1  # without ASR each turn is done on its own
    settings = {"whisper": args.whisper, "asr": args.asr, "asr_pack": args.asr and args.asr_pack,
                "asr_chunk": chunk if args.asr else None,
                "feats_dtype": args.feats_dtype,
                "whisper_config": asdict(cfg),
                "asr_device": torch.device(args.device).type if args.asr else None}
    settings = json.loads(json.dumps(settings))  # as an earlier run's settings read back from JSON
    job_name = f"job {args.job}/{args.nj}"
    args.outdir.mkdir(parents=True, exist_ok=True)
    files = JobFiles(args.outdir, args.job, args.asr)
    records = records_to_keep(files, settings, keys, wav_scp, job_name, chunk)
    if records is None:
        return
    end = start_from(files, settings, records)

    model = load_whisper(cfg, args.device)
    dtype = FEATS_DTYPES[args.feats_dtype]
    write_function = "numpy" if dtype == np.float16 else None  # Kaldi binary matrices are float32/64 only
    packing = Packing() if args.asr and args.asr_pack else None
    audio_seconds, n_encoded, n_fallback, start = 0.0, 0, 0, time.time()
    with open(files.partial, "r+b") as ark, open(files.progress, "a", encoding="utf-8") as progress, \
            tqdm(desc=f"dump {job_name}", unit="utt", initial=len(records), total=len(keys)) as bar:
        ark.seek(end)
        for first in range(len(records), len(keys), chunk):
            todo = keys[first : first + chunk]
            audios = dict(zip(todo, (check_audio(wav_scp[key]) for key in todo)))
            usable = [key for key in todo if audios[key][0] is not None]
            texts: dict[str, str] = {}
            if args.asr:
                hyps, fallbacks = transcribe_turns(model, [audios[key][0] for key in usable], packing,
                                                   cfg.asr_max_tokens)
                texts, n_fallback = dict(zip(usable, hyps)), n_fallback + fallbacks
            for key in todo:
                record = {"key": key, "wav": wav_scp[key], "wav_stamp": file_stamp(wav_scp[key])}
                audio, reason = audios[key]
                feats = None if audio is None else encode_audio(model, audio, cfg.pad_30s)
                if feats is not None and not np.isfinite(feats).all():
                    reason = "not finite (the encoder's output)"
                elif feats is not None:
                    feats = feats.astype(dtype)
                    if not np.isfinite(feats).all():
                        reason = f"not finite as {args.feats_dtype} (an encoder output beyond its range)"
                if reason is not None:
                    log.warning("skipping %s (%s): %s", key, wav_scp[key], reason)
                    record["skipped"] = reason
                else:
                    if args.asr:
                        record["text"] = texts[key]
                    record["offset"] = ark.tell() + len(f"{key} ".encode())  # the matrix follows "key "
                    kaldiio.save_ark(ark, {key: feats}, write_function=write_function)
                    ark.flush()  # the matrix is in the ark before its record claims it
                    record["frames"] = len(feats)
                    audio_seconds += len(audio) / SAMPLE_RATE
                    n_encoded += 1
                record["end"] = ark.tell()
                progress.write(json.dumps(record) + "\n")
                progress.flush()
                records.append(record)
            bar.update(len(todo))
    write_outputs(files, records, args.whisper)
    n_skipped = sum("skipped" in r for r in records)
    elapsed = time.time() - start
    log.info("%s: %d utterances encoded (%d in this run), %d skipped, %.1f s audio in %.1f s (RTF %.3f)",
             job_name, len(records) - n_skipped, n_encoded, n_skipped, audio_seconds, elapsed,
             elapsed / max(audio_seconds, 1e-9))
    if packing is not None:
        log.info("%s: ASR of %d turns in shared windows, %d of them in a window of their own (fallback)",
                 job_name, n_encoded, n_fallback)


if __name__ == "__main__":
    main()
