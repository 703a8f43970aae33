"""Training time: a budget of training minutes, and a job's time limit that must not kill a step.

Evaluation time is not training time: learning curves plot F1 against the seconds spent training.
Near the job's end, training checkpoints and stops on purpose (:class:`TimeLimit`), leaving room for
the checkpoint and for a step as slow as the slowest seen so far (evaluations included).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from speechllm.distributed import World

# seconds kept free before the job's end: a checkpoint to write, and a step slower than the slowest seen
STOP_MARGIN_S = 120


class TimeLimit(Exception):
    """Training stopped before the job's time limit, after a checkpoint: run it again to continue."""


class Budget:
    def __init__(self, max_minutes: float | None, world: World, spent_s: float = 0.0) -> None:
        """``spent_s``: the training seconds of the jobs before this one (from the checkpoint resumed)."""
        self.max_minutes, self.world, self.spent_s = max_minutes, world, spent_s
        self.start = time.time()
        self.excluded = 0.0
        self.slowest = 0.0
        self.last_check: float | None = None

    def train_seconds(self) -> float:
        """Training seconds of the run so far, earlier jobs included."""
        return self.spent_s + time.time() - self.start - self.excluded

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training."""
        start = time.time()
        yield
        self.excluded += time.time() - start

    def job_ending(self, stop_at: float | None) -> bool:
        """Whether, on any rank, one more step could outlast the job that ends at ``stop_at`` (a Unix time;
        None: no limit). Call it once before every step: it times the stretches between calls."""
        now = time.time()
        if self.last_check is not None:
            self.slowest = max(self.slowest, now - self.last_check)
        self.last_check = now
        return stop_at is not None and self.world.any(now + self.slowest + STOP_MARGIN_S > stop_at)

    def spent(self, share: float = 1.0) -> bool:
        """Whether the training minutes (or ``share`` of them) are used up, on any rank."""
        return self.max_minutes is not None and self.world.any(self.train_seconds() > share * 60 * self.max_minutes)
