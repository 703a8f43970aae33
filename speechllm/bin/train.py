"""Stage 3: train the speech LLM on a stage-2 JSONL file (resumes from the latest checkpoint).

Run it with ``python -m`` for one process, or under ``torchrun`` (see ``utils/torchrun.sh``) for
DistributedDataParallel over GPUs, nodes, or CPU processes.

The configs are resolved (the class's defaults, the file with its ``base:`` chain, then
``--train_args``/``--llm_args``) and recorded in the experiment dir as ``train.yaml`` and ``llm.yaml``;
a run that would resume from a checkpoint with other resolved configs is refused unless
``--force_config``.

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
from contextlib import nullcontext
from pathlib import Path

import torch

from speechllm.budget import TimeLimit
from speechllm.checkpoint import latest_checkpoint
from speechllm.config import load_yaml_dataclass, parse_overrides, record_config
from speechllm.distributed import close_world, init_world
from speechllm.features import read_whisper_record
from speechllm.formatting import MODES
from speechllm.lock import exclusive
from speechllm.logging_utils import setup_logging
from speechllm.model.llm import LLMConfig
from speechllm.train import build_and_train
from speechllm.train_config import TrainConfig

log = logging.getLogger(__name__)

RESUMABLE_EXIT = 75  # EX_TEMPFAIL: stopped early on purpose, run again to continue


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_jsonl", type=Path, required=True)
    parser.add_argument("--valid_jsonl", type=Path)
    parser.add_argument("--llm_config", type=Path, required=True, help="conf/llm/<name>.yaml")
    parser.add_argument("--llm_args", default="", help='overrides of the LLM config, e.g. "lora.r=16"')
    parser.add_argument("--llm_path", help="a local copy of the LLM config's weights (its name_or_path; the offline "
                        "cache is then not used)")
    parser.add_argument("--train_config", type=Path, required=True, help="conf/train*.yaml")
    parser.add_argument("--train_args", default="", help='overrides of the training config, e.g. "lr=1e-3 '
                        'max_minutes=20 align.steps=600"')
    parser.add_argument("--force_config", action="store_true",
                        help="resume even though the resolved configs differ from the experiment's recorded ones")
    parser.add_argument("--outdir", type=Path, required=True)
    parser.add_argument("--whisper", help="the encoder of the features (default: the one stage 1 recorded in the "
                        "train JSONL's dump dir), recorded for speechllm-infer")
    parser.add_argument("--mode", choices=MODES, help="recorded for speechllm-infer")
    parser.add_argument("--align_dir", type=Path, help="where the alignment phase (align.steps) keeps its result "
                        "(default: <outdir>/align); a later experiment with the same settings reuses it")
    parser.add_argument("--align_corpus", type=Path, help="stage 1's alignment corpus (sf.sh --align_calls), "
                        "trained on by the alignment phase beside the training turns")
    parser.add_argument("--align_eval", type=Path, nargs="*", default=[],
                        help="stage-2 JSONL files of held-out sets the alignment phase is also measured on")
    parser.add_argument("--tiny_texts", type=Path, nargs="*", default=[],
                        help="stage-2 JSONL files whose texts train a tiny LLM's tokenizer (default: --train_jsonl); "
                        "sf.sh gives every mode's, so that the modes share one tokenizer and one alignment")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a GPU when one is visible; under torchrun each process takes cuda:LOCAL_RANK")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    def where(config: Path, flag: str, text: str) -> str:
        return f"{config} with {flag} {text!r}" if text else str(config)

    train_cfg = load_yaml_dataclass(args.train_config, TrainConfig, parse_overrides(args.train_args, "--train_args"),
                                    where(args.train_config, "--train_args", args.train_args))
    llm_overrides = parse_overrides(args.llm_args, "--llm_args")
    if args.llm_path:  # a path as it is, not read as YAML
        llm_overrides.update(name_or_path=args.llm_path, local_cache=None)
    llm_cfg = load_yaml_dataclass(args.llm_config, LLMConfig, llm_overrides,
                                  where(args.llm_config, "--llm_args", args.llm_args))
    # rank 0 holds the experiment dir for the whole run: a second training into it is refused
    with exclusive(args.outdir) if rank == 0 else nullcontext():
        run(args, train_cfg, llm_cfg, rank)


def run(args: argparse.Namespace, train_cfg: TrainConfig, llm_cfg: LLMConfig, rank: int) -> None:
    if rank == 0:  # a run that resumes must train on the configs it started with
        resuming = latest_checkpoint(args.outdir) is not None and not args.force_config
        record_config(args.outdir / "train.yaml", train_cfg, resuming)
        record_config(args.outdir / "llm.yaml", llm_cfg, resuming)
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
                        resume_flag=Path(flag) if flag else None, align_dir=args.align_dir,
                        align_corpus=args.align_corpus, align_evals=args.align_eval, tiny_texts=args.tiny_texts)
    except TimeLimit:
        sys.exit(RESUMABLE_EXIT)
    finally:
        close_world(world)


if __name__ == "__main__":
    main()
