"""The paper's scale without a GPU: its LLMs built on the meta device with our LoRA, their sizes,
and the training-memory count (speechllm/memory.py) checked against real CPU tensors."""

import json
import re
import weakref
from pathlib import Path

import pytest
import torch
from bitsandbytes.functional import quantize_4bit
from peft.tuners.lora import LoraLayer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import RECIPE, REPO
from speechllm.bin.memory import main as memory_main
from speechllm.config import load_yaml_dataclass
from speechllm.memory import (FUSED_ATTENTION, GIB, SavedTensors, build, count_activations, estimate, nf4_bytes,
                              training_loss, wrap)
from speechllm.model.llm import LLMConfig, build_tiny, load_llm

pytestmark = pytest.mark.scale

# architecture numbers of the public config.json files, and the published parameter counts
PAPER = {
    "llama31_8b": ({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                    "tie_word_embeddings": False, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
                   8.03e9),
    "llama32_1b_instruct": ({"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
                             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                             "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True},
                            1.24e9),
    "qwen3_4b": ({"model_type": "qwen3", "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936,
                  "tie_word_embeddings": True}, 4.02e9),
    "qwen3_0_6b": ({"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
                    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "vocab_size": 151936,
                    "tie_word_embeddings": True}, 0.6e9),  # model card: 0.6B, of which 0.44B non-embedding
    "phi4_mini_reasoning": ({"model_type": "phi3", "hidden_size": 3072, "num_hidden_layers": 32,
                             "num_attention_heads": 24, "num_key_value_heads": 8, "intermediate_size": 8192,
                             "vocab_size": 200064, "tie_word_embeddings": True, "partial_rotary_factor": 0.75},
                            3.84e9),
}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def hf_config(arch: dict) -> AutoConfig:
    arch = dict(arch)
    return AutoConfig.for_model(arch.pop("model_type"), **arch)


def recipe_llm(name: str) -> LLMConfig:
    return load_yaml_dataclass(RECIPE / "conf" / "llm" / f"{name}.yaml", LLMConfig)


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one decoder layer, from the config numbers alone."""
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    q = heads * arch.get("head_dim", h // heads)
    k = kv * arch.get("head_dim", h // heads)
    if arch["model_type"] == "phi3":  # fused projections
        return {"qkv_proj": (h, q + 2 * k), "o_proj": (q, h), "gate_up_proj": (h, 2 * inter), "down_proj": (inter, h)}
    return {"q_proj": (h, q), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_llms_on_meta(name):
    arch, published = PAPER[name]
    cfg = recipe_llm(name)
    llm, adapter, quantized = build(hf_config(arch), cfg, gradient_checkpointing=False)
    layers, h, r = arch["num_hidden_layers"], arch["hidden_size"], cfg.lora["r"]
    shapes = linear_shapes(arch)

    wrapped = [n for n, m in llm.named_modules() if isinstance(m, LoraLayer)]
    assert {n.split(".")[-1] for n in wrapped} == set(shapes)
    assert len(wrapped) == layers * len(shapes)  # every layer, each once
    assert not isinstance(llm.get_output_embeddings(), LoraLayer)
    assert not any("lm_head" in n or "embed" in n for n in wrapped)

    lora = {n: p for n, p in llm.named_parameters() if p.requires_grad}
    assert all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    assert sum(p.numel() for p in lora.values()) == layers * r * sum(i + o for i, o in shapes.values())
    assert sum(p.numel() for p in adapter.parameters()) == (512 * 4 * 2048 + 2048) + (2048 * h + h)

    base = sum(p.numel() for p in llm.parameters() if not p.requires_grad)
    assert base == pytest.approx(published, rel=0.01)
    if name == "qwen3_0_6b":
        assert base - arch["vocab_size"] * h == pytest.approx(0.44e9, rel=0.01)
    # bitsandbytes quantises exactly the decoder linears: embeddings and the LM head stay in bfloat16
    linears = layers * sum(i * o for i, o in shapes.values())
    assert sum(p.numel() for p in llm.parameters() if id(p) in quantized) == (linears if cfg.quantization else 0)


def test_nf4_bytes_match_bitsandbytes():
    for shape in [(300, 1000), (256, 4096), (7, 9)]:
        q, state = quantize_4bit(torch.randn(*shape, dtype=torch.bfloat16), blocksize=64, compress_statistics=True,
                                 quant_type="nf4")
        stored = (q, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset)
        assert sum(t.nbytes for t in stored) == nf4_bytes(shape[0] * shape[1])


def test_8b_qlora_fits_24gb_with_checkpointing():
    arch, _ = PAPER["llama31_8b"]
    config, cfg = hf_config(arch), recipe_llm("llama31_8b")
    paper = {"batch_size": 4, "positions": 600, "target_tokens": 64, "world_size": 4}
    with_ckpt = estimate(config, cfg, gradient_checkpointing=True, **paper)
    without = estimate(config, cfg, gradient_checkpointing=False, **paper)
    print(f"\nLlama-3.1-8B QLoRA, 4 x 600 positions, DDP: {with_ckpt.total_gib:.1f} GiB per GPU with gradient "
          f"checkpointing, {without.total_gib:.1f} GiB without")
    assert with_ckpt.total_gib + 2 < 24  # with ~2 GB for the CUDA context
    assert without.total_gib > with_ckpt.total_gib + 20
    assert with_ckpt.recompute_gib > 0 and without.recompute_gib == 0
    # one layer recomputed is what each of the 32 layers keeps without checkpointing
    assert without.activations_gib == pytest.approx(32 * with_ckpt.recompute_gib, rel=0.05)
    assert with_ckpt.weights_gib == pytest.approx((6.98e9 * 4.127 / 8 + 2 * 128256 * 4096 * 2) / GIB, rel=0.01)
    assert with_ckpt.logits_gib == pytest.approx(2 * 4 * 65 * 128256 * 4 / GIB)


def test_fused_attention_keeps_what_padded_sdpa_keeps():
    """On CPU, transformers' SDPA path for a left-padded batch (keys and values repeated to every head)
    keeps what the count's attention keeps, plus the float copy of the mask that each layer makes."""
    config = hf_config({**TINY_LLAMA, "vocab_size": 100})
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :3] = 0
    saved = {}
    for attention in ("sdpa", FUSED_ATTENTION):
        torch.manual_seed(0)
        llm = AutoModelForCausalLM.from_config(config, attn_implementation=attention).train()
        count = SavedTensors(exclude=list(llm.parameters()))
        with count.hooks():
            llm(inputs_embeds=torch.randn(2, 40, 64, requires_grad=True),
                attention_mask=mask if attention == "sdpa" else None)
        saved[attention] = count.nbytes
    assert saved["sdpa"] - saved[FUSED_ATTENTION] == TINY_LLAMA["num_hidden_layers"] * 2 * 40 * 40 * 4


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages that ops allocate and that are still alive (``now``), and their peak."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        super().__init__()
        self.excluded = {t.untyped_storage()._cdata for t in exclude}
        self.alive: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()  # its Python object lives as long as the storage itself
            key = storage._cdata
            if key not in self.excluded and key not in self.alive:
                self.alive[key] = storage.nbytes()
                self.now += storage.nbytes()
                weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.alive.pop(key)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A random tiny Llama saved as the recipe saves one (so ``load_llm`` loads it, 4-bit too)."""
    texts = ["pay thirty dollars monthly", "my name is Maria Garcia", '{"amount": "thirty dollars"}'] * 10
    return build_tiny(LLMConfig(tiny=TINY_LLAMA, tiny_vocab_size=300), texts, tmp_path_factory.mktemp("tiny") / "llm")


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "nf4"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_count_matches_real_tensors(tiny_base, precision, checkpointing):
    """A tiny Llama loaded for training as the recipe loads it (a real bitsandbytes 4-bit base for nf4):
    the meta count equals the CPU count and the bytes a real forward leaves alive, and the estimated
    peak bounds (within 30%) the peak of a real forward and backward."""
    cfg = LLMConfig(tiny=TINY_LLAMA, dtype="float32" if precision == "float32" else "bfloat16",
                    quantization="nf4" if precision == "nf4" else None)
    shape = {"batch_size": 2, "positions": 40, "audio_frames": 64, "target_tokens": 8}
    meta_llm, meta_adapter, _ = build(AutoConfig.from_pretrained(tiny_base), cfg, checkpointing, feat_dim=16,
                                      adapter_hidden=32)
    base, _ = load_llm(cfg, tiny_base)
    base.set_attn_implementation(FUSED_ATTENTION)
    llm, adapter = wrap(base, cfg, checkpointing, feat_dim=16, adapter_hidden=32)
    assert any(type(m).__name__ == "Linear4bit" for m in llm.modules()) == (precision == "nf4")
    saved, recompute = count_activations(llm, adapter, **shape)
    assert count_activations(meta_llm, meta_adapter, **shape) == (saved, recompute)
    assert (recompute > 0) == checkpointing

    params = [*llm.parameters(), *adapter.parameters()]
    live = LiveStorages(params)
    with live:
        loss = training_loss(llm, adapter, **shape)
        assert live.now == saved + loss.untyped_storage().nbytes()
        loss.backward()
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    estimated = saved + recompute + 2 * 2 * 9 * llm.config.vocab_size * 4 + grads
    assert live.peak <= estimated <= 1.3 * live.peak


def test_cli(tmp_path, capsys):
    arch, _ = PAPER["qwen3_0_6b"]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], **arch}))
    memory_main(["--config_json", str(tmp_path / "config.json"),
                 "--llm_config", str(RECIPE / "conf" / "llm" / "qwen3_0_6b.yaml"), "--batch_size", "4",
                 "--positions", "600", "--target_tokens", "64", "--gradient_checkpointing", "true"])
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["gradient_checkpointing"] and result["model_type"] == "qwen3" and result["dtype"] == "bfloat16"
    parts = ("weights_gib", "trainable_gib", "activations_gib", "recompute_gib", "logits_gib")
    assert result["total_gib"] == pytest.approx(sum(result[k] for k in parts), abs=0.01)
    assert "GiB per GPU" in err


def test_the_memory_table_of_the_docs_is_what_the_count_gives():
    """docs/scaling.md quotes the counts; when the model code or the count changes, the table must follow."""
    rows = {m.group(1): line for line in (REPO / "docs" / "scaling.md").read_text().splitlines()
            if (m := re.match(r"\| [^|]*\(`(\w+)`\) \|", line)) and m.group(1) in PAPER}  # rows name their config
    assert rows.keys() == PAPER.keys()
    paper = {"batch_size": 4, "positions": 600, "target_tokens": 64, "world_size": 4}
    for name, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        config, cfg = hf_config(PAPER[name][0]), recipe_llm(name)
        counted = [round(estimate(config, cfg, gradient_checkpointing=c, **paper).total_gib, 1) for c in (True, False)]
        assert [float(cells[1]), float(cells[3])] == counted, (name, counted)
