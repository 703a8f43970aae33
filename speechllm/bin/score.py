"""Stage 5: score a decode dir against the references of its stage-2 JSONL file.

Writes ``scores.json`` (partial, exact, SLU-F1 and span F1, per-slot scores, counts of missing,
unparseable, truncated and loop-guarded outputs, and how many matched values the prompt's text also holds) and
``result.txt`` (the same as a table) into ``--outdir``. With ``--utt2group`` (e.g. SGD's seen and unseen
services) each group is also scored on its own.

``scores.json`` starts with ``run``, the identity of what was scored, so that results tables never
parse dir names: ``llm`` and ``tag`` as the recipe gives them, ``mode`` (the training mode) and
``think`` (``true``/``false`` for a hybrid model's /think and /no_think rows, else ``null``) from
``--mode``, ``set``, ``exp_dir``, and ``whisper``: stage 1's record of the scored set, else the
encoder the model dir recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from speechllm.data import read_examples
from speechllm.features import read_whisper_record
from speechllm.formatting import DECODES
from speechllm.io_utils import InputError, atomic_write, read_jsonl, read_kaldi_map
from speechllm.logging_utils import setup_logging
from speechllm.metrics import format_table, matches_in_prompt, score_corpus
from speechllm.model.builder import SPEC_FILE, read_spec
from speechllm.slots import Slots

log = logging.getLogger(__name__)


def score_files(ref_jsonl: Path, hyp_jsonl: Path, mode: str | None = None, utt2group: Path | None = None) -> dict:
    examples = read_examples(ref_jsonl, mode)
    refs = {e.id: e.slots for e in examples}
    hyps: dict[str, tuple[Slots, bool]] = {}
    truncated: dict[str, bool] = {}  # cut off by decoding's cap on new tokens (older hyp files do not say)
    looped: dict[str, bool] = {}  # ended by decoding's loop guard
    if hyp_jsonl.exists():
        for lineno, row in read_jsonl(hyp_jsonl):
            if "id" not in row or not isinstance(row.get("slots"), dict):
                raise InputError(f"{hyp_jsonl}:{lineno}: expected keys 'id' and 'slots' (an object)")
            hyps[row["id"]] = (row["slots"], bool(row.get("parseable", True)))
            truncated[row["id"]] = bool(row.get("truncated", False))
            looped[row["id"]] = row.get("stop") == "loop"
    else:
        log.warning("%s does not exist: every reference counts as missing", hyp_jsonl)
    unknown = set(hyps) - set(refs)
    if unknown:
        log.warning("%d hypotheses have no reference and are ignored (first: %s)", len(unknown), min(unknown))
    result = score_corpus(refs, hyps)
    result["n_truncated"] = sum(truncated.get(i, False) for i in refs)
    result["n_loop_guarded"] = sum(looped.get(i, False) for i in refs)
    result["matches_in_prompt"] = matches_in_prompt(refs, hyps, {e.id: e.prompt for e in examples})
    if result["n_missing"]:
        log.warning("%d of %d utterances have no hypothesis: their slots count as false negatives",
                    result["n_missing"], result["n_utts"])
    if result["n_truncated"]:
        log.warning("%d of %d outputs hit decoding's cap on new tokens: they may have lost slots",
                    result["n_truncated"], result["n_utts"])
    if result["n_loop_guarded"]:
        log.warning("%d of %d outputs were ended by decoding's loop guard (a repeated n-gram)",
                    result["n_loop_guarded"], result["n_utts"])
    if utt2group is not None:
        groups = read_kaldi_map(utt2group)
        ungrouped = sorted(e.utt_id for e in examples if e.utt_id not in groups)
        if ungrouped:
            raise InputError(f"{utt2group}: no group for {len(ungrouped)} utterances of {ref_jsonl} "
                             f"(first: {ungrouped[0]})")
        group_of = {e.id: groups[e.utt_id] for e in examples}
        result["groups"] = {g: score_corpus({i: r for i, r in refs.items() if group_of[i] == g}, hyps)
                            for g in sorted(set(group_of.values()))}
    return result


def whisper_of(dump_dir: Path, exp_dir: Path | None) -> str | None:
    """The encoder of the scored features: stage 1's record of the set, else the one the model recorded
    (dumps made before the record)."""
    recorded = read_whisper_record(dump_dir)
    if recorded is None and exp_dir is not None and (exp_dir / "model" / SPEC_FILE).exists():
        recorded = read_spec(exp_dir / "model").whisper
    return recorded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref_jsonl", type=Path, required=True)
    parser.add_argument("--hyp_jsonl", type=Path, required=True)
    parser.add_argument("--mode", choices=DECODES, help="only rows of this mode (a hybrid file holds two)")
    parser.add_argument("--outdir", type=Path, required=True)
    parser.add_argument("--title", default="")
    parser.add_argument("--utt2group", type=Path, help="'<utt> <group>' lines: also score each group")
    run = parser.add_argument_group("the run, recorded in scores.json (mode and think come from --mode)")
    run.add_argument("--llm", help="the LLM config (conf/llm/<llm>.yaml)")
    run.add_argument("--tag", help="the tag of the experiment ('': none)")
    run.add_argument("--set", help="the test set")
    run.add_argument("--exp_dir", type=Path, help="the experiment dir (its model/ records the Whisper used)")
    args = parser.parse_args(argv)
    setup_logging()
    mode, think = DECODES[args.mode] if args.mode else (None, None)
    result = {"run": {"llm": args.llm, "mode": mode, "think": think, "tag": args.tag or None, "set": args.set,
                      "whisper": whisper_of(args.ref_jsonl.parent, args.exp_dir),
                      "exp_dir": str(args.exp_dir) if args.exp_dir else None},
              **score_files(args.ref_jsonl, args.hyp_jsonl, args.mode, args.utt2group)}
    args.outdir.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.outdir / "scores.json") as f:
        json.dump(result, f, indent=1)
    table = format_table(result, args.title)
    if result["n_truncated"]:
        table += (f"truncated: {result['n_truncated']} outputs hit decoding's cap on new tokens "
                  "(raise --max_new_tokens of stage 4)\n")
    if result["n_loop_guarded"]:
        table += f"loop-guarded: {result['n_loop_guarded']} outputs repeated themselves and were ended early\n"
    with atomic_write(args.outdir / "result.txt") as f:
        f.write(table)
    print(table, end="")


if __name__ == "__main__":
    main()
