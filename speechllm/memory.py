"""Training memory of a SpeechLLM on one GPU, counted on the meta device: no weights, no GPU.

The LLM is built from its ``transformers`` config on the meta device and wrapped with our own
:func:`~speechllm.model.llm.add_lora` (so the LoRA targets and the gradient checkpointing are the
recipe's), our adapter is added, and one training forward pass runs on meta tensors. The estimate
has five parts:

- weights: the frozen base in the config's dtype; for ``quantization: nf4`` every ``nn.Linear`` that
  ``transformers`` hands to bitsandbytes costs :func:`nf4_bytes`, while the embeddings, the LM head
  (tied or not) and the norms stay in the compute dtype, as bitsandbytes leaves them;
- trainable: LoRA and adapter weights, their gradients and AdamW's two moments, all in the weights'
  own dtype (float32: peft keeps adapter weights in float32 on a bfloat16 base), plus one more copy
  of the gradients for DDP's buckets when training on several GPUs;
- activations: what the autograd graph keeps for backward, counted by :func:`count_activations`.
  With gradient checkpointing, torch's own hooks take over inside each decoder layer, which keeps
  only its inputs;
- recompute: with checkpointing, the backward pass re-runs one layer at a time, whose saved tensors
  exist on top of the kept inputs: one layer's activations, counted by running one layer without it;
- logits: only ``logits_to_keep`` (longest target + 1) positions reach the LM head. The float32
  log-probabilities the loss keeps are in the activations; backward adds two float32 buffers of the
  same size (their gradient and the logits'), counted here.

What does not run on the meta device, and what stands in for it:

- bitsandbytes layers (they need a real quantisation state): the base is built unquantised in the
  compute dtype; bitsandbytes keeps only the packed weight for backward, so autograd saves the same
  (the tests compare with a real 4-bit model on CPU);
- ``transformers``' padding mask (it reads the mask's values to decide whether to drop it) and
  ``SpeechLLM.forward`` (it slices each row by its length): :func:`training_loss` runs the same
  computation on unpadded rows;
- the default attention, which on the meta device is the math kernel with its ``T x T``
  probabilities that CUDA's fused kernels never keep: :func:`fused_attention`.

Not counted: the CUDA context and allocator fragmentation (leave ~2 GB), the gradient buffers alive
during backward (a few ``[B, T, hidden]`` or ``[B, T, intermediate]`` tensors at a time), the
``[B, 1, T, T]`` padding mask that attention copies into the compute dtype in each layer (2.9 MB a
layer at 4 x 600 in bfloat16), and the transient dequantised copy of one 4-bit weight. Memory is in
GiB (2**30 bytes), as GPU memory is quoted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from speechllm.model.adapter import FrameStackAdapter
from speechllm.model.builder import ModelSpec, new_adapter
from speechllm.model.llm import LLMConfig, add_lora

GIB = 2**30
FRAME_RATE = 50  # Whisper encoder frames per second
FUSED_ATTENTION = "speechllm_fused_count"
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256
NF4_CONSTANTS = 4 * (16 + 256 + 1)  # float32 NF4 code, 8-bit code of the nested absmax, its offset


def nf4_bytes(numel: int) -> int:
    """Bytes of one bitsandbytes NF4 weight with double quantisation (``bnb_4bit_use_double_quant``).

    Per parameter 4 bits, plus per block of 64 an absmax quantised to 8 bits, plus per 256 such
    blocks a float32 absmax of the absmaxes: 4 + 8/64 + 32/(64*256) = 4.127 bits; and per weight
    the float32 constants of both quantisations (1,092 bytes).
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_CONSTANTS


