"""Slot dicts: a label maps to one value or to a list of values, and some values mean "no value".

A turn can hold several values of one label ("move it from checking to savings":
``{"account_type": ["checking", "savings"]}``), so a value is a string or a list of strings. Every
metric counts (label, value) pairs, one per listed value, as SLURP counts repeated entity types.

``None``, ``""``, ``"None"``, ``"null"`` and ``"N/A"`` (in any case) all mean that the label has no
value, in references and hypotheses alike; a missing key means the same.
"""

from __future__ import annotations

SlotValue = str | list[str]
Slots = dict[str, SlotValue]

ABSENT = frozenset({"", "none", "null", "n/a"})


def is_filled(value: object) -> bool:
    """Whether a single value is a value (not ``None``, empty, ``'None'``, ``'null'`` or ``'N/A'``)."""
    return value is not None and str(value).strip().lower() not in ABSENT


def is_slot_value(value: object) -> bool:
    """Whether ``value`` has a slot value's type: a string, ``None``, or a list of those."""
    items = value if isinstance(value, list) else [value]
    return all(v is None or isinstance(v, str) for v in items)


def values_of(value: object) -> list[str]:
    """The filled values of one label, in order: a list's filled items, or the value itself."""
    items = value if isinstance(value, list) else [value]
    return [str(v) for v in items if is_filled(v)]


def filled_pairs(slots: Slots) -> list[tuple[str, str]]:
    """Every (label, value) pair of a slot dict, one per filled value."""
    return [(label, v) for label, value in slots.items() for v in values_of(value)]


def filled_slots(slots: Slots) -> Slots:
    """The labels that have a value: one value as a string, several as a list."""
    out: Slots = {}
    for label, value in slots.items():
        values = values_of(value)
        if values:
            out[label] = values if len(values) > 1 else values[0]
    return out
