"""speechllm-bench: the performance numbers of a recipe, measured in one run on its own data and configs.

    speechllm-bench --whisper base --wav_scp data/test/wav.scp --text data/test/text \\
        --exp_dir exp/smollm2_135m_reasoning --test_jsonl dump/test/reasoning.jsonl --outdir exp/bench

(a recipe's ``local/bench.sh`` fills these in). Sections, each a key of ``<outdir>/bench.json``:

- ``machine``: the CPU/GPU, and matmul GFLOP/s in the training dtype, measured now (the roofline);
- ``stage1``: encoder s/utt and RTF at true length and with 30-s padding, their outputs compared on
  the shared frames; ASR s/utt, RTF and WER with one window per turn and with packed windows;
- ``training``: stage 3's step on the experiment's training rows and ``train.yaml``: tokens/s, examples/s,
  padding efficiency, FLOPs per token from the model's shapes, the fraction of the roofline;
- ``decoding``: utt/s at batch 1 and at ``--batch_size`` with the trained model, identical outputs;
- ``memory``: peak memory of training with LoRA and with QLoRA (RSS on CPU, allocated on GPU);
- ``startup``: stage 3's start-up on generated text-only sets of ``--startup_rows`` rows.

``<outdir>/bench.md`` is the table the docs link to, with each goal marked met or not. ``--sections``
runs some; the others keep their earlier results in ``bench.json`` (each section records when and at
which commit it was measured). ``--dtype`` is the dtype of the roofline's matmuls; the model's own is
its config's. No number here is a test
threshold: the tests only check that every key is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from pathlib import Path

import torch

from speechllm.config import load_yaml_dataclass
from speechllm.io_utils import atomic_write
from speechllm.logging_utils import setup_logging
from speechllm.provenance import code_commit
from speechllm.train_config import TrainConfig

log = logging.getLogger(__name__)

SECTIONS = ("machine", "stage1", "training", "decoding", "memory", "startup")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (label, section, key, goal, compare): the goals the table marks
GOALS = [
    ("decoding: batched utt/s over batch 1", "decoding", "speedup", 3.0, "min"),
    ("decoding: identical outputs (share)", "decoding", "identical_share", 1.0, "min"),
    ("training: fraction of the roofline", "training", "roofline_fraction", 0.6, "min"),
    ("training: padding efficiency", "training", "padding_efficiency", 0.9, "min"),
    ("stage 1: packed ASR WER minus per-turn WER", "stage1", "wer_change", 0.0, "max"),
]


def run_section(name: str, args: argparse.Namespace, roofline: float | None) -> dict:
    """One section's measurements (imports are per section: each pulls in its own libraries)."""
    if name == "machine":
        from speechllm.bench.machine import describe, matmul_gflops

        return {**describe(args.device), "dtype": args.dtype,
                "matmul_gflops": round(matmul_gflops(DTYPES[args.dtype], args.device), 1)}
    if name == "stage1":
        from speechllm.bench.stage1 import measure_stage1

        result = measure_stage1(args.whisper, args.wav_scp, args.text, args.utts, args.device)
        if "wer" in result["asr_packed"]:
            result["wer_change"] = round(result["asr_packed"]["wer"] - result["asr_per_turn"]["wer"], 4)
        return result
    if name == "decoding":
        from speechllm.bench.decoding import measure_decoding

        result = measure_decoding(args.exp_dir / "model", args.test_jsonl, args.mode, args.utts, args.batch_size,
                                  args.device)
        return {**result, "identical_share": round(result["identical_outputs"] / result["n_utts"], 3)}
    from speechllm.model.builder import build_speechllm, read_spec

    spec = read_spec(args.exp_dir / "model") if args.exp_dir else None
    base = args.exp_dir / "model" / spec.base_llm if spec and spec.base_llm else None  # a tiny LLM's weights
    if name == "startup":
        from speechllm.bench.startup import measure_startup

        return measure_startup(args.startup_rows, args.outdir / "startup", args.llm_config, base)
    from speechllm.bench.training import measure_training, peak_memory
    from speechllm.data import tokenized

    cfg = load_yaml_dataclass(args.exp_dir / "train.yaml", TrainConfig)
    model = build_speechllm(spec, base, args.device, cfg.gradient_checkpointing)
    # the experiment's training rows, tokenised for the bench under --outdir: stage 3's own tokens go
    # stale when stage 2 is rerun, and the bench does not write into the experiment
    source = json.loads((args.exp_dir / "tokens" / "train" / "meta.json").read_text(encoding="utf-8"))["source"]
    tokens = tokenized(model, Path(source), args.outdir / "tokens")
    if name == "memory":
        return peak_memory(spec, tokens, base, cfg.batch_size, 2, args.device, cfg)
    return measure_training(model, tokens, cfg.batch_size, args.train_steps, roofline, cfg)


