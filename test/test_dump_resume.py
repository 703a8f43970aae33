"""Stage 1 (dump_feats): a killed job resumes where it stopped and ends with the bytes of an
uninterrupted run; other settings restart it; float16 features take half the disk and load exactly."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import kaldiio
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from conftest import RECIPE, REPO
from speechllm.bin import dump_feats
from speechllm.data import load_feats

WHISPER = RECIPE / "conf" / "whisper" / "tiny_random.yaml"
SKIPPED = {"utt03x": "empty", "utt20x": "unreadable"}  # sorted among the good turns: one early, one late
N_KEYS = 30 + len(SKIPPED)
CHUNK = ["--asr_chunk", "4"]  # keys per ASR call: a resumed job keeps whole chunks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """30 turns of 0.5-2 s noise or tones at 16 kHz, an empty one and an unreadable one."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(30):
        t = np.arange(int(rng.uniform(0.5, 2.0) * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) if i % 2 else 0.1 * rng.standard_normal(len(t))
        sf.write(root / f"utt{i:02d}.wav", audio.astype(np.float32), 16000)
        lines.append(f"utt{i:02d} {root / f'utt{i:02d}.wav'}")
    sf.write(root / "empty.wav", np.zeros(0, np.float32), 16000)
    (root / "broken.wav").write_bytes(b"not a wav file")
    lines += [f"utt03x {root / 'empty.wav'}", f"utt20x {root / 'broken.wav'}"]
    (root / "wav.scp").write_text("".join(f"{line}\n" for line in sorted(lines)))
    return root


def dump(data_dir: Path, outdir: Path, *flags: str, whisper: Path = WHISPER) -> None:
    """One in-process job, logging through pytest's capture (``setup_logging`` would replace its handler)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dump_feats, "setup_logging", lambda: None)
        dump_feats.main(["--data_dir", str(data_dir), "--outdir", str(outdir), "--whisper", str(whisper),
                         "--device", "cpu", *CHUNK, *flags])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted dumps of the data, in float32 and float16."""
    root = tmp_path_factory.mktemp("reference")
    for dtype in ("float32", "float16"):
        dump(data_dir, root / dtype, "--feats_dtype", dtype)
    return {dtype: root / dtype for dtype in ("float32", "float16")}


class Killed(Exception):
    pass


def count_encodes(monkeypatch, outdir: Path, die_after: int | None = None) -> list[int]:
    """Count ``encode_audio`` calls of a dump into ``outdir``; with ``die_after``, the job dies on the next call.

    Each call also checks that the matrices the progress file claims are in the ark file (flushed to
    the OS), as they must be for a kill at that moment.
    """
    calls, real = [], dump_feats.encode_audio
    progress, partial = outdir / "progress.1.jsonl", outdir / "feats.1.ark.partial"

    def counting(*args, **kwargs):
        lines = progress.read_bytes().splitlines()
        if len(lines) > 1:
            assert partial.stat().st_size >= json.loads(lines[-1])["end"], "a record came before its matrix"
        if die_after is not None and len(calls) == die_after:
            raise Killed
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dump_feats, "encode_audio", counting)
    return calls


def complete_records(progress: Path) -> int:
    return max(0, progress.read_bytes().count(b"\n") - 1)  # the first line holds the settings


def assert_same_dump(outdir: Path, reference: Path) -> None:
    for name in ("text_asr.1", "utt2num_frames.1", "skipped.1"):
        assert (outdir / name).read_bytes() == (reference / name).read_bytes(), name
    scp, ref_scp = outdir / "feats.1.scp", reference / "feats.1.scp"
    assert scp.read_text().replace(str(outdir), "<dir>") == ref_scp.read_text().replace(str(reference), "<dir>")
    feats, ref_feats = dict(kaldiio.load_scp(str(scp))), dict(kaldiio.load_scp(str(ref_scp)))
    assert list(feats) == list(ref_feats)
    for key, mat in ref_feats.items():
        assert feats[key].dtype == mat.dtype and np.array_equal(feats[key], mat), key
    assert (outdir / "feats.1.ark").read_bytes() == (reference / "feats.1.ark").read_bytes()
    assert not (outdir / "feats.1.ark.partial").exists()


