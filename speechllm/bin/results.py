"""Stage 5: gather ``score/scores.json`` of decode dirs into a RESULTS.md in the paper's layout.

Each ``scores.json`` names its run (LLM config, mode, the hybrid switch, tag, test set, Whisper, exp
dir; see :mod:`speechllm.bin.score`), so the tables never depend on how the dirs are named. A
system is the LLM config with the run's tag.

Table 1 puts each system's regular and reasoning partial-match P/R/F1 side by side with the
relative gain ΔF1 % = (F1_reasoning - F1_regular) / F1_regular x 100; Table 2 compares the hybrid
model in each of its modes with the single-mode model of that mode; the cascade table sets the
ASR + text-LLM baseline beside each system's best end-to-end mode. A full table lists exact and
SLU-F1 as well, with the count of unparseable outputs, and a group table splits the scores by the
groups of ``scores.json`` (SGD's seen and unseen services). The novel-value table sets each run's
scores on all turns beside those on the turns whose values no training text holds (scored with
``--seen_text``), with the share of slot values its aligned CTC head hears and the steps it trained
(``alignment.json`` and ``train_log.jsonl`` of the exp dir). ``--plot`` draws partial F1 per system
and mode.

``--llms``, ``--modes`` and ``--tag`` keep only the runs they name (``local/run_grid.sh`` gives them
every scored dir of ``exp/``); ``--list`` prints the decode dirs kept instead of writing anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from speechllm.formatting import DECODES, HYBRID, MODES, decode_mode
from speechllm.io_utils import InputError, atomic_write, read_json
from speechllm.logging_utils import setup_logging
from speechllm.plots import plot_f1
from speechllm.provenance import code_commit

log = logging.getLogger(__name__)

END_TO_END = [d for d, (mode, _) in DECODES.items() if mode != "cascade"]
Table = dict[tuple[str, str], dict[str, dict]]  # {(system, test set): {row mode: scores}}


def prf(r: dict) -> str:
    return f"{r['precision']:.4f} / {r['recall']:.4f} / {r['f1']:.4f}"


def delta(new: float, base: float) -> str:
    return f"{(new - base) / base * 100:+.2f}" if base > 0 else "n/a"


def read_run(ddir: Path) -> tuple[dict, dict] | None:
    """The run identity and the scores of a decode dir; ``None`` (with a warning) when its scores.json
    predates the identity: no table can place it."""
    path = ddir / "score" / "scores.json"
    if not path.is_file():
        raise InputError(f"{path} not found: score {ddir} first (stage 5)")
    scores = read_json(path)
    run = scores.get("run")
    if run is None:
        log.warning("%s names no run (scored before scores.json recorded it): left out; score it again "
                    "with stage 5 to include it", path)
        return None
    if not run.get("llm") or not run.get("set") or (run.get("mode"), run.get("think")) not in DECODES.values():
        raise InputError(f"{path}: run {run} needs an llm, a set, and a mode of {', '.join(MODES)} "
                         "(with think true or false for hybrid, null otherwise)")
    return run, scores


def system_of(run: dict) -> str:
    """A table row's system: the LLM config, and the tag that sets the run apart from others of it."""
    return f"{run['llm']}_{run['tag']}" if run.get("tag") else run["llm"]


def select(decode_dirs: list[Path], llms: list[str] | None = None, modes: list[str] | None = None,
           tag: str | None = None, skip_bad: bool = False) -> list[tuple[Path, dict, dict]]:
    """``(decode dir, run, scores)`` of the runs of these LLMs, modes and tag (``None``: any; tag ``""``:
    untagged runs only). With ``skip_bad``, a dir whose scores cannot be read is left out with a warning
    (a grid looking for its runs among every dir of ``exp/``) instead of stopping."""
    kept = []
    for ddir in decode_dirs:
        try:
            found = read_run(ddir)
        except InputError as e:
            if not skip_bad:
                raise
            log.warning("%s: left out", e)
            continue
        if found is None:
            continue
        run, scores = found
        if ((llms is None or run["llm"] in llms) and (modes is None or run["mode"] in modes)
                and (tag is None or (run.get("tag") or "") == tag)):
            kept.append((ddir, run, scores))
    return kept


def collect(runs: list[tuple[Path, dict, dict]]) -> Table:
    """The runs' scores by system, test set and row mode; two decode dirs of one run are an error."""
    table: Table = {}
    where: dict[tuple[str, str, str], Path] = {}
    for ddir, run, scores in runs:
        key = (system_of(run), run["set"], decode_mode(run["mode"], run["think"]))
        if key in where:
            raise InputError(f"{where[key]} and {ddir} both score {key[0]} on {key[1]} in mode {key[2]}: "
                             "give one of them (or tag the runs apart)")
        where[key] = ddir
        table.setdefault(key[:2], {})[key[2]] = scores
    return table


