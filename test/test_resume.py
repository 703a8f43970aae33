"""A run killed after a checkpoint, or stopped before a job's time limit, and started again ends with the
same weights as an uninterrupted run."""

import time

import pytest
import torch

from conftest import make_tiny_speechllm, write_examples
from speechllm.budget import TimeLimit
from speechllm.data import tokenized
from speechllm.train import Trainer
from speechllm.train_config import TrainConfig

ROWS = [{"utt_id": f"u{i}", "prompt": "<audio>\nFind the slots.", "target": '{"amount": "%d dollars"}' % (10 * i),
         "text": f"{10 * i} dollars", "slots": {"amount": f"{10 * i} dollars"}, "n_frames_to_make": 20 + 4 * i}
        for i in range(12)]


class Killed(Exception):
    pass


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def fresh_trainer(tmp_path, outdir, num_workers=0):
    jsonl = write_examples(tmp_path, [dict(r) for r in ROWS])
    torch.manual_seed(0)
    model, spec, base = make_tiny_speechllm(tmp_path / outdir, [t for r in ROWS for t in (r["prompt"], r["target"])])
    cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=9, lr=2e-3, warmup_ratio=0.2, adapter_hidden=32,
                      log_every=1, save_every=4, seed=5, num_workers=num_workers)
    exp = tmp_path / outdir / "exp"
    return Trainer(model, spec, cfg, tokenized(model, jsonl, exp / "tokens"), None, exp, base)


def check_resumes_from(trainer: Trainer, root, name: str, steps: list[int], monkeypatch) -> None:
    """Train ``trainer``; check that it took exactly ``steps`` (``Trainer.step`` before each) and that its first
    step started from the trainable weights of checkpoint ``name`` (which differ from its fresh ones)."""
    saved = torch.load(root / "exp" / "checkpoints" / name / "state.pt", weights_only=False)["trainable"]
    fresh, at_first_step, steps_taken = trainable(trainer), {}, []
    step = Trainer.train_step

    def counted(self, group, micro):
        if not steps_taken:
            at_first_step.update(trainable(self))
        steps_taken.append(self.step)
        return step(self, group, micro)

    monkeypatch.setattr(Trainer, "train_step", counted)
    trainer.train()
    monkeypatch.setattr(Trainer, "train_step", step)
    assert steps_taken == steps
    assert at_first_step.keys() == saved.keys() == fresh.keys()
    assert any(not torch.equal(saved[n], fresh[n]) for n in saved)
    for n in saved:
        torch.testing.assert_close(at_first_step[n], saved[n], rtol=0, atol=0, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])  # features read in the step, or by DataLoader processes
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, num_workers):
    whole = fresh_trainer(tmp_path, "whole")
    whole.train()

    killed = fresh_trainer(tmp_path, "resumed", num_workers)
    step = Trainer.train_step

    def dies_at_step_7(self, group, micro):
        if self.step == 6:  # after the checkpoint of step 4, in the second epoch (3 steps per epoch)
            raise Killed
        return step(self, group, micro)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_7)
    with pytest.raises(Killed):
        killed.train()
    monkeypatch.setattr(Trainer, "train_step", step)
    assert [p.name for p in (tmp_path / "resumed" / "exp" / "checkpoints").iterdir()] == ["step_0000004"]

    resumed = fresh_trainer(tmp_path, "resumed", num_workers)  # a new process: fresh model, same experiment dir
    # the checkpoint is loaded (not a fresh start that ends equal anyway: training is deterministic), and
    # only the steps after it run: 9 - 4 of them
    check_resumes_from(resumed, tmp_path / "resumed", "step_0000004", [4, 5, 6, 7, 8], monkeypatch)
    assert resumed.step == whole.step == 9
    a, b = trainable(whole), trainable(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert any((a[n] - trainable(killed)[n]).abs().max() > 1e-4 for n in a)  # the kill did cost steps


@pytest.mark.slow
def test_a_run_stopped_for_the_time_limit_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    whole = fresh_trainer(tmp_path, "whole")
    whole.train()

    stopped = fresh_trainer(tmp_path, "stopped")
    stopped.stop_at = float("inf")
    step = Trainer.train_step

    def job_ends_after_step_6(self, group, micro):
        out = step(self, group, micro)
        if self.step == 5:  # the step being taken is the 6th
            self.stop_at = time.time()
        return out

    monkeypatch.setattr(Trainer, "train_step", job_ends_after_step_6)
    with pytest.raises(TimeLimit):
        stopped.train()
    monkeypatch.setattr(Trainer, "train_step", step)
    checkpoints = sorted(p.name for p in (tmp_path / "stopped" / "exp" / "checkpoints").iterdir())
    assert checkpoints == ["step_0000004", "step_0000006"]  # saved at the stop, not at a save_every multiple
    assert not (tmp_path / "stopped" / "exp" / "model").exists()

    resumed = fresh_trainer(tmp_path, "stopped")
    check_resumes_from(resumed, tmp_path / "stopped", "step_0000006", [6, 7, 8], monkeypatch)
    a, b = trainable(whole), trainable(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_jobs_that_never_get_to_a_step_are_not_run_again_forever(tmp_path):
    first = fresh_trainer(tmp_path, "idle")
    first.stop_at, first.resume_flag = 0.0, tmp_path / "resume.flag"
    with pytest.raises(TimeLimit):  # one job may spend its time before the first step (tokenising, say)
        first.train()
    assert first.resume_flag.exists()
    second = fresh_trainer(tmp_path, "idle")
    second.stop_at = 0.0
    with pytest.raises(RuntimeError, match="two jobs in a row reached their time limit before a training step"):
        second.train()


def test_a_checkpoint_of_another_global_batch_is_refused(tmp_path):
    fresh_trainer(tmp_path, "run").train()
    other = fresh_trainer(tmp_path, "run")
    other.global_batch *= 2  # as with twice the processes
    with pytest.raises(RuntimeError, match="global batch 2 x accumulation 2, this run has 4 x 2"):
        other.train()
