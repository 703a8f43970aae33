"""Spoken-style value generators for the call-centre corpus.

Values are written the way a transcriber would write what was said ("$45", "March 3rd", "4 7 2 9"),
which is also what espeak-ng reads naturally and what Whisper tends to output.
"""

from __future__ import annotations

from random import Random
from typing import Callable

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
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def address(rng: Random) -> str:
    return f"{rng.randint(2, 990)} {rng.choice(STREETS)} {rng.choice(STREET_KINDS)}"


def city(rng: Random) -> str:
    return rng.choice(CITIES)


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
