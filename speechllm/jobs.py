"""Sharing a stage's keys among its parallel jobs (stages 1 and 4), as ESPnet's ``split_scp`` does.

Each job takes a contiguous chunk of the sorted keys, so the recipe's merge of the jobs' outputs (in
job order, or sorted) is the same whatever ``--nj`` is.
"""

from __future__ import annotations


def job_slice(keys: list[str], job: int, nj: int) -> list[str]:
    """Contiguous chunk ``job`` (1-based) of ``nj`` over sorted keys."""
    keys = sorted(keys)
    size, rest = divmod(len(keys), nj)
    start = (job - 1) * size + min(job - 1, rest)
    return keys[start : start + size + (1 if job <= rest else 0)]
