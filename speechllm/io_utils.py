"""Small I/O helpers shared by the stages: atomic writes and line-checked readers.

Atomic writes make an interrupted stage leave nothing that a later stage would take as complete.
Readers name the file and line of any malformed input.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

from speechllm.slots import Slots, is_slot_value


class InputError(ValueError):
    """Bad user input; the message names the file and line."""


def file_stamp(path: str | Path) -> list[int] | None:
    """Size and modification time of a file (``None`` if it is missing): a file rewritten at the same path
    is another input."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def temp_path(path: str | Path) -> Path:
    """A sibling of ``path`` that no other process or call picks (process id and a random part), to
    write aside and rename: two writers of one file never collide in a shared ``path.tmp``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def aside(path: str | Path, stale: bool = False) -> Iterator[Path]:
    """A :func:`temp_path` of ``path`` (a file or a dir) for the block to write and rename into place; it is
    removed if the block fails. ``stale``: first remove the ones that writers killed mid-write left behind
    (only where one writer at a time is sure, e.g. under the experiment dir's lock)."""
    path = Path(path)
    if stale:
        for old in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
            _remove(old)
    tmp = temp_path(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise


def replace_dir(new: Path, dest: Path) -> None:
    """Put the directory ``new`` at ``dest``: an old ``dest`` is moved aside first and removed only once the
    new one is in place (an error in between puts it back), so ``dest`` is never lost."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = temp_path(dest)
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Write to a :func:`temp_path` and rename on success, so readers never see a half-written file."""
    with aside(path) as tmp:
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` of a UTF-8 text file, line ends (LF or CRLF) stripped; a byte
    that is not UTF-8 raises naming the file, line and column."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1})") from None


def read_json(path: str | Path) -> Any:
    """A JSON file; malformed or non-UTF-8 content raises naming the file and line."""
    try:
        return json.loads("\n".join(line for _, line in read_lines(path)))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None


def read_kaldi_map(path: str | Path, allow_empty_value: bool = False) -> dict[str, str]:
    """Read a Kaldi ``key value...`` file (``wav.scp``, ``text``, ``utt2spk``...)."""
    out: dict[str, str] = {}
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        key, _, value = line.partition(" ")
        if not value.strip() and not allow_empty_value:
            raise InputError(f"{path}:{lineno}: expected '<key> <value>', got {line!r}")
        if key in out:
            raise InputError(f"{path}:{lineno}: duplicate key {key!r}")
        out[key] = value.strip()
    return out


def write_kaldi_map(path: str | Path, mapping: dict[str, str]) -> None:
    with atomic_write(path) as f:
        for key in sorted(mapping):
            f.write(f"{key} {mapping[key]}\n")


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, int, dict]]:
    """Yield ``(line number, byte offset, object)``; a malformed line raises with file and line."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{path}:{lineno}: malformed JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, start, obj


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)``; a malformed line raises with file and line."""
    for lineno, _, obj in jsonl_rows(path):
        yield lineno, obj


def read_slots(path: str | Path) -> dict[str, Slots]:
    """Read ``slots.jsonl`` (``{"utt_id": ..., "slots": {label: value or [values]}}`` per line)."""
    out: dict[str, Slots] = {}
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj.get("utt_id"), str) or not isinstance(obj.get("slots"), dict):
            raise InputError(f"{path}:{lineno}: expected keys 'utt_id' (string) and 'slots' (object)")
        bad = [k for k, v in obj["slots"].items() if not is_slot_value(v)]
        if bad:
            raise InputError(f"{path}:{lineno}: the value of {bad[0]!r} must be a string, null or a list of "
                             f"strings, got {obj['slots'][bad[0]]!r}")
        out[obj["utt_id"]] = obj["slots"]
    return out


def read_descriptions(path: str | Path) -> dict[str, dict[str, str]]:
    """The optional per-utterance ``descriptions`` of ``slots.jsonl`` rows (label meanings that differ
    per utterance, e.g. per SGD service); utterances without them are absent."""
    out: dict[str, dict[str, str]] = {}
    for lineno, obj in read_jsonl(path):
        descriptions = obj.get("descriptions")
        if descriptions is None:
            continue
        if not isinstance(descriptions, dict) or not all(isinstance(v, str) for v in descriptions.values()):
            raise InputError(f"{path}:{lineno}: 'descriptions' must map labels to strings")
        out[obj["utt_id"]] = descriptions
    return out


def fingerprint(*parts: object) -> str:
    """A short hash of JSON-able ``parts``: what a cached file was made from."""
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]
