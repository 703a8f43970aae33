"""Stage 4: features read batch by batch, outputs cut off by the token cap, the cap from the model dir, and
the truncation count of stage 5."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
import yaml

import speechllm.decode
from conftest import make_tiny_speechllm, write_examples
from speechllm.bin import decode as decode_bin
from speechllm.bin import score as score_bin
from speechllm.data import load_feats, read_examples
from speechllm.decode import CAP_MARGIN, CAP_SCALE, decode_examples, new_token_cap
from speechllm.model.builder import SPEC_FILE, ModelSpec, save_model
from speechllm.model.speechllm import ModelInput, SpeechLLM
from speechllm.parsing import parse_slots

TEXTS = ["Find slot values for payment_amount in the current audio. Format the output as JSON.",
         '{"payment_amount": "$30", "new_limit": "None"}', "I pay thirty dollars a month."] * 20
PROMPTS = ["<audio>\nFind slot values for payment_amount.", "<audio>\nFind all slot values.",
           "Context:\n- I pay thirty dollars a month.\n<audio>\nFind slot values for new_limit."]
FRAMES = [40, 9, 23, 61, 12, 33, 17]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model, its spec and base weights, and its examples (the last one text only)."""
    tmp = tmp_path_factory.mktemp("decode")
    model, spec, base = make_tiny_speechllm(tmp, TEXTS)
    rows = [{"utt_id": f"u{i}", "prompt": PROMPTS[i % len(PROMPTS)], "target": "{}", "slots": {"new_limit": "30"},
             "n_frames": n, "n_frames_to_make": n} for i, n in enumerate(FRAMES)]
    jsonl = write_examples(tmp, rows)
    examples = read_examples(jsonl)
    examples[-1] = dataclasses.replace(examples[-1], feats_path=None, n_frames=0, prompt="Find all slot values in: I pay.")
    return model.eval(), spec, base, examples, jsonl


class StandInEOS:
    """The model's tokenizer with another token as EOS (and as padding): a random model seldom emits its EOS."""

    def __init__(self, tokenizer, eos: int, pad_too: bool = False) -> None:
        self._tokenizer, self.eos_token_id = tokenizer, eos
        self.pad_token_id = eos if pad_too else tokenizer.pad_token_id

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def _item(model: SpeechLLM, example) -> ModelInput:
    return ModelInput(load_feats(example), *model.formatter.tokenize(example.prompt, audio=example.feats_path is not None))


def _first_token(model: SpeechLLM, item: ModelInput) -> int:
    """The greedy first response token, by a plain forward pass of the unpadded prompt."""
    batch = model.build_batch([item])
    with torch.no_grad():
        return int(model.llm(inputs_embeds=batch["inputs_embeds"]).logits[0, -1].argmax())


def test_features_are_read_batch_by_batch_just_before_generation(tiny, monkeypatch):
    model, _, _, examples, _ = tiny
    events = []

    def load(example):
        events.append(("load", example.id))
        return load_feats(example)

    generate = SpeechLLM.generate

    def recorded_generate(self, items, *args):
        events.append(("generate", len(items)))
        return generate(self, items, *args)

    monkeypatch.setattr(speechllm.decode, "load_feats", load)
    monkeypatch.setattr(SpeechLLM, "generate", recorded_generate)
    batched = decode_examples(model, examples, batch_size=3, max_new_tokens=8)
    monkeypatch.undo()
    batches, loaded = [], []
    for kind, what in events:
        if kind == "load":
            loaded.append(what)
        else:  # exactly this batch's features were read, since the previous batch was generated
            assert len(loaded) == what <= 3
            batches.append(loaded)
            loaded = []
    assert not loaded and [len(b) for b in batches] == [3, 3, 1]
    length = {e.id: len(sum(model.formatter.tokenize(e.prompt, audio=e.feats_path is not None), [])) + e.n_frames
              for e in examples}
    order = sum(batches, [])
    assert sorted(order) == sorted(length) and [length[i] for i in order] == sorted(length.values())
    assert [r["id"] for r in batched] == sorted(length)
    alone = [decode_examples(model, [e], batch_size=1, max_new_tokens=8)[0] for e in examples]
    assert batched == sorted(alone, key=lambda r: r["id"])
    assert any(r["output"] for r in batched)


