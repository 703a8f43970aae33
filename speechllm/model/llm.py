"""Foundation LLM loading (one YAML per model), LoRA/QLoRA wrapping and prompt rendering.

An :class:`LLMConfig` names a hub ID or local path (``name_or_path``), or ``tiny``: a config dict
from which a small random model is built, with a byte-level BPE tokenizer trained on the corpus
text. The tiny path is what CI and the mini preset use; its weights and tokenizer are saved into
the experiment so decoding rebuilds exactly the same model.

A model's thinking markup is one of two kinds (``native_thinking``). By default the targets carry our
``<thinking>``/``<response>`` markup as the answer proper, the same for every LLM. With
``native_thinking: true`` the trace goes into the model's own thinking block instead: each target is
rendered by the chat template as an assistant turn with ``reasoning_content`` (Qwen3's ``<think>``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from speechllm.formatting import split_reasoning_target
from speechllm.model import qwen3
from speechllm.pretrained import llm_dir
from speechllm.prompts import AUDIO

log = logging.getLogger(__name__)

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEMPLATES = Path(__file__).with_name("templates")


@dataclass(frozen=True)
class TinyTokens:
    """A tiny tokenizer's fixed tokens and chat template: a family's, so prompts tokenise as in the family."""

    special: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None = None
    added: tuple[str, ...] = ()  # single tokens that decoding keeps (not special)
    template: str = TINY_CHAT_TEMPLATE  # a chat_template value (resolve_template)


TINY_TOKENS = {
    "generic": TinyTokens(("<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"), eos="</s>",
                          pad="<pad>", bos="<s>"),
    "qwen3": TinyTokens(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos=qwen3.EOS, pad=qwen3.PAD,
                        added=("<think>", "</think>"), template="qwen3"),
}


def resolve_template(value: str) -> str:
    """A ``chat_template`` value as Jinja text: the text itself, a packaged name, or a ``.jinja`` file."""
    if "{" in value:
        return value
    for path in (TEMPLATES / f"{value}.jinja", Path(value)):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise ValueError(f"chat_template {value!r} is neither Jinja text, nor a file, nor one of the packaged "
                     f"templates {sorted(p.stem for p in TEMPLATES.glob('*.jinja'))}")


@dataclass
class LLMConfig:
    name_or_path: str | None = None  # hub ID or local directory
    local_cache: str | None = None  # converted offline copy: $MODEL_CACHE/llm/<local_cache>, used when present
    tiny: dict | None = None  # transformers config kwargs incl. model_type; builds a random model
    tiny_vocab_size: int = 1000
    tiny_tokens: str = "generic"  # the tiny tokenizer's fixed tokens and chat template: "generic" or "qwen3"
    prompt_style: str = "chat"  # "chat": tokenizer's chat template; "plain": plain_template
    plain_template: str = "{prompt}\nResponse:\n"
    system_prompt: str | None = None  # None: whatever the chat template does by default
    chat_template: str | None = None  # replaces the tokenizer's: Jinja text, a packaged name or a .jinja file
    chat_template_kwargs: dict = field(default_factory=dict)  # e.g. Qwen3's {enable_thinking: false}
    native_thinking: bool = False  # the trace in the template's own thinking block (Qwen3's <think>)
    response_prefix: str = ""  # appended after the generation prompt (closes DeepSeek-R1's open <think>)
    dtype: str = "float32"
    quantization: str | None = None  # None or "nf4" (QLoRA through bitsandbytes)
    lora: dict = field(default_factory=lambda: {"r": 32, "lora_alpha": 128, "lora_dropout": 0.05,
                                                "target_modules": "all-linear"})
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.tiny is None):
            raise ValueError("an LLM config needs exactly one of 'name_or_path' and 'tiny'")
        if self.prompt_style not in ("chat", "plain"):
            raise ValueError(f"prompt_style must be 'chat' or 'plain', got {self.prompt_style!r}")
        if self.quantization not in (None, "nf4"):
            raise ValueError(f"quantization must be null or 'nf4', got {self.quantization!r}")
        if self.chat_template is not None:  # the text itself is recorded: a later file cannot change decoding
            self.chat_template = resolve_template(self.chat_template)
        if self.tiny_tokens not in TINY_TOKENS:
            raise ValueError(f"tiny_tokens must be one of {sorted(TINY_TOKENS)}, got {self.tiny_tokens!r}")
        if self.native_thinking and (self.prompt_style != "chat" or self.response_prefix
                                     or self.chat_template_kwargs.get("enable_thinking") is False):
            raise ValueError("native_thinking renders the trace with the chat template's own thinking block: it "
                             "needs prompt_style chat, no response_prefix and thinking left on "
                             "(chat_template_kwargs.enable_thinking true, or not given)")


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int, tokens: str = "generic") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (every string stays encodable), with the fixed
    tokens and chat template of :data:`TINY_TOKENS` ``[tokens]``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    family = TINY_TOKENS[tokens]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(family.special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad)
    fast.chat_template = resolve_template(family.template)
    return fast


TINY_RECORD = "tiny.json"


def tiny_settings(cfg: LLMConfig) -> dict:
    """What a tiny LLM's weights and tokenizer are built from (its corpus aside)."""
    return {"tiny": cfg.tiny, "tiny_vocab_size": cfg.tiny_vocab_size, "tiny_tokens": cfg.tiny_tokens, "seed": cfg.seed}


