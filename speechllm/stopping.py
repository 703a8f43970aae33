"""When a generated row is done, so that a batch ends when its rows' answers do, not at the token cap.

``generate`` runs a batch until its last row ends: a row that rambles on after its answer, or loops,
keeps every row of its batch stepping. :class:`RowStops` ends a row as soon as one of these holds, and
records why:

- ``eos``: the model emitted EOS;
- ``answer``: the answer is complete: ``</response>`` once a ``<response>`` has opened, else the object
  that :func:`speechllm.parsing.parse_slots` reads (the first ``{...}`` of the response part: after the
  trace's closing tag, or a direct answer; nothing inside an open trace) has closed. What a model writes
  after that is never read;
- ``loop``: a degenerate row: the same ``ngram`` tokens at ``repeats`` equally spaced positions, i.e.
  a stretch repeated back to back (an answer that repeats its last keys forever would otherwise run
  to the cap). A value quoted several times in a reasoning trace is not equally spaced;
- ``cap``: none of these before ``max_new_tokens`` (set by :meth:`RowStops.reasons`).
"""

from __future__ import annotations

from collections import deque

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria

from speechllm.parsing import first_braced, response_part

LOOP_NGRAM, LOOP_REPEATS = 16, 3
STOPS = ("eos", "answer", "loop", "cap")


def answer_complete(text: str) -> bool:
    """Whether ``text`` holds a whole answer: a closed ``<response>``, else a closed object where
    :func:`~speechllm.parsing.parse_slots` looks for it."""
    if "<response>" in text:
        return "</response>" in text.split("<response>", 1)[1]
    part = response_part(text)
    body = first_braced(part)  # the object opened by the first brace: later text cannot change it
    return body is not None and part.startswith(body, part.find("{"))


class RowStops(StoppingCriteria):
    """Per-row stopping for ``generate`` (greedy); afterwards :meth:`reasons` and :attr:`lengths` say where
    and why each row stopped. ``generate`` pads a stopped row, so the row's own tokens are its first
    ``lengths[i]``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, batch_size: int, ngram: int = LOOP_NGRAM,
                 repeats: int = LOOP_REPEATS) -> None:
        self.tokenizer, self.ngram, self.repeats = tokenizer, ngram, repeats
        self.stopped: list[str | None] = [None] * batch_size
        self.ids: list[list[int]] = [[] for _ in range(batch_size)]
        self.seen: list[dict[tuple[int, ...], deque]] = [{} for _ in range(batch_size)]  # n-gram -> last ends

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]

    def _looping(self, row: int) -> bool:
        """Whether the row's last ``ngram`` tokens ended ``repeats`` times at equally spaced positions."""
        ids = self.ids[row]
        ends = self.seen[row].setdefault(tuple(ids[-self.ngram:]), deque(maxlen=self.repeats))
        ends.append(len(ids))
        gaps = {b - a for a, b in zip(ends, list(ends)[1:])}
        return len(ends) == self.repeats and len(gaps) == 1

    def _reason(self, row: int) -> str | None:
        ids = self.ids[row]
        if ids[-1] == self.tokenizer.eos_token_id:
            return "eos"
        if len(ids) >= self.ngram and self._looping(row):
            return "loop"
        # only a token that can close a brace or a tag can complete the answer
        if any(c in self.tokenizer.decode(ids[-1:]) for c in "}>") and answer_complete(self.tokenizer.decode(ids)):
            return "answer"
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        # given only inputs_embeds, ``input_ids`` holds the new tokens alone: its last column is this step's
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.stopped[row] is None:
                self.ids[row].append(token)
                self.stopped[row] = self._reason(row)
        return torch.tensor([reason is not None for reason in self.stopped], device=input_ids.device)

    def reasons(self) -> list[str]:
        """Why each row stopped, ``cap`` for the rows that ran to ``max_new_tokens``."""
        return [reason or "cap" for reason in self.stopped]
