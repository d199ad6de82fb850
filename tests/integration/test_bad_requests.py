"""Bad requests get a 4xx JSON error naming the problem, and the same replica keeps serving."""

import json
import struct

import pytest

pytestmark = pytest.mark.integration

ROW = [1.0] * 30
BAD_REQUESTS = [
    ("malformed JSON", {"content": b'{"instances": [[1, 2'}, 400, "not valid JSON"),
    ("not JSON at all", {"content": b"hello"}, 400, "not valid JSON"),
    ("empty body", {"content": b""}, 400, "empty request body"),
    ("wrong feature count", {"json": {"instances": [[1.0, 2.0, 3.0]]}}, 400, "needs 30 features, got 3"),
    ("non-numeric value", {"json": {"instances": [ROW[:29] + ["x"]]}}, 400, "row 0, column 29: expected a number"),
    ("null value", {"json": {"instances": [ROW[:29] + [None]]}}, 400, "got null"),
    ("empty instances", {"json": {"instances": []}}, 400, "instances is empty"),
    ("ragged rows", {"json": {"instances": [ROW, ROW[:5]]}}, 400, "row 1 has 5 values"),
    ("NaN literal", {"content": b'{"instances": [[NaN]]}'}, 400, "contains NaN"),
    ("unknown key", {"json": {"rows": [ROW]}}, 400, "unknown top-level key"),
    ("flat row", {"json": {"instances": ROW}}, 400, "wrap a single row"),
    ("wrong content type", {"content": b"<a/>", "headers": {"Content-Type": "application/xml"}}, 415, "text/csv"),
    ("CSV with no rows", {"content": b"a,b", "headers": {"Content-Type": "text/csv"}}, 400, "no rows"),
    ("CSV in latin-1", {"content": b"a\n1", "headers": {"Content-Type": "text/csv; charset=latin-1"}}, 415, "UTF-8"),
    ("oversized body", {"content": b'{"instances": [' + b"[1.0]," * 2_000_000 + b"[1.0]]}"}, 413, "max_request_bytes"),
    (
        "deeply nested",
        {"content": b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"},
        400,
        "nested too deeply",
    ),
    ("invalid UTF-8", {"content": b'{"instances": [[\xff\xfe]]}'}, 400, "not UTF-8"),
    ("unicode garbage", {"content": '{"инстансы": [[1]], "\u2603": 1}'.encode()}, 400, "unknown top-level key"),
    ("top-level list", {"json": [ROW]}, 400, "must be a JSON object"),
    ("top-level string", {"json": "predict please"}, 400, "must be a JSON object"),
    ("empty object", {"json": {}}, 400, "exactly one of"),
    ("two input keys", {"json": {"instances": [ROW], "inputs": [ROW]}}, 400, "got instances, inputs"),
    ("Infinity literal", {"content": b'{"instances": [[Infinity]]}'}, 400, "contains Infinity"),
    ("overflowing number", {"content": b'{"instances": [[1e400' + b", 1.0" * 29 + b"]]}"}, 400, "finite number"),
    ("boolean value", {"json": {"instances": [ROW[:29] + [True]]}}, 400, "got a boolean"),
    ("nested value", {"json": {"instances": [ROW[:29] + [[1.0]]]}}, 400, "got a list"),
    ("split without data", {"json": {"dataframe_split": {"columns": ["a"]}}}, 400, 'object with "data"'),
    ("split width mismatch", {"json": {"dataframe_split": {"columns": ["a", "b"], "data": [ROW]}}}, 400, "2 columns"),
    ("records mismatch", {"json": {"dataframe_records": [{"a": 1}, {"b": 2}]}}, 400, "has columns"),
    ("columnar lengths", {"json": {"inputs": {"a": [1, 2], "b": [1]}}}, 400, "different lengths"),
    ("xml content type", {"content": b"<x/>", "headers": {"Content-Type": "application/xml"}}, 415, "application/xml"),
]


def replica_of(http, url):
    return http.get(url).json()["replica"]


@pytest.mark.parametrize(
    ("case", "request_kwargs", "status", "expected"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_gets_4xx_json(cancer_url, http, case, request_kwargs, status, expected):
    headers = (
        {"Content-Type": "application/json", **request_kwargs.pop("headers", {})}
        if "json" not in request_kwargs
        else {}
    )
    answer = http.post(cancer_url, headers=headers, **request_kwargs)
    assert answer.status_code == status, answer.text[:300]
    assert answer.headers["content-type"].startswith("application/json")
    assert expected in answer.json()["error"]


def test_replica_survives_bad_requests(cancer_url, http):
    before = replica_of(http, cancer_url)
    for _, request_kwargs, _, _ in BAD_REQUESTS:
        kwargs = dict(request_kwargs)
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})} if "json" not in kwargs else {}
        assert http.post(cancer_url, headers=headers, **kwargs).status_code < 500
    assert replica_of(http, cancer_url) == before
    answer = http.post(cancer_url, json={"instances": [ROW]})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1


