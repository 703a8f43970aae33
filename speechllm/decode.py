"""Stage 4: batched generation over stage-2 examples, parsed into slot dicts.

Examples are sorted by length (prompt tokens plus the ``n_frames`` of their stage-2 rows, known
before any feature is read) so each batch pads little. A batch's features are read just before it
is generated and dropped after it, so a job holds one batch of features however many examples it
decodes. Results come back in id order, so the merged output of any number of parallel jobs is the
same file.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Callable, Sequence

from tqdm import tqdm

from speechllm.data import Example, load_feats
from speechllm.model.builder import ModelSpec
from speechllm.model.speechllm import Generation, ModelInput, SpeechLLM
from speechllm.parsing import parse_slots

log = logging.getLogger(__name__)

CAP_SCALE, CAP_MARGIN = 1.25, 16


def new_token_cap(spec: ModelSpec) -> int:
    """The default ``max_new_tokens``: the longest training target (EOS included) + 25% + 16 tokens.

    A test answer can be longer than every training target (more slots, longer values, a longer
    reasoning trace): the relative margin covers longer traces, the absolute one a couple more slot
    values (about 10 tokens each) on short direct answers. The cap costs time only on rows that do
    not stop, and those are counted as truncated.
    """
    if spec.max_target_tokens is None:
        raise ValueError("the model records no max_target_tokens (it was trained before they were recorded): "
                         "give --max_new_tokens explicitly")
    return math.ceil(spec.max_target_tokens * CAP_SCALE) + CAP_MARGIN


def _generate_batch(model: SpeechLLM, chunk: list[Example], prompts: dict[str, tuple[list[int], list[int]]],
                    max_new_tokens: int, num_beams: int) -> list[Generation]:
    """Read the chunk's features and generate; they are freed when this returns."""
    items = [ModelInput(load_feats(e), *prompts[e.id], []) for e in chunk]
    return model.generate(items, max_new_tokens, num_beams)


class StaleProgress(ValueError):
    """The kept batches of an earlier run are not this run's first batches."""


def result_row(example: Example, out: Generation) -> dict:
    """One line of ``hyp.jsonl``: the output, its parse, and why it ended."""
    parsed = parse_slots(out.text)
    return {"id": example.id, "utt_id": example.utt_id, "mode": example.mode, "output": out.text,
            "slots": parsed.slots, "parseable": parsed.parseable, "truncated": out.truncated, "stop": out.stop}


def decode_examples(model: SpeechLLM, examples: list[Example], batch_size: int = 8, max_new_tokens: int = 256,
                    num_beams: int = 1, done: Sequence[list[dict]] = (),
                    on_batch: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Generate for every example; one result dict per example, in id order.

    ``stop`` says why the output ended (:mod:`speechllm.stopping`). ``truncated`` marks an output that
    hit ``max_new_tokens`` first: it may have lost slots or fail to parse because of the cap rather
    than the model; a ``loop`` output was ended by the loop guard.

    ``done`` holds the result rows of the first batches from an earlier, interrupted run (the batches
    depend only on the examples, the tokenizer and ``batch_size``), which are not generated again;
    ``on_batch`` receives each new batch's rows as soon as they exist, for a job to save its progress.
    """
    if not examples:  # an empty share: more jobs than examples
        return []
    tokenized = model.formatter.tokenize_many([e.prompt for e in examples], [None] * len(examples),
                                              [e.feats_path is not None for e in examples])
    prompts = {e.id: (before, after) for e, (before, after, _) in zip(examples, tokenized)}
    if any(e.feats_path is not None and not e.n_frames for e in examples):
        log.warning("stage-2 rows without n_frames (an older dump): batches are sorted by prompt tokens only")
    order = sorted(examples, key=lambda e: (len(prompts[e.id][0]) + len(prompts[e.id][1]) + e.n_frames, e.id))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rows: dict[str, dict] = {}
    for k, (batch, kept) in enumerate(zip(batches, done)):
        if [e.id for e in batch] != [r["id"] for r in kept]:
            raise StaleProgress(f"batch {k} of the earlier run holds other examples than this run's batch {k}")
        rows.update((r["id"], r) for r in kept)
    start, n_tokens = time.time(), 0
    for batch in tqdm(batches[len(done) :], desc="decode", unit="batch", initial=len(done), total=len(batches)):
        outputs = _generate_batch(model, batch, prompts, max_new_tokens, num_beams)
        new = [result_row(e, out) for e, out in zip(batch, outputs)]
        n_tokens += sum(out.n_tokens for out in outputs)
        if on_batch is not None:
            on_batch(new)
        rows.update((r["id"], r) for r in new)
    seconds, n_new = max(time.time() - start, 1e-9), len(order) - sum(map(len, done))
    stops = Counter(r["stop"] for r in rows.values())
    log.log(logging.WARNING if stops["cap"] or stops["loop"] else logging.INFO,
            "decoded %d examples (%d in this run) in %.1f s (%.2f utt/s, %.1f new tokens/s, batch %d), %d truncated "
            "at the cap of %d new tokens, %d ended by the loop guard, %d at a complete answer without EOS",
            len(examples), n_new, seconds, n_new / seconds, n_tokens / seconds, batch_size, stops["cap"],
            max_new_tokens, stops["loop"], stops["answer"])
    return [rows[e.id] for e in sorted(examples, key=lambda e: e.id)]
