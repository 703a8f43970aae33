"""Adapter alignment phase (beyond the paper): CTC onto the LLM's frozen input-embedding space.

The adapter and a ``CTCEmbeddingHead`` (the embedding rows of the head's vocabulary plus a blank)
train with CTC against the transcript's LLM token ids. No LLM forward pass is needed, so a step
costs a small fraction of a slot-filling step. It pushes each audio position towards the
embeddings of the tokens spoken there, which the LLM already knows how to read; slot-filling
training then starts from the aligned adapter (and, with ``audio_input: ctc_tokens``, reads the
head's collapsed token-space output, and with ``ctc_weight`` keeps adding the same CTC loss,
``CTCObjective``, to the LLM's). Greedy CTC word error rate on held-out turns, and how many of
their slot values the greedy transcript contains, are logged as it trains (each evaluation's
transcripts in ``valid_hyp_step<N>.tsv``).
"""

from __future__ import annotations

import json
import logging
import random
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import jiwer
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from speechllm.data import Example, TokenizedSet, load_feats
from speechllm.distributed import World
from speechllm.io_utils import atomic_write
from speechllm.metrics import holds
from speechllm.model.adapter import FrameStackAdapter
from speechllm.model.ctc_head import CTCEmbeddingHead, token_vocab
from speechllm.model.speechllm import SpeechLLM
from speechllm.slots import filled_pairs

log = logging.getLogger(__name__)


@dataclass
class AlignConfig:
    """The ``align:`` block of a training config; ``steps: 0`` (the default) turns the phase off."""

    steps: int = 0
    batch_size: int = 16
    lr: float = 1.0e-3
    eval_every: int = 50
    vocab: str = "transcripts"  # CTC classes: "transcripts" (tokens of the training transcripts) or "full"

    def __post_init__(self) -> None:
        if self.vocab not in ("transcripts", "full"):
            raise ValueError(f"vocab must be 'transcripts' or 'full', not {self.vocab!r}")


def greedy_ctc(logits: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, repeats merged, blanks dropped, classes shifted back by one."""
    best = logits.argmax(-1).tolist()
    out = []
    for row, n in zip(best, lengths.tolist()):
        ids, prev = [], None
        for t in row[:n]:
            if t != prev and t != 0:
                ids.append(t - 1)
            prev = t
        out.append(ids)
    return out


def values_heard(examples: list[Example], hypotheses: list[str]) -> tuple[int, int]:
    """How many filled slot values occur (normalised as by the metrics) in their turn's hypothesis.

    The WER over all words hides what slot filling needs: a 0.4 WER can get every common word
    right and every name and number wrong.
    """
    pairs = [(hyp, value) for example, hyp in zip(examples, hypotheses) for _, value in filled_pairs(example.slots)]
    return sum(holds(hyp, value) for hyp, value in pairs), len(pairs)


def wer_text(text: str) -> str:
    """Text as the WER compares it: NFKC, lower case, punctuation and symbols as spaces (numbers as
    written, unlike the slot metrics' normalisation)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join("".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text).split())


class CTCObjective:
    """CTC of the adapter's outputs, scored by ``head``, against the transcripts' token classes.

    The loss alone, without an optimizer: the alignment phase minimises it by itself, and with
    ``ctc_weight`` slot-filling training keeps adding it to the LLM's loss."""

    def __init__(self, adapter: FrameStackAdapter, head: CTCEmbeddingHead, tokenizer) -> None:
        self.adapter, self.head, self.tokenizer = adapter, head, tokenizer
        self._token_cache: dict[str, torch.Tensor] = {}

    @property
    def vocab(self) -> torch.Tensor:
        return self.head.vocab

    def parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters()) + list(self.head.parameters())

    def _targets(self, text: str) -> torch.Tensor:
        """The transcript's CTC classes (1 + position in the sorted vocab), computed once per text."""
        if text not in self._token_cache:
            ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            vocab = self.vocab.cpu()
            pos = torch.searchsorted(vocab, ids).clamp(max=len(vocab) - 1)
            if not torch.equal(vocab[pos], ids):
                raise ValueError(f"transcript {text!r} has tokens outside the CTC vocabulary")
            self._token_cache[text] = pos + 1
        return self._token_cache[text]

    def logits(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.adapter.parameters()).device
        lengths = torch.tensor([len(f) for f in feats], device=device)
        padded = nn.utils.rnn.pad_sequence(feats, batch_first=True).to(device)
        hidden, out_lengths = self.adapter(padded, lengths)
        return self.head(hidden.float()), out_lengths

    def loss(self, feats: list[torch.Tensor], texts: list[str]) -> torch.Tensor:
        """Mean over the batch of each item's CTC loss per target token."""
        logits, out_lengths = self.logits(feats)
        targets = [self._targets(t) for t in texts]
        target_lengths = torch.tensor([len(t) for t in targets])
        losses = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), torch.cat(targets).to(logits.device),
                            out_lengths, target_lengths, blank=0, reduction="none", zero_infinity=True)
        return (losses / target_lengths.clamp(min=1).to(losses.device)).mean()  # an empty transcript: all blank

    @torch.no_grad()
    def wer(self, examples: list[Example], batch_size: int = 16) -> tuple[float, list[tuple[str, str]]]:
        """Greedy CTC WER (normalised text) and the (reference, hypothesis) pairs."""
        pairs = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            logits, lengths = self.logits([load_feats(e) for e in chunk])
            for e, classes in zip(chunk, greedy_ctc(logits, lengths)):
                pairs.append((e.text, self.tokenizer.decode(self.vocab[classes].tolist()).strip()))
        refs = [wer_text(r) or "<empty>" for r, _ in pairs]
        hyps = [wer_text(h) for _, h in pairs]
        return float(jiwer.wer(refs, hyps)), pairs


