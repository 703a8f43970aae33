"""The output parser accepts JSON and Python-dict syntax, never raises, and never takes a dict inside a
truncated reasoning trace for the answer."""

import pytest

from speechllm.parsing import ParsedOutput, parse_slots, response_part


def test_json_and_python_dict():
    assert parse_slots('{"a": "x", "b": "None"}').slots == {"a": "x", "b": "None"}
    assert parse_slots("{'payment_frequency': 'monthly', 'amount': '€30'}").slots == {
        "payment_frequency": "monthly", "amount": "€30"}


def test_reasoning_output_uses_the_response_part():
    text = ("<thinking>\nI hear ... {'decoy': 'x'}\n</thinking>\n<response>\n"
            '{"new_limit": "$5,000"}\n</response>')
    out = parse_slots(text)
    assert out.parseable and out.slots == {"new_limit": "$5,000"}


def test_apostrophes_inside_values():
    assert parse_slots('{"reason": "it\'s broken"}').slots == {"reason": "it's broken"}


@pytest.mark.parametrize("text", ["", "no braces", '{"a": "unterminated', "{'a': }", "[1, 2]", "{{{{",
                                  "<response>\n{'a' 'b'}"])
def test_garbage_never_raises(text):
    out = parse_slots(text)
    assert out.parseable is False and out.slots == {}


def test_non_string_values_are_stringified():
    assert parse_slots('{"count": 3, "x": null}').slots == {"count": "3", "x": "None"}


def test_a_label_may_hold_a_list_of_values():
    assert parse_slots('{"account_type": ["checking", "savings"], "amount": "None"}').slots == {
        "account_type": ["checking", "savings"], "amount": "None"}
    assert parse_slots("{'account_type': ('checking', None, 3)}").slots == {"account_type": ["checking", "None", "3"]}


TRACE = ("<thinking>\nI hear the utterance in the audio clip is \"thirty dollars\".\n"
         "The labels queried for are amount. I would answer {'amount': 'thirty dollars'}")


@pytest.mark.parametrize("text", [TRACE, TRACE + "\nso the", "<thinking>{\"amount\": \"$30\"}", "<thinking>"],
                         ids=["dict in the trace", "cut after the dict", "trace is a dict", "tag only"])
def test_a_trace_cut_off_before_its_end_has_no_answer(text):
    # the model hit the token cap mid-trace: neither </thinking> nor <response>, so the dict it quotes
    # in its reasoning is not its answer
    out = parse_slots(text)
    assert out.parseable is False and out.slots == {}
    assert response_part(text) == ""


def test_a_closed_or_answered_trace_still_gives_its_answer():
    closed = TRACE + "\n</thinking>\n"
    assert parse_slots(closed + '{"amount": "$30"}') == ParsedOutput({"amount": "$30"}, True)  # after </thinking>
    assert parse_slots(closed) == ParsedOutput({}, False)  # closed, but no answer after it: not the trace's dict
    # <response> opened without </thinking>: its body is the answer, even cut before </response>
    assert parse_slots(TRACE + '\n<response>\n{"amount": "$30"}') == ParsedOutput({"amount": "$30"}, True)
    assert parse_slots(TRACE + '\n<response>\n{"amount": "$3') == ParsedOutput({}, False)
    # no <thinking> at all (regular and /no_think outputs): the whole output, as before
    assert parse_slots('sure: {"amount": "$30"} thinking') == ParsedOutput({"amount": "$30"}, True)
    assert response_part('{"amount": "$30"}') == '{"amount": "$30"}'
