"""DistributedDataParallel on CPU: 2 gloo processes with half the batch each end with the same trainable
weights (and log the same losses) as 1 process with the whole batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, tiny_llm_dict, write_examples

WORDS = "pay thirty dollars monthly raise my limit to five thousand dollars name is Maria Garcia please".split()


def make_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5)]
        rows.append({"utt_id": f"u{i:02d}", "prompt": "<audio>\nFind the slots. Output JSON.",
                     "target": json.dumps({"amount": " ".join(words[:2])}), "text": " ".join(words),
                     "slots": {"amount": " ".join(words[:2])}, "n_frames_to_make": 24 + 8 * (i % 6)})
    return rows


def train(tmp_path: Path, name: str, nproc: int, batch_size: int, jsonl: Path, env: dict | None = None,
          stops: bool = False, config: dict | None = None) -> Path:
    """Train into ``tmp_path/name`` (``config``: more training keys); ``stops``: the run must stop for the
    job's time limit (exit 75)."""
    outdir = tmp_path / name
    outdir.mkdir(exist_ok=True)
    llm = tiny_llm_dict(lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"})
    (outdir / "llm.yaml").write_text(yaml.safe_dump(llm))
    (outdir / "train.yaml").write_text(yaml.safe_dump({
        "batch_size": batch_size, "grad_accum": 2, "max_steps": 4, "lr": 1e-3, "warmup_ratio": 0.0,
        "adapter_hidden": 32, "log_every": 1, "save_every": 1000, "seed": 3, "eval_every": 2,
        "eval_max_examples": 4, "eval_max_new_tokens": 8, **(config or {})}))
    module = ["-m", "speechllm.bin.train", "--train_jsonl", str(jsonl), "--valid_jsonl", str(jsonl),
              "--llm_config", str(outdir / "llm.yaml"), "--train_config", str(outdir / "train.yaml"),
              "--outdir", str(outdir), "--device", "cpu"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launcher + module if nproc > 1 else [sys.executable] + module
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if stops:
        assert proc.returncode != 0 and "stopping at step 0 of 4 before the job's time limit" in proc.stderr
        assert "exitcode  : 75" in proc.stderr, proc.stderr[-4000:]  # every rank, as torchrun reports it
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return outdir


def trainable(outdir: Path) -> dict[str, torch.Tensor]:
    weights = {f"lora.{k}": v for k, v in load_file(outdir / "model" / "lora" / "adapter_model.safetensors").items()}
    weights.update({f"adapter.{k}": v for k, v in torch.load(outdir / "model" / "adapter.pt").items()})
    return weights


def losses(outdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (outdir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.ddp
@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_whole_batch(tmp_path):
    jsonl = write_examples(tmp_path, make_rows(16))
    single = train(tmp_path, "single_b4", nproc=1, batch_size=4, jsonl=jsonl)
    ddp = train(tmp_path, "ddp_2x2", nproc=2, batch_size=2, jsonl=jsonl)
    half = train(tmp_path, "single_b2", nproc=1, batch_size=2, jsonl=jsonl)  # not the same effective batch

    assert len(losses(single)) == len(losses(ddp)) == 4
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)
    assert max_diff(trainable(ddp), trainable(single)) < 1e-5
    # the comparison can fail: half the batch on one process trains to visibly different weights
    assert max_diff(trainable(half), trainable(single)) > 1e-3
    # rank 0 alone wrote the learning curve (one line per evaluation, not one per process)
    assert len((ddp / "curve.jsonl").read_text().splitlines()) == 2


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("config", [{"text_first": 0.5}, {"ctc_collapse": "hard"}], ids=["text_first", "hard"])
def test_two_processes_train_through_steps_that_leave_the_adapter_without_gradient(tmp_path, config):
    """Text-first steps never touch the adapter, and hard CTC tokens pass it no gradient: DDP must not
    wait for one."""
    jsonl = write_examples(tmp_path, make_rows(16))
    aligned = {"align": {"steps": 2, "batch_size": 4, "eval_every": 2}, "audio_input": "ctc_tokens", **config}
    ddp = train(tmp_path, "ddp", nproc=2, batch_size=2, jsonl=jsonl, config=aligned)
    assert len(losses(ddp)) == 4
    rows = [json.loads(line) for line in (ddp / "train_log.jsonl").read_text().splitlines()]
    assert [r["text_steps"] for r in rows if "text_steps" in r] == ([2] if "text_first" in config else [])


@pytest.mark.ddp
@pytest.mark.slow
def test_two_processes_stopped_for_the_time_limit_flag_the_job_and_resume(tmp_path):
    jsonl = write_examples(tmp_path, make_rows(16))
    whole = train(tmp_path, "whole", nproc=2, batch_size=2, jsonl=jsonl)
    flag = tmp_path / "resume.flag"
    # the job's end has passed: both ranks stop before their first step, rank 0 checkpoints and flags
    stopped = train(tmp_path, "stopped", nproc=2, batch_size=2, jsonl=jsonl, stops=True,
                    env={"JOB_END_TIME": "0", "JOB_RESUME_FLAG": str(flag)})
    assert flag.exists() and not (stopped / "model").exists()
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step_0000000"]
    train(tmp_path, "stopped", nproc=2, batch_size=2, jsonl=jsonl)  # the next job, with time
    assert max_diff(trainable(stopped), trainable(whole)) < 1e-6
