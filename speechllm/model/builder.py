"""Building a fresh SpeechLLM, and saving / loading a trained one as a self-describing directory.

A model directory holds ``speechllm.yaml`` (LLM config, base weights location, adapter shape),
``adapter.pt`` (the projector), ``lora/`` (the PEFT adapter, loadable by ``PeftModel``) and, for
``audio_input: ctc_tokens``, ``ctc_head.pt`` (the head's vocabulary, blank and scale). A text-only
model (the cascade, ``feat_dim: 0``) has no adapter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft import PeftModel

from speechllm.config import from_dict
from speechllm.io_utils import InputError, aside, replace_dir
from speechllm.model.adapter import FrameStackAdapter
from speechllm.model.ctc_head import CTCEmbeddingHead
from speechllm.model.llm import TINY_RECORD, LLMConfig, PromptFormatter, add_lora, build_tiny, load_llm, tiny_settings
from speechllm.model.speechllm import SpeechLLM

log = logging.getLogger(__name__)

SPEC_FILE = "speechllm.yaml"


@dataclass
class ModelSpec:
    llm: dict
    feat_dim: int  # Whisper feature width; 0: a text-only model (the cascade), no adapter
    adapter_hidden: int = 2048
    stack: int = 4
    base_llm: str | None = None  # saved base weights (tiny models), relative to the model dir
    whisper: str | None = None  # the encoder the features came from (name, checkpoint or YAML)
    mode: str | None = None  # regular | reasoning | hybrid | cascade: how the model was trained
    audio_input: str = "adapter"  # what the LLM reads: "adapter" frames or "ctc_tokens" (model/ctc_head.py)
    ctc_collapse: str = "mix"  # ctc_tokens: posterior-weighted "mix" of embeddings, or the best token's ("hard")
    max_target_tokens: int | None = None  # longest training target (EOS included): decoding's default cap

    @property
    def llm_config(self) -> LLMConfig:
        """The LLM config. A model dir records every field of its time: one a later version dropped is
        ignored, with a warning, so that older models still load."""
        known = {f.name for f in dataclasses.fields(LLMConfig)}
        dropped = sorted(set(self.llm) - known)
        if dropped:
            log.warning("speechllm.yaml: ignoring LLM config key(s) %s, which this version no longer has", dropped)
        return from_dict(LLMConfig, {k: v for k, v in self.llm.items() if k in known}, "speechllm.yaml:llm")


def build_speechllm(spec: ModelSpec, base_path: str | Path | None = None, device: torch.device | str = "cpu",
                    gradient_checkpointing: bool = False) -> SpeechLLM:
    """A fresh adapter and fresh LoRA on the frozen foundation model, on ``device``."""
    cfg = spec.llm_config
    llm, tokenizer = load_llm(cfg, base_path, device)
    llm = add_lora(llm, cfg, gradient_checkpointing)
    torch.manual_seed(cfg.seed + 1)
    return SpeechLLM(llm, tokenizer, new_adapter(spec, llm), PromptFormatter(tokenizer, cfg)).to(device)


def tiny_base_llm(cfg: LLMConfig, texts: Callable[[], Iterable[str]], directory: Path) -> Path:
    """The random tiny LLM of a test config (``tiny:``), built in ``directory`` unless it is there.

    Its tokenizer is trained on ``texts()``, called only when the model is built. One built from other
    settings is refused: its checkpoints were trained on it, so it cannot be silently rebuilt."""
    if not (directory / "config.json").exists():
        build_tiny(cfg, texts(), directory)
        return directory
    record = directory / TINY_RECORD
    built = json.loads(record.read_text(encoding="utf-8")) if record.exists() else None
    if built is None:
        log.warning("%s records no tiny settings (built by an older version): using it as it is", directory)
    elif built != json.loads(json.dumps(tiny_settings(cfg), sort_keys=True)):
        raise InputError(f"{directory} was built from other tiny settings ({built}) than this config's "
                         f"({tiny_settings(cfg)}): train under a new --tag, or remove the experiment dir")
    return directory


def new_adapter(spec: ModelSpec, llm) -> FrameStackAdapter | None:
    if not spec.feat_dim:
        return None
    return FrameStackAdapter(spec.feat_dim, llm.get_input_embeddings().weight.shape[1], spec.adapter_hidden,
                             spec.stack)


def save_model(model: SpeechLLM, spec: ModelSpec, outdir: str | Path, base_path: str | Path | None) -> None:
    """Write a model dir; the directory appears complete or not at all (written aside, then renamed).
    Training calls it under the experiment dir's lock, so what a killed save left aside is removed."""
    outdir = Path(outdir)
    with aside(outdir, stale=True) as tmp:
        tmp.mkdir(parents=True)
        if model.adapter is not None:
            torch.save(model.adapter.state_dict(), tmp / "adapter.pt")
        if model.ctc_head is not None:
            torch.save(model.ctc_head.state_dict(), tmp / "ctc_head.pt")
        model.llm.save_pretrained(tmp / "lora")
        data = dataclasses.asdict(spec)
        if base_path is not None:
            data["base_llm"] = os.path.relpath(Path(base_path).resolve(), outdir.resolve())
        (tmp / SPEC_FILE).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        replace_dir(tmp, outdir)


def read_spec(model_dir: str | Path) -> ModelSpec:
    """The description of a trained model dir."""
    path = Path(model_dir) / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not a trained model dir (no {SPEC_FILE})")
    return from_dict(ModelSpec, yaml.safe_load(path.read_text(encoding="utf-8")), str(path))


def load_model(model_dir: str | Path, device: str = "cpu") -> SpeechLLM:
    """A trained model, built as :func:`build_speechllm` built it (same loading, same dtypes)."""
    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    cfg = spec.llm_config
    base = (model_dir / spec.base_llm).resolve() if spec.base_llm else None
    llm, tokenizer = load_llm(cfg, base, device)
    llm = PeftModel.from_pretrained(llm, model_dir / "lora")
    adapter = new_adapter(spec, llm)
    if adapter is not None:
        adapter.load_state_dict(torch.load(model_dir / "adapter.pt", map_location="cpu"))
    head = None
    if spec.audio_input == "ctc_tokens":
        state = torch.load(model_dir / "ctc_head.pt", map_location="cpu")
        head = CTCEmbeddingHead(llm.get_input_embeddings().weight, state["vocab"], spec.ctc_collapse)
        head.load_state_dict(state)
    model = SpeechLLM(llm, tokenizer, adapter, PromptFormatter(tokenizer, cfg), head).to(device)
    return model.eval()
