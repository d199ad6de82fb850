"""The Open Inference Protocol codec: the spec's requests and answers, the refusals, the rows the
predictors get, and interoperability with NVIDIA's own client (``tritonclient[http]``) when installed."""

import doctest
import json
import math
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import ray_deploy.serving.oip as oip
from ray_deploy.models.predictors.base import RequestError
from ray_deploy.serving.oip import (
    DATATYPES,
    InferRequest,
    InferRows,
    RequestedOutput,
    Route,
    TensorSpec,
    encode_infer_response,
    mlflow_schema_specs,
    model_metadata,
    onnx_tensor_specs,
    output_specs,
    parse_infer_request,
    parse_route,
    row_input_specs,
    server_metadata,
)


def sample(datatype):
    """A 2x3 tensor of ``datatype`` with its extreme values."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BYTES":
        return np.array([["a", "héllo", ""], ["x y", "\u2603", "z" * 300]], dtype=object)
    if datatype == "BF16":
        import ml_dtypes

        return np.array([[1.5, -2.0, 0.0], [3.0e38, -1.0e-38, 256.0]], dtype=ml_dtypes.bfloat16)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
    return np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=dtype)


def wire_values(array):
    """What the parsed request holds: BYTES as utf-8 bytes, BF16 widened to float32."""
    if array.dtype == object:
        return np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(array)
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def json_request(*inputs, **top):
    return json.dumps({"inputs": list(inputs), **top}).encode()


def binary_request(inputs, data, **top):
    """A body in Triton's binary extension: the JSON header, then ``data``; and the header length."""
    header = json.dumps({"inputs": inputs, **top}).encode()
    return header + data, len(header)


def fp64_input(name="input", shape=(2, 2), data=(1.0, 2.0, 3.0, 4.0)):
    return {"name": name, "shape": list(shape), "datatype": "FP64", "data": list(data)}


def decoded(body, headers):
    """The answer's JSON header and the binary data after it."""
    headers = dict(headers)
    length = int(headers.get(b"inference-header-content-length", len(body)))
    return json.loads(body[:length]), body[length:], headers[b"content-type"]


def test_docstring_examples_run():
    assert doctest.testmod(oip).failed == 0


# --- requests, to the spec


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_parses_from_json_and_binary_alike(datatype):
    array = sample(datatype)
    if datatype == "BYTES":
        values = list(array.ravel())
        raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in values)
    elif datatype == "BF16":
        values = array.astype(np.float32).ravel().tolist()
        raw = array.tobytes()
    else:
        values = array.ravel().tolist()
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    spec = {"name": "x", "shape": [2, 3], "datatype": datatype}
    from_json = parse_infer_request(json_request({**spec, "data": values}))
    from_binary = parse_infer_request(*binary_request([{**spec, "parameters": {"binary_data_size": len(raw)}}], raw))
    for request in (from_json, from_binary):
        (tensor,) = request.inputs
        assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, (2, 3))
        np.testing.assert_array_equal(tensor.data, wire_values(array))


def test_nested_data_reads_row_major():
    request = parse_infer_request(json_request(fp64_input(shape=(2, 2), data=[[1, 2], [3, 4]])))
    np.testing.assert_array_equal(request.inputs[0].data, [[1, 2], [3, 4]])


