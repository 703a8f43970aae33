"""Stage 5: score a decode dir against the references of its stage-2 JSONL file.

Writes ``scores.json`` (partial, exact, SLU-F1 and span F1, per-slot scores, counts of missing,
unparseable, truncated and loop-guarded outputs, and how many matched values the prompt's text also holds) and
``result.txt`` (the same as a table) into ``--outdir``. With ``--utt2group`` (e.g. SGD's seen and unseen
services) each group is also scored on its own; with ``--seen_text`` (the texts the system trained
on) so are the novel turns, whose slot values none of those texts holds (``novel``: values the model
can only have heard, not remembered). The alignment corpus that ``--exp_dir``'s adapter was aligned on
(its ``alignment.json``) counts as seen too.

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
import re
from dataclasses import dataclass
from pathlib import Path

from speechllm.data import read_examples
from speechllm.features import read_whisper_record
from speechllm.formatting import DECODES
from speechllm.io_utils import InputError, atomic_write, read_kaldi_map
from speechllm.logging_utils import setup_logging
from speechllm.metrics import format_table, matches_in_prompt, score_corpus
from speechllm.model.builder import SPEC_FILE, read_spec
from speechllm.novelty import SeenText
from speechllm.slots import Slots, is_slot_value

log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    slots: Slots
    parseable: bool
    truncated: bool = False  # cut off by decoding's cap on new tokens (older hyp files do not say)
    looped: bool = False  # ended by decoding's loop guard


_ID_RE = re.compile(rb'"id"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _hypothesis(raw: bytes) -> tuple[str | None, Hypothesis, str | None]:
    """One line of ``hyp.jsonl`` as ``(id, hypothesis, problem)``. A malformed line is an unparseable
    hypothesis of the id it names (``None`` when even that cannot be read), with the problem said."""
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        match = _ID_RE.search(raw)
        try:
            utt = json.loads(b'"' + match.group(1) + b'"') if match else None
        except (json.JSONDecodeError, UnicodeDecodeError):  # the id itself is broken
            utt = None
        return utt, Hypothesis({}, False), "not a JSON object"
    if not isinstance(row, dict):
        return None, Hypothesis({}, False), "not a JSON object"
    utt = row.get("id")
    if not isinstance(utt, str):
        return None, Hypothesis({}, False), f"'id' must be a string, got {utt!r}"
    slots, parseable = row.get("slots"), row.get("parseable", True)
    if not isinstance(slots, dict) or not all(is_slot_value(v) for v in slots.values()):
        return utt, Hypothesis({}, False), "'slots' must map labels to a string, null or a list of strings"
    if not isinstance(parseable, bool):
        return utt, Hypothesis({}, False), f"'parseable' must be true or false, got {parseable!r}"
    return utt, Hypothesis(slots, parseable, row.get("truncated") is True, row.get("stop") == "loop"), None


def read_hypotheses(path: Path) -> dict[str, Hypothesis]:
    """Every hypothesis of a ``hyp.jsonl`` file. A malformed line is scored as unparseable, with a
    warning naming it; one whose id cannot be read is left out (its utterance is then missing); an id
    given twice is an error naming both lines."""
    hyps: dict[str, Hypothesis] = {}
    line_of: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            utt, hyp, problem = _hypothesis(raw)
            if problem:
                log.warning("%s:%d: %s: %s", path, lineno, problem,
                            "no id to count it for, left out" if utt is None else f"{utt} counted as unparseable")
            if utt is None:
                continue
            if utt in line_of:
                raise InputError(f"{path}:{lineno}: duplicate id {utt!r} (also on line {line_of[utt]})")
            hyps[utt], line_of[utt] = hyp, lineno
    return hyps


def score_files(ref_jsonl: Path, hyp_jsonl: Path, mode: str | None = None, utt2group: Path | None = None,
                allow_missing: bool = False, seen: SeenText | None = None) -> dict:
    """Score a decode; a reference without a hypothesis (an incomplete decode) is an error unless
    ``allow_missing``, which counts its slots as false negatives."""
    examples = read_examples(ref_jsonl, mode)
    refs = {e.id: e.slots for e in examples}
    hyps = read_hypotheses(hyp_jsonl) if hyp_jsonl.exists() else {}
    missing = sorted(set(refs) - set(hyps))
    if missing and not allow_missing:
        found = "does not exist" if not hyp_jsonl.exists() else "has no hypothesis"
        raise InputError(f"{hyp_jsonl} {found} for {len(missing)} of the {len(refs)} utterances of {ref_jsonl} "
                         f"(first: {missing[0]}): the decode in {hyp_jsonl.parent} is incomplete. Rerun stage 4, "
                         "or score it anyway with --allow_missing (their slots then count as false negatives)")
    unknown = set(hyps) - set(refs)
    if unknown:
        log.warning("%d hypotheses have no reference and are ignored (first: %s)", len(unknown), min(unknown))
    pairs = {i: (h.slots, h.parseable) for i, h in hyps.items()}
    result = score_corpus(refs, pairs)
    result["n_truncated"] = sum(hyps[i].truncated for i in refs if i in hyps)
    result["n_loop_guarded"] = sum(hyps[i].looped for i in refs if i in hyps)
    result["matches_in_prompt"] = matches_in_prompt(refs, pairs, {e.id: e.prompt for e in examples})
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
        result["groups"] = {g: score_corpus({i: r for i, r in refs.items() if group_of[i] == g}, pairs)
                            for g in sorted(set(group_of.values()))}
    if seen is not None:
        result["novel"] = score_corpus({i: r for i, r in refs.items() if seen.novel_turn(r)}, pairs)
    return result


def seen_texts(paths: list[Path]) -> SeenText:
    """The texts of Kaldi ``text`` files (``<utt> <text>``)."""
    return SeenText(text for path in paths for text in read_kaldi_map(path, allow_empty_value=True).values())


def alignment_text(exp_dir: Path | None) -> list[Path]:
    """The Kaldi text of the alignment corpus that the experiment's adapter was aligned on, as its
    ``alignment.json`` records it: none for a run without one, or aligned on the training turns alone."""
    record = None if exp_dir is None else exp_dir / "alignment.json"
    if record is None or not record.is_file():
        return []
    aligned = json.loads(record.read_text(encoding="utf-8"))
    if "corpus" not in aligned:  # written before it named the corpus: the alignment dir's record does
        made = Path(aligned["dir"]) / "align.json"
        if not made.is_file():
            raise InputError(f"{record} does not name its alignment corpus, and {made} is gone: add "
                             '"corpus": its path (or null) to it, so that the novel turns are novel to it too')
        aligned = json.loads(made.read_text(encoding="utf-8"))
    if aligned["corpus"] is None:
        return []
    text = Path(aligned["corpus"]) / "data" / "align" / "text"
    if not text.is_file():
        raise InputError(f"{text} (the alignment corpus of {record}) not found: the novel turns cannot be told")
    return [text]


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
    parser.add_argument("--seen_text", type=Path, nargs="+", help="Kaldi text files of what the system trained on: "
                        "also score the turns whose values none of them holds")
    run = parser.add_argument_group("the run, recorded in scores.json (mode and think come from --mode)")
    run.add_argument("--llm", help="the LLM config (conf/llm/<llm>.yaml)")
    run.add_argument("--tag", help="the tag of the experiment ('': none)")
    run.add_argument("--set", help="the test set")
    parser.add_argument("--allow_missing", action="store_true",
                        help="score an incomplete decode: utterances without a hypothesis count as false negatives")
    run.add_argument("--exp_dir", type=Path, help="the experiment dir (its model/ records the Whisper used)")
    args = parser.parse_args(argv)
    setup_logging()
    mode, think = DECODES[args.mode] if args.mode else (None, None)
    result = {"run": {"llm": args.llm, "mode": mode, "think": think, "tag": args.tag or None, "set": args.set,
                      "whisper": whisper_of(args.ref_jsonl.parent, args.exp_dir),
                      "exp_dir": str(args.exp_dir) if args.exp_dir else None},
              **score_files(args.ref_jsonl, args.hyp_jsonl, args.mode, args.utt2group, args.allow_missing,
                            seen_texts(args.seen_text + alignment_text(args.exp_dir)) if args.seen_text else None)}
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
