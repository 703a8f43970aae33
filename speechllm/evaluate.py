"""Evaluation during training: the validation loss per epoch, and dev F1 for learning curves.

The F1 points decode a share of the validation set as stage 4 would and score it as stage 5 would,
so a curve's last point and the final scores measure the same thing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from speechllm.data import TokenizedSet, collate
from speechllm.decode import decode_examples
from speechllm.metrics import score_corpus
from speechllm.model.speechllm import SpeechLLM
from speechllm.run_log import RunLog

log = logging.getLogger(__name__)


@torch.no_grad()
def validation_loss(model: SpeechLLM, dataset: TokenizedSet, batch_size: int) -> float:
    """Cross-entropy per target token over the whole set."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        inputs, _ = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        n_tokens = sum(len(x.target) for x in inputs)
        total += model(inputs).item() * n_tokens
        count += n_tokens
    model.train()
    return total / max(count, 1)


class CurveEvaluator:
    """Learning-curve points: dev F1 after some seconds of training, appended to ``curve.jsonl``."""

    def __init__(self, dataset: TokenizedSet | None, max_examples: int, batch_size: int, max_new_tokens: int,
                 outdir: Path) -> None:
        n = 0 if dataset is None else min(max_examples, len(dataset))
        self.examples = [dataset.example(i) for i in range(n)]
        self.batch_size, self.max_new_tokens, self.path = batch_size, max_new_tokens, outdir / "curve.jsonl"

    @torch.no_grad()
    def __call__(self, model: SpeechLLM, step: int, train_s: float, run_log: RunLog) -> dict:
        model.eval()
        results = decode_examples(model, self.examples, self.batch_size, self.max_new_tokens)
        model.train()
        scores = score_corpus({e.id: e.slots for e in self.examples},
                              {r["id"]: (r["slots"], r["parseable"]) for r in results})
        point = {"step": step, "train_s": train_s, "dev_partial_f1": scores["partial"]["f1"],
                 "dev_exact_f1": scores["exact"]["f1"], "dev_unparseable": scores["n_unparseable"],
                 "dev_example": results[0]["output"] if results else ""}
        log.info("step %d (%.0f s of training): dev partial F1 %.3f, exact F1 %.3f; e.g. %r", step, train_s,
                 point["dev_partial_f1"], point["dev_exact_f1"], point["dev_example"][:120])
        run_log.add_scalar("dev/partial_f1", point["dev_partial_f1"], step)
        run_log.add_scalar("dev/exact_f1", point["dev_exact_f1"], step)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(point) + "\n")
        return point