def test_every_result_holds_its_own_examples_output(tiny):
    """Mixed lengths over three batches, given in neither id nor length order: each result row holds the
    output of its own example, which is generated here alone and unpadded, by id."""
    model, _, _, examples, _ = tiny
    own = {e.id: model.generate([_item(model, e)], max_new_tokens=8)[0] for e in examples}
    assert len({g.text for g in own.values()}) == len(own)  # all different: any mix-up of rows shows
    given = [examples[i] for i in (4, 0, 6, 2, 5, 1, 3)]
    results = decode_examples(model, given, batch_size=3, max_new_tokens=8)
    assert [r["id"] for r in results] == sorted(own)
    for r in results:
        g, example = own[r["id"]], next(e for e in examples if e.id == r["id"])
        assert (r["output"], r["truncated"], r["utt_id"]) == (g.text, g.truncated, example.utt_id), r["id"]
        parsed = parse_slots(g.text)
        assert (r["slots"], r["parseable"]) == (parsed.slots, parsed.parseable), r["id"]


@pytest.mark.parametrize("eos", ["real", "first token of row 0", "first token of row 0, also padding"])
def test_a_one_token_cap_truncates_exactly_the_outputs_without_eos(tiny, monkeypatch, eos):
    model, _, _, examples, _ = tiny
    items = [_item(model, e) for e in examples]
    first = [_first_token(model, it) for it in items]
    if eos != "real":  # a stand-in EOS that row 0 emits at once, so some rows end and others are cut off
        monkeypatch.setattr(model, "tokenizer", StandInEOS(model.tokenizer, first[0], eos.endswith("padding")))
    generations = model.generate(items, max_new_tokens=1)
    assert [g.truncated for g in generations] == [t != model.tokenizer.eos_token_id for t in first]
    assert all(g.n_tokens == 1 for g in generations)
    assert all(g.text == "" for g in generations if not g.truncated)  # the EOS alone
    results = {r["id"]: r["truncated"] for r in decode_examples(model, examples, batch_size=4, max_new_tokens=1)}
    assert [results[e.id] for e in examples] == [g.truncated for g in generations]
    if eos != "real":
        assert not generations[0].truncated and any(g.truncated for g in generations)


def test_truncated_agrees_with_the_uncapped_length(tiny, monkeypatch):
    """At a cap of 4, an output is cut off exactly when, uncapped, it needs more than 4 tokens."""
    model, _, _, examples, _ = tiny
    items = [_item(model, e) for e in examples]
    # a stand-in EOS: the third token of row 0, which therefore ends within the cap
    batch = model.build_batch(items[:1])
    row0 = model.llm.generate(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                              max_new_tokens=3, min_new_tokens=3, do_sample=False)[0].tolist()
    monkeypatch.setattr(model, "tokenizer", StandInEOS(model.tokenizer, row0[2]))
    uncapped = [model.generate([it], max_new_tokens=12)[0] for it in items]
    capped = model.generate(items, max_new_tokens=4)
    for cut, full in zip(capped, uncapped):
        assert cut.truncated == (full.truncated or full.n_tokens > 4)
        assert cut.n_tokens == min(full.n_tokens, 4)
    assert {g.truncated for g in capped} == {True, False}


def test_the_cap_is_the_longest_training_target_with_a_margin():
    spec = ModelSpec(llm={}, feat_dim=16, max_target_tokens=100)
    assert (CAP_SCALE, CAP_MARGIN) == (1.25, 16)  # the margin that bin/decode.py and the docs state
    assert new_token_cap(spec) == 141
    assert new_token_cap(dataclasses.replace(spec, max_target_tokens=9)) == math.ceil(9 * 1.25) + 16 == 28
    with pytest.raises(ValueError, match="no max_target_tokens .* give --max_new_tokens explicitly"):
        new_token_cap(dataclasses.replace(spec, max_target_tokens=None))


