"""Splicing adapter outputs into the LLM's input embeddings, the loss, and batched generation.

Each example is ``[prompt before audio] [adapter outputs] [prompt after audio] [target + EOS]``.
Labels are -100 everywhere but on the target, so the loss is on the response tokens only.
Batches are padded on the left, in training and generation alike, so that every row ends at the
same position; generation uses the KV cache of ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import StoppingCriteriaList

from speechllm.model.adapter import FrameStackAdapter
from speechllm.model.ctc_head import CTCEmbeddingHead
from speechllm.model.llm import PromptFormatter
from speechllm.stopping import RowStops

IGNORE_INDEX = -100


@dataclass
class ModelInput:
    """What the model reads of one example: the Whisper frames ``feats`` ``[T, D]`` (None: text only, the
    cascade) and the token ids of the prompt before and after the audio, and of the target.

    ``spoken`` (with ``feats`` None) is the token ids of the transcript, read where the audio would be:
    the text-first steps of training (``text_first``)."""

    feats: torch.Tensor | None
    before: list[int]
    after: list[int]
    target: list[int]
    spoken: list[int] | None = None


@dataclass(frozen=True)
class Generation:
    """One generated response and why it stopped (:data:`speechllm.stopping.STOPS`): ``cap`` tells an
    answer the token cap cut off from one that ended."""

    text: str
    n_tokens: int  # new tokens, EOS included
    stop: str

    @property
    def truncated(self) -> bool:
        """Reached ``max_new_tokens`` before the answer was complete."""
        return self.stop == "cap"


class SpeechLLM(nn.Module):
    """The LLM with the adapter's audio spliced in; without an adapter, a text-only LLM (the cascade).

    With a ``ctc_head`` (``audio_input: ctc_tokens``) the LLM reads the head's collapsed
    token-space vectors instead of the raw adapter frames.
    """

    def __init__(self, llm: nn.Module, tokenizer, adapter: FrameStackAdapter | None,
                 formatter: PromptFormatter, ctc_head: CTCEmbeddingHead | None = None) -> None:
        super().__init__()
        self.llm, self.adapter, self.ctc_head = llm, adapter, ctc_head
        self.tokenizer, self.formatter = tokenizer, formatter

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def tokenize(self, feats: torch.Tensor | None, prompt: str, target: str | None = None) -> ModelInput:
        return ModelInput(feats, *self.formatter.tokenize(prompt, target, audio=feats is not None))

    def param_groups(self, lr: float, audio_lr: float) -> list[dict]:
        """The trainable weights as optimizer groups: the audio path (adapter, CTC head), then LoRA."""
        groups = [{"params": [p for p in self.llm.parameters() if p.requires_grad], "lr": lr}]
        if self.adapter is not None:
            audio = list(self.adapter.parameters())
            audio += [] if self.ctc_head is None else list(self.ctc_head.parameters())
            groups.insert(0, {"params": audio, "lr": audio_lr})
        return groups

    def freeze_audio(self) -> None:
        """Leave the adapter and the CTC head as they are: only LoRA trains, and no gradient flows
        back through the audio path (its backward pass is skipped)."""
        for module in (self.adapter, self.ctc_head):
            if module is not None:
                module.requires_grad_(False)

    def audio_parameter_names(self) -> list[str]:
        """The adapter's and the CTC head's weights: a checkpoint keeps them, trained or frozen."""
        return [f"{name}.{n}" for name, module in (("adapter", self.adapter), ("ctc_head", self.ctc_head))
                if module is not None for n, _ in module.named_parameters()]

    def _embed_tokens(self, ids: list[int]) -> torch.Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device))

    def audio_embeddings(self, items: list[ModelInput]) -> list[torch.Tensor | None]:
        """Adapter outputs of the items with audio (None for text-only items)."""
        with_audio = [it for it in items if it.feats is not None]
        if not with_audio:
            return [None] * len(items)
        if self.adapter is None:
            raise ValueError("this model has no adapter (a text-only cascade model) but was given audio")
        lengths = torch.tensor([len(it.feats) for it in with_audio], device=self.device)
        feats = nn.utils.rnn.pad_sequence([it.feats for it in with_audio], batch_first=True).to(self.device)
        out, out_lengths = self.adapter(feats, lengths)
        dtype = self.llm.get_input_embeddings().weight.dtype
        spans = [out[i, : out_lengths[i]] for i in range(len(with_audio))]
        if self.ctc_head is not None:
            spans = [self.ctc_head.collapse(span) for span in spans]
        audio = iter(span.to(dtype) for span in spans)
        return [next(audio) if it.feats is not None else None for it in items]

    def build_batch(self, items: list[ModelInput]) -> dict[str, torch.Tensor]:
        """``inputs_embeds``, ``attention_mask`` and ``labels`` for a list of examples, padded on the left."""
        audio = self.audio_embeddings(items)
        rows, labels = [], []
        for item, a in zip(items, audio):
            if item.spoken:
                a = self._embed_tokens(item.spoken)
            parts = [self._embed_tokens(item.before)] + ([a] if a is not None else [])
            parts += [self._embed_tokens(ids) for ids in (item.after, item.target) if ids]
            rows.append(torch.cat(parts))
            n_prompt = sum(len(p) for p in parts) - len(item.target)
            labels.append(torch.tensor([IGNORE_INDEX] * n_prompt + item.target, device=self.device))
        width = max(len(r) for r in rows)
        dim = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), width, dim)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        label_pad = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=self.device)
        for i, (row, lab) in enumerate(zip(rows, labels)):
            span = slice(width - len(row), width)
            embeds[i, span], mask[i, span], label_pad[i, span] = row, 1, lab
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": label_pad}

    def forward(self, items: list[ModelInput], num_items_in_batch: int | None = None) -> torch.Tensor:
        """Cross-entropy over the target tokens: their mean, or their sum / ``num_items_in_batch``.

        The second form lets one optimizer step average over every token of every micro-batch on
        every process, so the update does not depend on how the batch was split. Left padding puts
        every target at the right edge, so the LM head (for a small LLM, the largest matrix product
        of a step) runs only on the last ``longest target + 1`` positions, not on the prompts.
        """
        batch = self.build_batch(items)
        keep = max(len(item.target) for item in items) + 1
        mask = batch["attention_mask"]
        return self.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0), labels=batch["labels"][:, -keep:],
                        logits_to_keep=keep, num_items_in_batch=num_items_in_batch).loss

    @torch.no_grad()
    def generate(self, items: list[ModelInput], max_new_tokens: int = 256, num_beams: int = 1) -> list[Generation]:
        """Greedy (or beam) responses, each with why it stopped.

        Greedy rows stop one by one (:class:`~speechllm.stopping.RowStops`: EOS, a complete answer, a
        loop); beam search stops at EOS or the cap only.
        """
        batch = self.build_batch(items)
        eos = self.tokenizer.eos_token_id
        stops = RowStops(self.tokenizer, len(items)) if num_beams == 1 else None
        # given only inputs_embeds, generate returns the new tokens alone; finished rows are padded
        out = self.llm.generate(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos,
                                stopping_criteria=StoppingCriteriaList([] if stops is None else [stops]))
        rows = out.tolist()
        if stops is not None:
            ends, reasons = stops.lengths, stops.reasons()
        else:  # the first EOS ends the response, even when padding is EOS too
            ends = [row.index(eos) + 1 if eos in row else len(row) for row in rows]
            reasons = ["eos" if eos in row else "cap" for row in rows]
        generations = []
        for row, end, reason in zip(rows, ends, reasons):
            response = row[: end - 1] if reason == "eos" else row[:end]
            text = self.tokenizer.decode(response, skip_special_tokens=True).strip()
            generations.append(Generation(text, end, reason))
        return generations
