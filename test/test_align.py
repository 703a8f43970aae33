"""The CTC alignment phase: greedy CTC decoding, and an adapter that learns to emit token embeddings."""

import dataclasses
import json
import re

import kaldiio
import numpy as np
import pytest
import torch

from conftest import make_tiny_speechllm
from speechllm.align import AdapterAligner, CTCObjective, alignment_data, greedy_ctc, values_heard
from speechllm.data import load_feats, read_examples
from speechllm.model.ctc_head import CTCEmbeddingHead, token_vocab
from speechllm.novelty import SeenText
from speechllm.train_config import AlignConfig, TrainConfig

WORDS = "pay thirty dollars monthly raise limit five thousand name maria garcia card".split()


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    # frames: a a blank a b b blank -> ids (shifted back by one): a-1, a-1, b-1
    frames = [2, 2, 0, 2, 3, 3, 0]
    logits = torch.nn.functional.one_hot(torch.tensor([frames]), 5).float()
    assert greedy_ctc(logits, torch.tensor([7])) == [[1, 1, 2]]
    assert greedy_ctc(logits, torch.tensor([3])) == [[1]]


def test_values_heard_counts_filled_values_found_as_whole_words():
    from speechllm.data import Example

    def turn(slots):
        return Example("u", "u", None, "<audio>", "{}", slots, "regular", "")

    examples = [turn({"customer_name": "Lucas Campbell", "card_type": "None"}),
                turn({"transfer_amount": "$200", "payment_date": "the 21st of May"}),
                turn({})]
    hyps = ["thanks again lucas campbell.", "I need to transfer $2000, on the 21st of May", "hello"]
    # "$200" is not heard in "$2000"; "None" values do not count
    assert values_heard(examples, hyps) == {"values_heard": 2, "values": 3, "novel_heard": 0, "novel_values": 0}
    # novel turns: none of their values in a training text (the first turn's name was seen)
    seen = SeenText(["my name is lucas campbell", "I paid 200 dollars"])
    assert values_heard(examples, hyps, seen) == {"values_heard": 2, "values": 3, "novel_heard": 0,
                                                  "novel_values": 0}
    seen = SeenText(["my name is lucas campbell", "I paid 300 dollars"])
    assert values_heard(examples, hyps, seen) == {"values_heard": 2, "values": 3, "novel_heard": 1,
                                                  "novel_values": 2}


def test_ctc_classes_are_the_tokens_of_the_training_transcripts(tmp_path):
    model, _, _ = make_tiny_speechllm(tmp_path, [" ".join(WORDS)] * 50)
    tokens = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    embeddings = model.llm.get_input_embeddings().weight
    texts = ["pay thirty dollars", "raise limit"]
    vocab = sorted(set(tokens(texts[0]) + tokens(texts[1])))
    head = CTCEmbeddingHead(embeddings, token_vocab(model.tokenizer, texts))
    aligner = AdapterAligner(model.adapter, head, model.tokenizer)
    assert aligner.vocab.tolist() == vocab and len(vocab) < len(embeddings)
    # class 0 is the blank, class i the frozen embedding row of token vocab[i - 1]
    assert torch.equal(aligner.head.embeddings, embeddings.detach().float()[vocab])
    assert aligner.head(torch.zeros(1, 3, embeddings.shape[1])).shape == (1, 3, len(vocab) + 1)
    assert aligner._targets(texts[1]).tolist() == [vocab.index(t) + 1 for t in tokens(texts[1])]
    assert not set(tokens("maria garcia card")) <= set(vocab)
    with pytest.raises(ValueError, match="outside the CTC vocabulary"):
        aligner._targets("maria garcia card")
    full = AdapterAligner(model.adapter, CTCEmbeddingHead(embeddings, torch.arange(len(embeddings))), model.tokenizer)
    assert full._targets("maria garcia card").tolist() == [t + 1 for t in tokens("maria garcia card")]


