"""Stage 4, one job: decode a share of a stage-2 JSONL file with a trained model dir.

Without ``--max_new_tokens`` the cap comes from the model dir: its longest training target plus a
margin (:func:`speechllm.decode.new_token_cap`). Each output row says whether the cap cut it off.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from speechllm.data import read_examples
from speechllm.decode import CAP_MARGIN, CAP_SCALE, decode_examples, new_token_cap
from speechllm.formatting import DECODES
from speechllm.io_utils import atomic_write
from speechllm.jobs import job_slice
from speechllm.logging_utils import setup_logging
from speechllm.model.builder import load_model, read_spec

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_dir", type=Path, required=True)
    parser.add_argument("--jsonl", type=Path, required=True)
    parser.add_argument("--mode", choices=DECODES, help="only rows of this mode (a hybrid file holds two)")
    parser.add_argument("--output", type=Path, required=True, help="hypothesis JSONL to write")
    parser.add_argument("--job", type=int, default=1)
    parser.add_argument("--nj", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=0,
                        help="cap on generated tokens; 0: the model's longest training target "
                             f"x {CAP_SCALE} + {CAP_MARGIN}")
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    setup_logging()
    if args.max_new_tokens < 0:
        parser.error("--max_new_tokens must be positive (0: from the model)")
    max_new_tokens = args.max_new_tokens
    if not max_new_tokens:
        spec = read_spec(args.model_dir)
        try:
            max_new_tokens = new_token_cap(spec)
        except ValueError as err:
            parser.error(f"{args.model_dir}: {err}")
        log.info("cap of %d new tokens: the longest training target (%d tokens) x %s + %d", max_new_tokens,
                 spec.max_target_tokens, CAP_SCALE, CAP_MARGIN)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    examples = {e.id: e for e in read_examples(args.jsonl, args.mode)}
    mine = [examples[i] for i in job_slice(list(examples), args.job, args.nj)]
    model = load_model(args.model_dir, args.device)
    results = decode_examples(model, mine, args.batch_size, max_new_tokens, args.num_beams)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)


if __name__ == "__main__":
    main()
