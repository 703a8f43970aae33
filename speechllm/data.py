"""Training and decoding examples: JSONL rows with their Whisper features, batched by length.

Rows come from stage 2 (``dump/<set>/<mode>.jsonl``); features are read lazily from the ark.
For training, a JSONL file is tokenised once into memory-mapped arrays (:class:`TokenizedSet`), so
that a rank's start-up time and memory do not grow with the corpus: a row's JSON is read back only
when its batch is built. Length bucketing sorts each chunk of ``bucket_batches`` batches by length
before cutting it into batches, so padding stays small while the order still changes every epoch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import kaldiio
import numpy as np
import torch
from tqdm import tqdm

from speechllm.io_utils import InputError, atomic_write, file_stamp, fingerprint, jsonl_rows, read_jsonl
from speechllm.distributed import World
from speechllm.model.speechllm import ModelInput, SpeechLLM
from speechllm.slots import Slots

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("id", "utt_id", "feats", "prompt", "target", "slots")


@dataclass
class Example:
    id: str
    utt_id: str
    feats_path: str | None  # kaldiio location "ark_path:offset"; None: a text-only (cascade) example
    prompt: str
    target: str
    slots: Slots
    mode: str
    text: str = ""
    n_frames: int = 0


def to_example(row: dict, where: str) -> Example:
    """A stage-2 row as an :class:`Example`; ``where`` (``file:line``) names it in errors."""
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise InputError(f"{where}: missing key(s) {missing}")
    return Example(row["id"], row["utt_id"], row["feats"], row["prompt"], row["target"], row["slots"],
                   row.get("mode", ""), row.get("text", ""), int(row.get("n_frames", 0)))


def read_examples(path: str | Path, mode: str | None = None) -> list[Example]:
    """Rows of a stage-2 JSONL file, optionally only those of one mode (e.g. ``hybrid_think``)."""
    out = [to_example(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)
           if mode is None or row.get("mode") == mode]
    if not out:
        raise InputError(f"{path}: no examples" + (f" of mode {mode!r}" if mode else ""))
    return out


def iter_examples(path: str | Path) -> Iterator[tuple[int, Example]]:
    """``(byte offset, example)`` of each row, streamed: the whole file is never held."""
    for lineno, offset, row in jsonl_rows(path):
        yield offset, to_example(row, f"{path}:{lineno}")


# columns of TokenizedSet.index
OFFSET, TOKENS, N_BEFORE, N_AFTER, N_TARGET, N_FRAMES = range(6)
TokenizeFn = Callable[[list[Example]], list[tuple[list[int], list[int], list[int]]]]
TOKENIZE_CHUNK = 2048  # rows per tokenizer call: parallel inside the tokenizer, flat memory outside


class TokenizedSet(torch.utils.data.Dataset):
    """A stage-2 JSONL file tokenised into ``tokens.bin`` (int32: each row's ids before the audio, after
    it and of the target, concatenated) and ``index.bin`` (int64 per row: JSONL byte offset, token
    offset, the three lengths and the feature frames), both memory-mapped.

    ``meta.json``, written last, records what the arrays were built from; :func:`tokenize_once`
    rebuilds them when the JSONL or the tokenizer changed. Items are ``(ModelInput, transcript)``.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))
        check_arks(self.meta.get("arks", {}), self.meta["source"])
        self.tokens = np.memmap(self.dir / "tokens.bin", dtype=np.int32, mode="r")
        self.index = np.memmap(self.dir / "index.bin", dtype=np.int64, mode="r").reshape(-1, 6)
        self._file: tuple[int, object] | None = None  # (pid, handle): each DataLoader worker opens its own

    def __len__(self) -> int:
        return len(self.index)

    @property
    def n_target(self) -> np.ndarray:
        return self.index[:, N_TARGET]

    def lengths(self, stack: int) -> np.ndarray:
        """Positions per row in the LLM: prompt tokens, stacked audio frames and target."""
        idx = self.index
        return idx[:, N_BEFORE] + idx[:, N_AFTER] + idx[:, N_TARGET] + idx[:, N_FRAMES] // stack

    def example(self, i: int) -> Example:
        if self._file is None or self._file[0] != os.getpid():
            f = open(self.meta["source"], "rb")
            stat = os.fstat(f.fileno())
            if (stat.st_size, stat.st_mtime_ns) != (self.meta["size"], self.meta["mtime_ns"]):
                raise InputError(f"{self.meta['source']} changed after it was tokenised into {self.dir}: "
                                 "its rows no longer match the tokens (run stage 3 again: it tokenises anew)")
            self._file = (os.getpid(), f)
        f = self._file[1]
        f.seek(int(self.index[i, OFFSET]))
        return to_example(json.loads(f.readline()), f"{self.meta['source']} (byte {self.index[i, OFFSET]})")

    def ids(self, i: int) -> tuple[list[int], list[int], list[int]]:
        start, nb, na, nt = (int(v) for v in self.index[i, [TOKENS, N_BEFORE, N_AFTER, N_TARGET]])
        ids = self.tokens[start : start + nb + na + nt].tolist()
        return ids[:nb], ids[nb : nb + na], ids[nb + na :]

    def __getitem__(self, i: int) -> tuple[ModelInput, str]:
        example = self.example(i)
        return ModelInput(load_feats(example), *self.ids(i)), example.text


