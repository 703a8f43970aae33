"""QLoRA computes in the config's dtype, in training and after save/load alike, and gradient
checkpointing changes the memory kept for backward but not the gradients."""

import pytest
import torch
from torch import nn

from conftest import make_tiny_speechllm, tiny_llm_dict
from speechllm.model.builder import build_speechllm, load_model, save_model
from speechllm.model.speechllm import ModelInput

TEXTS = ["pay thirty dollars monthly", "my name is Maria Garcia", '{"amount": "thirty dollars"}'] * 10


def batch(model, n: int = 2) -> list[ModelInput]:
    torch.manual_seed(1)
    return [model.tokenize(torch.randn(12 + 4 * i, 16), "<audio>\nFind the slots.", '{"amount": "30"}')
            for i in range(n)]


def output_dtypes(model) -> dict[str, torch.dtype]:
    """The dtype of what each embedding, norm, decoder layer and head outputs in one forward pass."""
    seen: dict[str, torch.dtype] = {}
    hooks = []
    for name, module in model.llm.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Embedding) or kind.endswith(("RMSNorm", "DecoderLayer")) or name.endswith("lm_head"):
            def record(_, __, out, name=name):
                seen[name] = (out[0] if isinstance(out, tuple) else out).dtype
            hooks.append(module.register_forward_hook(record))
    model(batch(model))
    for h in hooks:
        h.remove()
    return seen


def test_qlora_trains_and_decodes_in_bfloat16(tmp_path):
    llm = tiny_llm_dict(quantization="nf4", dtype="bfloat16")
    model, spec, base = make_tiny_speechllm(tmp_path, TEXTS, llm=llm)
    assert type(model.llm.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    model.train()
    training = output_dtypes(model)
    save_model(model, spec, tmp_path / "model", base)
    decoding = output_dtypes(load_model(tmp_path / "model"))
    assert decoding == training
    assert len(training) == 1 + 2 * 2 + 1 + 2 + 1  # embedding, 2 norms per layer, final norm, 2 layers, head
    assert set(training.values()) == {torch.bfloat16}, training  # none upcast to float32
    for name, p in model.llm.named_parameters():
        if not p.requires_grad and p.dtype.is_floating_point:
            assert p.dtype == torch.bfloat16, name  # embeddings, head and norms stay in the config's dtype


def saved_bytes(loss_fn) -> int:
    """Bytes autograd keeps for backward during ``loss_fn()`` (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_gradient_checkpointing_keeps_less_and_gives_the_same_gradients(tmp_path, quantization):
    llm = tiny_llm_dict(quantization=quantization, lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                         "target_modules": "all-linear"})
    llm["tiny"]["num_hidden_layers"] = 4
    plain, spec, base = make_tiny_speechllm(tmp_path, TEXTS, llm=llm)
    checkpointed = build_speechllm(spec, base, gradient_checkpointing=True)
    checkpointed.load_state_dict({n: p for n, p in plain.named_parameters() if p.requires_grad}, strict=False)
    grads = []
    sizes = []
    for model in (plain, checkpointed):
        model.train()
        items = batch(model, 4)
        sizes.append(saved_bytes(lambda: model(items)))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert sizes[1] < 0.6 * sizes[0], sizes  # only each layer's input is kept, not its insides
