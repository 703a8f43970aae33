"""Stage 4, one job: decode a share of a stage-2 JSONL file with a trained model dir.

Without ``--max_new_tokens`` the cap comes from the model dir: its longest training target plus a
margin (:func:`speechllm.decode.new_token_cap`). Each output row says whether the cap cut it off.

A job can be killed at any moment and run again: each finished batch is appended to
``<output>.partial`` as one JSON line (flushed), after a first line holding what the outputs depend
on (the model dir's and the JSONL file's size and modification time, the share, the batch size, the
cap, the beams, the device type). A rerun with the same settings keeps the whole batches, drops an
unfinished last line and decodes the rest in the same batches, so the output is that of an
uninterrupted run; any other setting starts over with a warning. The output is written (atomically)
only when every example is decoded; the partial file stays beside it, so that a job run again after
it completed decodes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from speechllm.data import Example, read_examples
from speechllm.decode import CAP_MARGIN, CAP_SCALE, StaleProgress, decode_examples, new_token_cap
from speechllm.formatting import DECODES
from speechllm.io_utils import atomic_write, file_stamp
from speechllm.jobs import job_slice
from speechllm.logging_utils import setup_logging
from speechllm.model.builder import SPEC_FILE, load_model, read_spec
from speechllm.model.speechllm import SpeechLLM

log = logging.getLogger(__name__)


def batches_to_keep(partial: Path, settings: dict) -> list[list[dict]]:
    """The finished batches of an earlier run of this job with the same settings (logged), else none."""
    if not partial.exists():
        return []
    lines = partial.read_bytes().split(b"\n")[:-1]  # the last piece is empty or an unfinished line
    try:
        old, *done = [json.loads(line) for line in lines] or [None]
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is not a progress file of this job: decoding from the start", partial)
        return []
    if old != json.loads(json.dumps(settings)):
        changed = [k for k in settings if (old or {}).get(k) != settings[k]]
        log.warning("%s was written with other settings (%s): decoding from the start", partial, ", ".join(changed))
        return []
    log.info("resuming: %d batches (%d examples) already decoded in %s", len(done), sum(map(len, done)), partial)
    return done


def decode_saving_batches(model: SpeechLLM, examples: list[Example], args: argparse.Namespace, max_new_tokens: int,
                          partial: Path, settings: dict, done: list[list[dict]]) -> list[dict]:
    """Decode after the ``done`` batches, appending each new batch to ``partial`` as it finishes."""
    with atomic_write(partial) as f:  # the settings and the kept batches, without an unfinished line
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in [settings, *done])
    with open(partial, "a", encoding="utf-8") as progress:
        def save(rows: list[dict]) -> None:
            progress.write(json.dumps(rows, ensure_ascii=False) + "\n")
            progress.flush()

        return decode_examples(model, examples, args.batch_size, max_new_tokens, args.num_beams, done, save)


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
    settings = {"model": file_stamp(args.model_dir / SPEC_FILE), "jsonl": file_stamp(args.jsonl), "mode": args.mode,
                "job": args.job, "nj": args.nj, "batch_size": args.batch_size, "max_new_tokens": max_new_tokens,
                "num_beams": args.num_beams, "device": torch.device(args.device).type}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(f"{args.output}.partial")
    done = batches_to_keep(partial, settings)
    kept = {r["id"]: r for batch in done for r in batch}
    if sorted(kept) == sorted(e.id for e in mine):  # a completed job (or an empty share): no model needed
        log.info("nothing to decode: %d examples in this job's share, all in %s", len(mine), partial)
        results = [kept[i] for i in sorted(kept)]
    else:
        model = load_model(args.model_dir, args.device)
        try:
            results = decode_saving_batches(model, mine, args, max_new_tokens, partial, settings, done)
        except StaleProgress as e:
            log.warning("%s: %s: decoding from the start", partial, e)
            results = decode_saving_batches(model, mine, args, max_new_tokens, partial, settings, [])
    with atomic_write(args.output) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)


if __name__ == "__main__":
    main()