def test_uninterrupted_dump_lists_every_turn(reference):
    skipped = dict(line.split(" ", 1) for line in (reference["float32"] / "skipped.1").read_text().splitlines())
    assert sorted(skipped) == sorted(SKIPPED)
    assert all(reason.startswith(SKIPPED[key]) for key, reason in skipped.items())
    for name in ("feats.1.scp", "text_asr.1", "utt2num_frames.1"):
        assert len((reference["float32"] / name).read_text().splitlines()) == N_KEYS - len(SKIPPED), name
    assert (reference["float32"] / "whisper.1").read_text() == f"{WHISPER.resolve()}\n"  # the set's record


def test_float32_ark_is_what_a_kaldiio_write_helper_writes(reference, tmp_path):
    ref = reference["float32"]
    ark, scp = tmp_path / "feats.1.ark", tmp_path / "feats.1.scp"
    with kaldiio.WriteHelper(f"ark,scp:{ark},{scp}") as writer:
        for key, mat in kaldiio.load_scp(str(ref / "feats.1.scp")).items():
            assert mat.dtype == np.float32
            writer(key, mat)
    assert ark.read_bytes() == (ref / "feats.1.ark").read_bytes()
    assert scp.read_text().replace(str(tmp_path), "<dir>") == (ref / "feats.1.scp").read_text().replace(
        str(ref), "<dir>")


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_job_resumes_where_it_stopped(data_dir, reference, tmp_path, monkeypatch, caplog, capsys, seed):
    kill_after = random.Random(seed).randint(1, 20)  # records of finished keys when the job is killed
    outdir = tmp_path / "dump"
    progress, partial = outdir / "progress.1.jsonl", outdir / "feats.1.ark.partial"
    with open(tmp_path / "killed.log", "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "speechllm.bin.dump_feats", "--data_dir", str(data_dir),
                                 "--outdir", str(outdir), "--whisper", str(WHISPER), "--device", "cpu", *CHUNK],
                                cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not progress.exists() or complete_records(progress) < kill_after:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            assert time.time() < deadline, "the dump did not get going"
            time.sleep(0.01)
        proc.kill()
        proc.wait()
    done = complete_records(progress)
    assert done < N_KEYS and not (outdir / "feats.1.ark").exists(), "the job finished before it was killed"
    if done % 4 == 0:  # records come a chunk at a time: stop within a chunk, whose finished keys must be redone
        lines = progress.read_bytes().splitlines(keepends=True)
        progress.write_bytes(b"".join(lines[:done]))  # the settings line and done - 1 records
        done -= 1
    with open(partial, "ab") as f:  # a kill in the middle of a matrix (longer than all still to come)
        f.write(b"utt09 \0BFM \4\x10\0\0\0\4" + bytes((reference["float32"] / "feats.1.ark").stat().st_size))
    with open(progress, "ab") as f:
        f.write(b'{"key": "utt09", "wav": "/da')

    caplog.set_level(logging.INFO)
    calls = count_encodes(monkeypatch, outdir)
    dump(data_dir, outdir)
    kept = done // 4 * 4
    assert f"job 1/1: resuming, {done} of {N_KEYS} keys already done ({kept} kept: whole chunks of 4)" in caplog.text
    todo = [line.split(" ")[0] for line in (data_dir / "wav.scp").read_text().splitlines()][kept:]
    assert len(calls) == len([key for key in todo if key not in SKIPPED])  # finished chunks were not re-encoded
    assert re.findall(rf"(\d+)/{N_KEYS}", capsys.readouterr().err)[0] == str(kept)  # the bar starts at them
    assert_same_dump(outdir, reference["float32"])


@pytest.mark.parametrize(("change", "reason"), [("whisper spec", "whisper '"), ("whisper config", "whisper_config {"),
                                               ("feats_dtype", "feats_dtype 'float16' -> 'float32'"),
                                               ("wav path", "the wav of utt01 changed"),
                                               ("wav rewritten", "utt01.wav was rewritten since utt01 was dumped")],
                         ids=["whisper spec", "whisper config", "feats_dtype", "wav path", "wav rewritten"])
