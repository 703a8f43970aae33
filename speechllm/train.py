"""Stage 3: LoRA/QLoRA fine-tuning of the speech LLM with the paper's schedule.

AdamW, linear warm-up over the first ``warmup_ratio`` of the optimizer steps then cosine decay,
gradient clipping, gradient accumulation. Only the adapter and LoRA weights train.

Under ``torchrun`` the model is wrapped in DistributedDataParallel. Every process draws the same
global batches of ``batch_size x world size`` examples and trains on its own slice, so the effective
batch is ``batch_size x grad_accum x world size`` (the paper: 4 x 8 x 4 = 128) and one optimizer step
averages over every target token of the step, however the batch was split. Only rank 0 writes.

The stage-2 files are tokenised once into ``tokens/`` (memory-mapped by every rank, see
:class:`speechllm.data.TokenizedSet`); features are read per batch by the DataLoader. The experiment
dir also receives ``checkpoints/step_N/`` (trainable weights, optimizer, scheduler, step, data
position and RNG states: a killed run resumes where it stopped; a job about to reach its time limit
checkpoints and stops on purpose), ``model/`` (the final model), ``tensorboard/``,
``train_log.jsonl`` and ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from speechllm.align import AdapterAligner, CTCObjective
from speechllm.config import from_dict
from speechllm.data import (BatchPlan, Example, TokenizedSet, bucketed_batches, collate, fingerprint,
                            iter_examples, load_feats, tokenize_once)
from speechllm.decode import decode_examples, new_token_cap
from speechllm.distributed import World
from speechllm.io_utils import InputError, atomic_write
from speechllm.metrics import score_corpus
from speechllm.model.builder import ModelSpec, build_speechllm, save_model
from speechllm.model.ctc_head import CTCEmbeddingHead, token_vocab
from speechllm.model.llm import LLMConfig, build_tiny
from speechllm.model.speechllm import Encoded, SpeechLLM

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    batch_size: int = 4
    grad_accum: int = 8
    effective_batch: int | None = None  # when set, grad_accum = effective_batch / (batch_size x processes)
    epochs: float = 10
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float = 2e-4
    adapter_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.2
    grad_clip: float = 1.0
    adapter_hidden: int = 2048
    stack: int = 4
    seed: int = 1
    gradient_checkpointing: bool = False  # recompute each layer in backward: activations of one layer, not all
    bucket_batches: int = 50
    log_every: int = 5
    save_every: int = 100
    keep_checkpoints: int = 2
    valid_max_examples: int = 200
    # adapter alignment phase (beyond the paper; 0 steps = off): CTC onto the LLM's embeddings
    align_steps: int = 0
    align_batch_size: int = 16
    align_lr: float = 1.0e-3
    align_eval_every: int = 50
    align_vocab: str = "transcripts"  # CTC classes: "transcripts" (tokens of the training transcripts) or "full"
    audio_input: str = "adapter"  # what the LLM reads: "adapter" frames or "ctc_tokens" (needs align_steps > 0)
    ctc_weight: float = 0.0  # slot filling adds this times the CTC loss of the batch's transcripts (ctc_tokens)
    # budgets and learning curves
    max_minutes: float | None = None  # stop after this much training time (alignment included)
    eval_every: int = 0  # decode and score the valid set every N optimizer steps (0: never)
    eval_max_examples: int = 40
    eval_max_new_tokens: int | None = None  # None: decoding's cap, from the longest training target
    num_workers: int = 0  # DataLoader processes that read features ahead of the step (0: in the step)

    def __post_init__(self) -> None:
        if self.align_vocab not in ("transcripts", "full"):
            raise ValueError(f"align_vocab must be 'transcripts' or 'full', not {self.align_vocab!r}")
        if self.audio_input not in ("adapter", "ctc_tokens"):
            raise ValueError(f"audio_input must be 'adapter' or 'ctc_tokens', not {self.audio_input!r}")
        if self.audio_input == "ctc_tokens" and self.align_steps <= 0:
            raise ValueError("audio_input: ctc_tokens reads the CTC head's output, which needs align_steps > 0")
        if self.effective_batch is not None and self.effective_batch <= 0:
            raise ValueError(f"effective_batch must be > 0, not {self.effective_batch}")
        if self.ctc_weight < 0:
            raise ValueError(f"ctc_weight must be >= 0, not {self.ctc_weight}")
        if self.ctc_weight > 0 and self.audio_input != "ctc_tokens":
            raise ValueError("ctc_weight trains on the CTC head that the LLM reads through: it needs "
                             "audio_input: ctc_tokens")


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


def tokenized(model: SpeechLLM, jsonl: Path, directory: Path, world: World = World(),
              limit: int | None = None) -> TokenizedSet:
    """``jsonl`` tokenised for ``model`` once (by rank 0, reused by every restart), then memory-mapped."""
    if world.is_main:
        def tokenize(examples: list[Example]) -> list[tuple[list[int], list[int], list[int]]]:
            return model.formatter.encode_many([e.prompt for e in examples], [e.target for e in examples],
                                               [e.feats is not None for e in examples])

        tokenize_once(jsonl, directory, tokenize, fingerprint(model.formatter.fingerprint()), limit)
    world.barrier()
    return TokenizedSet(directory)


def accumulation_for(cfg: TrainConfig, processes: int) -> int:
    """The gradient accumulation that keeps ``effective_batch`` whatever the number of GPUs."""
    per_pass = cfg.batch_size * processes
    if cfg.effective_batch % per_pass:
        raise ValueError(f"effective_batch {cfg.effective_batch} is not a multiple of batch_size {cfg.batch_size} "
                         f"x {processes} processes")
    accum = cfg.effective_batch // per_pass
    log.info("grad_accum %d: effective batch %d = batch_size %d x %d processes x %d", accum, cfg.effective_batch,
             cfg.batch_size, processes, accum)
    return accum


class TimeLimit(Exception):
    """Training stopped before the job's time limit, after a checkpoint: run it again to continue."""


