"""Slot filling of single wav files with a trained experiment: one JSON line per file.

    speechllm-infer --exp exp/smollm2_135m_hybrid [--think | --no_think] [--slots a,b,c] FILE.wav...

Features come from the Whisper encoder recorded in the experiment's model dir; a cascade model gets
that Whisper's transcript instead (printed as "transcript"). Without ``--slots`` the model lists the
slots it finds; with it, the prompt queries those labels. ``--think`` (reasoning and hybrid models)
also prints the reasoning trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from speechllm import prompts
from speechllm.asr import transcribe
from speechllm.features import check_audio, encode_audio, load_whisper_spec
from speechllm.io_utils import InputError
from speechllm.logging_utils import setup_logging
from speechllm.model.builder import SPEC_FILE, load_model, read_spec
from speechllm.parsing import parse_slots, reasoning_part, response_part


def build_prompt(slots: list[str], think: bool | None) -> str:
    """The first template of the no-context case, with the hybrid switch when one is given."""
    prompt = prompts.TEMPLATES[(False, bool(slots))][0].format(audio=prompts.AUDIO, labels=", ".join(slots),
                                                               context="")
    if think is not None:
        prompt += f" {prompts.THINK if think else prompts.NO_THINK}"
    return prompt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--exp", type=Path, required=True, help="experiment dir (holds model/) or a model dir")
    switch = parser.add_mutually_exclusive_group()
    switch.add_argument("--think", action="store_true", help="reasoning mode (hybrid models)")
    switch.add_argument("--no_think", action="store_true", help="direct mode (hybrid models)")
    parser.add_argument("--slots", default="", help="comma-separated labels to query")
    parser.add_argument("--max_new_tokens", type=int, default=384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)

    model_dir = args.exp / "model" if (args.exp / "model" / SPEC_FILE).exists() else args.exp
    try:
        spec = read_spec(model_dir)
    except (FileNotFoundError, InputError) as err:
        sys.exit(str(err))
    if not spec.whisper:
        sys.exit(f"{model_dir / SPEC_FILE} does not record its Whisper encoder: add whisper: <name or path> to "
                 "it (the encoder of the features it was trained on)")
    mode = spec.mode
    if args.think and mode == "regular":
        sys.exit("--think needs a reasoning or hybrid model; this one was trained in regular mode")
    encoder, cfg = load_whisper_spec(spec.whisper, args.device)
    model = load_model(model_dir, args.device)
    slots = [s.strip() for s in args.slots.split(",") if s.strip()]
    # only hybrid models take a switch; they answer directly unless --think is given
    prompt = build_prompt(slots, args.think if mode == "hybrid" else None)
    status = 0
    for path in args.files:
        audio, reason = check_audio(path)
        if audio is None:
            print(json.dumps({"file": path, "error": reason}), flush=True)
            status = 1
            continue
        if mode == "cascade":
            transcript = transcribe(encoder, audio, cfg.asr_max_tokens)
            item = model.tokenize(None, prompts.text_prompt(prompt, transcript))
        else:
            item = model.tokenize(torch.from_numpy(encode_audio(encoder, audio, cfg.pad_30s)), prompt)
        output = model.generate([item], args.max_new_tokens)[0].text
        parsed = parse_slots(output)
        result = {"file": path, "slots": parsed.slots, "parseable": parsed.parseable}
        if mode == "cascade":
            result["transcript"] = transcript
        reasoning = reasoning_part(output)
        if reasoning is not None:
            result["reasoning"] = reasoning
        if not parsed.parseable:
            result["output"] = response_part(output)
        print(json.dumps(result, ensure_ascii=False), flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
