"""What stage 3 costs before its first step at the paper's scale, without audio.

A stage-2 file of text-only rows shaped like hybrid-mode rows (a prompt with context, a direct or a
reasoning answer) is generated; it is tokenised once (rank 0's one-time cost), then a fresh process
per size measures what every rank pays: opening the memory-mapped set, the Trainer (lengths,
optimizer), the epoch's batch plan, and the first batch from the DataLoader, in seconds and in
resident memory on top of the loaded model (all of it, and the process's own part).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from speechllm.config import load_yaml
from speechllm.logging_utils import setup_logging

log = logging.getLogger(__name__)

WORDS = ("card payment limit account balance thirty dollars monthly statement Maria Garcia please raise "
         "the my to for on a twenty five hundred thousand new address street number phone yes no "
         "thank you can I help with anything else date March fourth").split()


def generate_rows(path: Path, rows: int, seed: int = 0) -> None:
    """Text-only stage-2 rows: half direct answers, half reasoning traces (hybrid mode's two kinds)."""
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            slots = {f"slot_{k}": words(rng.randint(1, 3)) for k in range(rng.randint(0, 3))}
            answer = json.dumps(slots)
            think = i % 2 == 1
            trace = words(rng.randint(40, 120))
            target = f"<thinking>\n{trace}\n</thinking>\n<response>\n{answer}\n</response>" if think else answer
            prompt = (f"Previous turns: {words(rng.randint(10, 80))}\nCurrent turn: {words(rng.randint(5, 40))}\n"
                      f"Find all slot values. Format the output as JSON. {'/think' if think else '/no_think'}")
            f.write(json.dumps({"id": f"r{i:08d}", "utt_id": f"u{i // 2:08d}", "feats": None, "prompt": prompt,
                                "target": target, "slots": slots, "mode": "hybrid", "n_frames": 0}) + "\n")


def load_text_model(llm_config: Path, base: Path | None = None):
    """The speech LLM without an adapter (text-only rows), as stage 3 builds it (``base``: the saved base
    of a tiny LLM, which has no weights to load by name)."""
    from speechllm.model.builder import ModelSpec, build_speechllm

    return build_speechllm(ModelSpec(llm=load_yaml(llm_config), feat_dim=0), base)


def rss_mb() -> tuple[float, float]:
    """This process's resident memory now, and the part of it that is its own (not file pages such as the
    memory-mapped tokens, which every rank of a node shares through the page cache); Linux only."""
    with open("/proc/self/statm", encoding="ascii") as f:
        resident, shared = (int(v) * resource.getpagesize() / 2**20 for v in f.read().split()[1:3])
    return resident, resident - shared


def rank_startup(tokens: Path, llm_config: Path, base: Path | None = None) -> dict:
    """What one rank pays before its first step (run in a fresh process). Every rank plans the same
    global batches and takes its share, so one process without a process group measures it."""
    from speechllm.data import TokenizedSet
    from speechllm.model.builder import ModelSpec
    from speechllm.train import Trainer
    from speechllm.train_config import TrainConfig

    model = load_text_model(llm_config, base)
    before = rss_mb()
    start = time.time()
    cfg = TrainConfig(batch_size=4, effective_batch=128, num_workers=2)
    trainer = Trainer(model, ModelSpec(llm={}, feat_dim=0), cfg, TokenizedSet(tokens), None, tokens.parent)
    batches = trainer.epoch_batches()
    inputs, _ = next(iter(trainer.loader(batches, 0)))
    after = rss_mb()
    return {"rank_startup_s": round(time.time() - start, 2), "rank_rss_mb": round(after[0] - before[0], 1),
            "rank_private_mb": round(after[1] - before[1], 1),
            "first_batch_rows": len(inputs), "batches_per_epoch": len(batches)}


def measure_startup(rows_list: list[int], workdir: Path, llm_config: Path, base: Path | None = None) -> dict:
    """Per size: generate the rows (kept in ``workdir`` for the next run), tokenise them once (timed), then
    one rank's start-up in a fresh process."""
    from speechllm.data import tokenized

    workdir.mkdir(parents=True, exist_ok=True)
    model = load_text_model(llm_config, base)
    results = []
    for rows in rows_list:
        jsonl = workdir / f"rows{rows}.jsonl"
        if not jsonl.exists():
            log.info("generating %d rows in %s", rows, jsonl)
            generate_rows(jsonl, rows)
        tokens = workdir / f"tokens{rows}"
        shutil.rmtree(tokens, ignore_errors=True)  # time the tokenisation itself, not its reuse
        start = time.time()
        meta = tokenized(model, jsonl, tokens).meta
        tokenise_s = time.time() - start
        proc = subprocess.run([sys.executable, "-m", "speechllm.bench.startup", "--tokens", str(tokens),
                               "--llm_config", str(llm_config), *(["--base", str(base)] if base else [])],
                              capture_output=True, text=True, check=True)
        rank = json.loads(proc.stdout.strip().splitlines()[-1])
        disk = sum(f.stat().st_size for f in tokens.iterdir())
        results.append({"rows": rows, "tokens": meta["tokens"], "tokenise_once_s": round(tokenise_s, 1),
                        "tokenised_disk_mb": round(disk / 2**20, 1), **rank})
        log.info("%d rows: %s", rows, results[-1])
    return {"what": "stage 3 before its first step: tokenising once (rank 0), then per rank", "date": str(date.today()),
            "llm_config": str(llm_config), "machine": platform.machine(),
            "cpus": len(os.sched_getaffinity(0)), "sizes": results}


def main(argv: list[str] | None = None) -> None:
    """One rank's start-up, in the fresh process :func:`measure_startup` starts: one JSON line on stdout."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--llm_config", type=Path, required=True)
    parser.add_argument("--base", type=Path)
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    print(json.dumps(rank_startup(args.tokens, args.llm_config, args.base)))


if __name__ == "__main__":
    main()
