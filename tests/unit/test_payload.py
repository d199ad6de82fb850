import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_deploy.models.predictors.base import RequestError
from ray_deploy.serving.payload import parse_body, parse_csv, parse_model_input


def rows_of(payload):
    return parse_model_input(payload)


@pytest.mark.parametrize(
    ("payload", "columns"),
    [
        ({"instances": [[1, 2.5], [3, 4]]}, None),
        ({"inputs": [[1, 2.5], [3, 4]]}, None),
        ({"inputs": {"a": [1, 3], "b": [2.5, 4]}}, ["a", "b"]),
        ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2.5], [3, 4]]}}, ["a", "b"]),
        ({"dataframe_records": [{"a": 1, "b": 2.5}, {"a": 3, "b": 4}]}, ["a", "b"]),
        ({"instances": [{"a": 1, "b": 2.5}, {"a": 3, "b": 4}]}, ["a", "b"]),
    ],
)
def test_every_mlflow_scoring_format_gives_the_same_rows(payload, columns):
    model_input = rows_of(payload)
    assert model_input.columns == columns
    np.testing.assert_array_equal(model_input.to_array(2), [[1, 2.5], [3, 4]])
    assert list(model_input.to_dataframe().shape) == [2, 2]


BAD = [
    (b"", "empty request body"),
    (b"   ", "empty request body"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"instances": [[NaN]]}', "contains NaN"),
    (b'{"instances": [[Infinity]]}', "contains Infinity"),
    (b"[" * 5000 + b"]" * 5000, None),
]


@pytest.mark.parametrize(("body", "expected"), BAD)
def test_bad_bodies(body, expected):
    with pytest.raises(RequestError) as raised:
        parse_model_input(parse_body(body))
    assert raised.value.status == 400
    if expected:
        assert expected in raised.value.message


BAD_PAYLOADS = [
    ([[1, 2]], "must be a JSON object"),
    ({}, "exactly one of"),
    ({"instances": [[1]], "inputs": [[1]]}, "got instances, inputs"),
    ({"rows": [[1]]}, "unknown top-level key(s) 'rows'"),
    ({"instances": []}, "instances is empty"),
    ({"instances": [1, 2, 3]}, "wrap a single row"),
    ({"instances": [[]]}, "empty row"),
    ({"instances": "1,2"}, "must be a list of rows"),
    ({"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}, "2 values but there are 1 columns"),
    ({"dataframe_split": [[1]]}, 'must be an object with "data"'),
    ({"dataframe_records": [{"a": 1}, {"b": 2}]}, "has columns ['b']"),
    ({"inputs": {"a": [1, 2], "b": [1]}}, "different lengths"),
]


@pytest.mark.parametrize(("payload", "expected"), BAD_PAYLOADS)
def test_bad_payload_shapes(payload, expected):
    with pytest.raises(RequestError) as raised:
        parse_model_input(payload)
    assert expected in raised.value.message


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"instances": [[1, "a"]]}, "row 0, column 1: expected a number, got a string"),
        ({"instances": [[1, True]]}, "expected a number, got a boolean"),
        ({"instances": [[1, None]]}, "got null"),
        ({"instances": [[1, 2], [3]]}, "row 1 has 1 values but row 0 has 2"),
        ({"instances": [[1, 2, 3]]}, "each row needs 2 features, got 3"),
        ({"dataframe_records": [{"age": "old", "b": 1}]}, "column 0 ('age')"),
        ({"instances": [[1, 1e400]]}, "finite number"),
        ({"instances": [[1, 10**400]]}, "row 0, column 1: expected a finite number"),
        ({"instances": [[1.5, 2], [True, 2]]}, "row 1, column 0: expected a number, got a boolean"),
    ],
)
def test_rows_that_cannot_be_numbers(payload, expected):
    with pytest.raises(RequestError) as raised:
        parse_model_input(payload).to_array(2)
    assert expected in raised.value.message


def test_numeric_rows_become_a_float_array():
    array = parse_model_input({"instances": [[1, 2.5], [-3, 0.0]]}).to_array(2)
    assert array.dtype == np.float64
    assert array.tolist() == [[1.0, 2.5], [-3.0, 0.0]]


