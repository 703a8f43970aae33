"""Training checkpoints: ``checkpoints/step_N/state.pt`` in the experiment dir, the newest few kept.

A checkpoint holds what an exact resume needs: the trainable weights, the optimizer and scheduler,
the data position and every RNG state. It is written aside and renamed, so that a run killed while
writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from speechllm.io_utils import aside, replace_dir

PATTERN = "step_???????"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(outdir: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` as step ``step``'s checkpoint and delete all but the newest ``keep``."""
    ckpt = outdir / "checkpoints" / f"step_{step:07d}"
    for stale in ckpt.parent.glob("*.tmp"):  # left by a run killed while saving (one trainer holds the dir)
        shutil.rmtree(stale, ignore_errors=True)
    with aside(ckpt) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "state.pt")
        replace_dir(tmp, ckpt)  # the same step saved again (the final save) keeps the first until then
    for old in sorted((outdir / "checkpoints").glob(PATTERN))[:-keep]:
        shutil.rmtree(old)
    return ckpt


def latest_checkpoint(outdir: Path) -> Path | None:
    ckpts = sorted((outdir / "checkpoints").glob(PATTERN))
    return ckpts[-1] if ckpts else None


def load_checkpoint(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
