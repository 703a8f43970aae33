"""The benchmark measurements on a tiny model: the matmul roofline, the flops count against one done by
hand from the config, training throughput as stage 3 trains, and LoRA vs QLoRA peak memory."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from conftest import TINY_LLAMA, make_tiny_speechllm, write_examples
from speechllm.bench.machine import describe, matmul_gflops
from speechllm.bench.training import flops_per_token, measure_training, peak_memory
from speechllm.data import tokenized
from speechllm.memory import build
from speechllm.model.builder import build_speechllm
from speechllm.model.llm import LLMConfig

# rows of different prompt and audio lengths; n_frames as stage 2 writes it, so the set's lengths count the audio
ROWS = [{"utt_id": f"u{i}", "prompt": "<audio>\nFind the slots." + " Context: yes." * (i % 4),
         "target": json.dumps({"amount": f"{i} dollars"}), "text": f"{i} dollars", "slots": {"amount": f"{i} dollars"},
         "n_frames_to_make": 20 + 8 * i, "n_frames": 20 + 8 * i} for i in range(8)]
EXPECTED_KEYS = {"tokens_per_s", "examples_per_s", "padding_efficiency", "flops_per_token", "achieved_gflops",
                 "roofline_fraction", "mean_tokens_per_example", "steps", "batch_size", "seconds", "data_seconds",
                 "achieved_gflops_with_lm_head", "roofline_fraction_with_lm_head"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    jsonl = write_examples(tmp, [dict(r) for r in ROWS])
    model, spec, base = make_tiny_speechllm(tmp, [t for r in ROWS for t in (r["prompt"], r["target"])])
    return model, spec, base, tokenized(model, jsonl, tmp / "tokens")


def test_matmul_gflops_is_positive_and_the_machine_is_described():
    gflops = matmul_gflops(size=128, seconds=0.2)
    assert isinstance(gflops, float) and gflops > 0
    info = describe("cpu")
    assert info["device"] == "cpu" and info["gpu"] is None and info["cpus"] >= 1 and info["threads"] >= 1
    assert info["cpu_model"] and info["torch"] == torch.__version__ and info["load_average"] >= 0


def test_flops_per_token_is_four_times_the_decoder_linears(tiny):
    model, spec, base, _ = tiny
    h, inter, layers = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"], TINY_LLAMA["num_hidden_layers"]
    kv = h // TINY_LLAMA["num_attention_heads"] * TINY_LLAMA["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q and o, k and v, gate, up and down
    expected = 4 * layers * per_layer
    assert expected == 294_912
    assert flops_per_token(model.llm) == expected  # LoRA's matrices, the embedding and the LM head left out
    # the same count on the meta device and on a 4-bit base (whose weights are packed)
    meta_llm, _, _ = build(AutoConfig.from_pretrained(base), LLMConfig(tiny=TINY_LLAMA), False, feat_dim=16,
                           adapter_hidden=32)
    assert flops_per_token(meta_llm) == expected
    qlora = build_speechllm(dataclasses.replace(spec, llm={**spec.llm, "quantization": "nf4"}), base)
    assert any(type(m).__name__ == "Linear4bit" for m in qlora.llm.modules())
    assert flops_per_token(qlora.llm) == expected


@pytest.fixture
def one_thread():
    """A tiny step with two threads, one of them on a busy core, takes seconds not ms; later tests get theirs back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measure_training_counts_real_tokens_of_real_steps(tiny, one_thread):
    model, _, _, train = tiny
    lengths = np.sort(train.lengths(4))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # 8 rows in batches of 4: two warm-up steps are epoch 0, the two timed ones all of epoch 1
    result = measure_training(model, train, batch_size=4, steps=2, roofline_gflops=10.0, warmup=2)
    assert set(result) == EXPECTED_KEYS
    assert result["steps"] == 2 and result["batch_size"] == 4 and result["seconds"] > 0
    assert result["tokens_per_s"] > 0 and result["examples_per_s"] * result["seconds"] == pytest.approx(8)
    assert result["mean_tokens_per_example"] == pytest.approx(lengths.mean())
    # the whole set is one length bucket: the 4 shortest rows make a batch, the 4 longest the other
    padded = 4 * lengths[3] + 4 * lengths[7]
    assert 0 < result["padding_efficiency"] < 1
    assert result["padding_efficiency"] == pytest.approx(lengths.sum() / padded)
    assert result["flops_per_token"] == flops_per_token(model.llm)
    assert result["achieved_gflops"] == pytest.approx(result["tokens_per_s"] * result["flops_per_token"] / 1e9)
    assert result["roofline_fraction"] == pytest.approx(result["achieved_gflops"] / 10.0)
    # the LM head runs on each row's last (longest target of its batch + 1) positions
    order = np.argsort(train.lengths(4), kind="stable")
    targets = [len(train.ids(int(i))[2]) for i in order]
    positions = 4 * (max(targets[:4]) + 1) + 4 * (max(targets[4:]) + 1)
    vocab, hidden = model.llm.get_output_embeddings().weight.shape
    head_gflops = positions * 4 * hidden * vocab / result["seconds"] / 1e9
    assert result["achieved_gflops_with_lm_head"] == pytest.approx(result["achieved_gflops"] + head_gflops)
    assert result["roofline_fraction_with_lm_head"] == pytest.approx(result["achieved_gflops_with_lm_head"] / 10.0)
    assert 0 <= result["data_seconds"] < result["seconds"]
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any(n.startswith("adapter.") for n in changed)
    single = measure_training(model, train, batch_size=1, steps=2)
    assert single["padding_efficiency"] == 1.0 and single["roofline_fraction"] is None


def test_peak_memory_of_lora_and_qlora(tiny, monkeypatch):
    _, spec, base, train = tiny
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the subprocesses' torch: a busy core stalls a second thread for long
    result = peak_memory(spec, train, base, batch_size=2, steps=1)
    assert set(result) == {"lora", "qlora"}
    for variant in result.values():  # bitsandbytes runs 4-bit on CPU: both variants run
        assert variant["peak_rss_mb"] >= variant["peak_rss_mb_before_training"] > 100
        assert variant["seconds"] > 0 and variant["tokens_per_s"] > 0


def test_peak_memory_reports_a_failed_variant_without_raising(tiny, tmp_path):
    _, spec, _, train = tiny
    result = peak_memory(spec, train, tmp_path / "no_llm_here", batch_size=2, steps=1)
    assert set(result) == {"lora", "qlora"}
    assert all(v["error"].startswith("exit status 1: ") and "no_llm_here" in v["error"] for v in result.values())
