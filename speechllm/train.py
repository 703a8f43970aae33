"""Stage 3: LoRA/QLoRA fine-tuning of the speech LLM with the paper's schedule.

AdamW, linear warm-up over the first ``warmup_ratio`` of the optimizer steps then cosine decay,
gradient clipping, gradient accumulation. Only the adapter and LoRA weights train.

Under ``torchrun`` the model is wrapped in DistributedDataParallel. Every process draws the same
global batches of ``batch_size x world size`` examples and trains on its own slice, so the effective
batch is ``batch_size x grad_accum x world size`` (the paper: 4 x 8 x 4 = 128) and one optimizer step
averages over every target token of the step, however the batch was split. Only rank 0 writes.

The experiment dir receives ``tokens/`` (the stage-2 files tokenised once, see
:class:`speechllm.data.TokenizedSet`), ``checkpoints/`` (:mod:`speechllm.checkpoint`), ``model/``
(the final model), ``tensorboard/``, ``train_log.jsonl`` and ``loss.png``; with an alignment phase
``alignment.json`` (the aligned dir it started from, by default ``align/``, and the phase's last
evaluation; :mod:`speechllm.align`), with learning curves ``curve.jsonl`` (:mod:`speechllm.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from speechllm.align import AlignmentData, CTCObjective, alignment_data, new_ctc_head, run_alignment_phase
from speechllm.budget import Budget, TimeLimit
from speechllm.checkpoint import (latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                                  set_seed)
from speechllm.config import from_dict
from speechllm.data import (BatchPlan, TokenizedSet, bucketed_batches, collate, iter_examples, load_feats,
                            tokenized)
from speechllm.decode import new_token_cap
from speechllm.distributed import World
from speechllm.evaluate import CurveEvaluator, validation_loss
from speechllm.io_utils import InputError, atomic_write, fingerprint
from speechllm.model.builder import ModelSpec, build_speechllm, save_model, tiny_base_llm
from speechllm.model.llm import LLMConfig
from speechllm.model.speechllm import ModelInput, SpeechLLM
from speechllm.plots import plot_losses
from speechllm.run_log import RunLog
from speechllm.train_config import TrainConfig, accumulation_for

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, model: SpeechLLM, spec: ModelSpec, cfg: TrainConfig, train: TokenizedSet,
                 valid: TokenizedSet | None, outdir: Path, base_path: Path | None = None,
                 world: World = World(), stop_at: float | None = None, resume_flag: Path | None = None,
                 alignment: AlignmentData | None = None) -> None:
        """``stop_at`` (a Unix time: the job's end) makes :meth:`train` checkpoint, create ``resume_flag``
        and raise :class:`TimeLimit` while there is still time to, rather than be killed mid-step.
        ``alignment``: the data of the alignment phase (with ``align.steps``)."""
        if cfg.effective_batch is not None:
            cfg = dataclasses.replace(cfg, grad_accum=accumulation_for(cfg, world.size))
        self.model, self.spec, self.cfg, self.world = model, spec, cfg, world
        self.outdir, self.base_path, self.stop_at, self.resume_flag = outdir, base_path, stop_at, resume_flag
        self.train_set, self.valid_set, self.alignment = train, valid, alignment
        spec.max_target_tokens = int(train.n_target.max())
        self.global_batch = cfg.batch_size * world.size
        full, rest = divmod(len(train), self.global_batch)
        self.batches_per_epoch = full + (rest >= world.size)  # a final batch smaller than the processes is left out
        if self.batches_per_epoch == 0:
            raise InputError(f"{train.meta['source']}: {len(train)} training rows for {world.size} processes: "
                             "every process needs at least one row")
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.optimizer = torch.optim.AdamW(model.param_groups(cfg.lr, cfg.adapter_lr or cfg.lr),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * self.total_steps),
                                                         self.total_steps)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.stopped_idle_before = False  # the checkpoint resumed from was a time-limit stop without a step
        self.n_nonfinite = 0  # steps skipped for a non-finite loss or gradient
        self.train_s_before = 0.0  # training seconds of the jobs before this one (max_minutes counts them)
        # the auxiliary CTC loss keeps the head that the LLM reads through aligned (text-only models have none)
        self.ctc = None
        if cfg.ctc_weight > 0 and model.ctc_head is not None:
            self.ctc = CTCObjective(model.adapter, model.ctc_head, model.tokenizer)
        self.forward = model  # wrapped for DDP in train(), once it is settled what trains
        # a checkpoint keeps the audio path even when slot filling freezes it (freeze_audio)
        self.saved = {n for n, p in model.named_parameters() if p.requires_grad} | set(model.audio_parameter_names())
        # the curriculum's text-first steps: the step audio starts at, once known (a text-only model reads text)
        self.text_share = cfg.text_first if model.adapter is not None else 0.0
        self.audio_from: int | None = None if self.text_share else 0
        if math.ceil(self.text_share * self.total_steps) >= self.total_steps:
            raise ValueError(f"text_first {self.text_share} of {self.total_steps} steps leaves no step to read audio")

    # -- data ----------------------------------------------------------------------------------
    def epoch_batches(self) -> BatchPlan:
        """The epoch's global batches, the same on every rank; one a rank would get nothing of is dropped."""
        batches = bucketed_batches(self.train_set.lengths(self.cfg.stack), self.global_batch, self.cfg.seed,
                                   self.epoch, self.cfg.bucket_batches)
        big_enough = batches.sizes >= self.world.size
        if not big_enough.all():
            log.info("epoch %d: %d examples left out (a final batch smaller than the %d processes)", self.epoch,
                     batches.sizes[~big_enough].sum(), self.world.size)
            batches = batches.keep(big_enough)
        return batches

    def loader(self, batches: BatchPlan, first: int) -> DataLoader:
        """This rank's shares of the batches from ``first`` on, read ahead by ``num_workers`` processes.

        The loader gets its own generator: drawing its seed from the global one would shift the dropout
        masks of a run resumed mid-epoch away from those of an uninterrupted run.
        """
        workers = self.cfg.num_workers
        shares = (self.world.share(batches[k]) for k in range(first, len(batches)))
        return DataLoader(self.train_set, batch_sampler=shares, collate_fn=collate,
                          num_workers=workers, prefetch_factor=2 if workers else None,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(self, group: list[list[int]],
                   micro: list[tuple[list[ModelInput], list[str]]]) -> tuple[float, float] | None:
        """One optimizer step over a group of global batches, of which ``micro`` holds this rank's shares.

        Returns this rank's share of the step's LLM loss, and its mean auxiliary CTC loss (0 without one);
        ``None`` when a loss or the gradient is not finite on any rank: the step's update is then skipped
        (:meth:`skip_step`) rather than written into the weights. A text-first step reads each turn's
        transcript where its audio would be."""
        n_tokens = int(self.train_set.n_target[np.concatenate(group)].sum())
        share = ctc_mean = 0.0
        text_step = self.audio_from is None
        for k, (inputs, texts) in enumerate(micro):
            last = k == len(group) - 1
            if text_step:
                spoken = self.model.tokenizer(texts, add_special_tokens=False)["input_ids"]
                inputs = [dataclasses.replace(x, feats=None, spoken=ids) for x, ids in zip(inputs, spoken)]
            with nullcontext() if last or not self.world.distributed else self.forward.no_sync():
                loss = self.forward(inputs, num_items_in_batch=n_tokens)
                share += loss.item()
                if self.ctc is not None and not text_step:
                    ctc = self.ctc.loss([x.feats for x in inputs], texts)
                    ctc_mean += ctc.item() / len(group)
                    loss = loss + self.cfg.ctc_weight * ctc / len(group)
                # DDP averages gradients over ranks, each of which holds a share of one global sum
                (loss * self.world.size).backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                              self.cfg.grad_clip)
        finite = math.isfinite(share) and math.isfinite(ctc_mean) and bool(torch.isfinite(norm))
        if self.world.any(not finite):
            self.skip_step(group)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return share, ctc_mean

    def end_text_first_when_due(self, run_log: RunLog) -> None:
        """Call after each step, before its checkpoint: the curriculum's text-first steps end once
        ``text_first`` of the slot-filling minutes (``max_minutes``) or of the steps is spent, whichever
        comes first. Every rank switches to audio at the same step, which is logged once and kept in the
        checkpoints, so a resumed run keeps it."""
        if self.audio_from is not None:
            return
        share = self.text_share
        if self.step >= share * self.total_steps or self.budget.spent(share):
            self.audio_from = self.step
            run_log.record({"step": self.step, "text_steps": self.step})
            log.info("text first: steps 1-%d read the transcripts; audio from step %d on", self.step, self.step + 1)

    def skip_step(self, group: list[list[int]]) -> None:
        """Drop a step whose loss or gradient is not finite (counted and logged with the step's rows);
        stop the run once more than ``max_nonfinite_steps`` were dropped: data or learning rate are wrong."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when no optimizer step came first: here that is the point
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()  # the schedule follows the step count, updated or not
        self.n_nonfinite += 1
        ids = [self.train_set.example(i).id for i in np.concatenate(group)[:5]]
        log.warning("step %d: loss or gradient not finite: update skipped (%d so far; rows include %s)",
                    self.step + 1, self.n_nonfinite, ", ".join(ids))
        if self.n_nonfinite > self.cfg.max_nonfinite_steps:
            raise RuntimeError(f"{self.n_nonfinite} training steps had a non-finite loss or gradient (more than "
                               f"max_nonfinite_steps {self.cfg.max_nonfinite_steps}): check the features of "
                               f"{self.train_set.meta['source']} and the learning rate")

    # -- checkpoints -----------------------------------------------------------------------------
    def check_weights(self) -> None:
        """Refuse trained tensors that hold a NaN or an infinity: such weights are never saved."""
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise RuntimeError(f"step {self.step}: {len(bad)} trained tensors hold non-finite values (first: "
                               f"{bad[0]}): not saved; the last checkpoint in {self.outdir / 'checkpoints'} is kept")

    def save_checkpoint(self, stopped_idle: bool = False) -> None:
        """Call on every rank: each checks the weights (the same on every rank, so all stop together, where
        a check on rank 0 alone would leave the others waiting in a collective); rank 0 writes."""
        self.check_weights()
        if not self.world.is_main:
            return
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if n in self.saved}
        # the batch position only means something for the same global batch and accumulation
        position = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                    "global_batch": self.global_batch, "grad_accum": self.cfg.grad_accum,
                    "stopped_idle": stopped_idle, "train_s": self.budget.train_seconds(),
                    "nonfinite_steps": self.n_nonfinite, "audio_from": self.audio_from}
        save_checkpoint(self.outdir, self.step, {"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                                                 "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                                                 "position": position}, self.cfg.keep_checkpoints)

    def maybe_resume(self) -> None:
        ckpt = latest_checkpoint(self.outdir)
        if ckpt is None:
            return
        state = load_checkpoint(ckpt)
        missing = self.saved - set(state["trainable"])
        if missing:
            raise RuntimeError(f"{ckpt} does not match this model (missing {sorted(missing)[:3]}...)")
        pos = state["position"]
        saved = (pos.get("global_batch", self.global_batch), pos.get("grad_accum", self.cfg.grad_accum))
        if saved != (self.global_batch, self.cfg.grad_accum):
            raise RuntimeError(f"{ckpt} was trained with global batch {saved[0]} x accumulation {saved[1]}, "
                               f"this run has {self.global_batch} x {self.cfg.grad_accum} (other --ngpu or "
                               "batch_size?): resume with the same, or train into a new experiment dir")
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.batch_in_epoch = pos["step"], pos["epoch"], pos["batch_in_epoch"]
        self.stopped_idle_before = pos.get("stopped_idle", False)
        self.train_s_before = pos.get("train_s", 0.0)
        self.n_nonfinite = pos.get("nonfinite_steps", 0)
        self.audio_from = pos.get("audio_from", self.audio_from)
        log.info("resumed from %s (step %d, epoch %d, batch %d)", ckpt, self.step, self.epoch, self.batch_in_epoch)

    def stop_for_time_limit(self, run_log: RunLog, idle: bool) -> None:
        """Checkpoint, flag the job to be run again, and raise :class:`TimeLimit` on every rank."""
        if idle and self.stopped_idle_before:
            raise RuntimeError(f"two jobs in a row reached their time limit before a training step (at step "
                               f"{self.step}): give the job more time than one step and a checkpoint")
        self.save_checkpoint(stopped_idle=idle)
        if self.world.is_main and self.resume_flag is not None:
            self.resume_flag.touch()
        run_log.close()
        self.world.barrier()
        log.warning("stopping at step %d of %d before the job's time limit; the checkpoint is saved: "
                    "run again to continue", self.step, self.total_steps)
        raise TimeLimit

    # -- the loop --------------------------------------------------------------------------------
    def end_epoch(self, run_log: RunLog) -> None:
        """The end of an epoch: the validation loss."""
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self.world.is_main and self.valid_set is not None:
            loss = validation_loss(self.model, self.valid_set, self.cfg.batch_size)
            run_log.record({"step": self.step, "epoch": self.epoch, "valid_loss": loss})
        self.world.barrier()

    def train(self) -> None:
        cfg, world, main = self.cfg, self.world, self.world.is_main
        self.maybe_resume()
        # a checkpoint at the end of an epoch resumes with that epoch's validation
        redo_epoch_end = self.step > 0 and self.batch_in_epoch >= len(self.epoch_batches())
        run_log = RunLog(self.outdir, world, with_ctc=self.ctc is not None, step=self.step,
                         redo_epoch_end=redo_epoch_end)
        self.budget = budget = Budget(cfg.max_minutes, world, self.train_s_before)
        curve = None
        if cfg.eval_every and main:
            curve = CurveEvaluator(self.valid_set, cfg.eval_max_examples, cfg.batch_size,
                                   cfg.eval_max_new_tokens or new_token_cap(self.spec), self.outdir)
        # the alignment phase, once, before the first step
        if self.alignment is not None and self.step == 0:
            llm = {k: self.spec.llm.get(k) for k in ("name_or_path", "tiny", "tiny_vocab_size", "tiny_tokens")}
            # the CTC classes are token ids: a tokenizer of its own (a tiny LLM's) cannot share the alignment
            vocab = fingerprint(sorted(self.model.tokenizer.get_vocab().items()))
            identity = {"llm": llm, "tokenizer": vocab, "whisper": self.spec.whisper, "feat_dim": self.spec.feat_dim,
                        "adapter_hidden": self.spec.adapter_hidden, "stack": self.spec.stack}
            with budget.paused():  # the phase is shared by the modes of a run: no one mode's budget pays for it
                aligned = run_alignment_phase(self.model, cfg.align, self.alignment, identity, cfg.seed, world,
                                              run_log, cfg.max_nonfinite_steps)
            if main:  # what the experiment started from, for stage 5's tables
                with atomic_write(self.outdir / "alignment.json") as f:
                    json.dump(aligned, f, indent=1)
        # hard CTC tokens pass no gradient back: without the CTC loss, the audio path does not train
        hard = self.model.ctc_head is not None and self.model.ctc_head.hard and self.ctc is None
        if cfg.freeze_audio or hard:
            self.model.freeze_audio()
        # DistributedDataParallel under torchrun; in a text-first step the adapter gets no gradient
        self.forward = world.wrap(self.model, find_unused_parameters=self.audio_from is None)
        if self.audio_from is None:
            log.info("text first: the first %.0f%% of slot filling reads the transcripts in place of the audio",
                     100 * self.text_share)
        self.model.train()
        log.info("%d examples, %d optimizer steps (%d per epoch), effective batch %d = %d x %d x %d processes",
                 len(self.train_set), self.total_steps, self.steps_per_epoch,
                 self.global_batch * cfg.grad_accum, cfg.batch_size, cfg.grad_accum, world.size)
        if redo_epoch_end and self.step >= self.total_steps:  # killed after the last step, before its epoch's end
            self.end_epoch(run_log)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not main)
        first_step, out_of_time = self.step, False
        while self.step < self.total_steps and not out_of_time:
            batches = self.epoch_batches()
            micro = iter(self.loader(batches, self.batch_in_epoch))
            while self.batch_in_epoch < len(batches) and self.step < self.total_steps and not out_of_time:
                # stop on purpose, with a checkpoint, if one more step could outlast the job
                if budget.job_ending(self.stop_at):
                    self.stop_for_time_limit(run_log, idle=self.step == first_step)
                # one optimizer step over the next grad_accum global batches
                group = [batches[k] for k in range(self.batch_in_epoch,
                                                   min(self.batch_in_epoch + cfg.grad_accum, len(batches)))]
                text_step = self.audio_from is None
                losses = self.train_step(group, [next(micro) for _ in group])
                if losses is not None:
                    run_log.add_step(*losses)
                self.batch_in_epoch += len(group)
                self.step += 1
                self.end_text_first_when_due(run_log)
                bar.update(1)
                # the mean loss since the last report, over every rank
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    losses = run_log.window()
                    run_log.record({"step": self.step, "epoch": self.epoch, **losses,
                                    "input": "text" if text_step else "audio",
                                    "lr": self.scheduler.get_last_lr()[-1], "elapsed_s": budget.train_seconds()})
                    if "loss" in losses:
                        bar.set_postfix(loss=f"{losses['loss']:.3f}")
                if self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                out_of_time = budget.spent()
                # a learning-curve point, its time not counted as training (the other ranks wait)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or out_of_time):
                    with budget.paused():
                        if main:
                            curve(self.model, self.step, budget.train_seconds(), run_log)
                        world.barrier()
            if self.batch_in_epoch >= len(batches):
                self.end_epoch(run_log)
        bar.close()
        if out_of_time:
            log.info("stopped after %.1f min of training (max_minutes %s) at step %d of %d",
                     budget.train_seconds() / 60, cfg.max_minutes, self.step, self.total_steps)
        # the final checkpoint and model, and the loss plot
        run_log.close()
        self.save_checkpoint()
        if main:
            save_model(self.model, self.spec, self.outdir / "model", self.base_path)
            plot_losses(self.outdir / "train_log.jsonl", self.outdir / "loss.png")
        world.barrier()
        log.info("training done: %d steps (%d skipped: not finite), %.1f s of training; model in %s", self.step,
                 self.n_nonfinite, budget.train_seconds(), self.outdir / "model")


def build_and_train(llm_cfg_dict: dict, cfg: TrainConfig, train_jsonl: Path, valid_jsonl: Path | None,
                    outdir: Path, whisper: str | None = None, mode: str | None = None,
                    world: World = World(), stop_at: float | None = None,
                    resume_flag: Path | None = None, align_dir: Path | None = None, align_corpus: Path | None = None,
                    align_evals: list[Path] = (), tiny_texts: list[Path] = ()) -> SpeechLLM:
    """Build the model (and a tiny base LLM when the config asks for one, its tokenizer trained on the
    texts of ``tiny_texts``, by default of ``train_jsonl``), tokenise the data, train.

    With ``align.steps`` the adapter is first aligned into ``align_dir`` (default ``<outdir>/align``;
    one dir can serve several experiments), on the training turns and ``align_corpus`` (stage 1's
    alignment corpus), measured on the validation set and the ``align_evals`` stage-2 files."""
    for path in (train_jsonl, valid_jsonl):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{path} not found (stage 2 writes it)")
    outdir.mkdir(parents=True, exist_ok=True)
    llm_cfg = from_dict(LLMConfig, llm_cfg_dict, "llm config")
    base_path = None
    if llm_cfg.tiny is not None:
        base_path = outdir / "base_llm"
        if world.is_main:
            tiny_base_llm(llm_cfg, lambda: (t for path in tiny_texts or [train_jsonl] for _, e in iter_examples(path)
                                            for t in (e.prompt, e.target, e.text)), base_path)
        world.barrier()
    set_seed(cfg.seed)  # after the tiny build: a rerun that finds it built initialises the same way
    first = next(iter_examples(train_jsonl), None)
    if first is None:
        raise InputError(f"{train_jsonl}: no examples")
    feats = load_feats(first[1])
    feat_dim = 0 if feats is None else feats.shape[1]  # 0: text-only (cascade) examples
    audio_input = cfg.audio_input if feat_dim else "adapter"  # a text-only model reads text
    spec = ModelSpec(llm=llm_cfg_dict, feat_dim=feat_dim, adapter_hidden=cfg.adapter_hidden,
                     stack=cfg.stack, whisper=whisper, mode=mode, audio_input=audio_input,
                     ctc_collapse=cfg.ctc_collapse)
    model = build_speechllm(spec, base_path, world.device, cfg.gradient_checkpointing)
    train = tokenized(model, train_jsonl, outdir / "tokens" / "train", world)
    valid = None if valid_jsonl is None else \
        tokenized(model, valid_jsonl, outdir / "tokens" / "valid", world, cfg.valid_max_examples)
    alignment = None
    if cfg.align.steps > 0 and model.adapter is not None:  # a text-only model has no adapter to align
        alignment = alignment_data(align_dir or outdir / "align", train, valid, align_corpus, align_evals, whisper)
    if audio_input == "ctc_tokens":
        model.ctc_head = new_ctc_head(model, cfg.align.vocab, [e.text for e in alignment.turns], cfg.ctc_collapse)
    trainer = Trainer(model, spec, cfg, train, valid, outdir, base_path, world, stop_at, resume_flag, alignment)
    trainer.train()
    return model