def test_request_fields_are_kept():
    body = json_request(
        fp64_input(),
        id="42",
        parameters={"binary_data_output": True, "priority": 1},
        outputs=[{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
    )
    request = parse_infer_request(body)
    assert request.id == "42"
    assert request.binary_output is True
    assert request.parameters == {"binary_data_output": True, "priority": 1}
    assert request.outputs == (RequestedOutput("a", binary=False), RequestedOutput("b", binary=None))


def test_kserve_clients_model_name_and_version_are_ignored():
    request = parse_infer_request(json_request(fp64_input(), model_name="m", model_version="2", id="x"))
    assert request.id == "x" and request.to_array().shape == (2, 2)


def test_json_and_binary_inputs_mix_in_one_request():
    raw = np.array([1.5, 2.5], dtype="<f4").tobytes()
    inputs = [
        {"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
        {"name": "b", "shape": [2], "datatype": "INT64", "data": [7, 8]},
    ]
    request = parse_infer_request(*binary_request(inputs, raw))
    assert request.to_model_input().rows == [[1.5, 7], [2.5, 8]]


def test_header_length_comes_as_the_header_text():
    body, length = binary_request([fp64_input()], b"")
    assert parse_infer_request(body, str(length).encode()).inputs[0].shape == (2, 2)


BAD_REQUESTS = [
    (b"", "empty inference request"),
    (b"{", "not valid JSON"),
    (b"[1]", 'non-empty "inputs" list'),
    (json_request(), 'non-empty "inputs" list'),
    (b'{"input": []}', "unknown key(s) 'input'"),
    (json_request(fp64_input(), id=7), "id must be a string"),
    (json_request(fp64_input(), parameters=[]), "parameters of the request must be a JSON object"),
    (
        json_request(fp64_input(), parameters={"binary_data_output": 1}),
        "binary_data_output must be true or false",
    ),
    (json_request("x"), "inputs[0] must be an object"),
    (json_request({**fp64_input(), "dims": [1]}), "inputs[0] has unknown key(s) 'dims'"),
    (json_request({**fp64_input(), "name": ""}), "inputs[0].name must be a non-empty string"),
    (json_request({**fp64_input(), "shape": [2, -1]}), "inputs[0].shape must be a list of non-negative"),
    (json_request({**fp64_input(), "shape": "2x2"}), "inputs[0].shape must be a list"),
    (
        json_request(fp64_input(), {**fp64_input("b"), "datatype": "FP128"}),
        "inputs[1].datatype 'FP128' is not one of BOOL, UINT8, UINT16",
    ),
    (json_request(fp64_input(shape=(2, 4), data=range(6))), "inputs[0].shape [2, 4] has 8 elements, data has 6"),
    (json_request(fp64_input(data=[[1, 2], 3])), "inputs[0].data mixes lists and values"),
    (json_request({**fp64_input(), "data": {"a": 1}}), "inputs[0].data must be a list"),
    (
        json_request({**fp64_input(), "datatype": "FP32", "data": [1, "a", 3, 4]}),
        'inputs[0].data element 1: expected a number for FP32, got "a"',
    ),
    (json_request({**fp64_input(), "datatype": "INT32", "data": [1, 1.5, 3, 4]}), "element 1: expected a number"),
    (json_request({**fp64_input(), "datatype": "BOOL", "data": [1, 0, 1, 0]}), "expected true or false for BOOL"),
    (json_request({**fp64_input(), "datatype": "BYTES"}), "expected a string for BYTES, got 1.0"),
    (json_request({**fp64_input(), "datatype": "INT8", "data": [1, 300, 3, 4]}), "out of range for INT8"),
    (json_request({**fp64_input(), "datatype": "FP16", "data": [1, 1e6, 3, 4]}), "out of range for FP16"),
    (json_request({k: v for k, v in fp64_input().items() if k != "data"}), "inputs[0] ('input') has no data"),
    (
        json_request({**fp64_input(), "parameters": {"binary_data_size": 32}}),
        "has both data and parameters.binary_data_size",
    ),
    (
        json_request({**fp64_input(), "parameters": {"shared_memory_region": "r"}}),
        "parameters.shared_memory_region of inputs[0]: the shared-memory extension is not supported",
    ),
    (json_request(fp64_input(), fp64_input()), "inputs name 'input' more than once"),
    (json_request(fp64_input(), outputs={"name": "a"}), "outputs must be a list"),
    (json_request(fp64_input(), outputs=[{"id": "a"}]), 'outputs[0] must be an object with a "name"'),
    (
        json_request(fp64_input(), outputs=[{"name": "a", "parameters": {"binary_data": "yes"}}]),
        "outputs[0].parameters.binary_data must be true or false",
    ),
    (
        json_request(fp64_input(), outputs=[{"name": "a", "parameters": {"classification": 3}}]),
        "the classification extension is not supported",
    ),
    (json_request(fp64_input(), outputs=[{"name": "a"}, {"name": "a"}]), "outputs name 'a' more than once"),
]
_BINARY = {"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
BAD_BINARY_REQUESTS = [
    (
        [{**_BINARY, "parameters": {"binary_data_size": 12}}],
        bytes(12),
        "binary_data_size of inputs[0] is 12 but FP32 [1, 4] needs 16",
    ),
    ([_BINARY], bytes(19), "the body has 3 bytes after the last binary input"),
    ([_BINARY], bytes(4), "binary_data_size of inputs[0] is 16 but only 4 bytes are left in the body"),
    (
        [{**_BINARY, "parameters": {"binary_data_size": -1}}],
        b"",
        "inputs[0].parameters.binary_data_size must be a byte count",
    ),
    (
        [{**_BINARY, "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}],
        struct.pack("<I", 5) + b"ab",
        "inputs[0]: BYTES element 0 runs past its binary_data_size",
    ),
    (
        [{**_BINARY, "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 6}}],
        struct.pack("<I", 2) + b"ab",
        "inputs[0].shape [2] has 2 elements, its binary data holds 1",
    ),
]


@pytest.mark.parametrize(("body", "expected"), BAD_REQUESTS)
def test_bad_requests_are_refused_naming_the_field(body, expected):
    with pytest.raises(RequestError) as caught:
        parse_infer_request(body)
    assert caught.value.status == 400
    assert expected in caught.value.message


@pytest.mark.parametrize(("inputs", "data", "expected"), BAD_BINARY_REQUESTS)
def test_bad_binary_requests_are_refused_naming_the_field(inputs, data, expected):
    with pytest.raises(RequestError) as caught:
        parse_infer_request(*binary_request(inputs, data))
    assert expected in caught.value.message


@pytest.mark.parametrize(
    ("header_length", "expected"),
    [
        (500, "inference-header-content-length must be the JSON's length in bytes, at most the body's"),
        ("abc", "got 'abc'"),
        (
            10,
            "the JSON header (the first 10 bytes, per inference-header-content-length): request body is not valid JSON",
        ),
    ],
)
def test_bad_header_lengths_are_refused(header_length, expected):
    body, _ = binary_request([fp64_input()], b"")
    with pytest.raises(RequestError) as caught:
        parse_infer_request(body, header_length)
    assert expected in caught.value.message


def test_binary_input_without_a_header_length_is_refused():
    with pytest.raises(
        RequestError, match="binary_data_size is set but the request has no inference-header-content-length"
    ):
        parse_infer_request(json_request(_BINARY))
    # The JSON and its binary data, sent without the header that says where the JSON ends.
    body, _ = binary_request([_BINARY], b"\xff" * 8)
    with pytest.raises(RequestError) as refused:
        parse_infer_request(body)
    assert refused.value.message == (
        f"the body is {len(body) - 8} bytes of JSON followed by 8 more; binary tensor data needs the "
        "inference-header-content-length header, set to the JSON's length"
    )
    with pytest.raises(RequestError, match="not UTF-8 text"):  # not JSON at all: said as such
        parse_infer_request(b"{]" + b"\xff" * 8)


# --- the rows the predictors get


def test_one_2d_input_is_rows_of_features():
    request = parse_infer_request(json_request(fp64_input(shape=(2, 3), data=range(6))))
    model_input = request.to_model_input()
    assert model_input.rows == [[0, 1, 2], [3, 4, 5]]
    assert model_input.columns is None
    assert model_input.body == {"instances": [[0, 1, 2], [3, 4, 5]]}
    np.testing.assert_array_equal(request.to_array(3), model_input.to_array(3))


def test_one_1d_input_is_one_row():
    request = parse_infer_request(json_request(fp64_input(shape=(3,), data=[1, 2, 3])))
    assert request.to_model_input().rows == [[1, 2, 3]]
    assert request.to_array().shape == (1, 3)


def test_several_inputs_are_named_columns():
    body = json_request(
        {"name": "age", "shape": [2], "datatype": "INT32", "data": [30, 40]},
        {"name": "city", "shape": [2, 1], "datatype": "BYTES", "data": ["Paris", "Zürich"]},
    )
    model_input = parse_infer_request(body).to_model_input()
    assert model_input.rows == [[30, "Paris"], [40, "Zürich"]]
    assert model_input.columns == ["age", "city"]
    assert model_input.body == {"dataframe_split": {"columns": ["age", "city"], "data": model_input.rows}}
    assert model_input.to_dataframe().to_dict(orient="list") == {"age": [30, 40], "city": ["Paris", "Zürich"]}


def test_numeric_columns_give_the_array_directly():
    body = json_request(
        {"name": "a", "shape": [2], "datatype": "INT64", "data": [1, 2]},
        {"name": "b", "shape": [2, 1], "datatype": "FP32", "data": [0.5, 1.5]},
    )
    request = parse_infer_request(body)
    array = request.to_array(2)
    np.testing.assert_array_equal(array, [[1, 0.5], [2, 1.5]])
    np.testing.assert_array_equal(array, request.to_model_input().to_array(2))


def test_binary_tensor_becomes_a_writable_float64_array():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    inputs = [{"name": "x", "shape": [3, 4], "datatype": "FP32", "parameters": {"binary_data_size": 48}}]
    array = parse_infer_request(*binary_request(inputs, values.tobytes())).to_array(4)
    assert array.dtype == np.float64 and array.flags.writeable
    np.testing.assert_array_equal(array, values)


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (
            [{"name": "a", "shape": [2], "datatype": "FP64", "data": [1, 2]}, fp64_input("b", (3,), [1, 2, 3])],
            "each of shape [N] or [N, 1] with the same N; got 'a' [2], 'b' [3]",
        ),
        ([{"name": "a", "shape": [2], "datatype": "FP64", "data": [1, 2]}, fp64_input("b")], "got 'a' [2], 'b' [2, 2]"),
        ([fp64_input(shape=(1, 2, 2))], "inputs[0] ('input') has shape [1, 2, 2]; send rows"),
        ([fp64_input(shape=(0, 4), data=[])], "the request holds no values ('input' [0, 4])"),
    ],
)
def test_requests_that_are_not_rows_are_refused(inputs, expected):
    request = parse_infer_request(json_request(*inputs))
    with pytest.raises(RequestError) as caught:
        request.to_model_input()
    assert expected in caught.value.message


def test_bytes_that_are_not_utf8_are_refused_as_text():
    inputs = [{"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]
    request = parse_infer_request(*binary_request(inputs, struct.pack("<I", 2) + b"\xff\xfe"))
    assert request.inputs[0].data.tolist() == [b"\xff\xfe"]
    with pytest.raises(RequestError, match=r"inputs\[0\] \('t'\) holds BYTES that are not UTF-8 text"):
        request.to_model_input()


@pytest.mark.parametrize(
    ("inputs", "n_features", "expected"),
    [
        ([fp64_input(shape=(1, 3), data=[1, 2, 3])], 4, "each row needs 4 features, got 3 ('input' [1, 3])"),
        (
            [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
            None,
            "inputs[0] ('t') is BYTES; this model takes numbers",
        ),
        ([{"name": "f", "shape": [1], "datatype": "BOOL", "data": [True]}], None, "is BOOL; this model takes numbers"),
    ],
)
def test_array_refusals_name_the_problem(inputs, n_features, expected):
    with pytest.raises(RequestError) as caught:
        parse_infer_request(json_request(*inputs)).to_array(n_features)
    assert expected in caught.value.message


@pytest.mark.parametrize(
    ("names", "expected"),
    [(None, "row 1, column 0: expected a finite number, got nan"), (["a", "b"], "row 0, input 'b'")],
)
def test_non_finite_binary_values_are_refused_by_row_and_column(names, expected):
    if names is None:
        raw = np.array([[1.0, 2.0], [np.nan, 4.0]]).tobytes()
        inputs = [{"name": "x", "shape": [2, 2], "datatype": "FP64", "parameters": {"binary_data_size": 32}}]
    else:
        raw = np.array([1.0, 2.0]).tobytes() + np.array([np.inf, 4.0]).tobytes()
        inputs = [{"name": n, "shape": [2], "datatype": "FP64", "parameters": {"binary_data_size": 16}} for n in names]
    with pytest.raises(RequestError) as caught:
        parse_infer_request(*binary_request(inputs, raw)).to_array()
    assert expected in caught.value.message


# --- answers


def test_an_array_answers_as_one_json_output():
    request = parse_infer_request(json_request(fp64_input(), id="r-1"))
    body, headers = encode_infer_response("iris", "3", request, np.array([1, 0], dtype=np.int64))
    answer, rest, content_type = decoded(body, headers)
    assert content_type == b"application/json" and rest == b""
    assert answer == {
        "model_name": "iris",
        "model_version": "3",
        "id": "r-1",
        "outputs": [{"name": "predictions", "datatype": "INT64", "shape": [2], "data": [1, 0]}],
    }


def test_binary_output_follows_the_json_header():
    request = InferRequest(inputs=(), binary_output=True)
    values = np.array([[0.25, np.nan], [np.inf, -1.0]], dtype=np.float32)
    body, headers = encode_infer_response("m", None, request, values)
    answer, rest, content_type = decoded(body, headers)
    assert content_type == b"application/octet-stream"
    assert "model_version" not in answer and "id" not in answer
    assert answer["outputs"] == [
        {"name": "predictions", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}
    ]
    np.testing.assert_array_equal(np.frombuffer(rest, "<f4").reshape(2, 2), values)


def test_json_answers_write_nan_and_infinity_as_null():
    body, headers = encode_infer_response("m", "1", InferRequest(inputs=()), np.array([1.5, np.nan, -np.inf]))
    assert decoded(body, headers)[0]["outputs"][0]["data"] == [1.5, None, None]


@pytest.mark.parametrize(
    ("predictions", "expected"),
    [
        (
            pd.DataFrame({"label": ["a", "b"], "score": [0.5, 0.25]}),
            [("label", "BYTES", ["a", "b"]), ("score", "FP64", [0.5, 0.25])],
        ),
        (
            {"ids": np.array([1, 2], dtype=np.int32), "ok": [True, False]},
            [("ids", "INT32", [1, 2]), ("ok", "BOOL", [True, False])],
        ),
        (
            [{"label": "a", "p": 0.5}, {"label": "b", "p": 0.75}],
            [("label", "BYTES", ["a", "b"]), ("p", "FP64", [0.5, 0.75])],
        ),
        (["cat", "dog"], [("predictions", "BYTES", ["cat", "dog"])]),
        (pd.Series([1.0, 2.0], name="score"), [("predictions", "FP64", [1.0, 2.0])]),
        (np.array([3, 4], dtype=object), [("predictions", "INT64", [3, 4])]),
        (np.array([b"\x00a\x00"], dtype=object), [("predictions", "BYTES", ["\x00a\x00"])]),
        (pd.DataFrame({"tokens": [[1, 2], [3]]}), [("tokens", "BYTES", ["[1, 2]", "[3]"])]),
    ],
)
def test_predictions_become_typed_outputs(predictions, expected):
    body, headers = encode_infer_response("m", "1", InferRequest(inputs=()), predictions)
    outputs = decoded(body, headers)[0]["outputs"]
    assert [(o["name"], o["datatype"], o["data"]) for o in outputs] == expected


def test_requested_outputs_are_returned_in_order_and_format_asked():
    request = InferRequest(inputs=(), outputs=(RequestedOutput("c", binary=True), RequestedOutput("a")))
    predictions = {"a": [1.0], "b": [2.0], "c": [3.0]}
    answer, rest, _ = decoded(*encode_infer_response("m", "1", request, predictions))
    assert [o["name"] for o in answer["outputs"]] == ["c", "a"]
    assert answer["outputs"][0]["parameters"] == {"binary_data_size": 8} and answer["outputs"][1]["data"] == [1.0]
    assert np.frombuffer(rest, "<f8").tolist() == [3.0]


def test_a_single_array_takes_the_one_name_asked_for():
    request = InferRequest(inputs=(), outputs=(RequestedOutput("probability"),))
    answer, _, _ = decoded(*encode_infer_response("m", "1", request, np.array([0.5])))
    assert answer["outputs"][0]["name"] == "probability"


def test_unknown_requested_output_is_refused_naming_the_outputs():
    request = InferRequest(inputs=(), outputs=(RequestedOutput("a"), RequestedOutput("z")))
    with pytest.raises(RequestError) as caught:
        encode_infer_response("m", "1", request, {"a": [1], "b": [2]})
    assert caught.value.status == 400
    assert caught.value.message == "outputs: model 'm' has no output 'z'; its outputs are 'a', 'b'"


# --- metadata


def test_server_and_row_model_metadata():
    assert server_metadata("0.1.0") == {"name": "ray-deploy", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    metadata = model_metadata(
        "iris",
        versions=["1", "2"],
        platform="xgboost",
        inputs=row_input_specs(4),
        outputs=[TensorSpec("predictions", "FP64", (-1,))],
    )
    assert metadata == {
        "name": "iris",
        "versions": ["1", "2"],
        "platform": "xgboost",
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}],
        "outputs": [{"name": "predictions", "datatype": "FP64", "shape": [-1]}],
    }
    assert row_input_specs(None) == [TensorSpec("input", "FP64", (-1, -1))]


def test_onnx_specs_from_duck_typed_nodes():
    nodes = [
        SimpleNamespace(name="x", type="tensor(float)", shape=["batch", 4]),
        SimpleNamespace(name="ids", type="tensor(int64)", shape=[None]),
        SimpleNamespace(name="text", type="tensor(string)", shape=[]),
        SimpleNamespace(name="probs", type="seq(map(int64,tensor(float)))", shape=None),
    ]
    assert onnx_tensor_specs(nodes) == [
        TensorSpec("x", "FP32", (-1, 4)),
        TensorSpec("ids", "INT64", (-1,)),
        TensorSpec("text", "BYTES", ()),
        TensorSpec("probs", "seq(map(int64,tensor(float)))", ()),
    ]


def test_onnx_specs_from_a_real_session():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert onnx_tensor_specs(session.get_inputs()) == [TensorSpec("x", "FP32", (-1, 3))]
    assert onnx_tensor_specs(session.get_outputs()) == [TensorSpec("y", "FP64", (-1, 3))]


def test_output_specs_are_what_answers_carry():
    assert output_specs(np.array([0, 1])) == [TensorSpec("predictions", "INT64", (-1,))]
    assert output_specs(np.ones((2, 3), np.float32)) == [TensorSpec("predictions", "FP32", (-1, 3))]
    frame = pd.DataFrame({"label": ["yes"], "score": [0.5]})
    assert output_specs(frame) == [TensorSpec("label", "BYTES", (-1,)), TensorSpec("score", "FP64", (-1,))]


def test_mlflow_signatures_become_specs():
    from mlflow.types import ColSpec, Schema
    from mlflow.types import TensorSpec as MlflowTensor

    columns = Schema([ColSpec("double", "a"), ColSpec("long", "b"), ColSpec("string", "c"), ColSpec("boolean", "d")])
    assert mlflow_schema_specs(columns) == [
        TensorSpec("a", "FP64", (-1,)),
        TensorSpec("b", "INT64", (-1,)),
        TensorSpec("c", "BYTES", (-1,)),
        TensorSpec("d", "BOOL", (-1,)),
    ]
    assert mlflow_schema_specs(Schema([ColSpec("long")])) == [TensorSpec("predictions", "INT64", (-1,))]
    tensor = Schema([MlflowTensor(np.dtype(np.float32), (-1, 4), "x")])
    assert mlflow_schema_specs(tensor) == [TensorSpec("x", "FP32", (-1, 4))]
    assert mlflow_schema_specs(None) == []


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v2", Route("server")),
        ("/v2/", Route("server")),
        ("/v2/health/live", Route("live")),
        ("/v2/health/ready", Route("ready")),
        ("/v2/models/cancer", Route("model", "cancer")),
        ("/v2/models/cancer/ready", Route("model_ready", "cancer")),
        ("/v2/models/cancer/infer", Route("infer", "cancer")),
        ("/v2/models/cancer/versions/3", Route("model", "cancer", "3")),
        ("/v2/models/cancer/versions/xgb@v3/ready", Route("model_ready", "cancer", "xgb@v3")),
        ("/v2/models/cancer/versions/3/infer", Route("infer", "cancer", "3")),
    ],
)
def test_routes_of_the_protocol(path, route):
    assert parse_route(path) == route
    assert route.method == ("POST" if route.kind == "infer" else "GET")


@pytest.mark.parametrize(
    "path",
    ["/v2/health", "/v2/health/dead", "/v2/models", "/v2/models/", "/v2/models/m/versions", "/v2/models/m/versions/",
     "/v2/models/m/stats", "/v2/models/m/versions/1/config", "/v2/repository/index", "/v2/models/m/infer/more"],
)  # fmt: skip
def test_other_paths_under_v2_are_404_naming_the_routes(path):
    with pytest.raises(RequestError) as refused:
        parse_route(path)
    assert refused.value.status == 404
    assert refused.value.message.startswith(f"no Open Inference Protocol route {path!r}; routes are GET /v2, ")


def test_infer_rows_give_arrays_from_tensors_and_rows_only_when_asked():
    body = json_request({"name": "a", "shape": [2], "datatype": "FP32", "data": [1, 2]},
                        {"name": "b", "shape": [2, 1], "datatype": "INT64", "data": [3, 4]})  # fmt: skip
    rows = InferRows(parse_infer_request(body))
    assert rows.params is None
    np.testing.assert_array_equal(rows.to_array(2), [[1.0, 3.0], [2.0, 4.0]])
    assert rows._model_input is None  # no Python rows were built for the array
    assert (rows.rows, rows.columns, len(rows)) == ([[1.0, 3], [2.0, 4]], ["a", "b"], 2)
    assert rows.body == {"dataframe_split": {"columns": ["a", "b"], "data": [[1.0, 3], [2.0, 4]]}}
    assert rows.to_dataframe().columns.tolist() == ["a", "b"]


# --- interoperability with NVIDIA's client


@pytest.fixture(scope="module")
def triton():
    import tritonclient.http

    return tritonclient.http


def triton_request(triton, inputs, outputs=None, **options):
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **options)
    return parse_infer_request(body, header_length)


@pytest.mark.parametrize(
    ("datatype", "binary"),
    [(d, b) for d in DATATYPES for b in (True, False) if b or d != "BF16"],  # BF16 goes in binary only
)
def test_tritonclient_requests_parse(triton, datatype, binary):
    array = sample(datatype)
    tensor = triton.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    request = triton_request(triton, [tensor], request_id="r-9", priority=2)
    (parsed,) = request.inputs
    assert (parsed.name, parsed.datatype, parsed.shape, request.id) == ("x", datatype, (2, 3), "r-9")
    np.testing.assert_array_equal(parsed.data, wire_values(array))
    assert request.binary_output is True  # tritonclient asks for binary when it names no outputs


def test_tritonclient_feature_rows_reach_the_model_unchanged(triton):
    features = np.random.default_rng(0).random((5, 4)).astype(np.float32)
    tensor = triton.InferInput("input", [5, 4], "FP32").set_data_from_numpy(features)
    request = triton_request(triton, [tensor], outputs=[triton.InferRequestedOutput("predictions")])
    np.testing.assert_array_equal(request.to_array(4), features.astype(np.float64))
    np.testing.assert_array_equal(request.to_model_input().to_array(4), features.astype(np.float64))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BF16"])
def test_tritonclient_reads_our_answers(triton, datatype, binary):
    array = sample(datatype)
    tensor = triton.InferInput("input", [1, 2], "FP64").set_data_from_numpy(np.ones((1, 2)))
    outputs = [triton.InferRequestedOutput("predictions", binary_data=binary)]
    request = triton_request(triton, [tensor], outputs, request_id="abc")
    body, headers = encode_infer_response("m", "2", request, array)
    header_length = dict(headers).get(b"inference-header-content-length")
    result = triton.InferResult.from_response_body(body, header_length=header_length and int(header_length))
    got = result.as_numpy("predictions")
    if datatype == "BYTES":
        expected = wire_values(array) if binary else array  # tritonclient gives bytes from binary, str from JSON
    else:
        expected = array
        assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, expected)
    assert result.get_response()["id"] == "abc" and result.get_response()["model_version"] == "2"


def test_tritonclient_reads_every_output_of_a_dataframe(triton):
    tensor = triton.InferInput("input", [2, 1], "FP64").set_data_from_numpy(np.ones((2, 1)), binary_data=False)
    request = triton_request(triton, [tensor])  # no outputs named: every output, in binary
    frame = pd.DataFrame({"label": ["yes", "no"], "score": [0.9, np.nan]})
    body, headers = encode_infer_response("m", "1", request, frame)
    result = triton.InferResult.from_response_body(
        body, header_length=int(dict(headers)[b"inference-header-content-length"])
    )
    assert result.as_numpy("label").tolist() == [b"yes", b"no"]
    np.testing.assert_array_equal(result.as_numpy("score"), [0.9, np.nan])


def test_tritonclient_reads_json_nan_as_nan(triton):
    request = InferRequest(inputs=(), outputs=(RequestedOutput("predictions", binary=False),))
    body, _ = encode_infer_response("m", "1", request, np.array([np.nan, 1.0], dtype=np.float32))
    np.testing.assert_array_equal(triton.InferResult.from_response_body(body).as_numpy("predictions"), [np.nan, 1.0])


class _Handler(BaseHTTPRequestHandler):
    """``/v2/models/{name}/infer`` as the server answers it: rows in, the sum of each row out."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            request = parse_infer_request(body, self.headers.get("Inference-Header-Content-Length"))
            answer, headers = encode_infer_response("summer", "1", request, request.to_array(3).sum(axis=1))
            status = 200
        except RequestError as exc:
            answer, headers, status = json.dumps({"error": exc.message}).encode(), [], exc.status
        self.send_response(status)
        for name, value in headers:
            self.send_header(name.decode(), value.decode())
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_tritonclient_infers_over_http(triton):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = triton.InferenceServerClient(f"127.0.0.1:{server.server_address[1]}")
    try:
        rows = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]], dtype=np.float32)
        tensor = triton.InferInput("input", [2, 3], "FP32").set_data_from_numpy(rows)
        result = client.infer("summer", [tensor], request_id="7")
        np.testing.assert_array_equal(result.as_numpy("predictions"), [6.0, 15.5])
        assert result.get_response()["id"] == "7"
        wide = triton.InferInput("input", [1, 4], "FP32").set_data_from_numpy(np.ones((1, 4), np.float32))
        with pytest.raises(triton.InferenceServerException, match="each row needs 3 features, got 4"):
            client.infer("summer", [wide])
    finally:
        client.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "array, datatype",
    [
        (np.array([1, 0, 1], dtype=np.int64), "INT64"),
        (np.array([[1, 2], [3, 4]], dtype=np.int32), "INT32"),
        (np.array([True, False]), "BOOL"),
        (np.array([7], dtype=np.uint8), "UINT8"),
        (np.array([0.25, 1.5]), "FP64"),  # floats take the general path (non-finite values become null)
        (np.array([0.5, np.nan], dtype=np.float32), "FP32"),
    ],
)
@pytest.mark.parametrize("version, request_id", [("3", None), (None, "r-1"), ("default@ab12", 'quote"d')])
def test_the_common_answer_is_written_as_the_spec_says(array, datatype, version, request_id):
    """The answer the scoring path writes for one output array, byte for byte what the general
    path (a dict, encoded compactly) gives: whichever path wrote it, clients read the same."""
    body, headers = encode_infer_response("cancer", version, InferRequest(inputs=(), id=request_id), array)
    expected = {"model_name": "cancer"}
    if version is not None:
        expected["model_version"] = version
    if request_id is not None:
        expected["id"] = request_id
    values = [None if isinstance(v, float) and not math.isfinite(v) else v for v in array.ravel().tolist()]
    expected["outputs"] = [{"name": "predictions", "datatype": datatype, "shape": list(array.shape), "data": values}]
    assert body == json.dumps(expected, separators=(",", ":")).encode()
    assert headers == [(b"content-type", b"application/json")]


def test_a_parsed_plain_request_gives_its_rows_as_float64_rounded_as_declared():
    request = parse_infer_request(
        json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0.1, 2]}]}).encode()
    )
    array = request.to_array(2)
    assert array.dtype == np.float64 and array.tolist() == [[float(np.float32(0.1)), 2.0]]
    with pytest.raises(RequestError, match="needs 3 features"):
        request.to_array(3)
