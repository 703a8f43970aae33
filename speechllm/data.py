"""Training and decoding examples: JSONL rows with their Whisper features, batched by length.

Rows come from stage 2 (``dump/<set>/<mode>.jsonl``); features are read lazily from the ark.
Length bucketing sorts each chunk of ``bucket_batches`` batches by length before cutting it into
batches, so padding stays small while the order still changes every epoch (seeded).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import kaldiio
import torch

from speechllm.io_utils import InputError, read_jsonl
from speechllm.slots import Slots

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("id", "utt_id", "feats", "prompt", "target", "slots")


@dataclass
class Example:
    id: str
    utt_id: str
    feats: str | None  # kaldiio location "ark_path:offset"; None: a text-only (cascade) example
    prompt: str
    target: str
    slots: Slots
    mode: str
    text: str = ""
    n_frames: int = 0


def read_examples(path: str | Path, mode: str | None = None) -> list[Example]:
    """Rows of a stage-2 JSONL file, optionally only those of one mode (e.g. ``hybrid_think``)."""
    out = []
    for lineno, row in read_jsonl(path):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise InputError(f"{path}:{lineno}: missing key(s) {missing}")
        if mode is not None and row.get("mode") != mode:
            continue
        out.append(Example(row["id"], row["utt_id"], row["feats"], row["prompt"], row["target"], row["slots"],
                           row.get("mode", ""), row.get("text", ""), int(row.get("n_frames", 0))))
    if not out:
        raise InputError(f"{path}: no examples" + (f" of mode {mode!r}" if mode else ""))
    return out


def load_feats(example: Example) -> torch.Tensor | None:
    if example.feats is None:
        return None
    return torch.from_numpy(kaldiio.load_mat(example.feats).copy()).float()


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                     bucket_batches: int = 50, shuffle: bool = True) -> list[list[int]]:
    """Index batches for one epoch: shuffled, locally sorted by length, batches shuffled."""
    order = list(range(len(lengths)))
    rng = random.Random(f"batches-{seed}-{epoch}")
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * max(1, bucket_batches)
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches
