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


WHISPER_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2, n_vocab=51864,
                    n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1)


@pytest.fixture(scope="module")
def random_whisper():
    """A random Whisper whose every weight matters: ``ln_post`` and the positional embedding are not left
    at the identity and the sinusoids, so an encoding that skips or recomputes either one shows."""
    model = load_whisper(WhisperConfig(random_init_dims=WHISPER_DIMS))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        encoder = model.encoder
        encoder.ln_post.weight.copy_(1 + 0.5 * torch.randn(encoder.ln_post.weight.shape, generator=generator))
        encoder.ln_post.bias.copy_(torch.randn(encoder.ln_post.bias.shape, generator=generator))
        encoder.positional_embedding.add_(torch.randn(encoder.positional_embedding.shape, generator=generator))
    return model


def whisper_encoder_at(model, n_ctx: int):
    """openai-whisper's own ``AudioEncoder`` built for ``n_ctx`` output frames, with ``model``'s weights and
    the first ``n_ctx`` rows of its positional embedding: its ``forward`` runs that length natively."""
    from whisper.model import AudioEncoder

    d = model.dims
    encoder = AudioEncoder(d.n_mels, n_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer)
    state = model.encoder.state_dict()
    encoder.load_state_dict({**state, "positional_embedding": state["positional_embedding"][:n_ctx]})
    return encoder.eval()


def test_whisper_true_length_encoding_shapes(random_whisper):
    audio = np.random.default_rng(0).standard_normal(16000 * 2 + 480).astype(np.float32) * 0.1
    true_len = encode_audio(random_whisper, audio)
    padded = encode_audio(random_whisper, audio, pad_30s=True)
    n_mel = len(audio) // 160
    assert true_len.shape == padded.shape == ((n_mel + 1) // 2, 32)


@pytest.mark.parametrize("seconds", [1.0, 2.5])
def test_whisper_true_length_encoding_is_whispers_encoder_at_that_length(random_whisper, seconds):
    """The true-length encoding of a clip of T output frames (2T mel frames) equals Whisper's own encoder
    run at T frames: convolutions, positional embedding rows 0..T-1, every block and ``ln_post``. The first
    T frames of the 30-s padded encoding are not that (attention also reads the padding)."""
    import whisper

    audio = np.random.default_rng(1).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1
    n_out = len(audio) // 320  # 100 mel frames a second, two per encoder output
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), 80)
    assert mel.shape == (80, 2 * n_out)
    with torch.no_grad():
        expected = whisper_encoder_at(random_whisper, n_out)(mel[None])[0].numpy()
    encoded = encode_audio(random_whisper, audio)
    assert encoded.shape == expected.shape == (n_out, 32)
    np.testing.assert_allclose(encoded, expected, rtol=1e-4, atol=1e-5)
    padded = encode_audio(random_whisper, audio, pad_30s=True)
    assert np.abs(padded - expected).max() > 1e-2


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