def test_rerun_with_other_settings_or_wavs_restarts_from_scratch(change, reason, data_dir, reference, tmp_path,
                                                                 monkeypatch, caplog):
    outdir, whisper = tmp_path / "dump", tmp_path / "whisper.yaml"
    shutil.copy(WHISPER, whisper)
    first_data, first_flags, first_whisper = data_dir, [], WHISPER
    if change == "whisper spec":
        first_whisper = whisper
    elif change == "whisper config":  # same spec, edited YAML: another random Whisper
        cfg = yaml.safe_load(WHISPER.read_text())
        whisper.write_text(yaml.safe_dump({**cfg, "seed": 1}))
        first_whisper = whisper
    elif change == "feats_dtype":
        first_flags = ["--feats_dtype", "float16"]
    else:  # the first run read utt01 from another file (same audio), or from the same path rewritten since
        first_data = tmp_path / "data"
        first_data.mkdir()
        shutil.copy(data_dir / "utt01.wav", first_data / "utt01.wav")
        (first_data / "wav.scp").write_text((data_dir / "wav.scp").read_text().replace(
            str(data_dir / "utt01.wav"), str(first_data / "utt01.wav")))
    with monkeypatch.context() as mp:
        count_encodes(mp, outdir, die_after=6)
        with pytest.raises(Killed):
            dump(first_data, outdir, *first_flags, whisper=first_whisper)
    assert complete_records(outdir / "progress.1.jsonl") == 7  # 6 turns and an empty one
    if change == "whisper config":
        shutil.copy(WHISPER, whisper)
    if change == "wav rewritten":
        stat = (first_data / "utt01.wav").stat()
        os.utime(first_data / "utt01.wav", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    caplog.set_level(logging.INFO)
    calls = count_encodes(monkeypatch, outdir)
    dump(first_data if change == "wav rewritten" else data_dir, outdir,
         whisper=whisper if change == "whisper config" else WHISPER)
    assert "job 1/1: restarting from scratch: " in caplog.text and reason in caplog.text
    assert "resuming" not in caplog.text
    assert len(calls) == N_KEYS - len(SKIPPED)
    assert_same_dump(outdir, reference["float32"])


def test_completed_job_is_kept_unless_its_settings_changed(data_dir, reference, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # a recipe-relative outdir, as sf.sh passes it
    outdir = Path("dump")
    shutil.copytree(reference["float32"], outdir)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in outdir.iterdir()}
    caplog.set_level(logging.INFO)
    calls = count_encodes(monkeypatch, outdir)
    dump(data_dir, outdir)
    assert "job 1/1: already complete with the same settings, keys and wav paths: nothing to do" in caplog.text
    assert not calls
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in outdir.iterdir()} == before

    with monkeypatch.context() as mp:
        count_encodes(mp, outdir, die_after=5)
        with pytest.raises(Killed):
            dump(data_dir, outdir, "--feats_dtype", "float16")
    assert "job 1/1: redoing the completed job: " in caplog.text and "feats_dtype 'float32' -> 'float16'" in caplog.text
    assert sorted(p.name for p in outdir.iterdir()) == ["feats.1.ark.partial", "progress.1.jsonl"]  # no old outputs

    calls = count_encodes(monkeypatch, outdir)
    dump(data_dir, outdir, "--feats_dtype", "float16")
    # utt00-03, utt03x (empty) and utt04 were done; the first chunk (utt00-03) is kept
    assert "job 1/1: resuming, 6 of 32 keys already done (4 kept: whole chunks of 4)" in caplog.text
    assert len(calls) == N_KEYS - len(SKIPPED) - 4
    assert_same_dump(outdir, reference["float16"])

    for name in ("text_asr.1", "whisper.1"):  # a completed job missing a list gets it back from its records
        (outdir / name).unlink()
        calls = count_encodes(monkeypatch, outdir)
        dump(data_dir, outdir, "--feats_dtype", "float16")
        assert f"job 1/1: complete, but {name} missing: written again from progress.1.jsonl" in caplog.text
        assert not calls
        assert_same_dump(outdir, reference["float16"])
        assert (outdir / "whisper.1").read_text() == f"{WHISPER.resolve()}\n"


def test_float16_features_take_half_the_disk_and_load_unchanged(reference):
    half, full = reference["float16"], reference["float32"]
    ratio = (half / "feats.1.ark").stat().st_size / (full / "feats.1.ark").stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    feats16 = dict(kaldiio.load_scp(str(half / "feats.1.scp")))
    feats32 = dict(kaldiio.load_scp(str(full / "feats.1.scp")))
    assert list(feats16) == list(feats32)
    for key, mat in feats16.items():
        assert mat.dtype == np.float16 and np.array_equal(mat, feats32[key].astype(np.float16)), key
    for line in (half / "feats.1.scp").read_text().splitlines():
        key, location = line.split(" ", 1)
        loaded = load_feats(SimpleNamespace(feats_path=location))  # load_feats reads only .feats_path of an Example
        assert loaded.dtype == torch.float32 and torch.equal(loaded, torch.from_numpy(feats16[key]).float()), key
