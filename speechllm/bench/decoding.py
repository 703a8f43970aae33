"""Stage 4's throughput: the same examples decoded one at a time and in batches, with the count of
identical outputs (batching must not change them) and why the rows stopped."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from speechllm.data import read_examples
from speechllm.decode import decode_examples, new_token_cap
from speechllm.model.builder import load_model, read_spec


def measure_decoding(model_dir: Path, jsonl: Path, mode: str | None, n_utts: int, batch_size: int,
                     device: str = "cpu") -> dict:
    """The first ``n_utts`` examples of ``jsonl`` (of ``mode``) at batch 1 and at ``batch_size``, with stage
    4's default cap on new tokens."""
    examples = read_examples(jsonl, mode)[:n_utts]
    if not examples:
        raise ValueError(f"{jsonl}: no examples{f' of mode {mode}' if mode else ''} to decode")
    model = load_model(model_dir, device)
    cap = new_token_cap(read_spec(model_dir))
    decode_examples(model, examples[:1], 1, cap)  # untimed: one-time costs (allocator, kernels) are no one's
    runs, outputs = {}, {}
    for name, batch in (("batch_1", 1), ("batched", batch_size)):
        start = time.perf_counter()
        rows = decode_examples(model, examples, batch, cap)
        seconds = time.perf_counter() - start
        outputs[name] = [r["output"] for r in rows]
        runs[name] = {"batch_size": batch, "seconds": round(seconds, 2), "utt_per_s": round(len(rows) / seconds, 3),
                      "stops": dict(Counter(r["stop"] for r in rows))}
    return {"model_dir": str(model_dir), "jsonl": str(jsonl), "mode": mode, "n_utts": len(examples),
            "max_new_tokens": cap, **runs,
            "speedup": round(runs["batched"]["utt_per_s"] / runs["batch_1"]["utt_per_s"], 2),
            "identical_outputs": sum(a == b for a, b in zip(outputs["batch_1"], outputs["batched"]))}
