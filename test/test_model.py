"""Adapter shapes, splicing and loss masking, batched vs unbatched generation, Whisper features."""

import numpy as np
import pytest
import torch

from conftest import make_tiny_speechllm
from speechllm.jobs import job_slice
from speechllm.features import WhisperConfig, encode_audio, load_whisper
from speechllm.model.adapter import FrameStackAdapter
from speechllm.model.speechllm import IGNORE_INDEX

TEXTS = ["Find slot values for payment_amount in the current audio. Format the output as JSON.",
         '{"payment_amount": "$30", "new_limit": "None"}', "I pay thirty dollars a month."] * 20


@pytest.mark.parametrize("frames", [4, 7, 50, 101])
def test_adapter_stacks_four_frames(frames):
    adapter = FrameStackAdapter(input_dim=8, output_dim=24, hidden_dim=16, stack=4)
    out, lengths = adapter(torch.randn(2, frames, 8), torch.tensor([frames, 4]))
    assert out.shape == (2, frames // 4, 24)
    assert lengths.tolist() == [frames // 4, 1]


def test_adapter_rows_are_stacked_consecutive_frames():
    adapter = FrameStackAdapter(input_dim=2, output_dim=3, hidden_dim=5, stack=4)
    feats = torch.randn(1, 8, 2)
    out, _ = adapter(feats, torch.tensor([8]))
    expected = adapter.mlp(feats[0, 4:8].reshape(1, 8))
    torch.testing.assert_close(out[0, 1:2], expected)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, _, _ = make_tiny_speechllm(tmp_path_factory.mktemp("tiny"), TEXTS)
    return model.eval()


def test_loss_is_on_response_tokens_only(tiny):
    item = tiny.tokenize(torch.randn(30, 16), "<audio>\nFind slot values. Format the output as JSON.",
                       '{"a": "b"}')
    batch = tiny.build_batch([item])  # one row: no padding
    labels = batch["labels"][0]
    n_audio = 30 // 4
    n_prompt = len(item.before) + n_audio + len(item.after)
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert labels[n_prompt:].tolist() == item.target
    assert item.target[-1] == tiny.tokenizer.eos_token_id
    # the loss equals the cross-entropy of the target tokens computed by hand
    logits = tiny.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits[0]
    manual = torch.nn.functional.cross_entropy(logits[n_prompt - 1 : -1], torch.tensor(item.target))
    torch.testing.assert_close(tiny([item]), manual)


def test_audio_conditions_the_response(tiny):
    feats = torch.randn(32, 16, requires_grad=True)
    item = tiny.tokenize(feats, "<audio>\nFind slot values.", '{"a": "b"}')
    tiny.zero_grad()
    tiny([item]).backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0  # audio conditions the response
    assert tiny.adapter.mlp[0].weight.grad.abs().sum() > 0


def test_loss_on_the_kept_logits_equals_the_full_unpadded_loss(tiny):
    """Training pads on the left and runs the LM head on the target positions only; loss and gradients
    must equal those of every example on its own, unpadded, with the LM head on every position."""
    torch.manual_seed(3)
    items = [tiny.tokenize(torch.randn(n, 16), p, t) for n, p, t in [
        (40, "<audio>\nFind slot values.", '{"amount": "40 dollars", "account_type": "savings"}'),
        (12, "Context:\n- I pay thirty dollars a month.\n<audio>\nFind all slot values in the audio.", "{}"),
        (23, "<audio>\nFind new_limit.", '{"new_limit": "None"}')]]

    def grads(loss_fn):
        tiny.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in tiny.parameters() if p.grad is not None]

    def full_loss():
        n_target = sum(len(it.target) for it in items)
        return sum(tiny.llm(**tiny.build_batch([it]), num_items_in_batch=n_target).loss for it in items)

    kept, kept_grads = grads(lambda: tiny(items, num_items_in_batch=sum(len(it.target) for it in items)))
    full, full_grads = grads(full_loss)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    assert len(kept_grads) == len(full_grads) > 0
    for a, b in zip(kept_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_padding_does_not_change_the_loss(tiny):
    a = tiny.tokenize(torch.randn(40, 16), "<audio>\nFind slot values.", '{"a": "b"}')
    b = tiny.tokenize(torch.randn(12, 16), "<audio>\nFind all slot values in the current audio please.", "{}")
    separate = (tiny([a]) * len(a.target) + tiny([b]) * len(b.target)) / (len(a.target) + len(b.target))
    torch.testing.assert_close(tiny([a, b]), separate, rtol=1e-4, atol=1e-5)


def test_batched_generation_equals_unbatched(tiny):
    torch.manual_seed(1)
    items = [tiny.tokenize(torch.randn(n, 16), p) for n, p in [
        (40, "<audio>\nFind slot values for payment_amount."), (9, "<audio>\nFind all slot values."),
        (23, "Context:\n- I pay thirty dollars a month.\n<audio>\nFind slot values for new_limit.")]]
    one_by_one = [tiny.generate([it], max_new_tokens=12)[0] for it in items]
    assert tiny.generate(items, max_new_tokens=12) == one_by_one
    assert any(g.text for g in one_by_one)


def test_whisper_true_length_encoding_shapes():
    dims = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_vocab=51864,
                n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1)
    model = load_whisper(WhisperConfig(random_init_dims=dims))
    audio = np.random.default_rng(0).standard_normal(16000 * 2 + 480).astype(np.float32) * 0.1
    true_len = encode_audio(model, audio)
    padded = encode_audio(model, audio, pad_30s=True)
    n_mel = len(audio) // 160
    assert true_len.shape == padded.shape == ((n_mel + 1) // 2, 32)


def test_job_slices_partition_the_sorted_keys():
    keys = [f"u{i:02d}" for i in range(11)]
    parts = [job_slice(keys, j, 3) for j in (1, 2, 3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert sum(parts, []) == sorted(keys)


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_lora_and_qlora_training_step(tmp_path, quantization):
    from conftest import tiny_llm_dict

    model, _, _ = make_tiny_speechllm(tmp_path, TEXTS, llm=tiny_llm_dict(quantization=quantization))
    linear = type(model.llm.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
    assert linear == ("Linear4bit" if quantization else "Linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("adapter.") for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    item = model.tokenize(torch.randn(24, 16), "<audio>\nFind slot values.", '{"a": "b"}')
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model([item])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any(n.startswith("adapter.") for n in changed)
