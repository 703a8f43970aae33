"""The frozen Whisper encoder (stage 1): true-length encoder outputs (the ASR hypotheses are :mod:`speechllm.asr`'s).

Whisper's ``AudioEncoder.forward`` insists on 30 s of input. Running its layers on the turn's true
length (slicing the positional embedding) gives the same frames for the speech part at a fraction of
the cost; ``pad_30s=True`` keeps the original behaviour and trims afterwards, for comparison.
Audio is read with soundfile (no ffmpeg binary) and handed to Whisper as arrays.

Stage 1 records the encoder in ``dump/<set>/whisper`` (:func:`read_whisper_record`), as ESPnet records
``feats_type``: training takes it from there, and stage 5 names it in ``scores.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import whisper
from scipy.signal import resample_poly
from whisper.model import ModelDimensions, Whisper

from speechllm.config import load_yaml_dataclass
from speechllm.io_utils import InputError, atomic_write, read_lines
from speechllm.pretrained import whisper_checkpoint

log = logging.getLogger(__name__)

SAMPLE_RATE = whisper.audio.SAMPLE_RATE
MAX_SECONDS = whisper.audio.CHUNK_LENGTH
WHISPER_RECORD = "whisper"  # the file name of stage 1's record in dump/<set>/


@dataclass
class WhisperConfig:
    """How to get the encoder: a Whisper size name / checkpoint path, or a random tiny model."""

    name_or_path: str = "base"
    random_init_dims: dict = field(default_factory=dict)  # ModelDimensions fields; set for tests/mini
    seed: int = 0
    pad_30s: bool = False
    asr_max_tokens: int | None = None  # cap on ASR hypothesis length (None: Whisper's default)


def resolve_whisper(name_or_path: str) -> str:
    """A checkpoint path: the file itself, the converted offline copy in the model cache, or
    else the name for ``whisper.load_model`` to download."""
    if Path(name_or_path).is_file():
        return name_or_path
    cached = whisper_checkpoint(name_or_path)
    return str(cached) if cached.is_file() else name_or_path


def load_whisper(cfg: WhisperConfig, device: str = "cpu") -> Whisper:
    if cfg.random_init_dims:
        torch.manual_seed(cfg.seed)
        model = Whisper(ModelDimensions(**cfg.random_init_dims))
        # openai-whisper leaves the decoder's positional embedding uninitialised (checkpoints fill it):
        # without this the random model's ASR output would change from run to run
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
        return model.to(device).eval()
    source = resolve_whisper(cfg.name_or_path)
    log.info("loading Whisper from %s", source)
    return whisper.load_model(source, device=device).eval()


def whisper_record(spec: str) -> str:
    """How stage 1 records ``--whisper``: a name as given, a file (checkpoint or YAML) by its absolute
    path, so that training and ``speechllm-infer`` find it from any working directory."""
    return str(Path(spec).resolve()) if Path(spec).is_file() else spec


def write_whisper_record(path: Path, spec: str) -> None:
    """One line naming the Whisper of ``spec`` (:func:`whisper_record`)."""
    with atomic_write(path) as f:
        f.write(whisper_record(spec) + "\n")


def read_whisper_record(dump_dir: Path) -> str | None:
    """The Whisper that stage 1 dumped ``dump_dir``'s features with; ``None`` for a dump older than the record."""
    path = Path(dump_dir) / WHISPER_RECORD
    if not path.exists():
        return None
    lines = [line for _, line in read_lines(path)]
    if not lines or not lines[0].strip():
        raise InputError(f"{path}:1: empty, expected the name or path of a Whisper model")
    if len(lines) > 1:
        raise InputError(f"{path}:2: expected one line (the name or path of a Whisper model), got {len(lines)}")
    return lines[0].strip()


def whisper_config(spec: str) -> WhisperConfig:
    """The :class:`WhisperConfig` of a YAML file or a Whisper name / checkpoint path, without loading weights."""
    return load_yaml_dataclass(spec, WhisperConfig) if spec.endswith((".yaml", ".yml")) else WhisperConfig(spec)


def load_whisper_spec(spec: str, device: str = "cpu") -> tuple[Whisper, WhisperConfig]:
    """``spec`` is a YAML file describing a :class:`WhisperConfig`, or a Whisper name / checkpoint path."""
    cfg = whisper_config(spec)
    return load_whisper(cfg, device), cfg


def resample_to_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    if sr == SAMPLE_RATE:
        return audio
    g = gcd(sr, SAMPLE_RATE)
    return resample_poly(audio, SAMPLE_RATE // g, sr // g).astype(np.float32)


def read_audio(path: str) -> np.ndarray:
    """Mono float32 at 16 kHz (other rates are resampled)."""
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    return resample_to_16k(audio.mean(axis=1), sr)


@torch.no_grad()
def encode_audio(model: Whisper, audio: np.ndarray, pad_30s: bool = False) -> np.ndarray:
    """Encoder outputs ``[T, d_model]`` at 50 Hz for the true length of ``audio``."""
    encoder, device = model.encoder, next(model.parameters()).device
    n_frames = len(audio) // whisper.audio.HOP_LENGTH
    n_out = max(1, (n_frames + 1) // 2)
    if pad_30s:
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), model.dims.n_mels).to(device)
        return encoder(mel[None].to(encoder.conv1.weight.dtype))[0, :n_out].float().cpu().numpy()
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), model.dims.n_mels)[:, : 2 * n_out]
    mel = F.pad(mel, (0, 2 * n_out - mel.shape[1])).to(device, encoder.conv1.weight.dtype)
    x = F.gelu(encoder.conv1(mel[None]))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.positional_embedding[: x.shape[1]].to(x.dtype)
    for block in encoder.blocks:
        x = block(x)
    return encoder.ln_post(x)[0].float().cpu().numpy()


def check_audio(path: str | Path) -> tuple[np.ndarray | None, str | None]:
    """Load a turn, or return the reason it must be skipped (missing, corrupt, not finite, empty, too long)."""
    try:
        audio = read_audio(str(path))
    except (OSError, RuntimeError, ValueError, sf.LibsndfileError) as e:
        return None, f"unreadable ({e})"
    bad = int(np.count_nonzero(~np.isfinite(audio)))
    if bad:  # a float wav can hold NaN or inf samples; one such turn would make every trained weight NaN
        return None, f"not finite ({bad} NaN or infinite samples)"
    if len(audio) < SAMPLE_RATE // 10:  # under 0.1 s: fewer than 4 encoder frames
        return None, "empty"
    if len(audio) > MAX_SECONDS * SAMPLE_RATE:
        return None, f"longer than {MAX_SECONDS} s ({len(audio) / SAMPLE_RATE:.1f} s)"
    return audio, None
