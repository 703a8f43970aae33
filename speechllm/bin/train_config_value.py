"""One key of a resolved training config, for the shell scripts:

    python -m speechllm.bin.train_config_value conf/train.yaml align.steps --train_args "align.steps=600"

prints ``600``: the file with its ``base:`` chain over the defaults, then the overrides, as stage 3
resolves them (stage 1 asks whether stage 3 will align, so as to build the alignment corpus only then).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from speechllm.config import load_yaml_dataclass, parse_overrides
from speechllm.train_config import TrainConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("key", help="a dotted key, e.g. align.steps")
    parser.add_argument("--train_args", default="")
    args = parser.parse_args(argv)
    cfg = load_yaml_dataclass(args.config, TrainConfig, parse_overrides(args.train_args, "--train_args"))
    value = dataclasses.asdict(cfg)
    for part in args.key.split("."):
        if not isinstance(value, dict) or part not in value:
            parser.error(f"{args.key}: no such key of the training config")
        value = value[part]
    print(value)


if __name__ == "__main__":
    main()