def build_tiny(cfg: LLMConfig, texts: Iterable[str], outdir: Path) -> Path:
    """Build, save and return the directory of a random tiny LLM and its corpus-trained tokenizer."""
    tokenizer = train_tiny_tokenizer(texts, cfg.tiny_vocab_size, cfg.tiny_tokens)
    kwargs = dict(cfg.tiny)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **kwargs)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    outdir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(outdir)
    tokenizer.save_pretrained(outdir)
    (outdir / TINY_RECORD).write_text(json.dumps(tiny_settings(cfg), sort_keys=True) + "\n", encoding="utf-8")
    log.info("built tiny %s LLM (%.2fM parameters, vocab %d) in %s", model_type,
             sum(p.numel() for p in model.parameters()) / 1e6, len(tokenizer), outdir)
    return outdir


def load_llm(cfg: LLMConfig, path: str | Path | None = None, device: torch.device | str = "cpu"):
    """Load the frozen foundation model and its tokenizer (``path`` overrides ``name_or_path``).

    On a GPU the weights are loaded straight onto ``device`` (4-bit ones are quantised there).
    """
    if path is None and cfg.local_cache and (llm_dir(cfg.local_cache) / "config.json").exists():
        path = llm_dir(cfg.local_cache)
    source = str(path or cfg.name_or_path)
    log.info("loading the LLM from %s", source)
    kwargs: dict = {"dtype": getattr(torch, cfg.dtype)}
    if cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, cfg.dtype))
    if torch.device(device).type == "cuda":
        kwargs["device_map"] = {"": torch.device(device)}
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def add_lora(model, cfg: LLMConfig, gradient_checkpointing: bool = False) -> PeftModel:
    """Fresh LoRA weights on the frozen model, which keeps the config's dtype.

    QLoRA needs no further preparation: ``peft.prepare_model_for_kbit_training`` would upcast the
    embeddings, head and norms to float32, so training would compute in float32 while decoding (which
    loads the model as :func:`load_llm` does) computes in ``cfg.dtype``. Gradient checkpointing is the
    non-reentrant kind, which needs no input that requires grad.
    """
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5; the old name is deprecated there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **cfg.lora))


