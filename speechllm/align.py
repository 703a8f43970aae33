"""Adapter alignment phase (beyond the paper): CTC onto the LLM's frozen input-embedding space.

The adapter and a ``CTCEmbeddingHead`` (the embedding rows of the head's vocabulary plus a blank)
train with CTC against the transcript's LLM token ids. No LLM forward pass is needed, so a step
costs a small fraction of a slot-filling step. It pushes each audio position towards the
embeddings of the tokens spoken there, which the LLM already knows how to read; slot-filling
training then starts from the aligned adapter (and, with ``audio_input: ctc_tokens``, reads the
head's collapsed token-space output, and with ``ctc_weight`` keeps adding the same CTC loss,
``CTCObjective``, to the LLM's).

The phase trains on the training turns and, when stage 1 made one, the alignment corpus
(:mod:`speechllm.corpus.alignment`: many more voices and values than a recipe's turns), less every
sentence of the held-out sets. Greedy CTC word error rate on each held-out set, and the share of
its slot values that the greedy transcript contains (also for the values that no training text
holds, :mod:`speechllm.novelty`), are logged as it trains (``align_log.jsonl``, ``align_curve.png``,
each evaluation's transcripts in ``<set>_hyp_step<N>.tsv``). Its result is kept in a directory of
its own, which every mode of a recipe run can share (``--align_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import jiwer
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import get_scheduler

from speechllm.data import Example, TokenizedSet, iter_examples, load_feats, read_examples
from speechllm.distributed import World
from speechllm.features import read_whisper_record
from speechllm.io_utils import InputError, atomic_write, read_json, read_kaldi_map, read_slots
from speechllm.lock import exclusive
from speechllm.metrics import holds
from speechllm.model.adapter import FrameStackAdapter
from speechllm.model.ctc_head import CTCEmbeddingHead, token_vocab
from speechllm.model.speechllm import SpeechLLM
from speechllm.novelty import SeenText
from speechllm.plots import plot_alignment
from speechllm.slots import filled_pairs
from speechllm.train_config import ALIGN_SCHEDULES, AlignConfig

log = logging.getLogger(__name__)


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


def values_heard(examples: list[Example], hypotheses: list[str], seen: SeenText | None = None) -> dict[str, int]:
    """How many filled slot values occur (normalised as by the metrics) in their turn's hypothesis, in
    all turns and in the novel ones (turns whose values no text of ``seen`` holds).

    The WER over all words hides what slot filling needs: a 0.4 WER can get every common word
    right and every name and number wrong.
    """
    counts = dict.fromkeys(("values_heard", "values", "novel_heard", "novel_values"), 0)
    for example, hyp in zip(examples, hypotheses):
        novel = seen is not None and seen.novel_turn(example.slots)
        for _, value in filled_pairs(example.slots):
            heard = holds(hyp, value)
            counts["values"] += 1
            counts["values_heard"] += heard
            counts["novel_values"] += novel
            counts["novel_heard"] += heard and novel
    return counts


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
    """Trains ``adapter`` (and the head) by CTC alone on (features, transcript) pairs; ``schedule`` and
    ``warmup_ratio`` shape the learning rate over the steps of :meth:`run`."""

    def __init__(self, adapter: FrameStackAdapter, head: CTCEmbeddingHead, tokenizer, lr: float = 1e-3,
                 batch_size: int = 16, seed: int = 1, max_nonfinite_steps: int = 10, schedule: str = "constant",
                 warmup_ratio: float = 0.0) -> None:
        super().__init__(adapter, head, tokenizer)
        self.batch_size, self.seed, self.max_nonfinite_steps = batch_size, seed, max_nonfinite_steps
        self.schedule, self.warmup_ratio = schedule, warmup_ratio
        log.info("CTC over %d token classes + blank", len(head.vocab))
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr)

    def step(self, examples: list[Example]) -> float | None:
        """One CTC update; ``None``, and no update, when the loss or the gradient is not finite."""
        loss = self.loss([load_feats(e) for e in examples], [e.text for e in examples])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        finite = bool(torch.isfinite(loss) and torch.isfinite(norm))
        if finite:
            self.optimizer.step()
        # no gradient outlives its step: the last one would leak into slot filling's first update
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item() if finite else None

    def evaluate(self, name: str, examples: list[Example], seen: SeenText, step: int, outdir: Path) -> dict:
        """Greedy CTC WER and slot values heard on one held-out set; its transcripts to a TSV."""
        wer, pairs = self.wer(examples, self.batch_size)
        counts = values_heard(examples, [hyp for _, hyp in pairs], seen)
        with open(outdir / f"{name}_hyp_step{step}.tsv", "w", encoding="utf-8") as f:
            f.writelines(f"{e.utt_id}\t{ref}\t{hyp}\n" for e, (ref, hyp) in zip(examples, pairs))
        log.info("align step %d, %s: greedy CTC WER %.3f, slot values heard %d of %d (novel: %d of %d; e.g. %r -> %r)",
                 step, name, wer, counts["values_heard"], counts["values"], counts["novel_heard"],
                 counts["novel_values"], *(pairs[0] if pairs else ("", "")))
        return {f"{name}_wer": wer, **{f"{name}_{key}": n for key, n in counts.items()}}

    def run(self, turns: list[Example], evals: dict[str, list[Example]], seen: SeenText, steps: int, outdir: Path,
            writer=None, eval_every: int = 50) -> list[dict]:
        """``steps`` CTC updates on seeded random batches of ``turns``, evaluated on every set of ``evals``
        every ``eval_every`` steps; returns the logged history."""
        outdir.mkdir(parents=True, exist_ok=True)
        log_path = outdir / "align_log.jsonl"  # a line per evaluation: a killed phase keeps its curve so far
        log_path.write_text("", encoding="utf-8")
        rng = random.Random(f"align-{self.seed}")
        usable = [e for e in turns if e.text.strip()]
        history: list[dict] = []
        start, losses, n_nonfinite = time.time(), [], 0
        scheduler = get_scheduler(ALIGN_SCHEDULES[self.schedule], self.optimizer,
                                  num_warmup_steps=int(self.warmup_ratio * steps), num_training_steps=steps)
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
            lr = scheduler.get_last_lr()[0]
            scheduler.step()  # the rate follows the step count, updated or not
            if step % eval_every == 0 or step == steps:
                record = {"step": step, "ctc_loss": sum(losses) / len(losses) if losses else None, "lr": lr,
                          "elapsed_s": time.time() - start}
                losses = []
                self.adapter.eval()
                for name, examples in evals.items():
                    record.update(self.evaluate(name, examples, seen, step, outdir))
                self.adapter.train()
                history.append(record)
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("align step %d: CTC loss %s", step,
                         "-" if record["ctc_loss"] is None else f"{record['ctc_loss']:.3f}")
                if writer is not None:
                    for key, value in record.items():
                        if key.endswith("_wer") or (key in ("ctc_loss", "lr") and value is not None):
                            writer.add_scalar(f"align/{key}", value, step)
                    for name in evals:
                        for kind, total in (("values_heard", "values"), ("novel_heard", "novel_values")):
                            if record[f"{name}_{total}"]:
                                writer.add_scalar(f"align/{name}_{kind}", record[f"{name}_{kind}"]
                                                  / record[f"{name}_{total}"], step)
        plot_alignment(history, list(evals), outdir / "align_curve.png")
        return history


def new_ctc_head(model: SpeechLLM, vocab: str, transcripts: list[str], collapse: str = "mix") -> CTCEmbeddingHead:
    """A CTC head over the tokens of the training transcripts (or, ``vocab: full``, all rows)."""
    embeddings = model.llm.get_input_embeddings().weight
    classes = torch.arange(len(embeddings)) if vocab == "full" else token_vocab(model.tokenizer, transcripts)
    return CTCEmbeddingHead(embeddings, classes, collapse).to(model.device)


def unique_turns(examples: Iterable[Example]) -> list[Example]:
    """One example per utterance (a turn appears once per mode row and query draw)."""
    return list({e.utt_id: e for e in examples}.values())


def set_turns(dataset: TokenizedSet | None) -> list[Example]:
    """The turns of a tokenised stage-2 set."""
    return [] if dataset is None else unique_turns(map(dataset.example, range(len(dataset))))


def corpus_turns(corpus: Path, held_out: Iterable[str], whisper: str | None) -> list[Example]:
    """The turns of an alignment corpus (stage 1: ``<corpus>/data/align``, ``<corpus>/dump``), less every
    sentence of the held-out sets (their count is logged). Its features must come from ``whisper``."""
    dump, data = corpus / "dump", corpus / "data" / "align"
    if not (dump / "feats.scp").is_file():
        raise InputError(f"{dump / 'feats.scp'} not found: stage 1 makes the alignment corpus (--align_calls)")
    recorded = read_whisper_record(dump)
    if whisper is not None and recorded != whisper:
        raise InputError(f"{dump} holds features of Whisper {recorded!r}, the training set's are {whisper!r}")
    banned = {wer_text(t) for t in held_out}
    text, slots = read_kaldi_map(data / "text"), read_slots(data / "slots.jsonl")
    frames = read_kaldi_map(dump / "utt2num_frames")
    out = [Example(utt, utt, location, "", "", slots.get(utt, {}), "align", text[utt], int(frames[utt]))
           for utt, location in read_kaldi_map(dump / "feats.scp").items()]
    kept = [e for e in out if wer_text(e.text) not in banned]
    log.info("alignment corpus %s: %d turns (%d left out: sentences of the held-out sets)", corpus, len(kept),
             len(out) - len(kept))
    return kept


@dataclass
class AlignmentData:
    """What the alignment phase trains and is measured on, and the directory that keeps its result."""

    directory: Path
    turns: list[Example]  # the training turns, then the alignment corpus's
    evals: dict[str, list[Example]] = field(default_factory=dict)  # held-out turns per set: valid first
    corpus: str | None = None

    def seen(self) -> SeenText:
        """Every text the phase trains on: what makes an evaluation value novel."""
        return SeenText(e.text for e in self.turns)


def alignment_data(directory: Path, train: TokenizedSet, valid: TokenizedSet | None, corpus: Path | None = None,
                   eval_jsonls: Iterable[Path] = (), whisper: str | None = None) -> AlignmentData:
    """The training turns and the corpus's, and the held-out sets: ``valid``, then one per ``eval_jsonls``
    file, named by its directory (``dump/test/regular.jsonl``: ``test``). The corpus loses every sentence
    of the held-out files, all of their rows (``valid`` may be measured on its first rows only)."""
    evals = {"valid": set_turns(valid)} if valid is not None else {}
    for path in eval_jsonls:
        name = Path(path).parent.name
        if name in evals:
            raise InputError(f"{path}: a second held-out set named {name!r} (sets are named by their directory)")
        evals[name] = unique_turns(read_examples(path))
    turns = set_turns(train)
    if corpus is not None:
        held_out = [] if valid is None else [e.text for _, e in iter_examples(valid.meta["source"])]
        held_out += [e.text for name, examples in evals.items() if name != "valid" for e in examples]
        turns += corpus_turns(corpus, held_out, whisper)
    return AlignmentData(directory, turns, evals, None if corpus is None else str(Path(corpus).resolve()))


def run_alignment_phase(model: SpeechLLM, cfg: AlignConfig, data: AlignmentData, identity: dict, seed: int,
                        world: World, writer=None, max_nonfinite_steps: int = 10) -> dict:
    """Align ``model``'s adapter (and CTC head) once, on rank 0, into ``data.directory``; every rank then
    loads the result. A finished phase is reloaded, not repeated, if it was made with the same
    ``identity`` (the LLM, the adapter's shape, the phase's config and data), and refused otherwise;
    one whose weights are not finite is never saved. Returns the phase's last evaluation."""
    directory = data.directory
    done, head_file, record_file = directory / "adapter.pt", directory / "ctc_head.pt", directory / "align.json"
    record = {**identity, "align": dataclasses.asdict(cfg), "seed": seed, "turns": len(data.turns),
              "corpus": data.corpus}
    if world.is_main:
        with exclusive(directory, "alignment", wait=True):  # a mode started beside it reuses what it makes
            if done.exists() and record_file.exists():
                made = read_json(record_file)
                if made != record:
                    changed = sorted(k for k in {*made, *record} if made.get(k) != record.get(k))
                    raise InputError(f"{directory} was aligned with other settings ({', '.join(changed)} differ): "
                                     "remove it or align into another --align_dir (sf.sh: another --tag)")
                log.info("alignment phase: reusing %s", directory)
            else:
                done.unlink(missing_ok=True)  # a phase killed before its record: aligned again
                align(model, cfg, data, seed, writer, max_nonfinite_steps)
                with atomic_write(record_file) as f:
                    json.dump(record, f, indent=1)
    world.barrier()
    model.adapter.load_state_dict(torch.load(done, map_location=world.device))
    if model.ctc_head is not None:
        model.ctc_head.load_state_dict(torch.load(head_file, map_location=world.device))
    log.info("alignment phase done: adapter loaded from %s", done)
    *_, last = (json.loads(line) for line in open(directory / "align_log.jsonl", encoding="utf-8"))
    return {"dir": str(directory.resolve()), "corpus": data.corpus, **last}


def align(model: SpeechLLM, cfg: AlignConfig, data: AlignmentData, seed: int, writer=None,
          max_nonfinite_steps: int = 10) -> None:
    """Run the phase and save the adapter and head (``adapter.pt`` last: it marks the phase done)."""
    head = model.ctc_head  # None unless the LLM reads through it: then it serves this phase only
    if head is None:
        head = new_ctc_head(model, cfg.vocab, [e.text for e in data.turns])
    aligner = AdapterAligner(model.adapter, head, model.tokenizer, cfg.lr, cfg.batch_size, seed, max_nonfinite_steps,
                             cfg.schedule, cfg.warmup_ratio)
    aligner.run(data.turns, data.evals, data.seen(), cfg.steps, data.directory, writer, cfg.eval_every)
    bad = [n for n, t in [*model.adapter.state_dict().items(), *head.state_dict().items()]
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise RuntimeError(f"the aligned {bad[0]} holds non-finite values: not saved to {data.directory}")
    with atomic_write(data.directory / "ctc_head.pt", "wb") as f:
        torch.save(head.state_dict(), f)
    with atomic_write(data.directory / "adapter.pt", "wb") as f:
        torch.save(model.adapter.state_dict(), f)