def test_collapse_keeps_one_token_space_vector_per_emitted_token():
    table = torch.eye(4) * 3.0  # four "embedding rows"
    head = CTCEmbeddingHead(table, torch.tensor([1, 3]))  # classes: blank, token 1, token 3
    with torch.no_grad():
        head.blank.copy_(torch.tensor([[0.0, 0.0, 3.0, 0.0]]))
        head.log_scale.zero_()  # logits 9 for the frame's own row, 0 for the others
    blank, t1, t3 = torch.tensor([0.0, 0, 3, 0]), table[1], table[3]
    frames = torch.stack([blank, t1, t1, blank, t1, t3, t3, blank]).requires_grad_()
    out = head.collapse(frames)
    # runs: t1 t1 | t1 | t3 t3 -> three vectors, each close to its token's embedding row
    assert out.shape == (3, 4)
    assert torch.allclose(out, torch.stack([t1, t1, t3]), atol=1e-3)
    out.sum().backward()
    assert frames.grad.abs().sum() > 0  # the adapter keeps learning through the mix
    assert head.collapse(torch.stack([blank, blank])).shape == (0, 4)


def test_align_vocab_config_is_checked(tmp_path):
    from speechllm.config import load_yaml_dataclass
    from speechllm.io_utils import InputError
    
    path = tmp_path / "train.yaml"
    path.write_text("align:\n  steps: 10\n  vocab: all\n")
    with pytest.raises(InputError, match=rf"{path}: align: vocab must be 'transcripts' or 'full', not 'all'"):
        load_yaml_dataclass(path, TrainConfig)


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0.0, [1.0, 1.0, 1.0, 1.0]),
    ("cosine", 0.0, [1.0, 0.8536, 0.5, 0.1464]),  # half a cosine from the full rate to 0 over 4 steps
    ("cosine", 0.5, [0.0, 0.5, 1.0, 0.5]),  # 2 steps of linear warmup, then the cosine over the other 2
])
def test_the_alignment_learning_rate_follows_its_schedule(tmp_path, schedule, warmup, expected):
    from conftest import write_examples

    rows = [{"utt_id": f"u{i}", "prompt": "<audio>", "target": "{}", "slots": {}, "text": "pay thirty dollars"}
            for i in range(4)]
    examples = read_examples(write_examples(tmp_path, rows))
    model, _, _ = make_tiny_speechllm(tmp_path, ["pay thirty dollars"] * 20)
    head = CTCEmbeddingHead(model.llm.get_input_embeddings().weight, token_vocab(model.tokenizer, ["pay thirty dollars"]))
    aligner = AdapterAligner(model.adapter, head, model.tokenizer, lr=1e-3, batch_size=2, schedule=schedule,
                             warmup_ratio=warmup)
    history = aligner.run(examples, {}, SeenText([]), steps=4, outdir=tmp_path / "align", eval_every=1)
    assert [round(h["lr"] / 1e-3, 4) for h in history] == expected
    logged = [json.loads(line)["lr"] for line in (tmp_path / "align" / "align_log.jsonl").read_text().splitlines()]
    assert logged == [h["lr"] for h in history]


@pytest.mark.parametrize("block, message", [
    ("schedule: linear", "align: schedule must be one of ('constant', 'cosine'), not 'linear'"),
    ("warmup_ratio: 1.0", "align: warmup_ratio must be in [0, 1), not 1.0"),
])
def test_align_schedule_config_is_checked(tmp_path, block, message):
    from speechllm.config import load_yaml_dataclass
    from speechllm.io_utils import InputError

    path = tmp_path / "train.yaml"
    path.write_text(f"align:\n  steps: 10\n  {block}\n")
    with pytest.raises(InputError, match=re.escape(f"{path}: {message}")):
        load_yaml_dataclass(path, TrainConfig)


def _utterances(tokenizer, n: int, feat_dim: int, seed: int = 0):
    """Synthetic 'speech': each token is a fixed random pattern held for 8 frames (2 adapter outputs)."""
    rng = np.random.default_rng(seed)
    patterns = {}
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for t in ids:
            patterns.setdefault(t, rng.standard_normal(feat_dim).astype(np.float32))
        feats = np.concatenate([np.repeat(patterns[t][None], 8, 0) for t in ids])
        rows.append({"utt_id": f"u{i:03d}", "prompt": "<audio>", "target": "{}", "slots": {}, "text": text,
                     "feats_array": feats + 0.05 * rng.standard_normal(feats.shape).astype(np.float32)})
    return rows