def environment() -> list[str]:
    """Where stage 5 ran: the code's commit and the versions and hardware that its numbers depend on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    packages = []
    for name in ("torch", "transformers", "peft", "openai-whisper"):
        try:
            packages.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [f"- commit: {code_commit()}", f"- Python {platform.python_version()}, {', '.join(packages)}",
            f"- {platform.platform()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"GPU: {gpu}"]


def ratio(heard: int, total: int) -> str:
    return f"{heard / total:.3f} ({heard}/{total})" if total else "-"


def training_of(exp_dir: str | None, dset: str) -> tuple[str, str, str]:
    """A run's slot-filling steps (those of a text-first curriculum counted apart), and its alignment's CTC steps and value recall on ``dset`` (all and
    novel turns), from its exp dir; ``-`` for what it does not have."""
    steps, ctc_steps, recall = "-", "-", "-"
    if exp_dir and (Path(exp_dir) / "train_log.jsonl").is_file():
        with open(Path(exp_dir) / "train_log.jsonl", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        n = max((r.get("step", 0) for r in records), default=0)
        text_first = [r["text_steps"] for r in records if "text_steps" in r]
        steps = f"{n} ({text_first[-1]} on text)" if text_first else str(n)
    if exp_dir and (Path(exp_dir) / "alignment.json").is_file():
        aligned = read_json(Path(exp_dir) / "alignment.json")
        ctc_steps = str(aligned["step"])
        if f"{dset}_values" in aligned:
            recall = (f"{ratio(aligned[f'{dset}_values_heard'], aligned[f'{dset}_values'])} / "
                      f"{ratio(aligned[f'{dset}_novel_heard'], aligned[f'{dset}_novel_values'])}")
    return steps, ctc_steps, recall


def novel_rows(table: Table) -> list[str]:
    """The novel-value table: F1 on all turns and on the novel ones, CTC value recall, steps."""
    if not any("novel" in r or (r["run"].get("exp_dir") and (Path(r["run"]["exp_dir"]) / "alignment.json").is_file())
               for modes in table.values() for r in modes.values() if "run" in r):
        return []
    out = ["", "## Heard or remembered: the novel-value turns (no training or alignment text holds their values)",
           "", "F1 on all turns / on the novel ones; the CTC head's value recall on the same set (all / novel "
           "turns) at the end of the alignment phase.", "",
           "| system | test set | mode | partial F1 | exact F1 | SLU-F1 | novel utts | CTC value recall | "
           "CTC steps | slot-filling steps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for system, dset, mode, r in rows(table):
        novel = r.get("novel")
        novel_f1 = novel and novel["n_utts"]  # no novel turns: no F1 to show
        cells = [f"{r[k]['f1']:.4f} / {novel[k]['f1']:.4f}" if novel_f1 else f"{r[k]['f1']:.4f} / -"
                 for k in ("partial", "exact", "slu_f1")]
        steps, ctc_steps, recall = training_of(r.get("run", {}).get("exp_dir"), dset)
        out.append(f"| {system} | {dset} | {mode} | {' | '.join(cells)} | "
                   f"{novel['n_utts'] if novel else '-'} | {recall} | {ctc_steps} | {steps} |")
    return out


def rows(table: Table) -> Iterator[tuple[str, str, str, dict]]:
    """``(system, test set, decode mode, scores)`` of every scored run, in the tables' order."""
    for (system, dset), modes in sorted(table.items()):
        for mode in DECODES:
            if mode in modes:
                yield system, dset, mode, modes[mode]


def render(table: Table, stage_times: Path | None, command: str) -> str:
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
        for single, hybrid in (("regular", decode_mode(HYBRID, False)), ("reasoning", decode_mode(HYBRID, True))):
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
        for system, dset, mode, r in rows(table):
            cells = [f"{prf(r['groups'][g]['partial'])} ({r['groups'][g]['n_utts']})"
                     if g in r.get("groups", {}) else "-" for g in groups]
            out.append(f"| {system} | {dset} | {mode} | {prf(r['partial'])} ({r['n_utts']}) | "
                       + " | ".join(cells) + " |")
    out += novel_rows(table)
    out += ["", "## All scores", "",
            "| system | test set | mode | partial P / R / F1 | exact P / R / F1 | SLU-F1 P / R / F1 | "
            "utts | unparseable | missing | truncated |", "|---|---|---|---|---|---|---|---|---|---|"]
    for system, dset, mode, r in rows(table):
        out.append(f"| {system} | {dset} | {mode} | {prf(r['partial'])} | {prf(r['exact'])} | "
                   f"{prf(r['slu_f1'])} | {r['n_utts']} | {r['n_unparseable']} | {r['n_missing']} | "
                   f"{r.get('n_truncated', '-')} |")  # older scores.json files have no truncation count
    if stage_times and stage_times.exists():
        out += ["", "## Stages run (wall time on this machine)", "",
                "| stage | run (LLM, mode) | seconds | finished | command | commit |", "|---|---|---|---|---|---|"]
        for line in stage_times.read_text().splitlines():
            stage, seconds, when, *rest = line.split("\t")
            what, command, commit = (rest + ["-", "-", "-"])[:3]  # older files lack the last columns
            out.append(f"| {stage} | {what} | {seconds} | {when} | {'-' if command == '-' else f'`{command}`'} | "
                       f"{commit} |")
    out += ["", "## Environment of stage 5", "", *environment()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode_dirs", type=Path, nargs="*", required=True)
    parser.add_argument("--llms", nargs="+", help="keep only runs of these LLM configs")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="keep only runs of these training modes")
    parser.add_argument("--tag", help="keep only runs with this tag ('': untagged runs)")
    parser.add_argument("--list", action="store_true", help="print the decode dirs kept, one a line; write nothing")
    parser.add_argument("--stage_times", type=Path)
    parser.add_argument("--command", default="run.sh")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--plot", type=Path, help="bar chart PNG of partial F1 per system and mode")
    args = parser.parse_args(argv)
    setup_logging()
    runs = select(args.decode_dirs, args.llms, args.modes, args.tag, skip_bad=args.list)
    if args.list:
        print("".join(f"{ddir}\n" for ddir, _, _ in runs), end="")
        return
    if args.output is None:
        parser.error("--output is required (unless --list)")
    if not runs:
        raise InputError(f"no scored run among {len(args.decode_dirs)} decode dir(s) to write {args.output} from")
    table = collect(runs)
    text = render(table, args.stage_times, args.command)
    if args.plot:
        plot_f1(table, args.plot)
        text += f"\n![partial F1 per system and mode]({os.path.relpath(args.plot, args.output.parent)})\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
