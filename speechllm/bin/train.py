"""Stage 3: train the speech LLM on a stage-2 JSONL file (resumes from the latest checkpoint).

Run it with ``python -m`` for one process, or under ``torchrun`` (see ``utils/torchrun.sh``) for
DistributedDataParallel over GPUs, nodes, or CPU processes.

A job backend with a time limit (``utils/run_slurm.py``) sets ``JOB_END_TIME`` (Unix seconds) and
``JOB_RESUME_FLAG`` (a path): training then checkpoints before the end, creates the flag file and
exits with status 75, and the backend runs the job again, which resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from speechllm.config import from_dict, load_yaml
from speechllm.distributed import close_world, init_world
from speechllm.logging_utils import setup_logging
from speechllm.train import TimeLimit, TrainConfig, build_and_train

RESUMABLE_EXIT = 75  # EX_TEMPFAIL: stopped early on purpose, run again to continue


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train_jsonl", type=Path, required=True)
    parser.add_argument("--valid_jsonl", type=Path)
    parser.add_argument("--llm_config", type=Path, required=True, help="conf/llm/<name>.yaml")
    parser.add_argument("--train_config", type=Path, required=True, help="conf/train*.yaml")
    parser.add_argument("--outdir", type=Path, required=True)
    parser.add_argument("--whisper", help="the encoder of the features, recorded for speechllm-infer")
    parser.add_argument("--mode", choices=("regular", "reasoning", "hybrid", "cascade"),
                        help="recorded for speechllm-infer")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a GPU when one is visible; under torchrun each process takes cuda:LOCAL_RANK")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    cfg = from_dict(TrainConfig, load_yaml(args.train_config), str(args.train_config))
    llm_cfg = load_yaml(args.llm_config)
    whisper = str(Path(args.whisper).resolve()) if args.whisper and Path(args.whisper).is_file() else args.whisper
    end, flag = os.environ.get("JOB_END_TIME"), os.environ.get("JOB_RESUME_FLAG")
    world = init_world(None if args.device == "auto" else args.device == "cuda")
    try:
        build_and_train(llm_cfg, cfg, args.train_jsonl, args.valid_jsonl, args.outdir, whisper, args.mode, world,
                        stop_at=float(end) if end else None, resume_flag=Path(flag) if flag else None)
    except TimeLimit:
        sys.exit(RESUMABLE_EXIT)
    finally:
        close_world(world)


if __name__ == "__main__":
    main()
