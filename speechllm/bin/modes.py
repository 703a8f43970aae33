"""The training modes for the shell scripts, from their one definition (:data:`speechllm.formatting.MODES`).

    python -m speechllm.bin.modes                  # every mode: regular reasoning hybrid cascade
    python -m speechllm.bin.modes all | MODE[,MODE]...  # the modes named (all: every one), or an error listing them
    python -m speechllm.bin.modes --decode MODE    # the row modes its model is decoded in (hybrid: both switches)

The answer is one line, space-separated, so that ``modes=$(python -m speechllm.bin.modes "${mode}")``
both checks and expands a recipe's ``--mode``.
"""

from __future__ import annotations

import argparse
import sys

from speechllm.formatting import DECODES, MODES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modes", nargs="*", help="modes to check (each may be a comma-separated list), or 'all'")
    parser.add_argument("--decode", action="store_true", help="print the row modes the models are decoded in")
    args = parser.parse_args(argv)
    args.modes = [m for arg in args.modes for m in arg.split(",")]
    unknown = [m for m in args.modes if m not in (*MODES, "all")]
    if unknown:
        sys.exit(f"Error: unknown mode '{unknown[0]}': {', '.join(MODES)} or all")
    modes = [m for m in MODES if not args.modes or "all" in args.modes or m in args.modes]
    if args.decode:
        modes = [name for name, (mode, _) in DECODES.items() if mode in modes]
    print(" ".join(modes))


if __name__ == "__main__":
    main()
