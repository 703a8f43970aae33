"""Spoken-style value generators for the call-centre corpus.

Values are written the way a transcriber would write what was said ("$45", "March 3rd", "4 7 2 9"),
which is also what espeak-ng reads naturally and what Whisper tends to output.

Names, streets and cities come from the :class:`Inventory` in use: the call-centre corpus keeps a
small one, so that names recur across calls as customers' do in one company's calls; the alignment
corpus (:mod:`speechllm.corpus.alignment`) draws the same shapes from a large one (:func:`drawing_from`).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from random import Random
from typing import Callable, Iterator

ValueFn = Callable[[Random], str]

MONTHS = ("January February March April May June July August September October "
          "November December").split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
FIRST_NAMES = ("Patrick Maria James Linda Ahmed Sofia David Emma Carlos Priya Daniel Grace Omar "
               "Hannah Lucas Olivia Ethan Chloe Ravi Fatima Noah Julia Victor Nina Samuel Laura "
               "Kevin Aisha Peter Rosa").split()
LAST_NAMES = ("Smith Johnson Garcia Brown Miller Davis Wilson Anderson Thomas Moore Taylor Clark "
              "Lewis Walker Young Allen King Wright Scott Green Baker Adams Nelson Hill Campbell "
              "Mitchell Roberts Carter Phillips Evans").split()
STREETS = ("Oak Maple Cedar Pine Elm Washington Lake Hill Park River Church Mill Sunset Forest "
           "Highland").split()
STREET_KINDS = "Street Avenue Road Lane Drive Boulevard Court".split()
CITIES = ("Springfield Riverside Fairview Greenville Madison Franklin Clinton Arlington Salem "
          "Bristol Dover Oxford").split()


@dataclass(frozen=True)
class Inventory:
    """The word lists that names, addresses and cities are drawn from."""

    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    streets: tuple[str, ...]
    cities: tuple[str, ...]


CALLCENTER = Inventory(tuple(FIRST_NAMES), tuple(LAST_NAMES), tuple(STREETS), tuple(CITIES))
_inventory: ContextVar[Inventory] = ContextVar("inventory", default=CALLCENTER)


@contextmanager
def drawing_from(inventory: Inventory) -> Iterator[None]:
    """Draw names, streets and cities from ``inventory`` inside the block (the call centre's otherwise)."""
    token = _inventory.set(inventory)
    try:
        yield
    finally:
        _inventory.reset(token)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def money(lo: int, hi: int, step: int = 1) -> ValueFn:
    """Dollar amounts: ``$1,300`` or ``1,300 dollars``."""
    def draw(rng: Random) -> str:
        amount = f"{rng.randrange(lo, hi + 1, step):,}"
        return f"${amount}" if rng.random() < 0.6 else f"{amount} dollars"
    return draw


def date(rng: Random) -> str:
    month, day = rng.choice(MONTHS), rng.randint(1, 28)
    return f"{month} {ordinal(day)}" if rng.random() < 0.6 else f"the {ordinal(day)} of {month}"


def time_of_day(rng: Random) -> str:
    hour = rng.randint(8, 18)
    suffix = "am" if hour < 12 else "pm"
    hour12 = hour if hour <= 12 else hour - 12
    minute = rng.choice([0, 0, 15, 30, 45])
    return f"{hour12} {suffix}" if minute == 0 else f"{hour12}:{minute:02d} {suffix}"


def digits(n: int) -> ValueFn:
    return lambda rng: " ".join(str(rng.randint(0, 9)) for _ in range(n))


def phone_number(rng: Random) -> str:
    return " ".join(str(rng.randint(0, 9)) for _ in range(3)) + " " + \
        " ".join(str(rng.randint(0, 9)) for _ in range(4))


def full_name(rng: Random) -> str:
    names = _inventory.get()
    return f"{rng.choice(names.first_names)} {rng.choice(names.last_names)}"


def address(rng: Random) -> str:
    return f"{rng.randint(2, 990)} {rng.choice(_inventory.get().streets)} {rng.choice(STREET_KINDS)}"


def city(rng: Random) -> str:
    return rng.choice(_inventory.get().cities)


def count(lo: int, hi: int) -> ValueFn:
    return lambda rng: NUMBER_WORDS[rng.randint(lo, hi)]


def duration(units: tuple[str, ...], lo: int, hi: int) -> ValueFn:
    def draw(rng: Random) -> str:
        n, unit = rng.randint(lo, hi), rng.choice(units)
        return f"{NUMBER_WORDS[n] if n <= 12 else n} {unit if n == 1 else unit + 's'}"
    return draw


def percent(lo: float, hi: float) -> ValueFn:
    return lambda rng: f"{rng.randint(int(lo * 10), int(hi * 10)) / 10:g}%"


def one_of(*options: str) -> ValueFn:
    return lambda rng: rng.choice(options)


def weekday(rng: Random) -> str:
    return rng.choice(WEEKDAYS)


def quantity(lo: int, hi: int, unit: str) -> ValueFn:
    return lambda rng: f"{rng.randint(lo, hi)} {unit}"