def test_unknown_route_and_method(cancer_url, http):
    assert http.get(f"{cancer_url}/nothing-here").status_code == 404
    answer = http.put(cancer_url, content=json.dumps({"instances": [ROW]}))
    assert answer.status_code == 405 and "POST" in answer.json()["error"]
    assert http.get(f"{cancer_url}/-/healthz").json() == {"status": "ok"}


def test_streamed_bodies_are_read_whole_and_bounded(cancer_url, http):
    """A body sent in chunks (no Content-Length) is scored like one sent at once; one that grows
    past max_request_bytes is refused with 413 without being read to its end."""
    row = json.dumps([ROW]).encode()
    streamed = http.post(
        cancer_url,
        content=iter([b'{"instances": ', row[:40], row[40:], b"}"]),
        headers={"Content-Type": "application/json"},
    )
    whole = http.post(cancer_url, json={"instances": [ROW]})
    assert streamed.status_code == 200, streamed.text[:300]
    assert streamed.json()["predictions"] == whole.json()["predictions"]

    def endless_rows(limit_chunks=160):
        yield b'{"instances": ['
        for _ in range(limit_chunks):  # 160 chunks of 60 kB: beyond the 8 MiB default limit
            yield b"[1.0]," * 10_000
        yield b"[1.0]]}"

    refused = http.post(cancer_url, content=endless_rows(), headers={"Content-Type": "application/json"})
    assert refused.status_code == 413 and "max_request_bytes" in refused.json()["error"]
    assert http.post(cancer_url, json={"instances": [ROW]}).status_code == 200


def test_replica_runs_with_the_serving_gc_threshold(cancer_url, http):
    from ray_deploy.serving.config import GC_THRESHOLD

    assert http.get(cancer_url).json()["gc_threshold"] == GC_THRESHOLD


# --- the Open Inference Protocol, at the server's root as its clients call it (through the front)


def tensor(shape=(1, 30), datatype="FP32", **fields):
    return {"name": "input", "shape": list(shape), "datatype": datatype, **fields}


def oip_json(*inputs, **top):
    return {"content": json.dumps({"inputs": list(inputs), **top}).encode()}


def oip_binary(inputs, data, header_length=None):
    """A body in the binary tensor extension: JSON header, then ``data``."""
    header = json.dumps({"inputs": inputs}).encode()
    length = str(len(header) if header_length is None else header_length)
    return {"content": header + data, "headers": {"Inference-Header-Content-Length": length}}


