"""build_and_train: a rerun that finds its tiny base LLM already built starts from the same weights."""

import shutil

import torch

from conftest import tiny_llm_dict, write_examples
from speechllm.train import build_and_train
from speechllm.train_config import TrainConfig

ROWS = [{"utt_id": f"u{i}", "prompt": "<audio>\nFind slots.", "target": '{"x": "a"}', "slots": {"x": "a"}}
        for i in range(4)]


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_prebuilt_tiny_llm_does_not_change_the_initial_weights(tmp_path):
    jsonl = write_examples(tmp_path, [dict(r) for r in ROWS])
    cfg = TrainConfig(batch_size=2, grad_accum=1, max_steps=2, adapter_hidden=16, lr=0.0, adapter_lr=0.0,
                      save_every=100)
    fresh = trainable(build_and_train(tiny_llm_dict(), cfg, jsonl, None, tmp_path / "a"))
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "base_llm", tmp_path / "b" / "base_llm")  # as a rerun finds it
    rerun = trainable(build_and_train(tiny_llm_dict(), cfg, jsonl, None, tmp_path / "b"))
    assert fresh.keys() == rerun.keys()
    for name in fresh:  # lr 0: the weights after two steps are the initial ones
        torch.testing.assert_close(rerun[name], fresh[name], rtol=0, atol=0, msg=name)
    log = (tmp_path / "b" / "train_log.jsonl").read_text()
    assert "valid_loss" not in log  # no validation set: no validation record (it was NaN)
