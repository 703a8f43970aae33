"""Stage 3: train the speech LLM on a stage-2 JSONL file (resumes from the latest checkpoint).

Run it with ``python -m`` for one process, or under ``torchrun`` (see ``utils/torchrun.sh``) for
DistributedDataParallel over GPUs, nodes, or CPU processes.

The configs are resolved (``base:`` chains, then ``--train_args``/``--llm_args``) and recorded in the
experiment dir as ``train.yaml`` and ``llm.yaml``; a rerun whose resolved configs differ from the
recorded ones is refused unless ``--force_config``.

A job backend with a time limit (``utils/run_slurm.py``) sets ``JOB_END_TIME`` (Unix seconds) and
``JOB_RESUME_FLAG`` (a path): training then checkpoints before the end, creates the flag file and
exits with status 75, and the backend runs the job again, which resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TypeVar

import torch

from speechllm.budget import TimeLimit
from speechllm.config import from_dict, load_config, merge, parse_overrides, record_config
from speechllm.distributed import close_world, init_world
from speechllm.features import read_whisper_record
from speechllm.formatting import MODES
from speechllm.logging_utils import setup_logging
from speechllm.model.llm import LLMConfig
from speechllm.train import build_and_train
from speechllm.train_config import TrainConfig

T = TypeVar("T")
log = logging.getLogger(__name__)

RESUMABLE_EXIT = 75  # EX_TEMPFAIL: stopped early on purpose, run again to continue


def resolve(config: Path, overrides: str, cls: type[T], flag: str) -> T:
    """The config file with its ``base:`` chain and the command line's overrides, as a checked ``cls``."""
    values = merge(load_config(config), parse_overrides(overrides, flag))
    return from_dict(cls, values, f"{config} with {flag} {overrides!r}" if overrides else str(config))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_jsonl", type=Path, required=True)
    parser.add_argument("--valid_jsonl", type=Path)
    parser.add_argument("--llm_config", type=Path, required=True, help="conf/llm/<name>.yaml")
    parser.add_argument("--llm_args", default="", help='overrides of the LLM config, e.g. "lora.r=16"')
    parser.add_argument("--train_config", type=Path, required=True, help="conf/train*.yaml")
    parser.add_argument("--train_args", default="", help='overrides of the training config, e.g. "lr=1e-3 '
                        'max_minutes=20 align.steps=600"')
    parser.add_argument("--force_config", action="store_true",
                        help="resume even though the resolved configs differ from the experiment's recorded ones")
    parser.add_argument("--outdir", type=Path, required=True)
    parser.add_argument("--whisper", help="the encoder of the features (default: the one stage 1 recorded in the "
                        "train JSONL's dump dir), recorded for speechllm-infer")
    parser.add_argument("--mode", choices=MODES, help="recorded for speechllm-infer")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a GPU when one is visible; under torchrun each process takes cuda:LOCAL_RANK")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    train_cfg = resolve(args.train_config, args.train_args, TrainConfig, "--train_args")
    llm_cfg = resolve(args.llm_config, args.llm_args, LLMConfig, "--llm_args")
    if rank == 0:
        record_config(args.outdir / "train.yaml", train_cfg, args.force_config)
        record_config(args.outdir / "llm.yaml", llm_cfg, args.force_config)
    whisper = args.whisper or read_whisper_record(args.train_jsonl.parent)
    if whisper is None:
        log.warning("%s records no Whisper encoder (a dump from before stage 1 recorded it; rerun stage 1, which "
                    "adds it without encoding again, or give --whisper): speechllm-infer will refuse this model",
                    args.train_jsonl.parent)
    elif Path(whisper).is_file():
        whisper = str(Path(whisper).resolve())
    end, flag = os.environ.get("JOB_END_TIME"), os.environ.get("JOB_RESUME_FLAG")
    world = init_world(None if args.device == "auto" else args.device == "cuda")
    try:
        build_and_train(dataclasses.asdict(llm_cfg), train_cfg, args.train_jsonl, args.valid_jsonl, args.outdir,
                        whisper, args.mode, world, stop_at=float(end) if end else None,
                        resume_flag=Path(flag) if flag else None)
    except TimeLimit:
        sys.exit(RESUMABLE_EXIT)
    finally:
        close_world(world)


if __name__ == "__main__":
    main()
