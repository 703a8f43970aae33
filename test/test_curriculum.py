"""The text-first curriculum and what slot filling does with the aligned audio path: hard or mixed
CTC tokens, and an adapter and head frozen or trained on."""

import json

import pytest
import torch

from conftest import make_tiny_speechllm, tiny_llm_dict, write_examples
from speechllm.data import load_feats, read_examples
from speechllm.model.ctc_head import CTCEmbeddingHead
from speechllm.model.speechllm import ModelInput, SpeechLLM
from speechllm.train_config import AlignConfig, TrainConfig

TEXTS = ["pay thirty dollars", "maria garcia card"]


def _rows(n: int = 4) -> list[dict]:
    return [{"utt_id": f"u{i}", "prompt": "<audio>\nFind slots.", "target": "{}", "slots": {},
             "text": TEXTS[i % 2]} for i in range(n)]


def _config(**overrides) -> TrainConfig:
    settings = dict(batch_size=2, grad_accum=1, max_steps=4, log_every=1, save_every=100, warmup_ratio=0.0,
                    align=AlignConfig(steps=2, batch_size=2, eval_every=2), audio_input="ctc_tokens")
    return TrainConfig(**{**settings, **overrides})


def test_hard_collapse_reads_the_best_tokens_embedding_rows():
    table = torch.eye(4) * 3.0
    head = CTCEmbeddingHead(table, torch.tensor([1, 3]), collapse="hard")  # classes: blank, token 1, token 3
    with torch.no_grad():
        head.blank.copy_(torch.tensor([[0.0, 0.0, 3.0, 0.0]]))
        head.log_scale.zero_()
    blank, t1, t3 = torch.tensor([0.0, 0, 3, 0]), table[1], table[3]
    # frames near their rows, not on them: a mix would be off the rows, the hard tokens are the rows
    frames = torch.stack([blank, t1, t1, blank, t1, 0.6 * t3 + 0.4 * t1, t3, blank])
    assert torch.equal(head.collapse(frames), torch.stack([t1, t1, t3]))
    assert not torch.equal(CTCEmbeddingHead(table, torch.tensor([1, 3])).collapse(frames)[2], t3)
    assert head.collapse(torch.stack([blank, blank])).shape == (0, 4)
    with pytest.raises(ValueError, match="collapse must be one of"):
        CTCEmbeddingHead(table, torch.tensor([1, 3]), collapse="soft")


def test_a_transcript_read_in_place_of_the_audio_is_its_tokens_embeddings(tmp_path):
    model, _, _ = make_tiny_speechllm(tmp_path, [f"{t} <audio> Find slots. {{}}" for t in TEXTS] * 10)
    before, after = model.formatter.tokenize("<audio>\nFind slots.", audio=True)[:2]
    target = model.tokenizer("{}", add_special_tokens=False)["input_ids"]
    spoken = model.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    read = model.build_batch([ModelInput(None, before, after, target, spoken=spoken)])
    inline = model.build_batch([ModelInput(None, before + spoken, after, target)])
    for key in read:
        assert torch.equal(read[key], inline[key]), key


def _recorded_training(tmp_path, monkeypatch, cfg: TrainConfig, calls: list | None = None):
    """``build_and_train`` on four turns; every forward pass's inputs and adapter weights go to ``calls``."""
    from speechllm.train import build_and_train

    calls = [] if calls is None else calls
    forward = SpeechLLM.forward

    def recorded(self, items, num_items_in_batch=None):
        calls.append({"items": items, "adapter": {k: v.clone() for k, v in self.adapter.state_dict().items()},
                      "lora": {n: p.detach().clone() for n, p in self.llm.named_parameters() if p.requires_grad}})
        return forward(self, items, num_items_in_batch)

    monkeypatch.setattr(SpeechLLM, "forward", recorded)
    jsonl = write_examples(tmp_path, _rows())
    model = build_and_train(tiny_llm_dict(), cfg, jsonl, None, tmp_path / "exp", mode="regular")
    return model, jsonl, calls


