"""Held-out slot values that no training text contains: "heard" told apart from "remembered".

A model can output a value it was trained on without hearing it (a prior that happens to match the
turn); a value that occurs in no training transcript, nor in the alignment corpus, can only have
come from the audio. :class:`SeenText` holds every run of up to ``max_len`` normalised tokens (as
the slot metrics normalise them) of the training texts; a value is novel when its tokens are not
among them.
"""

from __future__ import annotations

from typing import Iterable

from speechllm.metrics import value_tokens
from speechllm.slots import Slots, filled_pairs


class SeenText:
    def __init__(self, texts: Iterable[str], max_len: int = 8) -> None:
        self.max_len = max_len
        self.runs: set[tuple[str, ...]] = set()
        for text in texts:
            tokens = value_tokens(text)
            for i in range(len(tokens)):
                for n in range(1, min(max_len, len(tokens) - i) + 1):
                    self.runs.add(tokens[i : i + n])

    def seen(self, value: str) -> bool:
        """Whether a training text holds ``value``; a value longer than ``max_len`` tokens counts as
        seen when each of its ``max_len``-token windows is (so novelty is never overstated)."""
        tokens = value_tokens(value)
        n = min(len(tokens), self.max_len)
        return all(tokens[i : i + n] in self.runs for i in range(len(tokens) - n + 1))

    def novel_values(self, slots: Slots) -> list[str]:
        """The turn's filled values that no training text holds."""
        return [value for _, value in filled_pairs(slots) if not self.seen(value)]

    def novel_turn(self, slots: Slots) -> bool:
        """A turn with filled values, none of which a training text holds."""
        pairs = filled_pairs(slots)
        return bool(pairs) and len(self.novel_values(slots)) == len(pairs)
