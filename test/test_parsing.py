"""The output parser accepts JSON and Python-dict syntax, and never raises."""

import pytest

from speechllm.parsing import parse_slots


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
