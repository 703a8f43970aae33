"""Stage 4: batched generation over stage-2 examples, parsed into slot dicts.

Examples are sorted by length so each batch pads little; results come back in id order, so the
merged output of any number of parallel jobs is the same file.
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from speechllm.data import Example, load_feats
from speechllm.model.speechllm import SpeechLLM
from speechllm.parsing import parse_slots

log = logging.getLogger(__name__)


def decode_examples(model: SpeechLLM, examples: list[Example], batch_size: int = 8, max_new_tokens: int = 256,
                    num_beams: int = 1) -> list[dict]:
    """Generate for every example; one result dict per example, in id order."""
    encoded = {e.id: model.encode(load_feats(e), e.prompt) for e in examples}
    order = sorted(examples, key=lambda e: encoded[e.id].prompt_length)
    outputs: dict[str, str] = {}
    start = time.time()
    for i in tqdm(range(0, len(order), batch_size), desc="decode", unit="batch"):
        chunk = order[i : i + batch_size]
        texts = model.generate([encoded[e.id] for e in chunk], max_new_tokens, num_beams)
        outputs.update({e.id: t for e, t in zip(chunk, texts)})
    log.info("decoded %d examples in %.1f s (%.2f utt/s, batch %d)", len(examples), time.time() - start,
             len(examples) / max(time.time() - start, 1e-9), batch_size)
    results = []
    for e in sorted(examples, key=lambda e: e.id):
        parsed = parse_slots(outputs[e.id])
        results.append({"id": e.id, "utt_id": e.utt_id, "mode": e.mode, "output": outputs[e.id],
                        "slots": parsed.slots, "parseable": parsed.parseable})
    return results
