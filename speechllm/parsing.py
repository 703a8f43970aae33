"""Turn a generated answer into a slot dict without ever raising.

The model is trained to emit JSON (double quotes); the paper prints Python dicts (single quotes).
Both are accepted so that outputs of other systems can be scored with the same code. A label may
hold a list of values (``{"account_type": ["checking", "savings"]}``); other values become strings.

The answer is looked for in the ``<response>`` body, else after the trace (``</thinking>``, or the
``</think>`` of a model trained with its own thinking block), else in the whole output. A reasoning
output cut off inside its trace (an open ``<thinking>`` or ``<think>`` without ``<response>``: the model
hit the cap on new tokens) has no answer: it is unparseable, with no slots, even when the trace quotes
a dict.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from speechllm.slots import SlotValue, Slots

_RESPONSE_RE = re.compile(r"<response>(.*?)(?:</response>|$)", re.DOTALL)
TRACE_TAGS = (("<thinking>", "</thinking>"), ("<think>", "</think>"))  # ours, and Qwen3's native block


@dataclass
class ParsedOutput:
    slots: Slots
    parseable: bool


def _slot_value(value: object) -> SlotValue:
    """A parsed value as a slot value: ``None`` as ``'None'``, a list item by item, else ``str``."""
    if isinstance(value, (list, tuple)):
        return ["None" if v is None else str(v) for v in value]
    return "None" if value is None else str(value)


def first_braced(text: str) -> str | None:
    """Return the first balanced ``{...}`` substring, honouring quoted strings, in linear time.

    One scan from the first brace, with a stack of the braces still open, sees every balanced pair;
    the answer is the pair that opens first. Braces inside a quoted string are text. A generation of
    unclosed braces (hostile or looping output) costs one pass, not one pass per brace.
    """
    start = text.find("{")
    if start == -1:
        return None
    opened: list[int] = []
    first: tuple[int, int] | None = None  # the earliest-opening closed pair, while an outer brace is open
    quote, escape = None, False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            # an apostrophe inside a word (e.g. "it's") is not a quote
            if ch == "'" and i > 0 and text[i - 1].isalnum() and i + 1 < len(text) and text[i + 1].isalnum():
                continue
            quote = ch
        elif ch == "{":
            opened.append(i)
        elif ch == "}" and opened:
            begin = opened.pop()
            if not opened:  # the outermost pair: nothing opened before it
                return text[begin : i + 1]
            if first is None or begin < first[0]:
                first = (begin, i)
    return None if first is None else text[first[0] : first[1] + 1]


def response_part(text: str) -> str:
    """The part of a generation that holds the answer: the ``<response>`` body, else what follows the
    trace's closing tag, else everything; nothing (``""``) for a trace cut off before either tag."""
    match = _RESPONSE_RE.search(text)
    if match:
        return match.group(1)
    for _, closing in TRACE_TAGS:
        if closing in text:
            return text.split(closing, 1)[1]
    if any(opening in text for opening, _ in TRACE_TAGS):  # truncated mid-trace: a dict there is not the answer
        return ""
    return text


def reasoning_part(text: str) -> str | None:
    """The trace of a generation, its tags included (to its end if cut off); ``None`` without one, or
    for an empty thinking block (a native ``/no_think`` answer)."""
    for opening, closing in TRACE_TAGS:
        start = text.find(opening)
        if start < 0:
            continue
        end = text.find(closing, start)
        trace = text[start : len(text) if end < 0 else end + len(closing)]
        return trace.strip() if trace[len(opening) :].removesuffix(closing).strip() else None
    return None


def parse_slots(text: str) -> ParsedOutput:
    """Extract the slot dict of a generation (the first ``{...}`` of :func:`response_part`, read as JSON
    or as a Python dict); unparseable output, a trace cut off before its closing tag and ``<response>``
    included, gives ``({}, parseable=False)``."""
    body = first_braced(response_part(text))
    if body is None:
        return ParsedOutput({}, False)
    for loader in (json.loads, ast.literal_eval):
        try:
            value = loader(body)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return ParsedOutput({str(k): _slot_value(v) for k, v in value.items()}, True)
    return ParsedOutput({}, False)


def format_slots(slots: Slots) -> str:
    """The canonical target string: JSON with double quotes, keys in the given order."""
    return json.dumps(slots, ensure_ascii=False)