def collate(items: list[tuple[ModelInput, str]]) -> tuple[list[ModelInput], list[str]]:
    return [e for e, _ in items], [t for _, t in items]


def ark_of(feats_path: str) -> str:
    """The file of a kaldiio location (``path:offset`` or ``path:offset[slice]``)."""
    return re.sub(r":\d+(\[[^]]*\])?$", "", feats_path)


def ark_stamps(arks: set[str], jsonl: Path) -> dict[str, list[int]]:
    """Size and modification time of each feature file a JSONL file points into; a missing one is an error."""
    stamps = {ark: file_stamp(ark) for ark in sorted(arks)}
    missing = [ark for ark, stamp in stamps.items() if stamp is None]
    if missing:
        raise InputError(f"{missing[0]} (features of {jsonl}) not found: stage 1 did not complete, or ran again after "
                         "stage 2. Rerun stages 1 and 2")
    return stamps


def check_arks(stamps: dict[str, list[int]], jsonl: str) -> None:
    """Refuse feature files that changed since ``jsonl`` was tokenised: its offsets would point into
    other matrices (stage 1 ran again, or was killed while running again, after stage 2)."""
    for ark, stamp in stamps.items():
        now = file_stamp(ark)
        if now != stamp:
            raise InputError(f"{ark} (features of {jsonl}) is {'gone' if now is None else 'rewritten'} since the "
                             "rows that point into it were tokenised: stage 1 ran again. Rerun stage 2 (and stage 1 "
                             "if it did not complete)")


