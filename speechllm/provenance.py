"""The code's commit, as the recorded results name it (stage 5's RESULTS.md, speechllm-bench)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_commit() -> str:
    """The short commit of this checkout, ``+changes`` when tracked files differ from it (as sf.sh records
    each stage's); ``unknown (not a git checkout)`` for an installed copy."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
