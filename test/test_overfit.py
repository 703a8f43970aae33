"""The whole path learns: a tiny model memorises a few utterances through adapter and LoRA, and
decoding those utterances' features gives back the exact targets (partial F1 = 1.0). The cascade's
text-only model (transcript in the prompt, no adapter) learns the same way, and so does a tiny Qwen3
whose hybrid traces go in its own <think> block (``native_thinking``)."""

import json
from dataclasses import asdict, replace

import pytest

from conftest import make_tiny_speechllm, tiny_llm_dict, write_examples
from speechllm.data import read_examples, tokenized
from speechllm.decode import decode_examples
from speechllm.formatting import reasoning_target, regular_target
from speechllm.prompts import NO_THINK, THINK, text_prompt
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
TINY_QWEN3 = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
              "tie_word_embeddings": True, "initializer_range": 0.3}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regular", "reasoning", "cascade", "hybrid_native"])
def test_overfit_few_utterances(tmp_path, mode):
    rows = []
    for k, (utt, text, gold, queried, frames) in enumerate(UTTERANCES):
        think = mode == "reasoning" or (mode == "hybrid_native" and k % 2 == 0)  # hybrid: u1, u3 /think
        target = reasoning_target(text, gold, queried, DESCRIPTIONS) if think else regular_target(gold, queried)
        prompt = f"{PROMPT} {THINK if think else NO_THINK}" if mode == "hybrid_native" else PROMPT
        rows.append({"utt_id": utt, "prompt": prompt, "target": target, "text": text, "mode": mode,
                     "slots": gold, "n_frames": frames, "n_frames_to_make": frames})
    jsonl = write_examples(tmp_path, rows)
    examples = read_examples(jsonl)
    if mode == "cascade":
        examples = [replace(e, feats_path=None, prompt=text_prompt(e.prompt, e.text)) for e in examples]
        rows = [{**asdict(e), "feats": None} for e in examples]  # the JSONL field of Example.feats_path
        jsonl.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "feats_path"}) + "\n" for r in rows))
    texts = [t for e in examples for t in (e.prompt, e.target)]
    llm = tiny_llm_dict(tiny=TINY_QWEN3, tiny_tokens="qwen3", native_thinking=True) if mode == "hybrid_native" else None
    model, spec, base = make_tiny_speechllm(tmp_path, texts, adapter_hidden=64, feat_dim=0 if mode == "cascade" else 16,
                                            llm=llm)
    assert (model.adapter is None) == (mode == "cascade")
    cfg = TrainConfig(batch_size=4, grad_accum=1, max_steps=150 if mode in ("regular", "cascade") else 250, lr=5e-3,
                      warmup_ratio=0.05, adapter_hidden=64, log_every=50, save_every=1000, seed=0)
    Trainer(model, spec, cfg, tokenized(model, jsonl, tmp_path / "tokens"), None, tmp_path / "exp", base).train()
    model.eval()
    # two batches of mixed lengths, the examples given in neither id nor length order: each output by its id
    results = decode_examples(model, [examples[i] for i in (2, 0, 3, 1)], batch_size=3, max_new_tokens=400)
    assert [r["id"] for r in results] == ["u1", "u2", "u3", "u4"]
    # what the model learnt to write: the targets, or with native thinking the template's rendering of them
    assert {r["id"]: r["output"] for r in results} == {e.id: model.formatter.target_text(e.prompt, e.target)
                                                       for e in examples}
    if mode == "hybrid_native":
        starts = ("<think>\nI hear", "<think>\n\n</think>\n\n{")  # /think rows u1, u3; /no_think rows u2, u4
        assert all(r["output"].startswith(starts[k % 2]) for k, r in enumerate(results))
    scores = score_corpus({e.id: e.slots for e in examples}, {r["id"]: (r["slots"], r["parseable"]) for r in results})
    assert scores["partial"]["f1"] == 1.0 and scores["exact"]["f1"] == 1.0
    assert (tmp_path / "exp" / "model" / "speechllm.yaml").exists() and (tmp_path / "exp" / "loss.png").exists()
