"""Training memory of one GPU for an LLM config, counted on the meta device (no weights, no GPU).

Prints a JSON object (GiB) on stdout and a one-line summary on stderr; the CUDA context and the
allocator's fragmentation are not included (leave ~2 GB). ``config.json`` is the model's own
(e.g. from ``huggingface-cli download <model> config.json``):

    python -m speechllm.bin.memory --config_json config.json \\
        --llm_config egs/callcenter/sf1/conf/llm/llama31_8b.yaml --batch_size 4 --positions 600 \\
        --target_tokens 64 --gradient_checkpointing true
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoConfig

from speechllm.config import load_yaml_dataclass
from speechllm.memory import estimate
from speechllm.model.llm import LLMConfig


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_json", type=Path, required=True, help="the model's transformers config.json")
    parser.add_argument("--llm_config", type=Path, required=True, help="our LLM YAML (dtype, quantization, lora)")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per GPU and micro-batch")
    parser.add_argument("--positions", type=int, default=600, help="positions per example (prompt, audio, target)")
    parser.add_argument("--target_tokens", type=int, default=64, help="longest target in the batch, EOS included")
    parser.add_argument("--audio_seconds", type=float, default=7.6, help="audio per example (50 Whisper frames/s)")
    parser.add_argument("--gradient_checkpointing", type=_bool, default=True,
                        help="true (as in conf/train_gpu.yaml) or false")
    parser.add_argument("--world_size", type=int, default=1, help="GPUs: above 1, DDP's gradient buckets count")
    parser.add_argument("--feat_dim", type=int, default=512, help="Whisper feature width (base: 512)")
    parser.add_argument("--adapter_hidden", type=int, default=2048)
    parser.add_argument("--stack", type=int, default=4)
    args = parser.parse_args(argv)

    config = AutoConfig.from_pretrained(args.config_json)
    cfg = load_yaml_dataclass(args.llm_config, LLMConfig)
    est = estimate(config, cfg, args.batch_size, args.positions, args.target_tokens, args.audio_seconds,
                   args.gradient_checkpointing, args.world_size, args.feat_dim, args.adapter_hidden, args.stack)
    print(json.dumps({"model_type": config.model_type, "llm_config": str(args.llm_config),
                      "dtype": cfg.dtype, "quantization": cfg.quantization, "batch_size": args.batch_size,
                      "positions": args.positions, "target_tokens": args.target_tokens,
                      "world_size": args.world_size, **est.as_dict()}, indent=1))
    print(f"{args.llm_config.stem}: {est.total_gib:.1f} GiB per GPU at {args.batch_size} x {args.positions} positions "
          f"({'with' if est.gradient_checkpointing else 'without'} gradient checkpointing; weights "
          f"{est.weights_gib:.1f}, trainable {est.trainable_gib:.1f}, activations {est.activations_gib:.1f}, "
          f"recompute {est.recompute_gib:.1f}, logits {est.logits_gib:.1f}); add ~2 GB for the CUDA context",
          file=sys.stderr)


if __name__ == "__main__":
    main()