@pytest.mark.slow
def test_ctc_alignment_learns_to_transcribe(tmp_path):
    texts = [" ".join(WORDS)] * 50
    model, _, _ = make_tiny_speechllm(tmp_path, texts, adapter_hidden=64)
    rows = _utterances(model.tokenizer, 48, 16)
    with kaldiio.WriteHelper(f"ark,scp:{tmp_path}/a.ark,{tmp_path}/a.scp") as w:
        for r in rows:
            w(r["utt_id"], r.pop("feats_array"))
    scp = dict(line.split(" ", 1) for line in (tmp_path / "a.scp").read_text().splitlines())
    with open(tmp_path / "ex.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"id": r["utt_id"], **r, "feats": scp[r["utt_id"]]}) + "\n")
    examples = read_examples(tmp_path / "ex.jsonl")
    embeddings = model.llm.get_input_embeddings().weight
    frozen = embeddings.detach().clone()
    head = CTCEmbeddingHead(embeddings, token_vocab(model.tokenizer, [e.text for e in examples]))
    aligner = AdapterAligner(model.adapter, head, model.tokenizer, lr=3e-3, batch_size=16)
    assert len(aligner.vocab) < len(embeddings)
    wer_before, _ = aligner.wer(examples[:16])
    history = aligner.run(examples, {"valid": examples[:16]}, SeenText([]), steps=300, outdir=tmp_path / "align",
                          eval_every=100)
    assert wer_before > 0.8
    assert history[-1]["valid_wer"] < 0.2, history
    assert history[-1]["ctc_loss"] < history[0]["ctc_loss"]
    assert torch.equal(model.llm.get_input_embeddings().weight, frozen)  # the LLM stays frozen
    assert (tmp_path / "align" / "align_log.jsonl").exists() and (tmp_path / "align" / "align_curve.png").exists()
    # the collapsed output of an aligned turn is its transcript, read off the nearest embedding rows
    exact = 0
    for e in examples[:16]:
        feats = load_feats(e).unsqueeze(0)
        with torch.no_grad():
            hidden, lengths = model.adapter(feats, torch.tensor([feats.shape[1]]))
            vectors = head.collapse(hidden[0, : lengths[0]])
        nearest = torch.cdist(vectors, head.embeddings).argmin(-1)
        exact += head.vocab[nearest].tolist() == model.tokenizer(e.text, add_special_tokens=False)["input_ids"]
    assert exact >= 12, exact


class Killed(Exception):
    pass


def test_trainer_runs_the_alignment_phase_once(tmp_path, monkeypatch):
    """A run killed after the alignment phase, before its first checkpoint, starts again at step 0: the
    phase is reloaded from align/, not repeated, and slot filling starts from the aligned adapter."""
    from conftest import write_examples
    from speechllm.decode import decode_examples
    from speechllm.metrics import score_corpus
    from speechllm.model.builder import build_speechllm
    from speechllm.data import tokenized
    from speechllm.train import Trainer

    rows = [{"utt_id": f"u{i}", "prompt": "<audio>\nFind slots.", "target": "{}", "slots": {},
             "text": "pay thirty dollars"} for i in range(4)]
    jsonl = write_examples(tmp_path, rows)
    torch.manual_seed(0)
    model, spec, base = make_tiny_speechllm(tmp_path, ["pay thirty dollars <audio> Find slots. {}"] * 20)
    fresh_adapter = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    cfg = TrainConfig(batch_size=2, grad_accum=1, max_steps=2, align=AlignConfig(steps=6, batch_size=2, eval_every=3),
                      save_every=100, eval_every=2, eval_max_examples=2, eval_max_new_tokens=4)
    exp = tmp_path / "exp"
    aligner_runs, adapter_at_first_step = [], []
    align_run, train_step = AdapterAligner.run, Trainer.train_step

    def counted_run(self, *args, **kwargs):
        aligner_runs.append(len(aligner_runs) + 1)
        return align_run(self, *args, **kwargs)

    def killed(self, group, micro):
        raise Killed

    def recorded(self, group, micro):
        if self.step == 0:
            adapter_at_first_step.append({k: v.clone() for k, v in self.model.adapter.state_dict().items()})
        return train_step(self, group, micro)

    monkeypatch.setattr(AdapterAligner, "run", counted_run)
    monkeypatch.setattr(Trainer, "train_step", killed)
    data = tokenized(model, jsonl, exp / "tokens")
    with pytest.raises(Killed):
        Trainer(model, spec, cfg, data, data, exp, base, alignment=alignment_data(exp / "align", data, data)).train()
    assert aligner_runs == [1] and not list((exp / "checkpoints").glob("step_*"))
    log_lines = (exp / "align" / "align_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_lines] == [3, 6]
    assert json.loads(log_lines[-1])["valid_values"] == 0  # these turns have no slot values
    hyp_lines = (exp / "align" / "valid_hyp_step6.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in hyp_lines] == [[f"u{i}", "pay thirty dollars"] for i in range(4)]
    aligned = torch.load(exp / "align" / "adapter.pt")
    assert set(aligned) == set(model.adapter.state_dict())
    assert any(not torch.equal(aligned[k], fresh_adapter[k]) for k in aligned)
    written = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (exp / "align").iterdir()
               if p.name != ".lock"}  # the lock names whoever holds the dir last

    # a new process: a fresh model, the same experiment dir
    torch.manual_seed(0)
    model = build_speechllm(spec, base)
    assert all(torch.equal(v, fresh_adapter[k]) for k, v in model.adapter.state_dict().items())
    monkeypatch.setattr(Trainer, "train_step", recorded)
    data = tokenized(model, jsonl, exp / "tokens")
    Trainer(model, spec, cfg, data, data, exp, base, alignment=alignment_data(exp / "align", data, data)).train()
    assert aligner_runs == [1]  # not repeated
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (exp / "align").iterdir()
            if p.name != ".lock"} == written
    (first,) = adapter_at_first_step
    for k in aligned:  # reloaded
        torch.testing.assert_close(first[k], aligned[k], rtol=0, atol=0, msg=k)

    # the learning-curve point at step 2 (the last) is the final model's dev scores, decoded and scored here
    (point,) = [json.loads(line) for line in (exp / "curve.jsonl").read_text().splitlines()]
    dev = read_examples(jsonl)[:2]
    model.eval()
    results = decode_examples(model, dev, batch_size=2, max_new_tokens=4)
    scores = score_corpus({e.id: e.slots for e in dev}, {r["id"]: (r["slots"], r["parseable"]) for r in results})
    assert point["train_s"] > 0 and {k: v for k, v in point.items() if k != "train_s"} == {
        "step": 2, "dev_partial_f1": scores["partial"]["f1"], "dev_exact_f1": scores["exact"]["f1"],
        "dev_unparseable": scores["n_unparseable"], "dev_example": results[0]["output"]}


def test_ctc_tokens_model_trains_saves_and_reloads(tmp_path):
    from conftest import tiny_llm_dict, write_examples
    from speechllm.model.builder import load_model
    from speechllm.model.speechllm import ModelInput
    from speechllm.train import build_and_train

    rows = [{"utt_id": f"u{i}", "prompt": "<audio>\nFind slots.", "target": "{}", "slots": {},
             "text": "pay thirty dollars"} for i in range(4)]
    jsonl = write_examples(tmp_path, rows)
    examples = read_examples(jsonl)
    cfg = TrainConfig(batch_size=2, grad_accum=1, max_steps=2, align=AlignConfig(steps=4, batch_size=2, eval_every=4),
                      save_every=100, audio_input="ctc_tokens")
    model = build_and_train(tiny_llm_dict(), cfg, jsonl, jsonl, tmp_path / "exp", mode="regular")
    spoken = model.tokenizer("pay thirty dollars", add_special_tokens=False)["input_ids"]
    assert model.ctc_head.vocab.tolist() == sorted(set(spoken))
    aligned_head = torch.load(tmp_path / "exp" / "align" / "ctc_head.pt")
    # slot filling trained it on through the mix (the scale; the blank only picks frames, without gradient)
    assert not torch.equal(aligned_head["log_scale"], model.ctc_head.log_scale.detach())
    loaded = load_model(tmp_path / "exp" / "model")
    assert loaded.ctc_head is not None and torch.equal(loaded.ctc_head.log_scale, model.ctc_head.log_scale)
    items = [ModelInput(load_feats(e), *model.formatter.tokenize(e.prompt, audio=True)) for e in examples[:2]]
    model.eval()
    assert [len(a) for a in loaded.audio_embeddings(items)] == [len(a) for a in model.audio_embeddings(items)]
    assert loaded.generate(items, max_new_tokens=5) == model.generate(items, max_new_tokens=5)


def test_ctc_objective_is_the_per_token_mean_and_all_blank_for_an_empty_transcript(tmp_path):
    texts = ["pay thirty dollars", "maria garcia"]
    model, _, _ = make_tiny_speechllm(tmp_path, texts * 10)
    head = CTCEmbeddingHead(model.llm.get_input_embeddings().weight, token_vocab(model.tokenizer, texts))
    objective = CTCObjective(model.adapter, head, model.tokenizer)
    feats = [torch.randn(24, 16), torch.randn(16, 16)]
    logits, lengths = objective.logits(feats)
    targets = [objective._targets(t) for t in texts]
    reference = torch.nn.functional.ctc_loss(logits.log_softmax(-1).transpose(0, 1), torch.cat(targets), lengths,
                                             torch.tensor([len(t) for t in targets]), zero_infinity=True)
    assert torch.allclose(objective.loss(feats, texts), reference)
    # an empty transcript is scored as all blank (a finite loss), not divided by zero
    empty = objective.loss(feats[:1], [""])
    blank_only = -logits[0, : lengths[0]].log_softmax(-1)[:, 0].sum()
    assert torch.isfinite(empty) and torch.allclose(empty, blank_only)


def _ctc_weight_run(tmp_path, base, spec, jsonl, weight: float):
    from speechllm.model.builder import build_speechllm
    from speechllm.align import new_ctc_head
    from speechllm.checkpoint import set_seed
    from speechllm.data import tokenized
    from speechllm.train import Trainer

    cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=8, lr=0.0, adapter_lr=2e-2, warmup_ratio=0.0,
                      align=AlignConfig(steps=2, batch_size=2, eval_every=2), save_every=100, log_every=2,
                      audio_input="ctc_tokens", ctc_weight=weight)
    set_seed(cfg.seed)
    model = build_speechllm(spec, base)
    examples = read_examples(jsonl)
    model.ctc_head = new_ctc_head(model, cfg.align.vocab, [e.text for e in examples])
    train = tokenized(model, jsonl, tmp_path / "tokens" / "train")
    Trainer(model, spec, cfg, train, tokenized(model, jsonl, tmp_path / "tokens" / "valid", limit=2), tmp_path,
            base).train()
    objective = CTCObjective(model.adapter, model.ctc_head, model.tokenizer)
    with torch.no_grad():
        ctc = objective.loss([load_feats(e) for e in examples], [e.text for e in examples]).item()
    return ctc, [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]