class AdapterAligner(CTCObjective):
    """Trains ``adapter`` (and the head) by CTC alone on (features, transcript) pairs."""

    def __init__(self, adapter: FrameStackAdapter, head: CTCEmbeddingHead, tokenizer, lr: float = 1e-3,
                 batch_size: int = 16, seed: int = 1, max_nonfinite_steps: int = 10) -> None:
        super().__init__(adapter, head, tokenizer)
        self.batch_size, self.seed, self.max_nonfinite_steps = batch_size, seed, max_nonfinite_steps
        log.info("CTC over %d token classes + blank", len(head.vocab))
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr)

    def step(self, examples: list[Example]) -> float | None:
        """One CTC update; ``None``, and no update, when the loss or the gradient is not finite."""
        loss = self.loss([load_feats(e) for e in examples], [e.text for e in examples])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        return loss.item()

    def run(self, train: list[Example], valid: list[Example], steps: int, outdir: Path, writer=None,
            eval_every: int = 50) -> list[dict]:
        """``steps`` CTC updates on seeded random batches; returns the logged history."""
        outdir.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"align-{self.seed}")
        usable = [e for e in train if e.text.strip()]
        history: list[dict] = []
        start, losses, n_nonfinite = time.time(), [], 0
        self.adapter.train()
        for step in tqdm(range(1, steps + 1), desc="align (CTC)", unit="step"):
            batch = rng.sample(usable, k=min(self.batch_size, len(usable)))
            loss = self.step(batch)
            if loss is None:
                n_nonfinite += 1
                log.warning("align step %d: CTC loss or gradient not finite: update skipped (%d so far; rows "
                            "include %s)", step, n_nonfinite, ", ".join(e.utt_id for e in batch[:5]))
                if n_nonfinite > self.max_nonfinite_steps:
                    raise RuntimeError(f"{n_nonfinite} alignment steps had a non-finite loss or gradient (more than "
                                       f"max_nonfinite_steps {self.max_nonfinite_steps}): check the features")
            else:
                losses.append(loss)
            if step % eval_every == 0 or step == steps:
                self.adapter.eval()
                wer, pairs = self.wer(valid, self.batch_size) if valid else (float("nan"), [])
                self.adapter.train()
                heard, n_values = values_heard(valid, [hyp for _, hyp in pairs])
                record = {"step": step, "ctc_loss": sum(losses) / len(losses) if losses else None, "valid_wer": wer,
                          "valid_values_heard": heard, "valid_values": n_values, "elapsed_s": time.time() - start}
                losses = []
                history.append(record)
                with open(outdir / f"valid_hyp_step{step}.tsv", "w", encoding="utf-8") as f:
                    f.writelines(f"{e.utt_id}\t{ref}\t{hyp}\n" for e, (ref, hyp) in zip(valid, pairs))
                log.info("align step %d: CTC loss %s, greedy CTC WER %.3f, slot values heard %d of %d "
                         "(e.g. %r -> %r)", step, "-" if record["ctc_loss"] is None else f"{record['ctc_loss']:.3f}", wer, heard, n_values,
                         *(pairs[0] if pairs else ("", "")))
                if writer is not None:
                    if record["ctc_loss"] is not None:
                        writer.add_scalar("align/ctc_loss", record["ctc_loss"], step)
                    writer.add_scalar("align/valid_wer", wer, step)
                    writer.add_scalar("align/valid_values_heard", heard / max(n_values, 1), step)
        with open(outdir / "align_log.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        return history


def new_ctc_head(model: SpeechLLM, vocab: str, transcripts: list[str]) -> CTCEmbeddingHead:
    """A CTC head over the tokens of the training transcripts (or, ``vocab: full``, all rows)."""
    embeddings = model.llm.get_input_embeddings().weight
    classes = torch.arange(len(embeddings)) if vocab == "full" else token_vocab(model.tokenizer, transcripts)
    return CTCEmbeddingHead(embeddings, classes).to(model.device)


def unique_turns(dataset: TokenizedSet | None) -> list[Example]:
    """One example per utterance (a turn appears once per mode row and query draw)."""
    if dataset is None:
        return []
    return list({e.utt_id: e for e in map(dataset.example, range(len(dataset)))}.values())


def run_alignment_phase(model: SpeechLLM, cfg: AlignConfig, train: TokenizedSet, valid: TokenizedSet | None,
                        outdir: Path, seed: int, world: World, writer=None, max_nonfinite_steps: int = 10) -> None:
    """Align ``model``'s adapter (and CTC head) once, on rank 0, into ``outdir/align/``; every rank then
    loads the result. A finished phase is reloaded, not repeated; one whose weights are not finite is
    never saved."""
    done = outdir / "align" / "adapter.pt"
    head_file = done.with_name("ctc_head.pt")
    if world.is_main and not done.exists():
        turns = unique_turns(train)
        head = model.ctc_head  # None unless the LLM reads through it: then it serves this phase only
        if head is None:
            head = new_ctc_head(model, cfg.vocab, [e.text for e in turns])
        aligner = AdapterAligner(model.adapter, head, model.tokenizer, cfg.lr, cfg.batch_size, seed,
                                 max_nonfinite_steps)
        aligner.run(turns, unique_turns(valid), cfg.steps, done.parent, writer, cfg.eval_every)
        bad = [n for n, t in [*model.adapter.state_dict().items(), *head.state_dict().items()]
               if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise RuntimeError(f"the aligned {bad[0]} holds non-finite values: not saved to {done.parent}")
        with atomic_write(head_file, "wb") as f:
            torch.save(head.state_dict(), f)
        with atomic_write(done, "wb") as f:
            torch.save(model.adapter.state_dict(), f)
    world.barrier()
    model.adapter.load_state_dict(torch.load(done, map_location=world.device))
    if model.ctc_head is not None:
        model.ctc_head.load_state_dict(torch.load(head_file, map_location=world.device))
    log.info("alignment phase done: adapter loaded from %s", done)
