"""Stage 5: gather ``score/scores.json`` of decode dirs into a RESULTS.md in the paper's layout.

Table 1 puts each system's regular and reasoning partial-match P/R/F1 side by side with the
relative gain ΔF1 % = (F1_reasoning - F1_regular) / F1_regular x 100; Table 2 compares the hybrid
model in each of its modes with the single-mode model of that mode; the cascade table sets the
ASR + text-LLM baseline beside each system's best end-to-end mode. A full table lists exact and
SLU-F1 as well, with the count of unparseable outputs, and a group table splits the scores by the
groups of ``scores.json`` (SGD's seen and unseen services); ``--plot`` draws partial F1 per system
and mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from speechllm.io_utils import atomic_write

MODES = ("regular", "reasoning", "hybrid_no_think", "hybrid_think", "cascade")
END_TO_END = MODES[:-1]
_DECODE_RE = re.compile(r"^decode_(?P<set>.+)_(?P<mode>regular|reasoning|hybrid_no_think|hybrid_think|cascade)$")


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
        system = re.sub(r"_(regular|reasoning|hybrid|cascade)(?=_|$)", "", ddir.parent.name, count=1)
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
    out += ["", "## Cascade baseline: Whisper ASR transcript + the same LLM with LoRA (partial match)", "",
            "| system | test set | cascade P / R / F1 | best end-to-end mode | its P / R / F1 | ΔF1 % vs cascade |",
            "|---|---|---|---|---|---|"]
    for (system, dset), modes in sorted(table.items()):
        if "cascade" in modes:
            casc = modes["cascade"]
            e2e = [m for m in END_TO_END if m in modes]
            best = max(e2e, key=lambda m: modes[m]["partial"]["f1"]) if e2e else None
            out.append(f"| {system} | {dset} | {prf(casc['partial'])} | {best or '-'} | "
                       f"{prf(modes[best]['partial']) if best else '-'} | "
                       f"{delta(modes[best]['partial']['f1'], casc['partial']['f1']) if best else 'n/a'} |")
    groups = sorted({g for modes in table.values() for r in modes.values() for g in r.get("groups", {})})
    if groups:
        out += ["", f"## By group: {', '.join(groups)} (partial match P / R / F1, utterances)", "",
                "| system | test set | mode | all | " + " | ".join(groups) + " |",
                "|---|---|---|---|" + "---|" * len(groups)]
        for (system, dset), modes in sorted(table.items()):
            for mode in MODES:
                if mode in modes:
                    r = modes[mode]
                    cells = [f"{prf(r['groups'][g]['partial'])} ({r['groups'][g]['n_utts']})"
                             if g in r.get("groups", {}) else "-" for g in groups]
                    out.append(f"| {system} | {dset} | {mode} | {prf(r['partial'])} ({r['n_utts']}) | "
                               + " | ".join(cells) + " |")
    out += ["", "## All scores", "",
            "| system | test set | mode | partial P / R / F1 | exact P / R / F1 | SLU-F1 P / R / F1 | "
            "utts | unparseable | missing | truncated |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (system, dset), modes in sorted(table.items()):
        for mode in MODES:
            if mode in modes:
                r = modes[mode]
                out.append(f"| {system} | {dset} | {mode} | {prf(r['partial'])} | {prf(r['exact'])} | "
                           f"{prf(r['slu_f1'])} | {r['n_utts']} | {r['n_unparseable']} | {r['n_missing']} | "
                           f"{r.get('n_truncated', '-')} |")  # older scores.json files have no truncation count
    if stage_times and stage_times.exists():
        out += ["", "## Wall time per stage (this machine)", "", "| stage | run (LLM, mode) | seconds | finished |",
                "|---|---|---|---|"]
        for line in stage_times.read_text().splitlines():
            stage, seconds, when, *what = line.split("\t")  # older files have no run column
            out.append(f"| {stage} | {what[0] if what else '-'} | {seconds} | {when} |")
    return "\n".join(out) + "\n"


def plot(table: dict[tuple[str, str], dict[str, dict]], png: Path) -> None:
    """Grouped bars: partial-match F1 of every system (and test set) in every mode it has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(table)
    width = 0.8 / len(MODES)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys)), 4))
    for j, mode in enumerate(MODES):
        xs = [i + (j - (len(MODES) - 1) / 2) * width for i, k in enumerate(keys) if mode in table[k]]
        ys = [table[k][mode]["partial"]["f1"] for k in keys if mode in table[k]]
        if xs:
            ax.bar_label(ax.bar(xs, ys, width, label=mode), fmt="%.2f", fontsize=6)  # zeros stay visible
    ax.set_xticks(range(len(keys)), [f"{s}\n({d})" for s, d in keys], fontsize=8)
    ax.set_ylabel("partial-match F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decode_dirs", type=Path, nargs="+", required=True)
    parser.add_argument("--stage_times", type=Path)
    parser.add_argument("--command", default="run.sh")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="bar chart PNG of partial F1 per system and mode")
    args = parser.parse_args(argv)
    table = collect(args.decode_dirs)
    text = render(table, args.stage_times, args.command)
    if args.plot:
        plot(table, args.plot)
        text += f"\n![partial F1 per system and mode]({os.path.relpath(args.plot, args.output.parent)})\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