def fused_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention through a fused kernel that has CPU and meta kernels.

    It keeps what CUDA's fused kernels keep (query, key, value, output and the log-sum-exp), with
    the keys and values repeated to every head, as ``transformers`` does when a padding mask is
    present (left-padded training batches), which rules out the kernels' native GQA path.
    """
    if attention_mask is not None:
        raise ValueError("the memory count runs unpadded rows (no attention mask)")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout, True,
                                                                        scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FUSED_ATTENTION, fused_attention)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _graph_leaves(loss: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensors that the graph's ``AccumulateGrad`` nodes hold: the leaves that require grad."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            yield node.variable
        stack.extend(next_node for next_node, _ in node.next_functions)


def _storage_id(t: torch.Tensor) -> int:
    # the address of the storage; meta tensors have no data pointer to tell them apart
    return t.untyped_storage()._cdata


class SavedTensors:
    """Bytes of the tensors autograd saves for backward, each storage once, parameters left out.

    A view keeps its whole storage alive, so storages are counted, not views. References to what
    was counted are held, so no storage address is reused within a count. The layer inputs that
    non-reentrant checkpointing keeps are not saved tensors; :meth:`add` takes them.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {_storage_id(t) for t in exclude}
        self.kept: dict[int, torch.Tensor] = {}

    def add(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_id(t)
        if key not in self.excluded:
            self.kept.setdefault(key, t)
        return t

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.kept.values())

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t)


@dataclass
class MemoryEstimate:
    """One GPU's training memory in GiB, by part; the CUDA context is not included."""

    weights_gib: float
    trainable_gib: float  # weights, gradients, AdamW moments (and DDP buckets) of LoRA + adapter
    activations_gib: float
    recompute_gib: float  # one layer recomputed in backward (0 without checkpointing)
    logits_gib: float
    total_gib: float
    base_params: int
    quantized_params: int
    trainable_params: int
    lora_params: int
    gradient_checkpointing: bool

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def quantized_weights(llm: nn.Module, cfg: LLMConfig) -> set[int]:
    """Ids of the weights that 4-bit loading quantises: those of the ``nn.Linear`` modules that
    ``transformers`` replaces with bitsandbytes layers (not the LM head); none without quantisation."""
    if cfg.quantization != "nf4":
        return set()
    skip = HfQuantizer.get_modules_to_not_convert(llm, None, llm._keep_in_fp32_modules)
    return {id(m.weight) for name, m in llm.named_modules()
            if type(m) is nn.Linear and should_convert_module(name, skip)}


def wrap(llm: nn.Module, cfg: LLMConfig, gradient_checkpointing: bool, feat_dim: int = 512, adapter_hidden: int = 2048,
         stack: int = 4) -> tuple[nn.Module, FrameStackAdapter]:
    """Our LoRA on the frozen LLM and a fresh adapter, as ``build_speechllm`` makes them, in training mode."""
    llm = add_lora(llm, cfg, gradient_checkpointing)
    spec = ModelSpec(llm=dataclasses.asdict(cfg), feat_dim=feat_dim, adapter_hidden=adapter_hidden, stack=stack)
    return llm.train(), new_adapter(spec, llm).train()


def build(config: PretrainedConfig, cfg: LLMConfig, gradient_checkpointing: bool, feat_dim: int = 512,
          adapter_hidden: int = 2048, stack: int = 4) -> tuple[nn.Module, FrameStackAdapter, set[int]]:
    """:func:`wrap` of the LLM built from ``config`` on the meta device, and its :func:`quantized_weights`.

    A 4-bit base is built unquantised in the compute dtype (see the module's docstring).
    """
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.dtype),
                                               attn_implementation=FUSED_ATTENTION)
        llm.requires_grad_(False)
        quantized = quantized_weights(llm, cfg)
        return (*wrap(llm, cfg, gradient_checkpointing, feat_dim, adapter_hidden, stack), quantized)