def test_decode_job_takes_its_cap_from_the_model_dir(tiny, tmp_path, monkeypatch, caplog, capsys):
    model, spec, base, examples, jsonl = tiny
    monkeypatch.setattr(decode_bin, "setup_logging", lambda: None)  # keep pytest's log capture
    caplog.set_level("INFO")
    model_dir = tmp_path / "model"
    save_model(model, dataclasses.replace(spec, max_target_tokens=9), model_dir, base)
    args = ["--jsonl", str(jsonl), "--batch_size", "3", "--device", "cpu"]
    decode_bin.main(["--model_dir", str(model_dir), "--output", str(tmp_path / "hyp.jsonl"), *args])
    assert "cap of 28 new tokens: the longest training target (9 tokens)" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "hyp.jsonl").read_text().splitlines()]
    assert len(rows) == len(FRAMES) and all(isinstance(r["truncated"], bool) for r in rows)
    assert f"{sum(r['truncated'] for r in rows)} truncated at the cap of 28 new tokens" in caplog.text

    old_dir = tmp_path / "old_model"  # trained before the longest target was recorded
    shutil.copytree(model_dir, old_dir)
    data = yaml.safe_load((old_dir / SPEC_FILE).read_text())
    del data["max_target_tokens"]
    (old_dir / SPEC_FILE).write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit):
        decode_bin.main(["--model_dir", str(old_dir), "--output", str(tmp_path / "old.jsonl"), *args])
    assert "records no max_target_tokens" in capsys.readouterr().err
    caplog.clear()
    decode_bin.main(["--model_dir", str(old_dir), "--output", str(tmp_path / "old.jsonl"), *args,
                     "--max_new_tokens", "2"])  # an explicit cap needs no record
    assert "truncated at the cap of 2 new tokens" in caplog.text


def test_scores_count_truncated_and_loop_guarded_outputs(tiny, tmp_path, capsys):
    _, _, _, _, jsonl = tiny
    hyp = tmp_path / "hyp.jsonl"
    rows = [{"id": "u0", "slots": {}, "truncated": True, "stop": "cap"}, {"id": "u1", "slots": {}, "stop": "loop"},
            {"id": "u2", "slots": {}}, {"id": "u3", "slots": {}, "truncated": True},  # u2: an older hyp file's row
            {"id": "u4", "slots": {}, "stop": "answer"},
            {"id": "not_a_ref", "slots": {}, "truncated": True, "stop": "loop"}]  # no reference: ignored
    hyp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    score_bin.main(["--ref_jsonl", str(jsonl), "--hyp_jsonl", str(hyp), "--outdir", str(tmp_path / "score"),
                    "--allow_missing"])  # the model's other examples have no row here
    scores = json.loads((tmp_path / "score" / "scores.json").read_text())
    assert (scores["n_truncated"], scores["n_loop_guarded"]) == (2, 1)
    assert "truncated: 2 outputs" in (tmp_path / "score" / "result.txt").read_text()
    assert "loop-guarded: 1 outputs" in (tmp_path / "score" / "result.txt").read_text()
    assert "truncated: 2 outputs" in capsys.readouterr().out
    hyp.write_text("".join(json.dumps({**r, "truncated": False}) + "\n" for r in rows))
    score_bin.main(["--ref_jsonl", str(jsonl), "--hyp_jsonl", str(hyp), "--outdir", str(tmp_path / "score"),
                    "--allow_missing"])  # the model's other examples have no row here
    assert json.loads((tmp_path / "score" / "scores.json").read_text())["n_truncated"] == 0
    assert "truncated" not in (tmp_path / "score" / "result.txt").read_text()


def test_a_row_stopped_early_keeps_exactly_its_tokens(tiny, monkeypatch):
    """Rows stopped by the answer rule or the loop guard keep the tokens up to their stop (the stopping token
    included), a row at EOS drops the EOS, and the others run to the cap; every row's tokens are the ones
    it generates alone and unstopped."""
    from speechllm.stopping import RowStops

    model, _, _, examples, _ = tiny
    items = [_item(model, e) for e in examples[:4]]
    free = []
    for item in items:  # each row alone, never stopped before 6 tokens
        batch = model.build_batch([item])
        free.append(model.llm.generate(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=6, min_new_tokens=6, do_sample=False)[0].tolist())
    plan = {0: (3, "answer"), 1: (2, "loop"), 2: (4, "eos")}  # row: (step, reason); row 3 runs to the cap

    def planned(self, row):
        step, reason = plan.get(row, (None, None))
        return reason if len(self.ids[row]) == step else None

    monkeypatch.setattr(RowStops, "_reason", planned)
    generations = model.generate(items, max_new_tokens=6)
    assert [g.stop for g in generations] == ["answer", "loop", "eos", "cap"]
    assert [g.n_tokens for g in generations] == [3, 2, 4, 6]
    kept = [free[0][:3], free[1][:2], free[2][:3], free[3]]  # the EOS (here: the 4th token) is not text
    assert [g.text for g in generations] == [model.tokenizer.decode(k, skip_special_tokens=True).strip() for k in kept]
    assert [g.truncated for g in generations] == [False, False, False, True]