# seconds kept free before the job's end: a checkpoint to write, and a step slower than the slowest seen
STOP_MARGIN_S = 120


class Trainer:
    def __init__(self, model: SpeechLLM, spec: ModelSpec, cfg: TrainConfig, train: TokenizedSet,
                 valid: TokenizedSet | None, outdir: Path, base_path: Path | None = None,
                 world: World = World(), stop_at: float | None = None, resume_flag: Path | None = None) -> None:
        """``stop_at`` (a Unix time: the job's end) makes :meth:`train` checkpoint, create ``resume_flag``
        and raise :class:`TimeLimit` while there is still time to, rather than be killed mid-step."""
        if cfg.effective_batch is not None:
            cfg = dataclasses.replace(cfg, grad_accum=accumulation_for(cfg, world.size))
        self.model, self.spec, self.cfg, self.world = model, spec, cfg, world
        self.outdir, self.base_path, self.stop_at, self.resume_flag = outdir, base_path, stop_at, resume_flag
        self.stopped_idle_before = False  # the checkpoint resumed from was a time-limit stop without a step
        self.train_set, self.valid_set = train, valid
        self.lengths = train.lengths(cfg.stack)
        spec.max_target_tokens = int(train.n_target.max())
        self.global_batch = cfg.batch_size * world.size
        # a final batch smaller than the number of processes is left out (see epoch_batches)
        full, rest = divmod(len(train), self.global_batch)
        self.batches_per_epoch = full + (rest >= world.size)
        if self.batches_per_epoch == 0:
            raise InputError(f"{train.meta['source']}: {len(train)} training rows for {world.size} processes: "
                             "every process needs at least one row")
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        groups = [{"params": [p for p in model.llm.parameters() if p.requires_grad], "lr": cfg.lr}]
        if model.adapter is not None:
            audio = list(model.adapter.parameters())
            audio += [] if model.ctc_head is None else list(model.ctc_head.parameters())
            groups.insert(0, {"params": audio, "lr": cfg.adapter_lr or cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * self.total_steps),
                                                         self.total_steps)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        # the auxiliary CTC loss keeps the head that the LLM reads through aligned (text-only models have none)
        self.ctc = None
        if cfg.ctc_weight > 0 and model.ctc_head is not None:
            self.ctc = CTCObjective(model.adapter, model.ctc_head, model.tokenizer)
        self.forward = model
        if world.distributed:
            # frozen weights and buffers are loaded identically everywhere: only the trainable ones sync
            fixed = [n for n, p in model.named_parameters() if not p.requires_grad]
            fixed += [n for n, _ in model.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, fixed)
            self.forward = DistributedDataParallel(model, device_ids=None)

    def loader(self, batches: BatchPlan, first: int) -> DataLoader:
        """This rank's shares of the batches from ``first`` on, read ahead by ``num_workers`` processes.

        The loader gets its own generator: drawing its seed from the global one would shift the dropout
        masks of a run resumed mid-epoch away from those of an uninterrupted run.
        """
        workers = self.cfg.num_workers
        shares = (self.shard(batches[k]) for k in range(first, len(batches)))
        return DataLoader(self.train_set, batch_sampler=shares, collate_fn=collate,
                          num_workers=workers, prefetch_factor=2 if workers else None,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def epoch_batches(self) -> BatchPlan:
        """The epoch's global batches, the same on every rank; one a rank would get nothing of is dropped."""
        batches = bucketed_batches(self.lengths, self.global_batch, self.cfg.seed, self.epoch, self.cfg.bucket_batches)
        big_enough = batches.sizes >= self.world.size
        if not big_enough.all():
            log.info("epoch %d: %d examples left out (a final batch smaller than the %d processes)", self.epoch,
                     batches.sizes[~big_enough].sum(), self.world.size)
            batches = batches.keep(big_enough)
        return batches

    def shard(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch (length-sorted, so shares pad alike)."""
        size, rest = divmod(len(batch), self.world.size)
        r = self.world.rank
        start = r * size + min(r, rest)
        return batch[start : start + size + (1 if r < rest else 0)]

    def train_step(self, group: list[list[int]], micro: list[tuple[list[Encoded], list[str]]]) -> tuple[float, float]:
        """One optimizer step over a group of global batches, of which ``micro`` holds this rank's shares.

        Returns this rank's share of the step's LLM loss, and its mean auxiliary CTC loss (0 without one)."""
        n_tokens = int(self.train_set.n_target[np.concatenate(group)].sum())
        share = ctc_mean = 0.0
        for k, (encoded, texts) in enumerate(micro):
            last = k == len(group) - 1
            sync = nullcontext() if last or not self.world.distributed else self.forward.no_sync()
            with sync:
                loss = self.forward(encoded, num_items_in_batch=n_tokens)
                share += loss.item()
                if self.ctc is not None:
                    ctc = self.ctc.loss([e.feats for e in encoded], texts)
                    ctc_mean += ctc.item() / len(group)
                    loss = loss + self.cfg.ctc_weight * ctc / len(group)
                # DDP averages gradients over ranks, each of which holds a share of one global sum
                (loss * self.world.size).backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return share, ctc_mean

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, stopped_idle: bool = False) -> None:
        ckpt = self.outdir / "checkpoints" / f"step_{self.step:07d}"
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        # the batch position only means something for the same global batch and accumulation
        position = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                    "global_batch": self.global_batch, "grad_accum": self.cfg.grad_accum,
                    "stopped_idle": stopped_idle}
        torch.save({"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "position": position},
                   tmp / "state.pt")
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        for old in sorted((self.outdir / "checkpoints").glob("step_???????"))[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old)

    def maybe_resume(self) -> None:
        ckpts = sorted((self.outdir / "checkpoints").glob("step_???????"))
        if not ckpts:
            return
        state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)
        missing = set(self.trainable_state()) - set(state["trainable"])
        if missing:
            raise RuntimeError(f"{ckpts[-1]} does not match this model (missing {sorted(missing)[:3]}...)")
        pos = state["position"]
        saved = (pos.get("global_batch", self.global_batch), pos.get("grad_accum", self.cfg.grad_accum))
        if saved != (self.global_batch, self.cfg.grad_accum):
            raise RuntimeError(f"{ckpts[-1]} was trained with global batch {saved[0]} x accumulation {saved[1]}, "
                               f"this run has {self.global_batch} x {self.cfg.grad_accum} (other --ngpu or "
                               "batch_size?): resume with the same, or train into a new experiment dir")
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.batch_in_epoch = pos["step"], pos["epoch"], pos["batch_in_epoch"]
        self.stopped_idle_before = pos.get("stopped_idle", False)
        log.info("resumed from %s (step %d, epoch %d, batch %d)", ckpts[-1], self.step, self.epoch,
                 self.batch_in_epoch)

    # -- loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        if self.valid_set is None:
            return float("nan")
        self.model.eval()
        total, count = 0.0, 0
        n, size = len(self.valid_set), self.cfg.batch_size
        for start in range(0, n, size):
            encoded, _ = collate([self.valid_set[i] for i in range(start, min(start + size, n))])
            n_tokens = sum(len(e.target) for e in encoded)
            total += self.model(encoded).item() * n_tokens
            count += n_tokens
        self.model.train()
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate_f1(self) -> dict[str, float]:
        """Decode (a share of) the valid set and score it: the learning-curve points."""
        n = 0 if self.valid_set is None else min(self.cfg.eval_max_examples, len(self.valid_set))
        examples = [self.valid_set.example(i) for i in range(n)]
        max_new = self.cfg.eval_max_new_tokens or new_token_cap(self.spec)
        self.model.eval()
        results = decode_examples(self.model, examples, self.cfg.batch_size, max_new)
        self.model.train()
        scores = score_corpus({e.id: e.slots for e in examples},
                              {r["id"]: (r["slots"], r["parseable"]) for r in results})
        return {"dev_partial_f1": scores["partial"]["f1"], "dev_exact_f1": scores["exact"]["f1"],
                "dev_unparseable": scores["n_unparseable"], "dev_example": results[0]["output"] if results else ""}

    def curve_point(self, writer, train_s: float) -> None:
        """Append one learning-curve point (dev F1 after ``train_s`` seconds of training) to curve.jsonl."""
        point = {"step": self.step, "train_s": train_s, **self.evaluate_f1()}
        log.info("step %d (%.0f s of training): dev partial F1 %.3f, exact F1 %.3f; e.g. %r", self.step, train_s,
                 point["dev_partial_f1"], point["dev_exact_f1"], point["dev_example"][:120])
        writer.add_scalar("dev/partial_f1", point["dev_partial_f1"], self.step)
        writer.add_scalar("dev/exact_f1", point["dev_exact_f1"], self.step)
        with open(self.outdir / "curve.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(point) + "\n")

    def align(self, writer) -> None:
        """Run the CTC alignment phase once (on rank 0); a finished phase is reloaded, not repeated."""
        done = self.outdir / "align" / "adapter.pt"
        head_file = done.with_name("ctc_head.pt")
        if self.world.is_main and not done.exists():
            # the phase is off by default (beyond the paper): it alone holds every row's text
            train = list({e.utt_id: e for e in map(self.train_set.example, range(len(self.train_set)))}.values())
            valid = [] if self.valid_set is None else \
                list({e.utt_id: e for e in map(self.valid_set.example, range(len(self.valid_set)))}.values())
            head = self.model.ctc_head
            if head is None:  # the head serves the alignment phase only
                head = new_ctc_head(self.model, self.cfg, [e.text for e in train])
            aligner = AdapterAligner(self.model.adapter, head, self.model.tokenizer, self.cfg.align_lr,
                                     self.cfg.align_batch_size, self.cfg.seed)
            aligner.run(train, valid, self.cfg.align_steps, done.parent, writer, self.cfg.align_eval_every)
            with atomic_write(head_file, "wb") as f:
                torch.save(head.state_dict(), f)
            with atomic_write(done, "wb") as f:
                torch.save(self.model.adapter.state_dict(), f)
        self.world.barrier()  # the other ranks wait for rank 0's phase, then every rank loads its result
        self.model.adapter.load_state_dict(torch.load(done, map_location=self.world.device))
        if self.model.ctc_head is not None:
            self.model.ctc_head.load_state_dict(torch.load(head_file, map_location=self.world.device))
        log.info("alignment phase done: adapter loaded from %s", done)

    def stop_for_time_limit(self, writer, idle: bool) -> None:
        """Checkpoint, flag the job to be run again, and raise :class:`TimeLimit` on every rank."""
        if idle and self.stopped_idle_before:
            raise RuntimeError(f"two jobs in a row reached their time limit before a training step (at step "
                               f"{self.step}): give the job more time than {STOP_MARGIN_S} s plus one step")
        if self.world.is_main:
            self.save_checkpoint(stopped_idle=idle)
            writer.close()
            if self.resume_flag is not None:
                self.resume_flag.touch()
        self.world.barrier()
        log.warning("stopping at step %d of %d before the job's time limit; the checkpoint is saved: "
                    "run again to continue", self.step, self.total_steps)
        raise TimeLimit

    def log_record(self, record: dict, writer) -> None:
        """One line of train_log.jsonl, and its scalars in TensorBoard."""
        with open(self.outdir / "train_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, tag in (("loss", "train/loss"), ("ctc_loss", "train/ctc_loss"), ("lr", "train/lr"),
                         ("valid_loss", "valid/loss")):
            if key in record:
                writer.add_scalar(tag, record[key], self.step)

    def train(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        cfg, world = self.cfg, self.world
        main = world.is_main
        self.maybe_resume()
        writer = SummaryWriter(str(self.outdir / "tensorboard")) if main else None
        start = time.time()
        if cfg.align_steps > 0 and self.step == 0:
            if self.model.adapter is None:
                log.info("no alignment phase: a text-only model has no adapter")
            else:
                self.align(writer)
        excluded = 0.0  # seconds of dev evaluation (and of waiting for it), not counted as training time

        def train_seconds() -> float:
            return time.time() - start - excluded

        self.model.train()
        log.info("%d examples, %d optimizer steps (%d per epoch), effective batch %d = %d x %d x %d processes",
                 len(self.train_set), self.total_steps, self.steps_per_epoch,
                 self.global_batch * cfg.grad_accum, cfg.batch_size, cfg.grad_accum, world.size)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not main)
        window_loss, window_ctc, window_n = 0.0, 0.0, 0
        out_of_time = False
        first_step, slowest, last_check = self.step, 0.0, time.time()
        while self.step < self.total_steps and not out_of_time:
            batches = self.epoch_batches()
            micro = iter(self.loader(batches, self.batch_in_epoch))
            while self.batch_in_epoch < len(batches) and self.step < self.total_steps and not out_of_time:
                # the slowest stretch between two checks: a step, with any evaluation that followed it
                now = time.time()
                if self.step > first_step:
                    slowest = max(slowest, now - last_check)
                last_check = now
                if self.stop_at is not None and world.any(now + slowest + STOP_MARGIN_S > self.stop_at):
                    self.stop_for_time_limit(writer, idle=self.step == first_step)
                group = [batches[k] for k in range(self.batch_in_epoch,
                                                   min(self.batch_in_epoch + cfg.grad_accum, len(batches)))]
                loss, ctc = self.train_step(group, [next(micro) for _ in group])
                window_loss, window_ctc, window_n = window_loss + loss, window_ctc + ctc, window_n + 1
                self.batch_in_epoch += len(group)
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    loss = world.sum(window_loss) / window_n
                    bar.set_postfix(loss=f"{loss:.3f}")
                    record = {"step": self.step, "epoch": self.epoch, "loss": loss,
                              "lr": self.scheduler.get_last_lr()[-1], "elapsed_s": train_seconds()}
                    if self.ctc is not None:
                        record["ctc_loss"] = world.sum(window_ctc) / (window_n * world.size)
                    if main:
                        self.log_record(record, writer)
                    window_loss, window_ctc, window_n = 0.0, 0.0, 0
                if self.step % cfg.save_every == 0 and main:
                    self.save_checkpoint()
                if cfg.max_minutes is not None:
                    out_of_time = world.any(train_seconds() > 60 * cfg.max_minutes)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or out_of_time):
                    eval_start = time.time()
                    if main:
                        self.curve_point(writer, train_seconds())
                    world.barrier()
                    excluded += time.time() - eval_start
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if main:
                    self.log_record({"step": self.step, "epoch": self.epoch, "valid_loss": self.validate()}, writer)
                world.barrier()
        bar.close()
        if out_of_time:
            log.info("stopped after %.1f min of training (max_minutes %s) at step %d of %d",
                     train_seconds() / 60, cfg.max_minutes, self.step, self.total_steps)
        if main:
            self.save_checkpoint()
            save_model(self.model, self.spec, self.outdir / "model", self.base_path)
            writer.close()
            plot_losses(self.outdir / "train_log.jsonl", self.outdir / "loss.png")
        world.barrier()
        log.info("training done: %d steps in %.1f s; model in %s", self.step, time.time() - start,
                 self.outdir / "model")


def plot_losses(log_path: Path, png: Path) -> None:
    """Training (and validation) loss against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = [], []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train.append((r["step"], r["loss"]))
            elif "valid_loss" in r and not math.isnan(r["valid_loss"]):
                valid.append((r["step"], r["valid_loss"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def new_ctc_head(model: SpeechLLM, cfg: TrainConfig, transcripts: list[str]) -> CTCEmbeddingHead:
    """A CTC head over the tokens of the training transcripts (or, ``align_vocab: full``, all rows)."""
    embeddings = model.llm.get_input_embeddings().weight
    if cfg.align_vocab == "full":
        vocab = torch.arange(len(embeddings))
    else:
        vocab = token_vocab(model.tokenizer, transcripts)
    return CTCEmbeddingHead(embeddings, vocab).to(model.device)


def build_and_train(llm_cfg_dict: dict, cfg: TrainConfig, train_jsonl: Path, valid_jsonl: Path | None,
                    outdir: Path, whisper: str | None = None, mode: str | None = None,
                    world: World = World(), stop_at: float | None = None,
                    resume_flag: Path | None = None) -> SpeechLLM:
    """Build the model (and a tiny base LLM when the config asks for one), tokenise the data, train."""
    for path in (train_jsonl, valid_jsonl):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{path} not found (stage 2 writes it)")
    outdir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    llm_cfg = from_dict(LLMConfig, llm_cfg_dict, "llm config")
    base_path = None
    if llm_cfg.tiny is not None:
        base_path = outdir / "base_llm"
        if world.is_main and not (base_path / "config.json").exists():
            texts = [t for _, e in iter_examples(train_jsonl) for t in (e.prompt, e.target, e.text)]
            build_tiny(llm_cfg, texts, base_path)
        world.barrier()
    first = next(iter_examples(train_jsonl), None)
    if first is None:
        raise InputError(f"{train_jsonl}: no examples")
    feats = load_feats(first[1])
    feat_dim = 0 if feats is None else feats.shape[1]  # 0: text-only (cascade) examples
    audio_input = cfg.audio_input if feat_dim else "adapter"  # a text-only model reads text
    spec = ModelSpec(llm=llm_cfg_dict, feat_dim=feat_dim, adapter_hidden=cfg.adapter_hidden,
                     stack=cfg.stack, whisper=whisper, mode=mode, audio_input=audio_input)
    model = build_speechllm(spec, base_path, world.device, cfg.gradient_checkpointing)
    if audio_input == "ctc_tokens":
        model.ctc_head = new_ctc_head(model, cfg, [e.text for _, e in iter_examples(train_jsonl)])
    train = tokenized(model, train_jsonl, outdir / "tokens" / "train", world)
    valid = None if valid_jsonl is None else \
        tokenized(model, valid_jsonl, outdir / "tokens" / "valid", world, cfg.valid_max_examples)
    trainer = Trainer(model, spec, cfg, train, valid, outdir, base_path, world, stop_at, resume_flag)
    trainer.train()
    return model
