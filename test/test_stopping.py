"""Per-row stopping: a complete answer, a loop and EOS each end a row, and a stopped row's output is what
it was when it stopped."""

from __future__ import annotations

import pytest
import torch

from speechllm.stopping import LOOP_NGRAM, RowStops, answer_complete


@pytest.mark.parametrize("text, complete", [
    ('{"a": "b"}', True),
    ('  {"a": "b}"', False),  # the brace is inside a string
    ('{"a": {"b": "c"}', False),
    ("<thinking>\nthe labels are {a}\n</thinking>\n<response>\n{}", False),  # a trace quoting a dict
    ("<thinking>\n...\n</thinking>\n<response>\n{}\n</response>", True),
    ("<thinking>\n...\n</thinking>\n<response>\n{}", False),  # a response is complete at </response>
    ('<thinking>\n...\n</thinking>\n{"a": "b"}', True),  # no <response>: parse_slots reads what follows
    ("ok <thinking>\nquoting {a}", False),  # a trace that does not open the output is still a trace
    ("no answer yet", False),
])
def test_answer_complete(text, complete):
    assert answer_complete(text) is complete


class CharTokenizer:
    """One token per character; EOS is id 0."""

    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i)


def run(stops: RowStops, rows: list[list[int]], pad: int = 0) -> None:
    """Feed the rows token by token as ``generate`` does: a stopped row gets padding."""
    width = max(map(len, rows))
    grid = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    done = torch.zeros(len(rows), dtype=torch.bool)
    for step in range(1, width + 1):
        out = stops(grid[:, :step], None)
        assert not (done & ~out).any()  # a stopped row stays stopped
        done = out


def test_each_row_stops_for_its_own_reason():
    tok = CharTokenizer()
    loop = '{"a": ' + "x" * 5 * LOOP_NGRAM
    never = "".join(chr(1000 + k) for k in range(len(loop) + 5))  # no EOS, answer or repeat: the longest row
    rows = ['{"a": "b"} and more', "<thinking>{x}</thinking><response>{}</response> more", "abc", loop, never]
    ids = [tok.encode(r) for r in rows]
    ids[2].append(tok.eos_token_id)
    stops = RowStops(tok, len(rows))
    run(stops, ids)
    assert stops.reasons() == ["answer", "answer", "eos", "loop", "cap"]
    assert stops.lengths[:3] == [len('{"a": "b"}'), len("<thinking>{x}</thinking><response>{}</response>"), 4]
    # the loop guard fires at the third sight of the same n-gram: two n-grams past the first
    assert stops.lengths[3] == len('{"a": ') + LOOP_NGRAM + 2
    assert stops.lengths[4] == len(never)


def test_a_long_trace_with_repeated_phrases_is_not_a_loop():
    """A JSON answer repeats '": "None", "' for every label; with different labels that is no loop (even at
    one token per character, where 16 tokens are a third of a real tokenizer's 16)."""
    tok = CharTokenizer()
    labels = ("customer_name refund_amount delivery_date order_number product_color loan_term event_date "
              "property_address account_type callback_number claim_amount premium").split()
    answer = "{" + ", ".join(f'"{label}": "None"' for label in labels) + "}"
    stops = RowStops(tok, 1)
    run(stops, [tok.encode(answer)])
    assert stops.reasons() == ["answer"] and stops.lengths == [len(answer)]


def test_a_value_quoted_three_times_in_a_trace_is_not_a_loop():
    """A reasoning trace quotes a long value (an address, a spelled number) in the transcript, the mentions and
    the assignment: the same n-gram three times, but not back to back."""
    tok = CharTokenizer()
    value = "221 Baker Street, Springfield"  # longer than the n-gram at one token per character
    assert len(value) > LOOP_NGRAM
    trace = (f'<thinking>\nI hear "{value} please".\nThe mentions are "{value}".\n"{value}" is the '
             f'address.\n</thinking>\n<response>\n{{"address": "{value}"}}\n</response>')
    stops = RowStops(tok, 1)
    run(stops, [tok.encode(trace)])
    assert stops.reasons() == ["answer"] and stops.lengths == [len(trace)]
