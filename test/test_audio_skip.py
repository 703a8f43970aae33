"""Stage 1's handling of the audio it is given: unusable turns (missing or corrupt file, under 0.1 s,
over 30 s) are skipped and listed with their reason and counted; other sampling rates are resampled
to 16 kHz and several channels averaged into one. The encoder is the random tiny Whisper-shaped model
of the mini preset, so no real Whisper is needed."""

import logging
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import soundfile as sf

from conftest import RECIPE, copy_recipe, run
from speechllm.bin import dump_feats
from speechllm.features import read_audio

WHISPER = RECIPE / "conf" / "whisper" / "tiny_random.yaml"
TONE_HZ = 440
# the stereo turn: two different channels, and their mean worked out by hand (exact in float32)
LEFT, RIGHT, MEAN = [0.5, -0.5, 0.25, 1.0], [-0.25, 0.5, 0.75, 0.0], [0.125, 0.0, 0.5, 0.5]


def tone(seconds: float, rate: int) -> np.ndarray:
    n = round(seconds * rate)
    return (0.3 * np.sin(2 * np.pi * TONE_HZ * np.arange(n) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    wavs = {}

    def write(key, audio, rate, **kwargs):
        wavs[key] = root / f"{key}.wav"
        sf.write(wavs[key], audio, rate, subtype="FLOAT", **kwargs)

    write("ok_16k", tone(1.0, 16000), 16000)
    write("rate_44k", tone(0.5, 44100), 44100)
    write("rate_8k", tone(0.75, 8000), 8000)
    write("stereo", np.stack([np.tile(LEFT, 800), np.tile(RIGHT, 800)], axis=1).astype(np.float32), 16000)
    write("stereo_mean", np.tile(MEAN, 800).astype(np.float32), 16000)  # what the stereo turn must become
    write("edge_short", tone(0.1, 16000), 16000)  # 1600 samples: exactly 0.1 s is kept
    write("edge_long", tone(30.0, 16000), 16000)  # exactly 30 s is kept
    write("x_too_short", tone(0.1, 16000)[:-1], 16000)  # one sample under 0.1 s
    write("x_too_short_8k", tone(0.05, 8000), 8000)  # 400 samples, 800 at 16 kHz
    write("x_no_samples", np.zeros(0, np.float32), 16000)
    write("x_too_long", np.zeros(30 * 16000 + 1, np.float32), 16000)  # one sample over 30 s
    write("x_too_long_44k", np.zeros(1331820, np.float32), 44100)  # 30.2 s (483200 samples at 16 kHz)
    (root / "corrupt.wav").write_bytes(b"not a wav file")
    wavs["x_corrupt"] = root / "corrupt.wav"
    wavs["x_missing"] = root / "missing.wav"  # never written
    (root / "wav.scp").write_text("".join(f"{key} {path}\n" for key, path in sorted(wavs.items())))
    return root


# by hand: T = ((samples // 160) + 1) // 2 encoder frames at 50 per second, samples counted at 16 kHz
FRAMES = {"edge_long": 1500, "edge_short": 5, "ok_16k": 50, "rate_44k": 25, "rate_8k": 38, "stereo": 10,
          "stereo_mean": 10}


def skipped_reasons(data_dir: Path) -> dict[str, str]:
    return {"x_corrupt": f"unreadable (Error opening '{data_dir / 'corrupt.wav'}': Format not recognised.)",
            "x_missing": f"unreadable (Error opening '{data_dir / 'missing.wav'}': System error.)",
            "x_no_samples": "empty", "x_too_long": "longer than 30 s (30.0 s)",
            "x_too_long_44k": "longer than 30 s (30.2 s)", "x_too_short": "empty", "x_too_short_8k": "empty"}


def kaldi_map(path: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) if " " in line else (line, "") for line in path.read_text().splitlines())


class LogCapture(logging.Handler):
    """The messages dump_feats logs (caplog is function-scoped; the dump is done once per module)."""

    def __enter__(self):
        self.messages, self.logger = [], logging.getLogger(dump_feats.__name__)
        self.level, self.logger.level = self.logger.level, logging.INFO
        self.logger.addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.level = self.level

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def dump(data_dir, tmp_path_factory):
    """One in-process stage-1 job over the data dir, and its log."""
    outdir = tmp_path_factory.mktemp("dump")
    with pytest.MonkeyPatch.context() as mp, LogCapture() as records:
        mp.setattr(dump_feats, "setup_logging", lambda: None)
        dump_feats.main(["--data_dir", str(data_dir), "--outdir", str(outdir), "--whisper", str(WHISPER),
                         "--device", "cpu"])
    return outdir, "\n".join(records)


def test_unusable_turns_are_skipped_listed_and_counted(data_dir, dump):
    outdir, log = dump
    reasons = skipped_reasons(data_dir)
    skipped = outdir / "skipped.1"
    assert skipped.read_text() == "".join(f"{key} {reason}\n" for key, reason in sorted(reasons.items()))
    wavs = kaldi_map(data_dir / "wav.scp")
    for key, reason in reasons.items():
        assert f"skipping {key} ({wavs[key]}): {reason}" in log, key
    assert log.count("skipping ") == 7
    # 30 + 1 + 0.75 + 0.5 + 0.2 + 0.2 + 0.1 s of audio encoded
    assert "job 1/1: 7 utterances encoded (7 in this run), 7 skipped, 32.8 s audio in " in log
    # the usable turns, and only they, have features, a frame count and a transcript
    assert {k: int(v) for k, v in kaldi_map(outdir / "utt2num_frames.1").items()} == FRAMES
    assert list(kaldi_map(outdir / "text_asr.1")) == sorted(FRAMES)
    feats = dict(kaldiio.load_scp(str(outdir / "feats.1.scp")))
    assert {key: mat.shape for key, mat in feats.items()} == {key: (t, 64) for key, t in FRAMES.items()}


def test_other_rates_are_resampled_to_16k(data_dir):
    for key, samples in (("ok_16k", 16000), ("rate_44k", 8000), ("rate_8k", 12000)):
        audio = read_audio(str(data_dir / f"{key}.wav"))
        assert audio.dtype == np.float32 and audio.shape == (samples,), key
        # the 440 Hz tone stays at 440 Hz: FFT bin 440 / (16000 / samples)
        assert np.argmax(np.abs(np.fft.rfft(audio))) == TONE_HZ * samples // 16000, key
    assert read_audio(str(data_dir / "x_too_long_44k.wav")).shape == (483200,)


def test_stereo_becomes_the_mean_of_its_channels(data_dir, dump):
    audio = read_audio(str(data_dir / "stereo.wav"))
    assert audio.dtype == np.float32 and np.array_equal(audio, np.tile(np.float32(MEAN), 800))
    outdir, _ = dump
    feats = dict(kaldiio.load_scp(str(outdir / "feats.1.scp")))
    assert np.array_equal(feats["stereo"], feats["stereo_mean"])  # encoded as the mono mean would be
    asr = kaldi_map(outdir / "text_asr.1")
    assert asr["stereo"] == asr["stereo_mean"]


def test_the_recipe_merges_the_skipped_lists_of_its_jobs(data_dir, tmp_path):
    """Stage 1 of sf.sh in two jobs: dump/<set>/skipped holds every skipped turn, sorted, and the log counts them."""
    recipe = copy_recipe(tmp_path)
    (recipe / "data" / "mine").mkdir(parents=True)
    (recipe / "data" / "mine" / "wav.scp").write_text((data_dir / "wav.scp").read_text())
    proc = run(recipe, "--stage", "1", "--stop_stage", "1", "--nj", "2", "--whisper", "conf/whisper/tiny_random.yaml",
               "--train_set", "mine", "--valid_set", "", "--test_sets", "", "--align_calls", "0")  # no corpus: not tested here
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dump_dir = recipe / "dump" / "mine"
    reasons = skipped_reasons(data_dir)
    assert (dump_dir / "skipped").read_text() == "".join(f"{k} {r}\n" for k, r in sorted(reasons.items()))
    # wav.scp is split in the middle: job 1 has the 7 usable turns, job 2 the 7 skipped ones
    assert (dump_dir / "split2" / "skipped.1").read_text() == ""
    assert "dump/mine: 7 utterances, 7 skipped (see dump/mine/skipped)" in proc.stdout
    assert {k: int(v) for k, v in kaldi_map(dump_dir / "utt2num_frames").items()} == FRAMES
