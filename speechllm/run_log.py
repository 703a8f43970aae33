"""What training reports: ``train_log.jsonl`` and TensorBoard scalars, written by rank 0 only.

Losses are averaged over the steps since the last report and over every rank, so the logged loss
is the same whatever the number of GPUs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from speechllm.distributed import World
from speechllm.io_utils import atomic_write

log = logging.getLogger(__name__)

SCALARS = {"loss": "train/loss", "ctc_loss": "train/ctc_loss", "lr": "train/lr", "valid_loss": "valid/loss"}


def cut_back(path: Path, step: int, redo_epoch_end: bool = False) -> None:
    """Drop the records after ``step`` (the checkpoint a run resumes from): a killed run's steps past its
    last checkpoint are trained again, and would otherwise be logged twice. ``redo_epoch_end``: the
    checkpoint closed an epoch whose validation the resumed run does again, so its record goes too.
    A line cut short by the kill is dropped with a warning."""
    if not path.exists():
        return
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    kept, n_bad = [], 0
    for line in lines:
        try:
            row = json.loads(line)
            at = row.get("step", 0)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            n_bad += 1
            continue
        if at < step or (at == step and not (redo_epoch_end and "valid_loss" in row)):
            kept.append(line)
    if n_bad:
        log.warning("%s: %d malformed lines dropped (written when the run was killed?)", path, n_bad)
    if len(kept) < len(lines):
        with atomic_write(path, "wb") as f:
            f.writelines(line + b"\n" for line in kept)


class RunLog:
    def __init__(self, outdir: Path, world: World, with_ctc: bool = False, step: int = 0,
                 redo_epoch_end: bool = False) -> None:
        """``with_ctc``: training adds an auxiliary CTC loss, reported beside the LLM's. ``step`` and
        ``redo_epoch_end``: where the run starts; what ``train_log.jsonl`` and ``curve.jsonl`` hold after
        it is dropped (:func:`cut_back`)."""
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.world, self.with_ctc = outdir / "train_log.jsonl", world, with_ctc
        self.writer = SummaryWriter(str(outdir / "tensorboard")) if world.is_main else None
        if world.is_main:
            for path in (self.path, outdir / "curve.jsonl"):
                cut_back(path, step, redo_epoch_end)
        self.loss = self.ctc_loss = 0.0
        self.steps = 0

    def add_step(self, loss: float, ctc_loss: float) -> None:
        """This rank's share of a step's loss, and its auxiliary CTC loss."""
        self.loss, self.ctc_loss, self.steps = self.loss + loss, self.ctc_loss + ctc_loss, self.steps + 1

    def window(self) -> dict[str, float]:
        """The mean losses since the last call, over every rank (a collective: call it on every rank);
        none when every step since was skipped (ranks skip steps together)."""
        if self.steps == 0:
            return {}
        means = {"loss": self.world.sum(self.loss) / self.steps}
        if self.with_ctc:
            means["ctc_loss"] = self.world.sum(self.ctc_loss) / (self.steps * self.world.size)
        self.loss = self.ctc_loss = 0.0
        self.steps = 0
        return means

    def record(self, record: dict) -> None:
        """One line of train_log.jsonl, and its known scalars in TensorBoard."""
        if self.writer is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, tag in SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["step"])

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
