"""One YAML per foundation model (docs/model.md), and the per-family prompt details they configure."""

import pytest
import yaml

from conftest import RECIPE, make_tiny_speechllm, tiny_llm_dict
from speechllm.model.llm import LLMConfig

PAPER_MODELS = {
    "llama32_1b_instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama31_8b_instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama31_8b": "meta-llama/Llama-3.1-8B",
    "deepseek_r1_distill_llama8b": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "qwen3_0_6b": "Qwen/Qwen3-0.6B",
    "qwen3_4b": "Qwen/Qwen3-4B",
    "phi4_mini_reasoning": "microsoft/Phi-4-mini-reasoning",
    "smollm2_135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def load(name: str) -> dict:
    return yaml.safe_load((RECIPE / "conf" / "llm" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_foundation_model_configs(name):
    raw = load(name)
    cfg = LLMConfig(**raw)  # every key is a known field, values valid
    assert cfg.name_or_path == PAPER_MODELS[name]
    assert cfg.prompt_style == ("plain" if name == "llama31_8b" else "chat")
    assert cfg.quantization == ("nf4" if "8b" in name else None)  # the 8B models default to QLoRA
    dropout = 0.0 if name == "smollm2_135m" else 0.05  # the CPU default: mask draws are costly on a CPU
    assert cfg.lora == {"r": 32, "lora_alpha": 128, "lora_dropout": dropout, "target_modules": "all-linear"}
    if name.startswith("qwen3"):
        assert cfg.chat_template_kwargs == {"enable_thinking": False}
    if name.startswith("deepseek"):
        assert cfg.response_prefix == "</think>\n\n"


# the families' own templates: Qwen3's (packaged, by name) with enable_thinking, and the shape of
# DeepSeek-R1's, whose generation prompt opens <think>
DEEPSEEK_LIKE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")


@pytest.mark.parametrize("template, extra, ending", [
    ("qwen3", {"chat_template_kwargs": {"enable_thinking": False}}, "assistant\n<think>\n\n</think>\n\n"),
    ("qwen3", {}, "<|im_start|>assistant\n"),
    (DEEPSEEK_LIKE, {"response_prefix": "</think>\n\n"}, "<|Assistant|><think>\n</think>\n\n"),
])
def test_family_thinking_markup_is_closed_before_our_targets(tmp_path, template, extra, ending):
    model, _, _ = make_tiny_speechllm(tmp_path, ["find the slots"] * 3,
                                      llm=tiny_llm_dict(chat_template=template, **extra))
    before, after = model.formatter.render("<audio>\nFind the slots. /think")
    assert after.endswith(ending) and "/think" in after
    text_before, text_after = model.formatter.render('(transcript) "hi"\nFind the slots.', audio=False)
    assert text_before.endswith(ending) and text_after == ""
    with pytest.raises(ValueError, match="needs one <audio> placeholder"):
        model.formatter.render("Find the slots.")


def test_a_chat_template_is_text_a_file_or_a_packaged_name(tmp_path):
    from speechllm.model.llm import resolve_template

    path = tmp_path / "mine.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert resolve_template(str(path)) == resolve_template("{{ messages[0]['content'] }}") == path.read_text()
    assert "<|im_start|>" in resolve_template("qwen3")
    with pytest.raises(ValueError, match=r"neither Jinja text, nor a file, nor one of the packaged templates \['qwen3'\]"):
        resolve_template("qwen4")
