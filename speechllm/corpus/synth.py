"""Speak a conversation corpus with espeak-ng into Kaldi-style data dirs (stage 0).

Each turn becomes one 16 kHz wav and one utterance ``<conv>_<speaker>_<turn>``. The two sides of a
call (agent or system, customer or user) draw from disjoint voice sets; rate and pitch are drawn
per call and side, seeded. ``--voices wide`` (the alignment corpus) draws both sides from every
English accent of espeak-ng with most of its human-sounding variants, at a wider range of rates.
Written per split: ``wav.scp text utt2spk spk2utt utt2conv utt2turn slots.jsonl slot_inventory.json``, and ``utt2group`` when turns carry a ``group`` (SGD's seen and
unseen services). A turn's ``descriptions`` (its labels' meanings, where they differ per service)
go into its ``slots.jsonl`` row.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from random import Random

import numpy as np
import soundfile as sf
from tqdm import tqdm

from speechllm.features import SAMPLE_RATE, resample_to_16k
from speechllm.io_utils import InputError, atomic_write, fingerprint, read_jsonl, write_kaldi_map

log = logging.getLogger(__name__)

VOICES = {
    "agent": ("en-us+m3", "en-us+f2", "en-gb-x-rp+m1", "en-us+f4", "en+m4"),
    "customer": ("en-gb+m2", "en-gb-scotland+f3", "en-us+m7", "en-gb-x-rp+f1", "en-029+m5", "en-us-nyc+f5"),
}
SPOKEN = "spoken.jsonl"  # per wav dir: what each wav says, in which voice (a fingerprint per line)
SIDES = {"agent": "agent", "system": "agent", "customer": "customer", "user": "customer"}
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp", "en-029", "en-us-nyc")
VARIANTS = ("m1 m2 m3 m4 m5 m6 m7 m8 f1 f2 f3 f4 f5 klatt klatt2 klatt3 klatt4 Andy Annie Alex Alicia benjamin "
            "belinda caleb david edward john linda max Michael paul robert steph travis victor zac").split()
WIDE = tuple(f"{accent}+{variant}" for accent in ACCENTS for variant in VARIANTS)


@dataclass(frozen=True)
class VoiceSet:
    """The voices of each side of a call and the range of speaking rates (words per minute)."""

    voices: dict[str, tuple[str, ...]]
    rates: tuple[int, int]


VOICE_SETS = {"callcenter": VoiceSet(VOICES, (145, 185)),
              "wide": VoiceSet({"agent": WIDE, "customer": WIDE}, (125, 205))}


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng not found: install it with 'apt-get install espeak-ng' "
                           "(or run tools/install.sh as root)")
    return exe


def synthesize(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """Return 16 kHz float32 audio of ``text`` spoken by espeak-ng."""
    proc = subprocess.run([espeak_binary(), "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=True)
    audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return resample_to_16k(audio, sr)


def voice_for(conv_id: str, speaker: str, seed: int, voices: VoiceSet = VOICE_SETS["callcenter"]
              ) -> tuple[str, int, int]:
    rng = Random(f"voice-{seed}-{conv_id}-{speaker}")
    return rng.choice(voices.voices[SIDES[speaker]]), rng.randint(*voices.rates), rng.randint(35, 70)


def utt_id(conv_id: str, speaker: str, turn: int) -> str:
    return f"{conv_id}_{speaker}_{turn:03d}"


def build_data_dirs(conversations: Path, inventory: str | Path, wavdir: Path, datadir: Path,
                    nj: int = 2, seed: int = 1, voices: VoiceSet = VOICE_SETS["callcenter"]) -> dict[str, int]:
    """Synthesise every turn and write one data dir per split.

    A wav is kept only if ``<wavdir>/spoken.jsonl`` records that it says the same text in the same
    voice: a changed generator (or a new Faker) speaks its changed turns again instead of pairing them
    with stale audio, and a killed run goes on where it stopped. Wavs made before the record are
    spoken again, once. ``inventory`` is one file for every split, or a pattern with ``{split}`` for one
    per split.
    """
    wavdir.mkdir(parents=True, exist_ok=True)
    calls = []
    for lineno, call in read_jsonl(conversations):
        for key in ("conv_id", "split", "turns"):
            if key not in call:
                raise InputError(f"{conversations}:{lineno}: missing key {key!r}")
        calls.append(call)
    jobs = []
    for call in calls:
        for turn, t in enumerate(call["turns"]):
            if not t["text"].strip():
                raise InputError(f"{conversations}: call {call['conv_id']} turn {turn} has empty text")
            if t["speaker"] not in SIDES:
                raise InputError(f"{conversations}: call {call['conv_id']} turn {turn}: unknown speaker "
                                 f"{t['speaker']!r} (one of {', '.join(SIDES)})")
            uid = utt_id(call["conv_id"], t["speaker"], turn)
            jobs.append((wavdir / f"{uid}.wav", t["text"], *voice_for(call["conv_id"], t["speaker"], seed, voices)))

    manifest = wavdir / SPOKEN
    spoken = {}  # the last line of a wav wins
    if manifest.exists():
        spoken = {row["utt"]: row["said"] for _, row in read_jsonl(manifest)}
    said = {path.stem: fingerprint(*job) for path, *job in jobs}
    todo = [job for job in jobs if not (job[0].exists() and spoken.get(job[0].stem) == said[job[0].stem])]
    log.info("%s: %d of %d turns to speak (the others are spoken already)", wavdir, len(todo), len(jobs))

    def run(job: tuple[Path, str, str, int, int]) -> str:
        path, text, voice, rate, pitch = job
        with atomic_write(path, "wb") as f:
            sf.write(f, synthesize(text, voice, rate, pitch), SAMPLE_RATE, format="WAV", subtype="PCM_16")
        return path.stem

    with open(manifest, "a", encoding="utf-8") as record, ThreadPoolExecutor(max(1, nj)) as pool:
        # first unknown, then what each wav says once it is written: a killed run never leaves a wav
        # recorded as saying what it no longer says
        record.writelines(json.dumps({"utt": job[0].stem, "said": None}) + "\n" for job in todo)
        record.flush()
        for utt in tqdm(pool.map(run, todo), total=len(todo), desc="espeak-ng", unit="utt"):
            record.write(json.dumps({"utt": utt, "said": said[utt]}) + "\n")
            record.flush()
    counts: dict[str, int] = {}
    for split in sorted({c["split"] for c in calls}):
        out = datadir / split
        out.mkdir(parents=True, exist_ok=True)
        wav, text, utt2spk, utt2conv, utt2turn, utt2group, utt2domain, rows = {}, {}, {}, {}, {}, {}, {}, {}
        for call in (c for c in calls if c["split"] == split):
            for turn, t in enumerate(call["turns"]):
                uid = utt_id(call["conv_id"], t["speaker"], turn)
                wav[uid] = str((wavdir / f"{uid}.wav").resolve())
                text[uid] = " ".join(t["text"].split())
                utt2spk[uid] = f"{call['conv_id']}_{t['speaker']}"
                utt2conv[uid] = call["conv_id"]
                utt2turn[uid] = str(turn)
                if "group" in t:
                    utt2group[uid] = t["group"]
                if "domain" in call:
                    utt2domain[uid] = call["domain"]
                rows[uid] = {"utt_id": uid, "slots": t["slots"]}
                if t.get("descriptions"):
                    rows[uid]["descriptions"] = t["descriptions"]
        spk2utt: dict[str, list[str]] = {}
        for uid in sorted(utt2spk):
            spk2utt.setdefault(utt2spk[uid], []).append(uid)
        for name, mapping in (("wav.scp", wav), ("text", text), ("utt2spk", utt2spk), ("utt2conv", utt2conv),
                              ("utt2turn", utt2turn), ("spk2utt", {k: " ".join(v) for k, v in spk2utt.items()})):
            write_kaldi_map(out / name, mapping)
        for name, mapping in (("utt2group", utt2group), ("utt2domain", utt2domain)):
            if mapping:
                write_kaldi_map(out / name, mapping)
        with atomic_write(out / "slots.jsonl") as f:
            for uid in sorted(rows):
                f.write(json.dumps(rows[uid], ensure_ascii=False) + "\n")
        source = Path(str(inventory).format(split=split))
        if not source.is_file():
            raise InputError(f"{source}: slot inventory of split {split!r} not found")
        shutil.copyfile(source, out / "slot_inventory.json")
        counts[split] = len(wav)
        log.info("%s: %d utterances from %d calls", out, len(wav), sum(c["split"] == split for c in calls))
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=Path, required=True)
    parser.add_argument("--inventory", required=True,
                        help="slot_inventory.json of every split, or a pattern with {split}")
    parser.add_argument("--wavdir", type=Path, required=True)
    parser.add_argument("--datadir", type=Path, required=True)
    parser.add_argument("--nj", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--voices", choices=sorted(VOICE_SETS), default="callcenter",
                        help="callcenter: a few voices per side; wide: every English accent and most variants")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    build_data_dirs(args.conversations, args.inventory, args.wavdir, args.datadir, args.nj, args.seed,
                    VOICE_SETS[args.voices])


if __name__ == "__main__":
    main()
