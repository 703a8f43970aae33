"""Stage 3: LoRA/QLoRA fine-tuning of the speech LLM with the paper's schedule.

AdamW, linear warm-up over the first ``warmup_ratio`` of the optimizer steps then cosine decay,
gradient clipping, gradient accumulation. Only the adapter and LoRA weights train.

Under ``torchrun`` the model is wrapped in DistributedDataParallel. Every process draws the same
global batches of ``batch_size x world size`` examples and trains on its own slice, so the effective
batch is ``batch_size x grad_accum x world size`` (the paper: 4 x 8 x 4 = 128) and one optimizer step
averages over every target token of the step, however the batch was split. Only rank 0 writes.

The experiment dir receives ``checkpoints/step_N/`` (trainable weights, optimizer, scheduler, step,
data position and RNG states: a killed run resumes where it stopped), ``model/`` (the final model),
``tensorboard/``, ``train_log.jsonl`` and ``loss.png``.
"""

from __future__ import annotations

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
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from speechllm.align import AdapterAligner, CTCObjective
from speechllm.config import from_dict
from speechllm.data import Example, bucketed_batches, load_feats
from speechllm.decode import decode_examples
from speechllm.distributed import World
from speechllm.io_utils import atomic_write
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
    eval_max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.align_vocab not in ("transcripts", "full"):
            raise ValueError(f"align_vocab must be 'transcripts' or 'full', not {self.align_vocab!r}")
        if self.audio_input not in ("adapter", "ctc_tokens"):
            raise ValueError(f"audio_input must be 'adapter' or 'ctc_tokens', not {self.audio_input!r}")
        if self.audio_input == "ctc_tokens" and self.align_steps <= 0:
            raise ValueError("audio_input: ctc_tokens reads the CTC head's output, which needs align_steps > 0")
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
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@dataclass
class _Item:
    """A tokenised example; features stay on disk until its batch is built."""

    example: Example
    before: list[int]
    after: list[int]
    target: list[int]
    n_frames: int