class PromptFormatter:
    """Renders an instruction into the text before and after the audio, the same in training and decoding."""

    def __init__(self, tokenizer, cfg: LLMConfig) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg

    def _messages(self, prompt: str) -> list[dict]:
        messages = [{"role": "user", "content": prompt}]
        if self.cfg.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return messages

    def _text(self, prompt: str) -> str:
        """The whole prompt as text, up to where the model's answer begins."""
        if self.cfg.prompt_style == "chat":
            text = self.tokenizer.apply_chat_template(self._messages(prompt), tokenize=False,
                                                      add_generation_prompt=True, **self.cfg.chat_template_kwargs)
        else:
            text = (self.tokenizer.bos_token or "") + self.cfg.plain_template.format(prompt=prompt)
        return text + self.cfg.response_prefix

    def render(self, prompt: str, audio: bool = True) -> tuple[str, str]:
        """The text before and after the audio placeholder (all of it before, for a text-only prompt)."""
        if (AUDIO in prompt) != audio:
            raise ValueError(f"{'an audio' if audio else 'a text-only'} example needs "
                             f"{'one' if audio else 'no'} {AUDIO} placeholder in its prompt: {prompt!r}")
        text = self._text(prompt)
        if not audio:
            return text, ""
        before, after = text.split(AUDIO, 1)
        return before, after

    def target_text(self, prompt: str, target: str, head: str | None = None) -> str:
        """What the model learns to write after the prompt (EOS excluded): the stage-2 target, or with
        ``native_thinking`` the template's rendering of it as an answer, the trace in its thinking block.
        ``head``: the rendered prompt, when the caller has it."""
        if not self.cfg.native_thinking:
            return target
        trace, answer = split_reasoning_target(target)
        turn = {"role": "assistant", "content": answer, "reasoning_content": trace}
        whole = self.tokenizer.apply_chat_template(self._messages(prompt) + [turn], tokenize=False,
                                                   **self.cfg.chat_template_kwargs)
        head, eos = head if head is not None else self._text(prompt), self.tokenizer.eos_token
        written = whole[len(head) :]
        if not whole.startswith(head) or eos not in written or trace not in written:
            raise ValueError("native_thinking needs a chat template that renders an answer's reasoning_content "
                             f"after the generation prompt and ends it with EOS ({eos!r}), as Qwen3's does; "
                             f"this one renders {whole[len(head) - 40 :]!r}")
        return written[: written.rindex(eos)]

    def tokenize(self, prompt: str, target: str | None = None,
                 audio: bool = True) -> tuple[list[int], list[int], list[int]]:
        """Token ids before the audio, after it, and of the target (ending with EOS)."""
        return self.tokenize_many([prompt], [target], [audio])[0]

    def tokenize_many(self, prompts: list[str], targets: list[str | None],
                      audio: list[bool]) -> list[tuple[list[int], list[int], list[int]]]:
        """:meth:`tokenize` of many examples, in one (parallel) tokenizer call per part."""
        rendered = [self.render(p, a) for p, a in zip(prompts, audio)]
        enc = lambda texts: self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        before, after = enc([b for b, _ in rendered]), enc([a for _, a in rendered])
        eos = self.tokenizer.eos_token_id
        heads = [b + AUDIO + a if has_audio else b for (b, a), has_audio in zip(rendered, audio)]
        target = enc([self.target_text(p, t, h) if t is not None else "" for p, t, h in zip(prompts, targets, heads)])
        target = [ids + [eos] if t is not None else [] for ids, t in zip(target, targets)]
        return list(zip(before, after, target))

    def fingerprint(self) -> list:
        """What tokenised data depends on: the rendering and the ids of a probe text."""
        probe = 'Pay $1,300.50 on 2024-05-01, {"name": "Zoë"} <think>'
        trace = f"<thinking>\n{probe}\n</thinking>\n<response>\n{probe}\n</response>"  # as stage 2 writes one
        return [self.render(f"{AUDIO} {probe}"), self.render(probe, audio=False), self.tokenize(f"{AUDIO} {probe}", probe),
                self.tokenize(f"{AUDIO} {probe}", trace), len(self.tokenizer)]
