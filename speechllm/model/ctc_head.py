"""A CTC output layer tied to the LLM's frozen input embeddings, and the token-space audio input.

The adapter's outputs are scored against rows of the embedding matrix plus one learnable blank
(logits = scale * out @ [blank; E[vocab]]^T). ``vocab`` is the set of token ids the head can emit:
by default the tokens of the training transcripts, since the softmax over a whole 49k-row table
dominates a step's cost and a token never spoken in training gets no CTC gradient anyway.

``collapse`` turns the posteriors into what the LLM reads with ``audio_input: ctc_tokens``: one
vector per emitted token (blank frames dropped, repeats merged) instead of 12.5 per second. With
``collapse: mix`` (as in LegoSLM) it is the posterior-weighted mix of token embeddings, which lies
in the convex hull of real rows and passes gradient back to the head; with ``collapse: hard`` it is
the embedding row of the best token, so the LLM reads exactly what it would read of the greedy
transcript as text (and the head gets no gradient from the LLM's loss).
"""

from __future__ import annotations

import math

import torch
from torch import nn

COLLAPSES = ("mix", "hard")


def token_vocab(tokenizer, texts: list[str]) -> torch.Tensor:
    """The sorted ids of every token that occurs in ``texts``."""
    ids = {t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]}
    return torch.tensor(sorted(ids), dtype=torch.long)


class CTCEmbeddingHead(nn.Module):
    """Class 0 is the learnable blank, class i the frozen embedding row of token ``vocab[i - 1]``.

    ``vocab`` is a saved buffer; the embedding rows are not saved (they are the LLM's)."""

    def __init__(self, embeddings: torch.Tensor, vocab: torch.Tensor, collapse: str = "mix") -> None:
        super().__init__()
        if collapse not in COLLAPSES:
            raise ValueError(f"collapse must be one of {COLLAPSES}, not {collapse!r}")
        self.hard = collapse == "hard"
        vocab = vocab.to(embeddings.device)
        table = embeddings.detach().float()[vocab]
        self.register_buffer("vocab", vocab)
        self.register_buffer("embeddings", table, persistent=False)
        self.blank = nn.Parameter(table.mean(0, keepdim=True).clone())
        # start with unit-scale logits: 1 / mean embedding norm
        self.log_scale = nn.Parameter(torch.tensor(-math.log(table.norm(dim=1).mean().item())))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.blank, self.embeddings])
        return self.log_scale.exp() * hidden.float() @ table.T

    def collapse(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [T, d]`` (one item's adapter outputs) -> ``[N, d]`` token-space vectors.

        Frames whose best class is the blank are dropped; each run of frames with the same best
        token becomes that token's embedding (hard) or the mean over the run of the frames'
        posterior-weighted token embeddings (mix; the posterior renormalised over the tokens, so the
        mix stays among real rows).
        """
        logits = self(hidden)
        best = logits.argmax(-1)
        starts = torch.ones_like(best, dtype=torch.bool)
        starts[1:] = best[1:] != best[:-1]
        keep = best != 0
        if self.hard:
            return self.embeddings[best[starts & keep] - 1]
        mixes = logits[:, 1:].softmax(-1) @ self.embeddings
        run = starts.cumsum(0) - 1  # run index of every frame
        if not keep.any():
            return mixes[:0]
        sums = mixes.new_zeros(int(run[-1]) + 1, mixes.shape[1]).index_add(0, run[keep], mixes[keep])
        counts = mixes.new_zeros(len(sums)).index_add(0, run[keep], mixes.new_ones(int(keep.sum())))
        emitted = counts > 0
        return sums[emitted] / counts[emitted, None]
