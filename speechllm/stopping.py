"""When a generated row is done: each row of a batch stops on its own, so one long row costs its own tokens.

``generate`` runs a batch until its last row ends, so every row's tail of padding costs as much as the
longest row. :class:`RowStops` ends a row as soon as one of these holds, and records why:

- ``eos``: the model emitted EOS;
- ``answer``: the answer is complete: ``</response>`` after a reasoning trace (an output that opens
  with ``<thinking>``), else the object opened by the first ``{`` has closed. What a model writes after that
  is never read (:func:`speechllm.parsing.parse_slots` takes the first object of the response);
- ``loop``: a degenerate row: the same ``ngram`` tokens have appeared ``repeats`` times (an answer
  that repeats its last keys forever would otherwise run to the cap);
- ``cap``: none of these before ``max_new_tokens`` (set by :meth:`RowStops.reasons`).
"""

from __future__ import annotations

from collections import Counter

import torch
from transformers import StoppingCriteria

from speechllm.parsing import first_braced

LOOP_NGRAM, LOOP_REPEATS = 16, 3
STOPS = ("eos", "answer", "loop", "cap")


def answer_complete(text: str) -> bool:
    """Whether ``text`` holds a whole answer: a reasoning output's ``</response>``, else a closed JSON object."""
    if text.lstrip().startswith("<thinking>"):
        return "</response>" in text
    body = first_braced(text)  # the object opened by the first brace: later text cannot change it
    return body is not None and text.startswith(body, text.find("{"))


class RowStops(StoppingCriteria):
    """Per-row stopping for ``generate`` (greedy); afterwards :meth:`reasons` and :attr:`lengths` say where
    and why each row stopped. ``generate`` pads a stopped row, so the row's own tokens are its first
    ``lengths[i]``."""

    def __init__(self, tokenizer, batch_size: int, ngram: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> None:
        self.tokenizer, self.ngram, self.repeats = tokenizer, ngram, repeats
        self.stopped: list[str | None] = [None] * batch_size
        self.lengths = [0] * batch_size
        self.seen = [Counter() for _ in range(batch_size)]

    def _reason(self, row: int, ids: list[int]) -> str | None:
        if ids[-1] == self.tokenizer.eos_token_id:
            return "eos"
        if len(ids) >= self.ngram:
            gram = tuple(ids[-self.ngram:])
            self.seen[row][gram] += 1
            if self.seen[row][gram] >= self.repeats:
                return "loop"
        # only a token that can close a brace or a tag can complete the answer
        if any(c in self.tokenizer.decode(ids[-1:]) for c in "}>") and answer_complete(self.tokenizer.decode(ids)):
            return "answer"
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        # given only inputs_embeds, ``input_ids`` holds the new tokens alone
        done = torch.zeros(len(self.stopped), dtype=torch.bool, device=input_ids.device)
        for row, ids in enumerate(input_ids.tolist()):
            if self.stopped[row] is None:
                self.lengths[row] = len(ids)
                self.stopped[row] = self._reason(row, ids)
            done[row] = self.stopped[row] is not None
        return done

    def reasons(self) -> list[str]:
        """Why each row stopped, ``cap`` for the rows that ran to ``max_new_tokens``."""
        return [reason or "cap" for reason in self.stopped]