def test_text_first_steps_read_transcripts_then_audio(tmp_path, monkeypatch):
    model, jsonl, calls = _recorded_training(tmp_path, monkeypatch, _config(text_first=0.5))
    tokens = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(calls) == 4
    # the two text steps are one epoch: every turn once, its transcript's tokens where its audio would be
    assert all(x.feats is None for call in calls[:2] for x in call["items"])
    assert sorted(x.spoken for call in calls[:2] for x in call["items"]) == sorted(
        tokens(e.text) for e in read_examples(jsonl))
    for call in calls[2:]:
        assert all(x.feats is not None and x.spoken is None for x in call["items"])
    aligned = torch.load(tmp_path / "exp" / "align" / "adapter.pt")
    for call in calls[:3]:  # no gradient reaches the adapter in the text steps
        assert all(torch.equal(call["adapter"][k], aligned[k]) for k in aligned)
    assert any(not torch.equal(calls[3]["adapter"][k], aligned[k]) for k in aligned)  # the first audio step does
    assert any(not torch.equal(calls[0]["lora"][n], calls[2]["lora"][n]) for n in calls[0]["lora"])  # LoRA learns
    log = [json.loads(line) for line in (tmp_path / "exp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["input"] for r in log if "loss" in r] == ["text", "text", "audio", "audio"]
    assert [r["text_steps"] for r in log if "text_steps" in r] == [2]


def test_hard_tokens_leave_the_audio_path_as_aligned_and_decoding_rebuilds_them(tmp_path, monkeypatch):
    from speechllm.model.builder import load_model

    model, jsonl, _ = _recorded_training(tmp_path, monkeypatch, _config(ctc_collapse="hard", max_steps=2))
    aligned = torch.load(tmp_path / "exp" / "align" / "adapter.pt")
    assert all(torch.equal(model.adapter.state_dict()[k], v) for k, v in aligned.items())
    assert not any(p.requires_grad for p in [*model.adapter.parameters(), *model.ctc_head.parameters()])
    loaded = load_model(tmp_path / "exp" / "model")
    assert loaded.ctc_head.hard and model.ctc_head.hard
    examples = read_examples(jsonl)[:2]
    items = [ModelInput(load_feats(e), *model.formatter.tokenize(e.prompt, audio=True)) for e in examples]
    model.eval()
    for a, b in zip(loaded.audio_embeddings(items), model.audio_embeddings(items)):
        assert torch.equal(a, b)


def test_freeze_audio_trains_lora_alone_and_checkpoints_the_aligned_audio_path(tmp_path, monkeypatch):
    from speechllm.checkpoint import latest_checkpoint, load_checkpoint

    model, _, calls = _recorded_training(tmp_path, monkeypatch, _config(freeze_audio=True, max_steps=2))
    exp = tmp_path / "exp"
    aligned, head = torch.load(exp / "align" / "adapter.pt"), torch.load(exp / "align" / "ctc_head.pt")
    for k, v in aligned.items():
        assert torch.equal(model.adapter.state_dict()[k], v), k
        assert torch.equal(torch.load(exp / "model" / "adapter.pt")[k], v), k
    for k in ("blank", "log_scale"):
        assert torch.equal(getattr(model.ctc_head, k).detach(), head[k]), k
    assert any(not torch.equal(p, calls[0]["lora"][n]) for n, p in model.llm.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in model.adapter.parameters())
    saved = load_checkpoint(latest_checkpoint(exp))["trainable"]
    assert {f"adapter.{k}" for k in aligned} | {"ctc_head.blank", "ctc_head.log_scale"} <= set(saved)


@pytest.mark.parametrize("text, message", [
    ("freeze_audio: true\n", "freeze_audio .* needs align.steps > 0"),
    ("align:\n  steps: 4\naudio_input: ctc_tokens\nfreeze_audio: true\nctc_weight: 0.5\n",
     "freeze_audio .* ctc_weight would train nothing"),
    ("align:\n  steps: 4\naudio_input: ctc_tokens\nctc_collapse: argmax\n", "ctc_collapse must be one of"),
    ("text_first: -0.1\n", "text_first must be at least 0 and below 1 .*, not -0.1"),
    ("text_first: 1.0\n", "text_first must be at least 0 and below 1 \\(some steps must read audio\\), not 1.0"),
])
def test_curriculum_config_is_checked(tmp_path, text, message):
    from speechllm.config import load_yaml_dataclass
    from speechllm.io_utils import InputError

    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"{path}: {message}"):
        load_yaml_dataclass(path, TrainConfig)


def test_text_first_ends_at_its_share_of_the_minutes_when_they_run_out_before_the_steps(tmp_path, monkeypatch):
    """A time budget: 10 s per step (a fake clock), 1 minute, 20 steps planned: half the minutes is spent
    after step 4, long before half the steps, and the minute after step 7."""
    from speechllm.budget import Budget

    calls = []
    monkeypatch.setattr(Budget, "train_seconds", lambda self: 10.0 * len(calls))
    _, _, recorded = _recorded_training(tmp_path, monkeypatch, _config(text_first=0.5, max_steps=20, max_minutes=1),
                                        calls)
    assert [all(x.feats is None for x in c["items"]) for c in recorded] == [True] * 4 + [False] * 3
    log = [json.loads(line) for line in (tmp_path / "exp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["text_steps"] for r in log if "text_steps" in r] == [4]


def test_a_resumed_run_keeps_the_step_audio_started_at(tmp_path, monkeypatch):
    """Killed after step 3 (audio from step 3 on), resumed: step 4 reads audio, the switch logged once."""
    from speechllm.train import Trainer

    class Killed(Exception):
        pass

    step = Trainer.train_step

    def dies_at_step_4(self, group, micro):
        if self.step == 3:
            raise Killed
        return step(self, group, micro)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_4)
    cfg = _config(text_first=0.5, save_every=1)
    with pytest.raises(Killed):
        _recorded_training(tmp_path, monkeypatch, cfg)
    monkeypatch.setattr(Trainer, "train_step", step)
    _, _, calls = _recorded_training(tmp_path, monkeypatch, cfg)
    assert len(calls) == 1 and all(x.feats is not None for x in calls[0]["items"])
    log = [json.loads(line) for line in (tmp_path / "exp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["text_steps"] for r in log if "text_steps" in r] == [2]
    assert [r["input"] for r in log if "loss" in r] == ["text", "text", "audio", "audio"]


def test_text_first_must_leave_audio_steps(tmp_path):
    from speechllm.train import build_and_train

    jsonl = write_examples(tmp_path, _rows())
    with pytest.raises(ValueError, match="text_first 0.9 of 4 steps leaves no step to read audio"):
        build_and_train(tiny_llm_dict(), _config(text_first=0.9), jsonl, None, tmp_path / "exp", mode="regular")
