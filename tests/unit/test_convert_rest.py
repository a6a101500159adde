"""REST conversions: OpenAI's `input` shapes and the fast JSON-number lists."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import json_format, struct_pb2

from embedserve import convert
from embedserve.errors import InvalidInputError


def value(json_text: str) -> struct_pb2.Value:
    return json_format.Parse(json_text, struct_pb2.Value())


def test_number_lists_are_exactly_the_values_protobuf_builds_one_by_one_of_the_shortest_doubles() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5, 384)).astype(np.float32)
    vectors[0, :4] = np.array([0.0, -0.0, 1e-45, np.finfo(np.float32).max], dtype=np.float32)
    fast = convert._number_lists(vectors)
    for row, got in zip(vectors, fast, strict=True):
        expected = struct_pb2.Value()
        expected.list_value.extend(convert.shortest_doubles(row).tolist())
        assert got == expected
        assert np.array([v.number_value for v in got.list_value.values], np.float32).tobytes() == row.tobytes()


@pytest.mark.parametrize(
    ("json_text", "texts"),
    [('"one"', ["one"]), ('["a", "b"]', ["a", "b"]), ("[]", []), ('""', [""])],
)
def test_input_is_a_string_or_an_array_of_strings(json_text: str, texts: list[str]) -> None:
    assert convert.texts(value(json_text)) == texts  # emptiness is the engine's to refuse


@pytest.mark.parametrize(
    ("json_text", "says"),
    [
        ("[101, 2023]", "input[0] is a number (token ids are not supported"),
        ("[[101, 2023]]", "input[0] is an array (token ids are not supported"),
        ('["ok", null]', "input[1] is null;"),
        ('["ok", {"text": "x"}]', "input[1] is an object;"),
        ("3", "not a number"),
        ("true", "not a boolean"),
    ],
)
def test_other_inputs_say_what_to_send(json_text: str, says: str) -> None:
    with pytest.raises(InvalidInputError, match="string or an array of strings") as raised:
        convert.texts(value(json_text))
    assert says in str(raised.value)


def test_a_missing_input_is_required() -> None:
    with pytest.raises(InvalidInputError, match="input is required"):
        convert.texts(struct_pb2.Value())


def test_json_floats_are_the_shortest_decimals_that_give_each_float32_back() -> None:
    import re

    from embedserve.convert import shortest_doubles

    rng = np.random.default_rng(3)
    values = rng.standard_normal((64, 384)).astype(np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    edges = [0.0, -0.0, 1.0, 0.1, -3.708128e-33, 1e-45, 3.4028235e38, 1e-15, 7e20, 123456.79]
    values[0, : len(edges)] = edges
    doubles = shortest_doubles(values)
    np.testing.assert_array_equal(doubles.astype(np.float32), values)  # every float32 back, exactly
    for double, single in zip(doubles.ravel().tolist(), values.ravel().tolist(), strict=True):
        printed = repr(double)
        assert len(re.sub(r"e.*|[-.]", "", printed).lstrip("0")) <= 9
        assert printed == str(np.float32(single)) or float(printed) == float(str(np.float32(single)))