def _num(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def table(bench: dict) -> str:
    """bench.md: the measured rows, then each goal met or not."""
    rows = []
    machine = bench.get("machine", {})
    rows.append(("machine", f"{machine.get('gpu') or machine.get('cpu_model')}, {machine.get('threads')} threads, "
                            f"matmul {_num(machine.get('matmul_gflops'))} GFLOP/s ({machine.get('dtype')})"))
    s1 = bench.get("stage1", {})
    for label, key in (("encoder, true length", "encoder_true_length"), ("encoder, 30-s padded", "encoder_30s"),
                       ("ASR, one window per turn", "asr_per_turn"), ("ASR, packed windows", "asr_packed")):
        part = s1.get(key, {})
        extra = "".join(f", {k} {_num(part[k])}" for k in ("wer", "fallbacks") if k in part)
        rows.append((f"stage 1: {label}", f"{_num(part.get('s_per_utt'))} s/utt, RTF {_num(part.get('rtf'))}{extra}"))
    if "shared_frames" in s1:
        rows.append(("stage 1: true length vs padded, shared frames",
                     f"max abs diff {_num(s1['shared_frames']['max_abs_diff'])}, "
                     f"mean cosine {_num(s1['shared_frames']['mean_cosine'])}"))
    tr = bench.get("training", {})
    rows.append(("training", f"{_num(tr.get('tokens_per_s'))} tokens/s, {_num(tr.get('examples_per_s'))} examples/s, "
                             f"padding efficiency {_num(tr.get('padding_efficiency'))}, "
                             f"{_num(tr.get('flops_per_token'))} FLOPs/token, "
                             f"{_num(tr.get('roofline_fraction'))} of the roofline "
                             f"({_num(tr.get('roofline_fraction_with_lm_head'))} with the LM head's flops)"))
    dec = bench.get("decoding", {})
    for key in ("batch_1", "batched"):
        part = dec.get(key, {})
        rows.append((f"decoding, batch {part.get('batch_size')}",
                     f"{_num(part.get('utt_per_s'))} utt/s, stops {part.get('stops')}"))
    if dec:
        rows.append(("decoding: identical outputs", f"{dec.get('identical_outputs')} of {dec.get('n_utts')}"))
    for variant in ("lora", "qlora"):
        part = bench.get("memory", {}).get(variant, {})
        value = part.get("error") or ", ".join(f"{k} {_num(v)}" for k, v in part.items() if k.endswith("_mb"))
        rows.append((f"training peak memory, {variant}", value))
    for size in bench.get("startup", {}).get("sizes", []):
        rows.append((f"stage 3 start-up, {size['rows']:,} rows",
                     f"tokenise once {_num(size['tokenise_once_s'])} s, per rank {_num(size['rank_startup_s'])} s "
                     f"and {_num(size['rank_private_mb'])} MB of its own"))
    runs: dict[tuple, list[str]] = {}  # the runs that measured the sections: command, date, commit
    for section in SECTIONS:
        if section in bench:
            part = bench[section]
            runs.setdefault((part.get("command"), part.get("measured"), part.get("commit")), []).append(section)
    lines = ["# speechllm-bench", ""]
    lines += [f"- {', '.join(sections)}: `{command}` ({when}, commit {commit})"
              for (command, when, commit), sections in runs.items()]
    lines += ["", "| what | measured |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in rows]
    lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
    for label, section, key, goal, compare in GOALS:
        value = bench.get(section, {}).get(key)
        met = "-" if value is None else ("yes" if (value >= goal if compare == "min" else value <= goal) else "no")
        lines.append(f"| {label} | {'>=' if compare == 'min' else '<='} {goal} | {_num(value)} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", type=Path, default=Path("exp/bench"), help="bench.json and bench.md go here")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--whisper", default="base", help="stage 1's Whisper (name, checkpoint or YAML)")
    parser.add_argument("--wav_scp", type=Path, help="stage 1's turns (data/<set>/wav.scp)")
    parser.add_argument("--text", type=Path, help="their reference transcripts, for the WER (data/<set>/text)")
    parser.add_argument("--exp_dir", type=Path, help="a trained experiment: its model, train.yaml and tokens")
    parser.add_argument("--test_jsonl", type=Path, help="stage-2 rows to decode (dump/<set>/<mode>.jsonl)")
    parser.add_argument("--mode", help="only rows of this mode of --test_jsonl (a hybrid file holds two)")
    parser.add_argument("--llm_config", type=Path, help="the LLM config of the start-up section")
    parser.add_argument("--utts", type=int, default=16, help="turns of stage 1 and examples of decoding")
    parser.add_argument("--batch_size", type=int, default=8, help="decoding's batch")
    parser.add_argument("--train_steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--startup_rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the training dtype (roofline)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    setup_logging()
    needs = {"stage1": ("wav_scp",), "training": ("exp_dir",), "memory": ("exp_dir",),
             "decoding": ("exp_dir", "test_jsonl"), "startup": ("llm_config",)}
    for section in args.sections:
        missing = [f"--{flag}" for flag in needs.get(section, ()) if getattr(args, flag) is None]
        if missing:
            parser.error(f"section {section} needs {' and '.join(missing)}")
    output = args.outdir / "bench.json"
    bench = json.loads(output.read_text(encoding="utf-8")) if output.exists() else {}
    bench.update(date=datetime.now().isoformat(timespec="seconds"), commit=code_commit(),
                 command=" ".join(["speechllm-bench", *(argv if argv is not None else sys.argv[1:])]))
    args.outdir.mkdir(parents=True, exist_ok=True)
    for section in args.sections:
        log.info("measuring %s", section)
        roofline = bench.get("machine", {}).get("matmul_gflops")
        bench[section] = {**run_section(section, args, roofline), "measured": bench["date"], "commit": bench["commit"],
                          "command": bench["command"]}
        with atomic_write(output) as f:  # each section as soon as it is measured
            f.write(json.dumps(bench, indent=1) + "\n")
    with atomic_write(args.outdir / "bench.md") as f:
        f.write(table(bench))
    log.info("wrote %s and %s", output, args.outdir / "bench.md")


if __name__ == "__main__":
    main()
