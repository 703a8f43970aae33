"""The training config (``conf/train*.yaml``): the schedule, the batch, and what the LLM reads.

Stage 3 writes the resolved config, overrides included, to the experiment dir as ``train.yaml``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from speechllm.model.ctc_head import COLLAPSES

log = logging.getLogger(__name__)

ALIGN_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}  # to transformers' scheduler names


@dataclass
class AlignConfig:
    """The ``align:`` block of a training config; ``steps: 0`` (the default) turns the phase off."""

    steps: int = 0
    batch_size: int = 16
    lr: float = 1.0e-3
    eval_every: int = 50
    vocab: str = "transcripts"  # CTC classes: "transcripts" (tokens of the training transcripts) or "full"
    schedule: str = "constant"  # the learning rate over the phase: "constant", or "cosine" (decays to 0)
    warmup_ratio: float = 0.0  # the share of the steps over which the rate first rises from 0

    def __post_init__(self) -> None:
        if self.vocab not in ("transcripts", "full"):
            raise ValueError(f"vocab must be 'transcripts' or 'full', not {self.vocab!r}")
        if self.schedule not in ALIGN_SCHEDULES:
            raise ValueError(f"schedule must be one of {tuple(ALIGN_SCHEDULES)}, not {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), not {self.warmup_ratio}")


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
    max_nonfinite_steps: int = 10  # steps whose loss or gradient is NaN/inf are skipped; more than this stop the run
    adapter_hidden: int = 2048
    stack: int = 4
    seed: int = 1
    gradient_checkpointing: bool = False  # recompute each layer in backward: activations of one layer, not all
    bucket_batches: int = 50
    log_every: int = 5
    save_every: int = 100
    keep_checkpoints: int = 2
    valid_max_examples: int = 200
    align: AlignConfig = field(default_factory=AlignConfig)  # CTC alignment of the adapter (beyond the paper)
    audio_input: str = "adapter"  # what the LLM reads: "adapter" frames or "ctc_tokens" (needs align.steps > 0)
    ctc_weight: float = 0.0  # slot filling adds this times the CTC loss of the batch's transcripts (ctc_tokens)
    ctc_collapse: str = "mix"  # ctc_tokens: a posterior-weighted "mix" of embeddings per token, or the best ("hard")
    freeze_audio: bool = False  # slot filling trains LoRA only: the aligned adapter and CTC head stay as they are
    text_first: float = 0.0  # share of slot filling (of max_minutes, else of the steps) read on transcripts first
    max_minutes: float | None = None  # slot-filling time, resumed jobs included (not alignment or evaluation)
    eval_every: int = 0  # decode and score the valid set every N optimizer steps (0: never)
    eval_max_examples: int = 40
    eval_max_new_tokens: int | None = None  # None: decoding's cap, from the longest training target
    num_workers: int = 0  # DataLoader processes that read features ahead of the step (0: in the step)

    def __post_init__(self) -> None:
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 (the newest is what a resume needs), not "
                             f"{self.keep_checkpoints}")
        if self.audio_input not in ("adapter", "ctc_tokens"):
            raise ValueError(f"audio_input must be 'adapter' or 'ctc_tokens', not {self.audio_input!r}")
        if self.audio_input == "ctc_tokens" and self.align.steps <= 0:
            raise ValueError("audio_input: ctc_tokens reads the CTC head's output, which needs align.steps > 0")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, not {self.max_nonfinite_steps}")
        if self.effective_batch is not None and self.effective_batch <= 0:
            raise ValueError(f"effective_batch must be > 0, not {self.effective_batch}")
        if self.ctc_weight < 0:
            raise ValueError(f"ctc_weight must be >= 0, not {self.ctc_weight}")
        if self.ctc_weight > 0 and self.audio_input != "ctc_tokens":
            raise ValueError("ctc_weight trains on the CTC head that the LLM reads through: it needs "
                             "audio_input: ctc_tokens")
        if self.ctc_collapse not in COLLAPSES:
            raise ValueError(f"ctc_collapse must be one of {COLLAPSES}, not {self.ctc_collapse!r}")
        if self.freeze_audio and self.align.steps <= 0:
            raise ValueError("freeze_audio keeps the aligned adapter as it is: it needs align.steps > 0 (a frozen "
                             "random adapter hears nothing)")
        if self.freeze_audio and self.ctc_weight > 0:
            raise ValueError("freeze_audio leaves the CTC head as it is, so ctc_weight would train nothing: "
                             "set one of them")
        if not 0 <= self.text_first < 1:
            raise ValueError(f"text_first must be at least 0 and below 1 (some steps must read audio), not "
                             f"{self.text_first}")


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
