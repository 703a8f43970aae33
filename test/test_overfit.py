"""The whole path learns: a tiny model memorises a few utterances through adapter and LoRA, and
decoding those utterances' features gives back the exact targets (partial F1 = 1.0). The cascade's
text-only model (transcript in the prompt, no adapter) learns the same way."""

import json
from dataclasses import asdict, replace

import pytest

from conftest import make_tiny_speechllm, write_examples
from speechllm.data import read_examples, tokenized
from speechllm.decode import decode_examples
from speechllm.formatting import reasoning_target, regular_target
from speechllm.prompts import text_prompt
from speechllm.metrics import score_corpus
from speechllm.train import Trainer
from speechllm.train_config import TrainConfig

UTTERANCES = [
    ("u1", "I pay thirty dollars monthly.", {"payment_amount": "thirty dollars", "payment_frequency": "monthly"},
     ("payment_amount", "payment_frequency", "new_limit"), 48),
    ("u2", "Please raise my limit to five thousand.", {"new_limit": "five thousand"}, None, 28),
    ("u3", "Is there anything else I can help you with?", {}, ("review_period", "card_type"), 64),
    ("u4", "My name is Maria Garcia.", {"customer_name": "Maria Garcia"}, None, 36),
]  # id, text, slots, queried labels, frames: lengths differ, so decoding's length order is not the id order
DESCRIPTIONS = {"payment_amount": "amount of a payment", "new_limit": "requested new credit limit"}
PROMPT = "<audio>\nFind slot values in the current audio. Format the output as JSON."


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regular", "reasoning", "cascade"])
def test_overfit_few_utterances(tmp_path, mode):
    rows = []
    for utt, text, gold, queried, frames in UTTERANCES:
        target = (reasoning_target(text, gold, queried, DESCRIPTIONS) if mode == "reasoning"
                  else regular_target(gold, queried))
        rows.append({"utt_id": utt, "prompt": PROMPT, "target": target, "text": text, "mode": mode,
                     "slots": gold, "n_frames": frames, "n_frames_to_make": frames})
    jsonl = write_examples(tmp_path, rows)
    examples = read_examples(jsonl)
    if mode == "cascade":
        examples = [replace(e, feats_path=None, prompt=text_prompt(e.prompt, e.text)) for e in examples]
        rows = [{**asdict(e), "feats": None} for e in examples]  # the JSONL field of Example.feats_path
        jsonl.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "feats_path"}) + "\n" for r in rows))
    texts = [t for e in examples for t in (e.prompt, e.target)]
    model, spec, base = make_tiny_speechllm(tmp_path, texts, adapter_hidden=64, feat_dim=0 if mode == "cascade" else 16)
    assert (model.adapter is None) == (mode == "cascade")
    cfg = TrainConfig(batch_size=4, grad_accum=1, max_steps=250 if mode == "reasoning" else 150, lr=5e-3,
                      warmup_ratio=0.05, adapter_hidden=64, log_every=50, save_every=1000, seed=0)
    Trainer(model, spec, cfg, tokenized(model, jsonl, tmp_path / "tokens"), None, tmp_path / "exp", base).train()
    model.eval()
    # two batches of mixed lengths, the examples given in neither id nor length order: each output by its id
    results = decode_examples(model, [examples[i] for i in (2, 0, 3, 1)], batch_size=3, max_new_tokens=400)
    assert [r["id"] for r in results] == ["u1", "u2", "u3", "u4"]
    assert {r["id"]: r["output"] for r in results} == {e.id: e.target for e in examples}
    scores = score_corpus({e.id: e.slots for e in examples}, {r["id"]: (r["slots"], r["parseable"]) for r in results})
    assert scores["partial"]["f1"] == 1.0 and scores["exact"]["f1"] == 1.0
    assert (tmp_path / "exp" / "model" / "speechllm.yaml").exists() and (tmp_path / "exp" / "loss.png").exists()
