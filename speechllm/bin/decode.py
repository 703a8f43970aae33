"""Stage 4, one job: decode a share of a stage-2 JSONL file with a trained model dir."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from speechllm.bin.dump_feats import job_slice
from speechllm.data import read_examples
from speechllm.decode import decode_examples
from speechllm.io_utils import atomic_write
from speechllm.logging_utils import setup_logging
from speechllm.model.builder import load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_dir", type=Path, required=True)
    parser.add_argument("--jsonl", type=Path, required=True)
    parser.add_argument("--mode", help="only rows of this mode (hybrid_think, hybrid_no_think)")
    parser.add_argument("--output", type=Path, required=True, help="hypothesis JSONL to write")
    parser.add_argument("--job", type=int, default=1)
    parser.add_argument("--nj", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    examples = {e.id: e for e in read_examples(args.jsonl, args.mode)}
    mine = [examples[i] for i in job_slice(list(examples), args.job, args.nj)]
    model = load_model(args.model_dir, args.device)
    results = decode_examples(model, mine, args.batch_size, args.max_new_tokens, args.num_beams)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)


if __name__ == "__main__":
    main()