def training_loss(llm: nn.Module, adapter: FrameStackAdapter, batch_size: int, positions: int, audio_frames: int,
                  target_tokens: int) -> torch.Tensor:
    """The loss of one batch as ``SpeechLLM.forward`` computes it, on the model's device.

    Each row is ``positions`` long: prompt tokens, the adapter's frames of ``audio_frames`` Whisper
    features, the target; the LM head and the loss see the last ``target_tokens + 1`` positions.
    The rows are not padded (no mask), so every position is real.
    """
    table = llm.get_input_embeddings()
    device = table.weight.device
    n_audio = audio_frames // adapter.stack
    n_prompt = positions - n_audio - target_tokens
    if n_prompt < 0:
        raise ValueError(f"{positions} positions cannot hold {n_audio} audio and {target_tokens} target positions")
    feats = torch.zeros(batch_size, audio_frames, adapter.mlp[0].in_features // adapter.stack, device=device)
    lengths = torch.full((batch_size,), audio_frames, device=device)
    audio, _ = adapter(feats, lengths)
    ids = torch.zeros(batch_size, positions, dtype=torch.long, device=device)
    embeds = torch.cat([table(ids[:, :n_prompt]), audio.to(table.weight.dtype), table(ids[:, -target_tokens:])], 1)
    keep = target_tokens + 1
    return llm(inputs_embeds=embeds, labels=ids[:, -keep:], logits_to_keep=keep,
               num_items_in_batch=batch_size * target_tokens).loss


def count_activations(llm: nn.Module, adapter: FrameStackAdapter, batch_size: int, positions: int,
                      audio_frames: int, target_tokens: int) -> tuple[int, int]:
    """Bytes kept for backward by one training forward, and bytes of one layer recomputed in backward.

    The graph keeps the tensors autograd saves (:class:`SavedTensors`), the leaves that require grad
    and are not parameters (under checkpointing peft makes the input embeddings require grad, for the
    reentrant kind) and, for each checkpointed layer, the arguments it was called with (held by the
    recompute closure, counted by a forward pre-hook). One layer is then run again without
    checkpointing to count what its recomputation saves (0 without checkpointing).
    """
    params = [*llm.parameters(), *adapter.parameters()]
    saved = SavedTensors(exclude=params)
    first_call: list[tuple[GradientCheckpointingLayer, tuple, dict]] = []

    def keep_inputs(layer: GradientCheckpointingLayer, args: tuple, kwargs: dict) -> None:
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            for t in _tensors((args, kwargs)):
                saved.add(t)
            if not first_call:
                first_call.append((layer, args, kwargs))

    layers = [m for m in llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [m.register_forward_pre_hook(keep_inputs, with_kwargs=True) for m in layers]
    try:
        with saved.hooks():
            loss = training_loss(llm, adapter, batch_size, positions, audio_frames, target_tokens)
    finally:
        for h in handles:
            h.remove()
    for leaf in _graph_leaves(loss):
        saved.add(leaf)
    if not first_call:
        return saved.nbytes, 0
    layer, args, kwargs = first_call[0]
    recomputed = SavedTensors(exclude=[*params, *saved.kept.values()])
    layer.gradient_checkpointing = False
    try:
        with recomputed.hooks():
            layer(*args, **kwargs)
    finally:
        layer.gradient_checkpointing = True
    return saved.nbytes, recomputed.nbytes


def estimate(config: PretrainedConfig, cfg: LLMConfig, batch_size: int = 4, positions: int = 600,
             target_tokens: int = 64, audio_seconds: float = 7.6, gradient_checkpointing: bool = True,
             world_size: int = 1, feat_dim: int = 512, adapter_hidden: int = 2048, stack: int = 4) -> MemoryEstimate:
    """Peak training memory of one GPU for ``batch_size`` rows of ``positions`` positions.

    The total adds all parts, although the logits' backward buffers are freed before the first layer
    is recomputed; the overlap leaves room for the backward's gradient buffers, which are not counted
    (the tests check that the sum bounds, within 30%, the peak of a real CPU step of a tiny model).
    """
    llm, adapter, quantized = build(config, cfg, gradient_checkpointing, feat_dim, adapter_hidden, stack)
    base = [p for p in llm.parameters() if not p.requires_grad]
    trainable = [p for p in [*llm.parameters(), *adapter.parameters()] if p.requires_grad]
    weights = sum(nf4_bytes(p.numel()) if id(p) in quantized else p.numel() * p.element_size() for p in base)
    weights += sum(b.numel() * b.element_size() for b in llm.buffers())
    copies = 4 + (world_size > 1)  # weight, gradient, two AdamW moments, DDP's gradient bucket
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable) * copies
    activations, recompute = count_activations(llm, adapter, batch_size, positions,
                                               round(audio_seconds * FRAME_RATE), target_tokens)
    logits = 2 * batch_size * (target_tokens + 1) * llm.config.vocab_size * 4
    parts = [weights / GIB, trainable_bytes / GIB, activations / GIB, recompute / GIB, logits / GIB]
    return MemoryEstimate(*parts, total_gib=sum(parts), base_params=sum(p.numel() for p in base),
                          quantized_params=sum(p.numel() for p in base if id(p) in quantized),
                          trainable_params=sum(p.numel() for p in trainable),
                          lora_params=sum(p.numel() for n, p in llm.named_parameters() if "lora_" in n),
                          gradient_checkpointing=gradient_checkpointing)
