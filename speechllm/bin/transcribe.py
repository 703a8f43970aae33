"""Print Whisper's transcript of each audio file: the code stage 1 uses for the context hypotheses.

    speechllm-transcribe [--whisper base|tiny.en|PATH|conf.yaml] FILE.wav...
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from speechllm.asr import transcribe
from speechllm.features import MAX_SECONDS, SAMPLE_RATE, load_whisper_spec, read_audio
from speechllm.logging_utils import setup_logging

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--whisper", default="base", help="size name, checkpoint path or YAML (default: base)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    model, cfg = load_whisper_spec(args.whisper, args.device)
    status = 0
    for path in args.files:
        try:
            audio = read_audio(path)
        except (OSError, RuntimeError) as e:
            print(f"{path}: cannot read audio ({e})", file=sys.stderr)
            status = 1
            continue
        if len(audio) > MAX_SECONDS * SAMPLE_RATE:
            log.warning("%s is longer than %d s: only the first %d s are transcribed", path, MAX_SECONDS, MAX_SECONDS)
        print(f"{path}\t{transcribe(model, audio, cfg.asr_max_tokens)}", flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
