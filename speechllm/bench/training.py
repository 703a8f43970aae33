"""Training throughput of stage 3's optimizer step, and the peak memory of LoRA vs QLoRA training.

Throughput is measured with stage 3's own :class:`~speechllm.train.Trainer`: its length-bucketed batch
plan, its DataLoader and its :meth:`~speechllm.train.Trainer.train_step` (forward, backward, clipping,
AdamW, the schedule), one global batch per optimizer step. Tokens are the positions a row really has in
the LLM (prompt tokens, adapter frames, target), not the padding its batch adds; flops are
:func:`flops_per_token` of those tokens, so the roofline fraction is the useful share of the machine.

A peak is the high-water mark of a whole process, so :func:`peak_memory` trains each variant in a fresh
one, started as ``python -m speechllm.bench.training --peak JOB``, which prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from speechllm.bench.machine import synchronize
from speechllm.config import from_dict
from speechllm.data import TokenizedSet
from speechllm.logging_utils import setup_logging
from speechllm.model.builder import ModelSpec, build_speechllm
from speechllm.model.speechllm import ModelInput, SpeechLLM
from speechllm.train import Trainer
from speechllm.train_config import TrainConfig

log = logging.getLogger(__name__)

QUANTIZATION = {"lora": None, "qlora": "nf4"}  # the peak_memory variants: the base's LLMConfig.quantization


def flops_per_token(llm: nn.Module) -> int:
    """Flops of one LoRA training step per position: 4 x the base weights of the decoder layers' linears.

    Each such weight is one multiply-accumulate per position in the forward pass (2 flops) and one more
    in the backward pass, for the gradient of the activations (2 flops); the base is frozen, so there is
    no weight gradient (the 2 more flops of full fine-tuning's ``6N``). Weights are counted from the
    modules' shapes (``in x out``), so a 4-bit weight counts as the matrix it packs and a model on the
    meta device can be counted. Left out: the token embedding (a lookup), the LM head (it runs on the
    target positions only, see ``SpeechLLM.forward``), the LoRA matrices (``r x (in + out)`` per linear),
    the attention scores (which grow with the sequence length) and the recomputation of gradient
    checkpointing (work the step redoes, not work it needs).
    """
    layers = [m for m in llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(llm).__name__} has no decoder layers (transformers' GradientCheckpointingLayer)")
    lora = {id(sub) for m in llm.modules() if isinstance(m, BaseTunerLayer)
            for name in m.adapter_layer_names for sub in getattr(m, name).modules()}
    weights = sum(m.in_features * m.out_features for layer in layers for m in layer.modules()
                  if isinstance(m, nn.Linear) and id(m) not in lora)
    return 4 * weights


def lm_head_flops(llm: nn.Module) -> int:
    """Flops of the LM head per position it runs on (forward and the activations' gradient): 4 x its
    weights. It runs on the last ``longest target + 1`` positions of each row, not on every token."""
    head = llm.get_output_embeddings()
    return 4 * head.in_features * head.out_features


def row_length(item: ModelInput, stack: int) -> int:
    """Positions of one row in the LLM, as :meth:`TokenizedSet.lengths` counts them (prompt tokens, the
    adapter's frames, the target), but from the features read rather than the row's ``n_frames``."""
    frames = 0 if item.feats is None else len(item.feats) // stack
    return len(item.before) + len(item.after) + frames + len(item.target)


def global_batches(trainer: Trainer) -> Iterator[tuple[list[int], tuple[list[ModelInput], list[str]]]]:
    """The trainer's global batches and their rows as its DataLoader reads them, epoch after epoch (a
    benchmark may take more steps than an epoch has)."""
    while True:
        plan = trainer.epoch_batches()
        for k, micro in enumerate(trainer.loader(plan, 0)):
            yield plan[k], micro
        trainer.epoch += 1


def measure_training(model: SpeechLLM, train: TokenizedSet, batch_size: int, steps: int,
                     roofline_gflops: float | None = None, cfg: TrainConfig | None = None,
                     warmup: int = 1) -> dict:
    """Throughput of ``steps`` optimizer steps of ``batch_size`` rows as stage 3 takes them, after
    ``warmup`` untimed ones (allocator, thread pools, kernel choice), quoted against ``roofline_gflops``
    (:func:`speechllm.bench.machine.matmul_gflops`; None: no fraction).

    ``cfg`` gives the rest of the schedule (seed, bucketing, learning rates, DataLoader workers); one
    global batch makes one step (no accumulation, which changes nothing per token). The model trains:
    the steps are real. ``data_seconds`` is the part of ``seconds`` spent reading batches (features and
    rows), which stage 3 spends in the step too unless ``num_workers`` read ahead.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    cfg = cfg or TrainConfig()
    stack = model.adapter.stack if model.adapter is not None else cfg.stack
    cfg = dataclasses.replace(cfg, batch_size=batch_size, grad_accum=1, effective_batch=None,
                              max_steps=warmup + steps, stack=stack)
    # the spec only receives the longest target; nothing is written to the outdir: train() never runs
    trainer = Trainer(model, ModelSpec(llm={}, feat_dim=0), cfg, train, None, train.dir)
    model.train()
    batches = global_batches(trainer)
    real = padded = examples = head_positions = 0
    data_s = 0.0
    for step in tqdm(range(warmup + steps), desc="bench training", unit="step"):
        if step == warmup:
            synchronize(model.device)
            start = time.perf_counter()
        before = time.perf_counter()
        group, micro = next(batches)
        read = time.perf_counter()
        trainer.train_step([group], [micro])
        if step >= warmup:
            lengths = [row_length(item, stack) for item in micro[0]]
            real, padded = real + sum(lengths), padded + len(lengths) * max(lengths)
            examples += len(lengths)
            head_positions += len(lengths) * (max(len(item.target) for item in micro[0]) + 1)
            data_s += read - before
    synchronize(model.device)
    seconds = time.perf_counter() - start
    per_token = flops_per_token(model.llm)
    tokens_per_s = real / seconds
    achieved = tokens_per_s * per_token / 1e9
    with_head = achieved + head_positions * lm_head_flops(model.llm) / seconds / 1e9
    result = {"tokens_per_s": tokens_per_s, "examples_per_s": examples / seconds, "padding_efficiency": real / padded,
              "flops_per_token": per_token, "achieved_gflops": achieved,
              "roofline_fraction": None if roofline_gflops is None else achieved / roofline_gflops,
              "achieved_gflops_with_lm_head": with_head,
              "roofline_fraction_with_lm_head": None if roofline_gflops is None else with_head / roofline_gflops,
              "mean_tokens_per_example": real / examples, "steps": steps, "batch_size": batch_size,
              "seconds": seconds, "data_seconds": data_s}
    log.info("training: %.0f tokens/s, %.2f examples/s, padding efficiency %.3f, %.2f GFLOP/s", tokens_per_s,
             result["examples_per_s"], result["padding_efficiency"], achieved)
    return result


def peak_memory(spec: ModelSpec, train: TokenizedSet, base_path: str | Path | None = None, batch_size: int = 4,
                steps: int = 2, device: str = "cpu", cfg: TrainConfig | None = None) -> dict[str, dict]:
    """Peak memory of :func:`measure_training`'s steps with the base as ``spec`` loads it (``lora``) and
    quantised to 4 bits (``qlora``), each in a fresh process so that each peak is its own.

    On CPU the peak is the process's resident memory (``peak_rss_mb``: everything, the Python runtime
    and the libraries included); on CUDA it is ``max_memory_allocated_mb``; each comes with the mark
    before the first step (``..._before_training``). ``seconds`` is the whole process. A variant that
    fails (bitsandbytes missing, or without a kernel for the device) gives ``{"error": message}``, with
    a warning, so that the other one is still reported.
    """
    cfg = cfg or TrainConfig()
    results = {}
    for variant, quantization in QUANTIZATION.items():
        job = {"spec": dataclasses.asdict(dataclasses.replace(spec, llm={**spec.llm, "quantization": quantization})),
               "tokens": str(train.dir), "base_path": None if base_path is None else str(base_path),
               "batch_size": batch_size, "steps": steps, "device": device, "cfg": dataclasses.asdict(cfg)}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "speechllm.bench.training", "--peak", json.dumps(job)],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            last = proc.stderr.strip().splitlines()[-1:]
            message = f"exit status {proc.returncode}" + "".join(f": {line}" for line in last)
            log.warning("%s: the peak-memory run failed (%s)", variant, message)
            results[variant] = {"error": message}
        else:
            results[variant] = {**json.loads(proc.stdout.splitlines()[-1]), "seconds": seconds}
    return results


def high_water_mb(device: torch.device) -> tuple[str, float]:
    """This process's memory high-water mark so far, and its name: CUDA memory allocated by torch, or the
    resident memory's high-water mark on CPU (``VmHWM``: unlike ``ru_maxrss``, which Linux carries across
    ``execve``, it starts with this process's own image, not its parent's at the fork)."""
    if device.type == "cuda":
        return "max_memory_allocated_mb", torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status", encoding="ascii") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return "peak_rss_mb", kib / 1024


def peak_of_job(job: dict) -> dict:
    """One :func:`peak_memory` variant in this process: build the model, train, read the high-water mark.

    The mark before training is reported too: for a small model, importing the libraries can set a
    peak that training never passes, and then the two are equal."""
    spec = from_dict(ModelSpec, job["spec"], "peak job: spec")
    cfg = from_dict(TrainConfig, job["cfg"], "peak job: cfg")
    device = torch.device(job["device"])
    model = build_speechllm(spec, job["base_path"], device, cfg.gradient_checkpointing)
    name, before = high_water_mb(device)
    measured = measure_training(model, TokenizedSet(job["tokens"]), job["batch_size"], job["steps"], cfg=cfg)
    return {name: high_water_mb(device)[1], f"{name}_before_training": before,
            "tokens_per_s": measured["tokens_per_s"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="(internal) one variant of peak_memory, in a fresh process")
    parser.add_argument("--peak", required=True, help="the job, as JSON (see peak_memory)")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    print(json.dumps(peak_of_job(json.loads(args.peak))))


if __name__ == "__main__":
    main()