FP32_ROW = struct.pack("<30f", *ROW)
OIP_BAD_REQUESTS = [
    # (case, path after /v2/models/, request, status, expected text in the error)
    ("malformed JSON", "cancer/infer", {"content": b'{"inputs": [{"name"'}, 400, "not valid JSON"),
    ("empty body", "cancer/infer", {"content": b""}, 400, "empty inference request"),
    ("no inputs", "cancer/infer", {"content": b'{"outputs": []}'}, 400, 'non-empty "inputs" list'),
    ("unknown key", "cancer/infer", oip_json(tensor(data=ROW), input=1), 400, "the request has unknown key(s) 'input'"),
    ("shape and data disagree", "cancer/infer", oip_json(tensor(data=ROW[:29])), 400,
     "inputs[0].shape [1, 30] has 30 elements, data has 29"),
    ("wrong width", "cancer/infer", oip_json(tensor((1, 3), data=[1, 2, 3])), 400, "each row needs 30 features, got 3"),
    ("not rows", "cancer/infer", oip_json(tensor((1, 2, 15), data=ROW)), 400, "inputs[0] ('input') has shape [1, 2, 15]"),
    ("unknown datatype", "cancer/infer", oip_json(tensor(datatype="FP99", data=ROW)), 400,
     "inputs[0].datatype 'FP99' is not one of BOOL"),
    ("text for FP32", "cancer/infer", oip_json(tensor(data=["x"] + ROW[1:])), 400,
     "inputs[0].data element 0: expected a number for FP32"),
    ("BYTES to a numeric model", "cancer/infer", oip_json(tensor(datatype="BYTES", data=["1"] * 30)), 400,
     "inputs[0] ('input') is BYTES; this model takes numbers"),
    ("negative shape", "cancer/infer", oip_json(tensor((1, -30), data=ROW)), 400,
     "inputs[0].shape must be a list of non-negative integers"),
    ("binary size mismatch", "cancer/infer",
     oip_binary([tensor(parameters={"binary_data_size": 100})], FP32_ROW[:100]), 400,
     "binary_data_size of inputs[0] is 100 but FP32 [1, 30] needs 120"),
    ("binary past the body", "cancer/infer", oip_binary([tensor(parameters={"binary_data_size": 120})], FP32_ROW[:60]),
     400, "binary_data_size of inputs[0] is 120 but only 60 bytes are left"),
    ("binary without header length", "cancer/infer",
     {"content": json.dumps({"inputs": [tensor(parameters={"binary_data_size": 120})]}).encode() + FP32_ROW}, 400,
     "binary tensor data needs the inference-header-content-length header"),
    ("header length past the body", "cancer/infer", oip_binary([tensor(data=ROW)], b"", header_length=99999), 400,
     "inference-header-content-length must be the JSON's length in bytes"),
    ("NaN in binary", "cancer/infer",
     oip_binary([tensor(parameters={"binary_data_size": 120})], struct.pack("<30f", *ROW[:29], float("nan"))), 400,
     "row 0, column 29: expected a finite number, got nan"),
    ("unknown outputs", "cancer/infer", oip_json(tensor(data=ROW), outputs=[{"name": "a"}, {"name": "b"}]), 400,
     "outputs: model 'cancer' has no output 'a', 'b'; its outputs are 'predictions'"),
    ("shared memory", "cancer/infer", oip_json(tensor(data=ROW, parameters={"shared_memory_region": "r"})), 400,
     "the shared-memory extension is not supported"),
    ("compressed body", "cancer/infer", {"content": b"x", "headers": {"Content-Encoding": "gzip"}}, 415,
     "Content-Encoding 'gzip' is not supported"),
    ("oversized body", "cancer/infer", {"content": b'{"inputs": [' + b" " * 9_000_000 + b"]}"}, 413, "max_request_bytes"),
    ("unknown model", "nowhere/infer", oip_json(tensor(data=ROW)), 404, "no model 'nowhere' on this server"),
    ("unknown version", "cancer/versions/999/infer", oip_json(tensor(data=ROW)), 404,
     "version '999' of model 'cancer' is not loaded; loaded: "),
    ("unknown route", "cancer/stats", {"content": b"{}"}, 404, "no Open Inference Protocol route"),
]  # fmt: skip


def oip_request(http, base: str, path: str, request: dict):
    kwargs = dict(request)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return http.post(f"{base}/v2/models/{path}", headers=headers, **kwargs)


@pytest.mark.parametrize(("case", "path", "request_kwargs", "status", "expected"), OIP_BAD_REQUESTS,
                         ids=[b[0] for b in OIP_BAD_REQUESTS])  # fmt: skip
def test_bad_oip_request_gets_4xx_json_naming_the_field(ray_head, http, case, path, request_kwargs, status, expected):
    answer = oip_request(http, ray_head.http_url, path, request_kwargs)
    assert answer.status_code == status, answer.text[:300]
    assert answer.headers["content-type"].startswith("application/json")
    assert expected in answer.json()["error"], answer.json()["error"]


def test_replica_survives_bad_oip_requests(cancer_url, ray_head, http):
    before = replica_of(http, cancer_url)
    for _, path, request_kwargs, _, _ in OIP_BAD_REQUESTS:
        assert oip_request(http, ray_head.http_url, path, request_kwargs).status_code < 500
    assert http.get(f"{ray_head.http_url}/v2/models/cancer/infer").status_code == 405
    assert replica_of(http, cancer_url) == before
    answer = oip_request(http, ray_head.http_url, "cancer/infer", oip_json(tensor(data=ROW)))
    assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [1]


def test_fuzzed_payloads_never_get_a_5xx(cancer_url, http):
    """Random JSON shaped like scoring requests (bounded: 120 examples, loopback only)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False), st.text(max_size=8)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=40,
    )
    keys = st.sampled_from(["instances", "inputs", "dataframe_split", "dataframe_records", "params", "other"])
    payloads = st.one_of(values, st.dictionaries(keys, values, max_size=3))

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payloads)
    def check(payload):
        # json.dumps (unlike httpx's json=) writes Infinity for inf: send what clients may send.
        body = json.dumps(payload).encode()
        answer = http.post(cancer_url, content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code < 500, (payload, answer.text)
        if answer.status_code >= 400:
            assert "error" in answer.json()

    before = replica_of(http, cancer_url)
    check()
    assert replica_of(http, cancer_url) == before