class Trainer:
    def __init__(self, model: SpeechLLM, spec: ModelSpec, cfg: TrainConfig, train: list[Example],
                 valid: list[Example], outdir: Path, base_path: Path | None = None, world: World = World()) -> None:
        self.model, self.spec, self.cfg, self.world = model, spec, cfg, world
        self.outdir, self.base_path = outdir, base_path
        self.train_items = [self._encode(e) for e in tqdm(train, desc="tokenise train", unit="ex",
                                                          disable=not world.is_main)]
        self.valid_items = [self._encode(e) for e in valid[: cfg.valid_max_examples]]
        self.lengths = [len(it.before) + len(it.after) + len(it.target) + it.n_frames // cfg.stack
                        for it in self.train_items]
        self.global_batch = cfg.batch_size * world.size
        self.batches_per_epoch = math.ceil(len(train) / self.global_batch)
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

    def _encode(self, example: Example) -> _Item:
        before, after, target = self.model.formatter.encode(example.prompt, example.target,
                                                            audio=example.feats is not None)
        return _Item(example, before, after, target, example.n_frames)

    def _batch(self, items: list[_Item]) -> list[Encoded]:
        return [Encoded(load_feats(it.example), it.before, it.after, it.target) for it in items]

    def epoch_batches(self) -> list[list[int]]:
        """The epoch's global batches, the same on every rank; one a rank would get nothing of is dropped."""
        batches = bucketed_batches(self.lengths, self.global_batch, self.cfg.seed, self.epoch, self.cfg.bucket_batches)
        kept = [b for b in batches if len(b) >= self.world.size]
        if len(kept) < len(batches):
            log.info("epoch %d: %d examples left out (a final batch smaller than the %d processes)", self.epoch,
                     sum(len(b) for b in batches) - sum(len(b) for b in kept), self.world.size)
        return kept

    def shard(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch (length-sorted, so shares pad alike)."""
        size, rest = divmod(len(batch), self.world.size)
        r = self.world.rank
        start = r * size + min(r, rest)
        return batch[start : start + size + (1 if r < rest else 0)]

    def train_step(self, group: list[list[int]]) -> tuple[float, float]:
        """One optimizer step over a group of global batches.

        Returns this rank's share of the step's LLM loss, and its mean auxiliary CTC loss (0 without one)."""
        n_tokens = sum(len(self.train_items[i].target) for batch in group for i in batch)
        share = ctc_mean = 0.0
        for k, batch in enumerate(group):
            last = k == len(group) - 1
            sync = nullcontext() if last or not self.world.distributed else self.forward.no_sync()
            items = [self.train_items[i] for i in self.shard(batch)]
            with sync:
                encoded = self._batch(items)
                loss = self.forward(encoded, num_items_in_batch=n_tokens)
                share += loss.item()
                if self.ctc is not None:
                    ctc = self.ctc.loss([e.feats for e in encoded], [it.example.text for it in items])
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
    def save_checkpoint(self) -> None:
        ckpt = self.outdir / "checkpoints" / f"step_{self.step:07d}"
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                    "position": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}},
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
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        pos = state["position"]
        self.step, self.epoch, self.batch_in_epoch = pos["step"], pos["epoch"], pos["batch_in_epoch"]
        log.info("resumed from %s (step %d, epoch %d, batch %d)", ckpts[-1], self.step, self.epoch,
                 self.batch_in_epoch)

    # -- loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        if not self.valid_items:
            return float("nan")
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.valid_items), self.cfg.batch_size):
            chunk = self.valid_items[start : start + self.cfg.batch_size]
            n_tokens = sum(len(it.target) for it in chunk)
            total += self.model(self._batch(chunk)).item() * n_tokens
            count += n_tokens
        self.model.train()
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate_f1(self) -> dict[str, float]:
        """Decode (a share of) the valid set and score it: the learning-curve points."""
        examples = [it.example for it in self.valid_items[: self.cfg.eval_max_examples]]
        self.model.eval()
        results = decode_examples(self.model, examples, self.cfg.batch_size, self.cfg.eval_max_new_tokens)
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
            train = list({it.example.utt_id: it.example for it in self.train_items}.values())
            valid = list({it.example.utt_id: it.example for it in self.valid_items}.values())
            head = self.model.ctc_head
            if head is None:  # the head serves the alignment phase only
                head = new_ctc_head(self.model, self.cfg, train)
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
                 len(self.train_items), self.total_steps, self.steps_per_epoch,
                 self.global_batch * cfg.grad_accum, cfg.batch_size, cfg.grad_accum, world.size)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not main)
        window_loss, window_ctc, window_n = 0.0, 0.0, 0
        out_of_time = False
        while self.step < self.total_steps and not out_of_time:
            batches = self.epoch_batches()
            while self.batch_in_epoch < len(batches) and self.step < self.total_steps and not out_of_time:
                group = batches[self.batch_in_epoch : self.batch_in_epoch + cfg.grad_accum]
                loss, ctc = self.train_step(group)
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


def new_ctc_head(model: SpeechLLM, cfg: TrainConfig, train: list[Example]) -> CTCEmbeddingHead:
    """A CTC head over the tokens of the training transcripts (or, ``align_vocab: full``, all rows)."""
    embeddings = model.llm.get_input_embeddings().weight
    if cfg.align_vocab == "full":
        vocab = torch.arange(len(embeddings))
    else:
        vocab = token_vocab(model.tokenizer, [e.text for e in train])
    return CTCEmbeddingHead(embeddings, vocab).to(model.device)


def feature_dim(example: Example) -> int:
    """The Whisper feature width, or 0 for text-only (cascade) examples."""
    feats = load_feats(example)
    return 0 if feats is None else feats.shape[1]


def build_and_train(llm_cfg_dict: dict, cfg: TrainConfig, train: list[Example], valid: list[Example],
                    outdir: Path, whisper: str | None = None, mode: str | None = None,
                    world: World = World()) -> SpeechLLM:
    """Build the model (and a tiny base LLM when the config asks for one), then train it."""
    outdir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    llm_cfg = from_dict(LLMConfig, llm_cfg_dict, "llm config")
    base_path = None
    if llm_cfg.tiny is not None:
        base_path = outdir / "base_llm"
        if world.is_main and not (base_path / "config.json").exists():
            texts = [t for e in train for t in (e.prompt, e.target, e.text)]
            build_tiny(llm_cfg, texts, base_path)
        world.barrier()
    feat_dim = feature_dim(train[0])
    audio_input = cfg.audio_input if feat_dim else "adapter"  # a text-only model reads text
    spec = ModelSpec(llm=llm_cfg_dict, feat_dim=feat_dim, adapter_hidden=cfg.adapter_hidden,
                     stack=cfg.stack, whisper=whisper, mode=mode, audio_input=audio_input)
    model = build_speechllm(spec, base_path, world.device)
    if audio_input == "ctc_tokens":
        model.ctc_head = new_ctc_head(model, cfg, train)
    trainer = Trainer(model, spec, cfg, train, valid, outdir, base_path, world)
    trainer.train()
    return model
