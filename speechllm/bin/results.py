"""Stage 5: gather ``score/scores.json`` of decode dirs into a RESULTS.md in the paper's layout.

Table 1 puts each system's regular and reasoning partial-match P/R/F1 side by side with the
relative gain ΔF1 % = (F1_reasoning - F1_regular) / F1_regular x 100; Table 2 compares the hybrid
model in each of its modes with the single-mode model of that mode. A full table lists exact and
SLU-F1 as well, with the count of unparseable outputs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from speechllm.io_utils import atomic_write

MODES = ("regular", "reasoning", "hybrid_no_think", "hybrid_think")
_DECODE_RE = re.compile(r"^decode_(?P<set>.+)_(?P<mode>regular|reasoning|hybrid_no_think|hybrid_think)$")


def prf(r: dict) -> str:
    return f"{r['precision']:.4f} / {r['recall']:.4f} / {r['f1']:.4f}"


def delta(new: float, base: float) -> str:
    return f"{(new - base) / base * 100:+.2f}" if base > 0 else "n/a"


def collect(decode_dirs: list[Path]) -> dict[tuple[str, str], dict[str, dict]]:
    """``{(system, test set): {mode: scores}}``; the system is the exp dir name without its mode."""
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for ddir in decode_dirs:
        match = _DECODE_RE.match(ddir.name)
        scores_path = ddir / "score" / "scores.json"
        if not match or not scores_path.exists():
            continue
        system = re.sub(r"_(regular|reasoning|hybrid)(?=_|$)", "", ddir.parent.name, count=1)
        table.setdefault((system, match["set"]), {})[match["mode"]] = json.loads(scores_path.read_text())
    return table


def render(table: dict[tuple[str, str], dict[str, dict]], stage_times: Path | None, command: str) -> str:
    out = ["# Results", "", f"Produced by `{command}`.", "",
           "All numbers are micro-averaged over (slot, value) pairs with a filled value; partial match is "
           "the paper's headline metric (see `speechllm/metrics.py`).", "",
           "## Table 1: regular vs reasoning (partial match)", "",
           "| system | test set | regular P / R / F1 | reasoning P / R / F1 | ΔF1 % |", "|---|---|---|---|---|"]
    for (system, dset), modes in sorted(table.items()):
        if "regular" in modes or "reasoning" in modes:
            reg, rea = modes.get("regular"), modes.get("reasoning")
            d = delta(rea["partial"]["f1"], reg["partial"]["f1"]) if reg and rea else "n/a"
            out.append(f"| {system} | {dset} | {prf(reg['partial']) if reg else '-'} | "
                       f"{prf(rea['partial']) if rea else '-'} | {d} |")
    out += ["", "## Table 2: hybrid vs single-mode models (partial match)", "",
            "| system | test set | mode | single-mode P / R / F1 | hybrid P / R / F1 | ΔF1 % |",
            "|---|---|---|---|---|---|"]
    for (system, dset), modes in sorted(table.items()):
        for single, hybrid in (("regular", "hybrid_no_think"), ("reasoning", "hybrid_think")):
            if hybrid in modes:
                base = modes.get(single)
                d = delta(modes[hybrid]["partial"]["f1"], base["partial"]["f1"]) if base else "n/a"
                out.append(f"| {system} | {dset} | {single} | {prf(base['partial']) if base else '-'} | "
                           f"{prf(modes[hybrid]['partial'])} | {d} |")
    out += ["", "## All scores", "",
            "| system | test set | mode | partial P / R / F1 | exact P / R / F1 | SLU-F1 P / R / F1 | "
            "utts | unparseable | missing |", "|---|---|---|---|---|---|---|---|---|"]
    for (system, dset), modes in sorted(table.items()):
        for mode in MODES:
            if mode in modes:
                r = modes[mode]
                out.append(f"| {system} | {dset} | {mode} | {prf(r['partial'])} | {prf(r['exact'])} | "
                           f"{prf(r['slu_f1'])} | {r['n_utts']} | {r['n_unparseable']} | {r['n_missing']} |")
    if stage_times and stage_times.exists():
        out += ["", "## Wall time per stage (this machine)", "", "| stage | seconds | finished |", "|---|---|---|"]
        for line in stage_times.read_text().splitlines():
            stage, seconds, when = line.split("\t")
            out.append(f"| {stage} | {seconds} | {when} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decode_dirs", type=Path, nargs="+", required=True)
    parser.add_argument("--stage_times", type=Path)
    parser.add_argument("--command", default="run.sh")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    text = render(collect(args.decode_dirs), args.stage_times, args.command)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
