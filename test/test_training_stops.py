"""Where training stops and what it leaves: ``keep_checkpoints`` prunes ``checkpoints/step_*`` to the
newest N (the final one among them), and ``max_minutes`` stops at the step whose training time passes
the limit, still saving the model, with evaluation time (``eval_every``) not counted as training.

Training time comes from :mod:`speechllm.budget`'s clock, replaced here by one that only moves when
the test says: each optimizer step takes 10 s, each learning-curve evaluation 1000 s.
"""

import json
import logging
from types import SimpleNamespace

import pytest

import speechllm.budget
from conftest import make_tiny_speechllm, write_examples
from speechllm.checkpoint import load_checkpoint
from speechllm.data import tokenized
from speechllm.evaluate import CurveEvaluator
from speechllm.train import Trainer
from speechllm.train_config import TrainConfig
from test_resume import ROWS

STEP_S, EVAL_S = 10.0, 1000.0


def tiny_trainer(tmp_path, valid=False, **cfg) -> Trainer:
    """12 rows, batch 2 x accumulation 2: 3 optimizer steps per epoch, 9 steps in all unless ``cfg`` says."""
    jsonl = write_examples(tmp_path, [dict(r) for r in ROWS])
    model, spec, base = make_tiny_speechllm(tmp_path / "model", [t for r in ROWS for t in (r["prompt"], r["target"])])
    cfg = TrainConfig(**{"batch_size": 2, "grad_accum": 2, "max_steps": 9, "lr": 2e-3, "adapter_hidden": 32,
                         "log_every": 1, "save_every": 4, "seed": 5, **cfg})
    exp = tmp_path / "exp"
    valid_set = tokenized(model, jsonl, exp / "tokens" / "valid") if valid else None
    return Trainer(model, spec, cfg, tokenized(model, jsonl, exp / "tokens" / "train"), valid_set, exp, base)


@pytest.fixture
def clock(monkeypatch):
    """Budget's clock: 10 s per optimizer step, 1000 s per learning-curve point, nothing else."""
    now = [1_000_000.0]
    monkeypatch.setattr(speechllm.budget, "time", SimpleNamespace(time=lambda: now[0]))
    train_step, evaluate = Trainer.train_step, CurveEvaluator.__call__

    def slow_step(self, group, micro):
        out = train_step(self, group, micro)
        now[0] += STEP_S
        return out

    def slow_evaluation(self, *args, **kwargs):
        point = evaluate(self, *args, **kwargs)
        now[0] += EVAL_S
        return point

    monkeypatch.setattr(Trainer, "train_step", slow_step)
    monkeypatch.setattr(CurveEvaluator, "__call__", slow_evaluation)
    return now


def checkpoints(trainer: Trainer) -> list[str]:
    return sorted(p.name for p in (trainer.outdir / "checkpoints").iterdir())


@pytest.mark.parametrize(("keep", "left"), [(1, [9]), (2, [8, 9]), (3, [6, 8, 9])])
def test_only_the_newest_checkpoints_are_kept(tmp_path, monkeypatch, keep, left):
    trainer = tiny_trainer(tmp_path, save_every=2, keep_checkpoints=keep)
    seen, save = [], Trainer.save_checkpoint

    def listing_after_save(self, *args, **kwargs):
        save(self, *args, **kwargs)
        seen.append((self.step, checkpoints(self)))

    monkeypatch.setattr(Trainer, "save_checkpoint", listing_after_save)
    trainer.train()
    # saves at steps 2, 4, 6, 8 (save_every) and 9 (the final one); each prunes to the newest `keep`
    saved = [2, 4, 6, 8, 9]
    assert seen == [(step, [f"step_{s:07d}" for s in saved[: i + 1][-keep:]]) for i, step in enumerate(saved)]
    assert checkpoints(trainer) == [f"step_{s:07d}" for s in left]
    assert load_checkpoint(trainer.outdir / "checkpoints" / "step_0000009")["position"]["step"] == 9
    assert (trainer.outdir / "model" / "speechllm.yaml").exists()


@pytest.mark.parametrize("eval_every", [0, 2], ids=["no evaluation", "evaluation every 2 steps"])
def test_max_minutes_stops_at_the_step_past_the_limit_and_saves_the_model(tmp_path, clock, caplog, eval_every):
    # 0.5 min = 30 s: steps end at 10, 20, 30 (not past it), 40 s of training: the 4th step is the last.
    # The evaluations after steps 2 and 4 take 1000 s each: counted as training, the run would stop at step 3.
    trainer = tiny_trainer(tmp_path, valid=bool(eval_every), max_minutes=0.5, eval_every=eval_every,
                           eval_max_examples=2, eval_max_new_tokens=4)
    caplog.set_level(logging.INFO)
    trainer.train()
    assert trainer.step == 4 and trainer.total_steps == 9
    assert "stopped after 0.7 min of training (max_minutes 0.5) at step 4 of 9" in caplog.text
    log = [json.loads(line) for line in (trainer.outdir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["elapsed_s"]) for r in log if "loss" in r] == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    assert checkpoints(trainer) == ["step_0000004"]  # save_every 4 and the final save, the same step
    assert (trainer.outdir / "model" / "speechllm.yaml").exists() and (trainer.outdir / "model" / "adapter.pt").exists()
    assert (trainer.outdir / "loss.png").exists()
    if eval_every:
        curve = [json.loads(line) for line in (trainer.outdir / "curve.jsonl").read_text().splitlines()]
        assert [(p["step"], p["train_s"]) for p in curve] == [(2, 20.0), (4, 40.0)]
        assert clock[0] == 1_000_000.0 + 4 * STEP_S + 2 * EVAL_S  # the evaluations did take their time
    else:
        assert not (trainer.outdir / "curve.jsonl").exists()


def test_a_stop_between_evaluations_still_evaluates_the_last_step(tmp_path, clock):
    # 0.45 min = 27 s: the 3rd step (30 s) passes it; eval_every 2 evaluates step 2, and step 3 as the last one
    trainer = tiny_trainer(tmp_path, valid=True, max_minutes=0.45, eval_every=2, eval_max_examples=2,
                           eval_max_new_tokens=4)
    trainer.train()
    assert trainer.step == 3
    curve = [json.loads(line) for line in (trainer.outdir / "curve.jsonl").read_text().splitlines()]
    assert [(p["step"], p["train_s"]) for p in curve] == [(2, 20.0), (3, 30.0)]
    assert checkpoints(trainer) == ["step_0000003"]
    assert (trainer.outdir / "model" / "speechllm.yaml").exists()