def test_a_csv_body_reads_as_pandas_reads_it():
    """`mlflow models serve` reads text/csv with pandas.read_csv: a header row, then rows."""
    import io

    import pandas as pd

    body = b"a,b,name\n1,2.5,x\n3,-4e-1,y\n\n"
    parsed = parse_csv(body)
    expected = pd.read_csv(io.BytesIO(body))
    assert parsed.columns == list(expected.columns)
    assert parsed.to_dataframe().equals(expected)
    assert parsed.body == {"dataframe_split": {"columns": ["a", "b", "name"], "data": [[1, 2.5, "x"], [3, -0.4, "y"]]}}
    assert parse_model_input(parsed.body).rows == parsed.rows  # what an isolated variant reads
    numbers = parse_csv(b"\xef\xbb\xbfx,y\n1,2\n")  # a byte-order mark, as spreadsheets write it
    assert numbers.columns == ["x", "y"] and numbers.to_array(2).tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "empty CSV body"),
        (b"a,b\n", "has a header (a, b) but no rows"),
        (b"a,b\n1,2\n3\n", "CSV row 2 has 1 values but the header names 2 columns"),
        (b"a\n\xff\n", "not UTF-8"),
    ],
)
def test_bad_csv_bodies(body, expected):
    with pytest.raises(RequestError, match=re.escape(expected)) as raised:
        parse_csv(body)
    assert raised.value.status == 400


def test_params_travel_with_the_rows():
    parsed = parse_model_input({"dataframe_split": {"columns": ["a"], "data": [[1.0]]}, "params": {"k": 3}})
    assert parsed.params == {"k": 3} and parsed.rows == [[1.0]]
    assert parse_model_input({"instances": [[1.0]]}).params is None
    with pytest.raises(RequestError, match="params must be a JSON object"):
        parse_model_input({"instances": [[1.0]], "params": [1, 2]})


# Bodies where a fast decoder and the standard library could part ways: parse_body must accept
# and refuse exactly what the standard library does, with the same values and messages.
DECODER_EDGES = [
    b'{"instances": [[1, 2.5e-3, -0.0, 1e308, 5e-324]]}',
    b'{"s": "\\ud800"}',  # an escaped lone surrogate
    b'{"a": 1, "a": 2}',  # a repeated key: the last wins
    b'{"x": 1e400}',  # past a double's range
    b'\xef\xbb\xbf{"a": 1}',  # a byte-order mark
    b'{"a": "tab\there"}',  # a raw control character in a string
    b'{"a": 1} x',  # text after the value
    b'{"instances": [[NaN]]}',
    b"\xff\xfe",
    b"",
]


def _decoded(body):
    try:
        return "ok", parse_body(body)
    except RequestError as exc:
        return "refused", exc.message


@pytest.mark.parametrize("body", DECODER_EDGES)
def test_the_fast_decoder_accepts_and_refuses_what_the_standard_library_does(body, monkeypatch):
    import ray_deploy.serving.payload as payload

    assert payload._fast_loads is not None, "orjson is a dependency: the fast path must be in use"
    fast = _decoded(body)
    monkeypatch.setattr(payload, "_fast_loads", None)  # the standard library alone
    slow = _decoded(body)
    assert repr(fast) == repr(slow)  # repr: nan != nan, -0.0 == 0.0


def test_an_integer_beyond_64_bits_arrives_as_the_nearest_float():
    big = 123456789012345678901234567890
    assert parse_body(b'{"big": %d, "edge": %d}' % (big, 2**63 - 1)) == {"big": float(big), "edge": 2**63 - 1}


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
        max_leaves=30,
    )
)
def test_any_json_value_decodes_as_the_standard_library_decodes_it(value):
    body = json.dumps(value).encode()
    assert repr(parse_body(body)) == repr(json.loads(body))


def outcome(model_input):
    """What scoring a request's rows gives: the array, or the refusal's message."""
    try:
        return model_input.to_array(3).tolist()
    except RequestError as exc:
        return exc.message


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(
            st.integers(min_value=-(2**53), max_value=2**53)
            | st.floats(allow_nan=False, allow_infinity=False, width=32)
            | st.sampled_from([True, False, None, "1.5", "", [1.0], {"a": 1}]),
            min_size=3,
            max_size=3,
        ),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([None, 0, 2]),
)
def test_a_batch_checked_from_its_bytes_scores_as_one_checked_value_by_value(rows, indent):
    raw = json.dumps({"instances": rows}, indent=indent).encode()
    payload = parse_body(raw)
    from_bytes = parse_model_input(payload, raw)
    assert from_bytes.numbers_only == (
        len(rows) >= 16 and all(type(value) in (int, float) for row in rows for value in row)
    )
    assert outcome(from_bytes) == outcome(parse_model_input(payload))


def test_a_batch_with_one_bool_or_string_is_refused_naming_it():
    rows = [[float(i), 1.0, 2.0] for i in range(64)]
    for bad in (True, "1.5", None):
        body = [list(row) for row in rows]
        body[40][1] = bad
        raw = json.dumps({"instances": body}).encode()
        model_input = parse_model_input(parse_body(raw), raw)
        assert not model_input.numbers_only
        with pytest.raises(RequestError, match=r"row 40, column 1: expected a number"):
            model_input.to_array(3)