def source_stamp(jsonl: Path, tokenizer_fingerprint: str, limit: int | None) -> dict:
    stat = jsonl.stat()
    return {"source": str(jsonl.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "tokenizer": tokenizer_fingerprint, "limit": limit}


def tokenize_once(jsonl: str | Path, directory: str | Path, tokenize: TokenizeFn, tokenizer_fingerprint: str,
                  limit: int | None = None) -> None:
    """Tokenise the first ``limit`` rows (all: None) of ``jsonl`` into ``directory``, unless that was done.

    Rows stream through in chunks, so memory stays flat however long the file is.
    """
    jsonl, directory = Path(jsonl), Path(directory)
    if not jsonl.is_file():
        raise InputError(f"{jsonl} not found (stage 2 writes it)")
    stamp = source_stamp(jsonl, tokenizer_fingerprint, limit)
    meta_file = directory / "meta.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text(encoding="utf-8"))
        if {k: old.get(k) for k in stamp} == stamp:
            return
        log.info("%s was tokenised from another file or tokenizer: tokenising again", directory)
        meta_file.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    n_rows, n_tokens, pending, arks = 0, 0, [], set()
    with open(directory / "tokens.bin", "wb") as tok, open(directory / "index.bin", "wb") as idx:
        def flush() -> None:
            nonlocal n_tokens
            rows = np.zeros((len(pending), 6), dtype=np.int64)
            for r, ((offset, e), (before, after, target)) in enumerate(zip(pending, tokenize([e for _, e in pending]))):
                tok.write(np.asarray(before + after + target, dtype=np.int32).tobytes())
                rows[r] = (offset, n_tokens, len(before), len(after), len(target), e.n_frames)
                n_tokens += len(before) + len(after) + len(target)
            idx.write(rows.tobytes())
            pending.clear()

        for offset, example in tqdm(iter_examples(jsonl), desc=f"tokenise {jsonl.name}", unit="row"):
            if limit is not None and n_rows >= limit:
                break
            pending.append((offset, example))
            if example.feats_path is not None:
                arks.add(ark_of(example.feats_path))
            n_rows += 1
            if len(pending) == TOKENIZE_CHUNK:
                flush()
        if pending:
            flush()
    if n_rows == 0:
        raise InputError(f"{jsonl}: no examples")
    with atomic_write(meta_file) as f:
        json.dump({**stamp, "rows": n_rows, "tokens": n_tokens, "arks": ark_stamps(arks, jsonl)}, f)
    log.info("tokenised %d rows (%d tokens) of %s into %s", n_rows, n_tokens, jsonl, directory)


def load_feats(example: Example) -> torch.Tensor | None:
    if example.feats_path is None:
        return None
    return torch.from_numpy(kaldiio.load_mat(example.feats_path).copy()).float()


@dataclass
class BatchPlan:
    """An epoch's batches as one flat array of row indices and the batch boundaries: a few bytes per
    row on every rank, where a Python list per batch would cost about a hundred."""

    order: np.ndarray  # row indices, batch after batch
    bounds: np.ndarray  # batch k is order[bounds[k] : bounds[k + 1]]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k: int) -> list[int]:
        return self.order[self.bounds[k] : self.bounds[k + 1]].tolist()

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)

    def keep(self, mask: np.ndarray) -> BatchPlan:
        """The plan of the batches where ``mask`` is true, in the same order."""
        return BatchPlan.of_ranges(self.order, self.bounds[:-1][mask], self.sizes[mask])

    @staticmethod
    def of_ranges(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> BatchPlan:
        """Batches ``order[start : start + size]`` in the given order (vectorised: no loop per batch)."""
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        flat = np.arange(bounds[-1], dtype=np.int64) + np.repeat(starts - bounds[:-1], sizes)
        return BatchPlan(order[flat], bounds)


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                     bucket_batches: int = 50) -> BatchPlan:
    """Index batches for one epoch: rows shuffled, sorted by length within chunks of ``bucket_batches``
    batches, cut into batches, and the batches shuffled (seeded by ``seed`` and ``epoch``)."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    chunk = batch_size * max(1, bucket_batches)
    order = order[np.lexsort((np.asarray(lengths)[order], np.arange(n) // chunk))]  # stable within a chunk
    starts = np.arange(0, n, batch_size)  # chunks are whole batches, so no batch spans two chunks
    sizes = np.minimum(starts + batch_size, n) - starts
    perm = rng.permutation(len(starts))
    return BatchPlan.of_ranges(order, starts[perm], sizes[perm])


def tokenized(model: SpeechLLM, jsonl: Path, directory: Path, world: World = World(),
              limit: int | None = None) -> TokenizedSet:
    """``jsonl`` tokenised for ``model`` once (by rank 0, reused by every restart), then memory-mapped."""
    if world.is_main:
        def tokenize(examples: list[Example]) -> list[tuple[list[int], list[int], list[int]]]:
            return model.formatter.tokenize_many([e.prompt for e in examples], [e.target for e in examples],
                                                 [e.feats_path is not None for e in examples])

        tokenize_once(jsonl, directory, tokenize, fingerprint(model.formatter.fingerprint()), limit)
    world.barrier()
    return TokenizedSet(directory)