def test_ctc_weight_keeps_training_the_alignment_during_slot_filling(tmp_path):
    from conftest import write_examples

    rows = [{"utt_id": f"u{i}", "prompt": "<audio>\nFind slots.", "target": "{}", "slots": {},
             "text": ["pay thirty dollars", "maria garcia card"][i % 2]} for i in range(8)]
    jsonl = write_examples(tmp_path, rows)
    _, spec, base = make_tiny_speechllm(tmp_path, [f"{r['text']} <audio> Find slots. {{}}" for r in rows] * 5)
    spec = dataclasses.replace(spec, audio_input="ctc_tokens")
    without, log_without = _ctc_weight_run(tmp_path / "w0", base, spec, jsonl, 0.0)
    with_ctc, log_with = _ctc_weight_run(tmp_path / "w1", base, spec, jsonl, 1.0)
    # both runs share the seed and the 2 alignment steps; only the auxiliary loss tells them apart
    assert with_ctc < 0.9 * without, (with_ctc, without)
    ctc_logged = [r["ctc_loss"] for r in log_with if "ctc_loss" in r]
    assert len(ctc_logged) == 4 and all(np.isfinite(ctc_logged))
    assert not any("ctc_loss" in r for r in log_without)


@pytest.mark.parametrize("text, message", [
    ("ctc_weight: -0.5\n", "ctc_weight must be >= 0, not -0.5"),
    ("align:\n  steps: 10\nctc_weight: 0.3\n", "ctc_weight .* needs audio_input: ctc_tokens"),
])
def test_ctc_weight_config_is_checked(tmp_path, text, message):
    from speechllm.config import load_yaml_dataclass
    from speechllm.io_utils import InputError
    
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"{path}: {message}"):
        load_yaml_dataclass(path, TrainConfig)


def test_ctc_tokens_needs_the_alignment_phase(tmp_path):
    from speechllm.config import load_yaml_dataclass
    from speechllm.io_utils import InputError
    
    path = tmp_path / "train.yaml"
    path.write_text("audio_input: ctc_tokens\n")
    with pytest.raises(InputError, match=rf"{path}: audio_input: ctc_tokens .* needs align.steps > 0"):
        load_yaml_dataclass(path, TrainConfig)
