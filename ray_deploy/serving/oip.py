"""The Open Inference Protocol (KServe and Triton "v2" REST), with Triton's binary tensor extension.

A pure codec: request bytes in, ``ModelInput`` or a numpy array out; predictions in, answer bytes out.

A request (``POST /v2/models/{name}[/versions/{v}]/infer``)::

    {"id": "42", "parameters": {"binary_data_output": false},
     "inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP64", "data": [1, 2, 3, 4, 5, 6]}],
     "outputs": [{"name": "predictions", "parameters": {"binary_data": true}}]}

``data`` is row-major, flat or nested. ``model_name`` and ``model_version``, which KServe's client adds,
are ignored (the path names the model). With the binary extension the request has an
``Inference-Header-Content-Length`` header: that many bytes of JSON, then the data of each input that has
``parameters.binary_data_size`` (and no ``data``), in input order: little-endian values (BOOL one byte),
or for BYTES each element as a 4-byte little-endian length and its bytes. BF16 arrives as float32.

Rows for the predictors: one input of shape [N, F] is N rows of F values ([F] is one row); several
inputs, each of shape [N] or [N, 1], are N rows with one column per input, named after it.

The answer: one output per DataFrame column or dict key; any other value is one output,
``predictions`` (or the one name the request's ``outputs`` asked for)::

    {"model_name": "m", "model_version": "3", "id": "42",
     "outputs": [{"name": "predictions", "datatype": "FP64", "shape": [2], "parameters": {"binary_data_size": 16}}]}

An output asked for in binary (its ``binary_data``, else the request's ``binary_data_output``) has
``binary_data_size`` instead of ``data`` and its bytes follow the JSON. JSON holds no NaN or infinity:
in ``data`` they are null (tritonclient reads null back as NaN); binary outputs carry them exactly.

Routes, relative to where the protocol is served (``parse_route``)::

    GET  /v2                                      server metadata (``server_metadata``)
    GET  /v2/health/live, /v2/health/ready        liveness, readiness
    GET  /v2/models/{name}[/versions/{v}]         model metadata (``model_metadata``)
    GET  /v2/models/{name}[/versions/{v}]/ready   model readiness
    POST /v2/models/{name}[/versions/{v}]/infer   inference

Not supported, refused by name: the shared-memory and classification extensions. Request
``parameters`` (priority, timeout, sequence ids...) are read for ``binary_data_output`` only.
Every refusal is a ``RequestError`` (400) naming the field, what came in and what was expected.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from ray_deploy.models.predictors.base import RequestError
from ray_deploy.serving.payload import ModelInput, parse_body

HEADER_LENGTH = "inference-header-content-length"
"""The request and answer header giving the JSON's length when binary data follows it."""
PREDICTIONS = "predictions"
_PREDICTIONS_NAME = PREDICTIONS.encode()
"""The name of the one output of a model that answers a single array."""
DATATYPES = tuple("BOOL UINT8 UINT16 UINT32 UINT64 INT8 INT16 INT32 INT64 FP16 FP32 FP64 BF16 BYTES".split())
"""The v2 datatypes, with Triton's BF16 (bfloat16)."""
_WIRE = {  # datatype -> numpy dtype of its binary data, little-endian; BF16 is the top half of a float32
    datatype: np.dtype(code)
    for datatype, code in zip(DATATYPES, "? u1 <u2 <u4 <u8 i1 <i2 <i4 <i8 <f2 <f4 <f8 <u2".split())
}
_DATATYPE_OF = {(dtype.kind, dtype.itemsize): name for name, dtype in _WIRE.items() if name != "BF16"}
_JSON_VALUES = {"BOOL": ({bool}, "true or false"), "BYTES": ({str}, "a string")}
_INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
_REQUEST_KEYS = ("id", "parameters", "inputs", "outputs", "model_name", "model_version")
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # built once, not per answer
_FLOAT_LIMITS = {"FP16": float(np.finfo(np.float16).max), "FP32": float(np.finfo(np.float32).max)}
_FLOAT_LIMITS |= {"BF16": _FLOAT_LIMITS["FP32"], "FP64": float(np.finfo(np.float64).max)}
"""The spec's keys, and the two KServe's client adds (the path names the model: they are ignored)."""
_EXAMPLE = '{"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP64", "data": [1.0, 2.0]}]}'


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~3x, per request
class InferTensor:
    """One input: ``data`` has the tensor's shape; BYTES elements are ``bytes`` in an object array."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class RequestedOutput:
    """An output the request named; ``binary`` is None when it left the choice to the request."""

    name: str
    binary: bool | None = None


@dataclass(slots=True)
class InferRequest:
    """A parsed inference request. ``outputs`` is None when the request wants every output."""

    inputs: tuple[InferTensor, ...]
    outputs: tuple[RequestedOutput, ...] | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    binary_output: bool = False
    finite: bool = False
    """Its one input holds finite floats within its datatype's range (checked while parsing)."""

    def to_array(self, n_features: int | None = None) -> np.ndarray:
        """The rows as a 2-D float64 array, without Python lists: what ``ModelInput.to_array`` gives,
        refusing the same requests (text, booleans, non-finite values, rows of the wrong width)."""
        if self.finite:  # the common request, read by _plain_request
            data = self.inputs[0].data
            if data.ndim == 2 and n_features in (None, data.shape[1]):
                return data.astype(np.float64, copy=False)
        if len(self.inputs) == 1:  # one [N, F] tensor of finite floats
            data = self.inputs[0].data
            if data.ndim == 2 and data.dtype.kind == "f" and data.size and n_features in (None, data.shape[1]):
                array = data.astype(np.float64)
                if math.isfinite(array.sum()):  # else (or if the sum overflowed) the exact check below
                    return array
        blocks, columns = self._blocks()
        for index, tensor in enumerate(self.inputs):
            if tensor.datatype in ("BYTES", "BOOL"):
                raise RequestError(f"inputs[{index}] ({tensor.name!r}) is {tensor.datatype}; this model takes numbers")
        array = blocks[0].astype(np.float64) if len(blocks) == 1 else np.hstack(blocks, dtype=np.float64)
        finite = np.isfinite(array)
        if not finite.all():
            row, column = np.argwhere(~finite)[0]
            where = f"input {columns[column]!r}" if columns else f"column {column}"
            raise RequestError(f"row {row}, {where}: expected a finite number, got {array[row, column]}")
        if n_features is not None and array.shape[1] != n_features:
            raise RequestError(f"each row needs {n_features} features, got {array.shape[1]} ({self._shapes()})")
        return array

    def to_model_input(self) -> ModelInput:
        """The rows as ``ModelInput`` (Python values; BYTES as UTF-8 text), for every payload format.
        Its ``body`` is the same rows in the MLflow protocol (``instances``, or ``dataframe_split``
        with the input names as columns); request ``parameters`` are not model params."""
        blocks, columns = self._blocks()
        parts = [_python_rows(block, tensor, index) for index, (block, tensor) in enumerate(zip(blocks, self.inputs))]
        rows = parts[0] if len(parts) == 1 else [list(chain.from_iterable(cells)) for cells in zip(*parts)]
        body = {"dataframe_split": {"columns": columns, "data": rows}} if columns else {"instances": rows}
        return ModelInput(rows=rows, columns=columns, body=body)

    def _blocks(self) -> tuple[list[np.ndarray], list[str] | None]:
        """The inputs as 2-D blocks of rows: one [N, F] block, or one [N, 1] block per named column."""
        if len(self.inputs) == 1:
            data = self.inputs[0].data
            if data.ndim not in (1, 2):
                raise RequestError(
                    f"inputs[0] ({self.inputs[0].name!r}) has shape {list(data.shape)}; send rows: "
                    "shape [N, F] for N rows of F values, or [F] for one row"
                )
            blocks, columns = [data.reshape(1, -1) if data.ndim == 1 else data], None
        else:
            shapes = {t.shape for t in self.inputs}
            if any(not s or s[1:] not in ((), (1,)) for s in shapes) or len({s[:1] for s in shapes}) != 1:
                raise RequestError(
                    f"several inputs are read as columns, each of shape [N] or [N, 1] with the same N; got {self._shapes()}"
                )
            blocks, columns = [t.data.reshape(-1, 1) for t in self.inputs], [t.name for t in self.inputs]
        if any(block.size == 0 for block in blocks):
            raise RequestError(f"the request holds no values ({self._shapes()}); send at least one row")
        return blocks, columns

    def _shapes(self) -> str:
        return ", ".join(f"{t.name!r} {list(t.shape)}" for t in self.inputs)


class InferRows:
    """An inference request as the scoring path reads a ``ModelInput``: ``to_array`` straight from
    the tensors (no Python lists); the rows, body and DataFrame are built on first use, for the
    variants (and shadows) that take them."""

    params = None  # request parameters are not model params

    def __init__(self, request: InferRequest) -> None:
        self.request = request
        self._model_input: ModelInput | None = None

    def to_array(self, n_features: int | None = None) -> np.ndarray:
        return self.request.to_array(n_features)

    @property
    def model_input(self) -> ModelInput:
        if self._model_input is None:
            self._model_input = self.request.to_model_input()
        return self._model_input

    @property
    def rows(self) -> list[list[Any]]:
        return self.model_input.rows

    @property
    def columns(self) -> list[str] | None:
        return self.model_input.columns

    @property
    def body(self) -> Any:
        return self.model_input.body

    def to_dataframe(self) -> Any:
        return self.model_input.to_dataframe()

    def __len__(self) -> int:
        return len(self.model_input)


def parse_infer_request(body: bytes, header_length: int | str | bytes | None = None) -> InferRequest:
    """Parse an inference request.

    Args:
        body: the request body.
        header_length: the ``Inference-Header-Content-Length`` header as received, or None when the
            request had none (the whole body is JSON).

    Returns:
        The ``InferRequest``, each input's data checked against its shape and datatype.

    Raises:
        RequestError: naming the field, e.g. ``inputs[0].shape [2, 4] has 8 elements, data has 6``.

    >>> request = parse_infer_request(b'{"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}')
    >>> request.to_array().tolist()
    [[1.0, 2.0], [3.0, 4.0]]
    """
    length = None if header_length is None else _header_length(header_length, len(body))
    header_bytes = body if length is None else body[:length]
    if not header_bytes or header_bytes.isspace():
        raise RequestError(f"empty inference request; send JSON such as {_EXAMPLE}")
    try:
        header = parse_body(header_bytes)
    except RequestError as exc:
        if length is None:
            raise RequestError(_binary_without_length(body) or exc.message) from None
        raise RequestError(f"the JSON header (the first {length} bytes, per {HEADER_LENGTH}): {exc.message}") from None
    if length is None:
        plain = _plain_request(header)
        if plain is not None:
            return plain
    if type(header) is dict:
        _refuse_unknown(header, _REQUEST_KEYS, "the request")
    if type(header) is not dict or type(header.get("inputs")) is not list or not header["inputs"]:
        raise RequestError(f'an inference request is a JSON object with a non-empty "inputs" list, e.g. {_EXAMPLE}')
    request_id = header.get("id")
    if request_id is not None and type(request_id) is not str:
        raise RequestError(f"id must be a string, got {_shown(request_id)}")
    parameters = _parameters(header, "the request")
    binary_output = parameters.get("binary_data_output", False) if parameters else False
    if type(binary_output) is not bool:
        raise RequestError(f"parameters.binary_data_output must be true or false, got {_shown(binary_output)}")
    tail = memoryview(body)[len(header_bytes) :] if length is not None else memoryview(b"")
    offset, inputs = 0, []
    for index, item in enumerate(header["inputs"]):
        where = f"inputs[{index}]"
        name, datatype, shape, size = _tensor_header(item, where)
        if size is None:
            data = _json_data(item["data"], where, datatype, shape)
        elif length is None:
            raise RequestError(
                f"{where}.parameters.binary_data_size is set but the request has no {HEADER_LENGTH} header"
            )
        elif size > len(tail) - offset:
            raise RequestError(
                f"binary_data_size of {where} is {size} but only {len(tail) - offset} bytes are left in the body"
            )
        else:
            data, offset = _binary_data(tail[offset : offset + size], where, datatype, shape), offset + size
        inputs.append(InferTensor(name=name, datatype=datatype, shape=tuple(shape), data=data))
    if offset != len(tail):
        raise RequestError(f"the body has {len(tail) - offset} bytes after the last binary input")
    if len(inputs) > 1:
        _refuse_repeats([t.name for t in inputs], "inputs")
    return InferRequest(
        inputs=tuple(inputs),
        outputs=_requested_outputs(header.get("outputs")),
        id=request_id,
        parameters=parameters or None,
        binary_output=binary_output,
    )


def encode_infer_response(
    model_name: str, model_version: str | None, request: InferRequest, predictions: Any
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Encode what a predictor returned as the answer to ``request``.

    Args:
        model_name, model_version: echoed in the answer (no ``model_version`` when None).
        request: the parsed request: its ``id``, the outputs it named and which it wants in binary.
        predictions: an array, list, pandas Series (one output); DataFrame, list of records or dict
            (one output per column or key).

    Returns:
        The body and its headers: ``content-type``, and in binary ``inference-header-content-length``
        (the server adds ``content-length``).

    Raises:
        RequestError: the request named an output the model does not produce (the message lists them).

    >>> request = InferRequest(inputs=(), id="7")
    >>> encode_infer_response("m", "1", request, np.array([0.5, 1.0]))[0]
    b'{"model_name":"m","model_version":"1","id":"7","outputs":[{"name":"predictions","datatype":"FP64","shape":[2],"data":[0.5,1.0]}]}'
    """
    if request.outputs is None and not request.binary_output and type(predictions) is np.ndarray:
        quick = _quick_answer(model_name, model_version, request.id, predictions)
        if quick is not None:
            return quick, [_JSON_TYPE]
    tensors = _prediction_tensors(predictions)
    if request.outputs is None:
        chosen = [(name, request.binary_output) for name in tensors]
    else:
        if list(tensors) == [PREDICTIONS] and len(request.outputs) == 1:
            tensors = {request.outputs[0].name: tensors[PREDICTIONS]}
        unknown = [o.name for o in request.outputs if o.name not in tensors]
        if unknown:
            raise RequestError(
                f"outputs: model {model_name!r} has no output {', '.join(map(repr, unknown))}; "
                f"its outputs are {', '.join(map(repr, tensors))}"
            )
        chosen = [(o.name, request.binary_output if o.binary is None else o.binary) for o in request.outputs]
    entries, chunks = [], []
    for name, binary in chosen:
        datatype, array = _typed(tensors[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunks.append(_raw_bytes(array, datatype))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = _json_values(array, datatype)
        entries.append(entry)
    header = _ENCODER.encode(_answer(model_name, model_version, request, entries)).encode()
    if not chunks:
        return header, [_JSON_TYPE]
    headers = [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH.encode(), str(len(header)).encode())]
    return header + b"".join(chunks), headers


_JSON_TYPE = (b"content-type", b"application/json")


def _quick_answer(
    model_name: str, model_version: str | None, request_id: str | None, array: np.ndarray
) -> bytes | None:
    """The common answer, one array of integers or booleans in JSON, written directly: the same
    bytes ``encode_infer_response`` builds through its general path (None for any other array)."""
    datatype = _DATATYPE_OF.get((array.dtype.kind, array.dtype.itemsize))
    if datatype is None or array.dtype.kind not in "biu":
        return None
    head = _answer_head(model_name, model_version)
    if request_id is not None:
        head += b',"id":' + _ENCODER.encode(request_id).encode()
    shape = ",".join(map(str, array.shape)).encode()
    data = _ENCODER.encode(array.ravel().tolist()).encode()
    return b"".join(
        (
            head,
            b',"outputs":[{"name":"',
            _PREDICTIONS_NAME,
            b'","datatype":"',
            datatype.encode(),
            b'","shape":[',
            shape,
            b'],"data":',
            data,
            b"}]}",
        )
    )


@functools.lru_cache(maxsize=64)
def _answer_head(model_name: str, model_version: str | None) -> bytes:
    head = b'{"model_name":' + _ENCODER.encode(model_name).encode()
    if model_version is not None:
        head += b',"model_version":' + _ENCODER.encode(model_version).encode()
    return head


def _answer(model_name: str, model_version: str | None, request: InferRequest, outputs: list) -> dict[str, Any]:
    answer: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        answer["model_version"] = model_version
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = outputs
    return answer


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as model metadata describes it; -1 marks a dimension of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def server_metadata(version: str) -> dict[str, Any]:
    """The answer to ``GET /v2``."""
    return {"name": "ray-deploy", "version": version, "extensions": ["binary_tensor_data"]}


def model_metadata(
    name: str, *, versions: list[str], platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> dict[str, Any]:
    """The answer to ``GET /v2/models/{name}[/versions/{v}]``."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": [spec.to_dict() for spec in outputs],
    }


def row_input_specs(n_features: int | None) -> list[TensorSpec]:
    """The input of a model that takes rows: ``input``, FP64 [-1, n_features] (-1 when unknown)."""
    return [TensorSpec("input", "FP64", (-1, -1 if n_features is None else n_features))]


def onnx_tensor_specs(nodes: Iterable[Any]) -> list[TensorSpec]:
    """Specs from onnxruntime's ``session.get_inputs()`` or ``get_outputs()`` (anything with ``name``,
    ``type`` like ``'tensor(float)'`` and ``shape``); symbolic or unknown dimensions become -1, and a
    type with no v2 datatype (a sequence, a map) is reported as ONNX spells it."""
    return [
        TensorSpec(
            node.name,
            _ONNX_TYPES.get(node.type, node.type),
            tuple(d if type(d) is int and d >= 0 else -1 for d in node.shape or ()),
        )
        for node in nodes
    ]


def output_specs(predictions: Any) -> list[TensorSpec]:
    """The outputs an answer carrying ``predictions`` has (as ``encode_infer_response`` names and
    types them), the first (row) dimension of any size."""
    specs = []
    for name, values in _prediction_tensors(predictions).items():
        datatype, array = _typed(values)
        specs.append(TensorSpec(name, datatype, (-1, *array.shape[1:])))
    return specs


def mlflow_schema_specs(schema: Any) -> list[TensorSpec]:
    """Specs from an MLflow signature's input or output ``Schema`` (None: no signature, no specs).

    Columns become one input each, of shape [-1] (requests send them as several [N] inputs, which
    ``InferRequest`` reads as named columns); a tensor spec keeps its shape. An unnamed single
    column or tensor is ``predictions``, as answers name it."""
    if schema is None:
        return []
    specs = []
    for item in schema.inputs:
        name = getattr(item, "name", None) or PREDICTIONS
        dtype = getattr(item.type, "name", None)
        if isinstance(item.type, np.dtype):  # a tensor spec: numpy type and shape
            kind = item.type.kind, item.type.itemsize
            datatype = _DATATYPE_OF.get(kind, "BYTES")
            shape = tuple(d if type(d) is int and d >= 0 else -1 for d in item.shape)
        else:  # a column: an MLflow DataType
            datatype = _MLFLOW_TYPES.get(dtype, "BYTES")
            shape = (-1,)
        specs.append(TensorSpec(name, datatype, shape))
    return specs


_MLFLOW_TYPES = {
    "boolean": "BOOL",
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "binary": "BYTES",
    "datetime": "BYTES",
}

PLATFORMS = {"xgboost": "xgboost", "onnx": "onnxruntime_onnx", "mlflow": "mlflow_pyfunc", "python": "python"}
"""Model metadata's ``platform`` by built-in predictor; a predictor class of one's own is ``python``."""


@dataclass(frozen=True)
class Route:
    """Where a request under ``/v2`` goes: ``kind`` is ``server``, ``live``, ``ready``, ``model``,
    ``model_ready`` or ``infer``; ``model`` and ``version`` as the path names them."""

    kind: str
    model: str | None = None
    version: str | None = None

    @property
    def method(self) -> str:
        """The HTTP method the route answers."""
        return "POST" if self.kind == "infer" else "GET"


_ROUTE_HELP = "GET /v2, /v2/health/{live,ready}, /v2/models/{name}[/versions/{v}][/ready]; POST .../infer"


def parse_route(path: str) -> Route:
    """The route of a path under ``/v2`` (the part after an app's route prefix).

    Raises:
        RequestError: 404 for a path the protocol does not define, naming the routes it does.

    >>> parse_route("/v2/models/cancer/versions/3/infer")
    Route(kind='infer', model='cancer', version='3')
    """
    parts = path.split("/")[2:]  # "", "v2", then the rest
    if parts in ([], [""]):
        return Route("server")
    if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
        return Route(parts[1])
    if parts[0] == "models" and len(parts) >= 2 and parts[1]:
        model, rest, version = parts[1], parts[2:], None
        if rest[:1] == ["versions"] and len(rest) >= 2 and rest[1]:
            version, rest = rest[1], rest[2:]
        if not rest:
            return Route("model", model, version)
        if rest in (["ready"], ["infer"]):
            return Route("model_ready" if rest[0] == "ready" else "infer", model, version)
    raise RequestError(f"no Open Inference Protocol route {path!r}; routes are {_ROUTE_HELP}", 404)


_ONNX_TYPES = {
    **{f"tensor({t.lower()})": t for t in DATATYPES if t[0] in "UI"},
    **{"tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(bfloat16)": "BF16"},
    **{"tensor(bool)": "BOOL", "tensor(string)": "BYTES"},
}


def _header_length(value: int | str | bytes | None, body_length: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        length = -1
    if length < 0 or length > body_length:
        raise RequestError(
            f"{HEADER_LENGTH} must be the JSON's length in bytes, at most the body's {body_length}; got {value!r}"
        )
    return length


_PLAIN_INPUT_KEYS = frozenset(("name", "shape", "datatype", "data"))
_NUMBERS = frozenset((int, float))  # exactly: a bool is refused


def _plain_request(header: Any) -> InferRequest | None:
    """The common request, read in one pass: ``{"inputs": [...]}`` (perhaps with an ``id``) holding
    one FP32 or FP64 tensor of rows, its data a flat list of numbers that fits. None for any other
    request: the exact path reads it and names what is wrong."""
    if type(header) is not dict:
        return None
    inputs, request_id = header.get("inputs"), header.get("id")
    if len(header) != (1 if request_id is None else 2) or type(inputs) is not list or len(inputs) != 1:
        return None
    item = inputs[0]
    if type(item) is not dict or item.keys() != _PLAIN_INPUT_KEYS or (request_id and type(request_id) is not str):
        return None
    name, shape, datatype, values = item["name"], item["shape"], item["datatype"], item["data"]
    if datatype not in ("FP32", "FP64") or type(name) is not str or not name:
        return None
    if type(shape) is not list or len(shape) not in (1, 2) or any(type(d) is not int or d < 0 for d in shape):
        return None
    if type(values) is not list or not values or len(values) != math.prod(shape):
        return None
    limit = _FLOAT_LIMITS[datatype]
    if not {type(v) for v in values} <= _NUMBERS or not -limit <= min(values) <= max(values) <= limit:
        return None
    array = np.array(values, dtype=_WIRE[datatype]).reshape(shape)
    return InferRequest(inputs=(InferTensor(name, datatype, tuple(shape), array),), id=request_id, finite=True)


def _binary_without_length(body: bytes) -> str | None:
    """For a body that is not JSON: whether it is JSON followed by more bytes (binary tensor data
    sent without its header length), said with the fix; None otherwise."""
    text = body.decode("latin-1")  # any bytes: only where the JSON ends matters
    start = len(text) - len(text.lstrip())
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    if end >= len(text.rstrip()):
        return None
    return (
        f"the body is {end} bytes of JSON followed by {len(body) - end} more; binary tensor data needs the "
        f"{HEADER_LENGTH} header, set to the JSON's length"
    )


def _tensor_header(item: Any, where: str) -> tuple[str, str, list[int], int | None]:
    """An input's name, datatype, shape and ``binary_data_size`` (None: its data is in the JSON)."""
    if not isinstance(item, dict):
        raise RequestError(f"{where} must be an object with {', '.join(_INPUT_KEYS)}, got {_shown(item)}")
    _refuse_unknown(item, _INPUT_KEYS, where)
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.name must be a non-empty string, got {_shown(name)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise RequestError(f"{where}.shape must be a list of non-negative integers, got {_shown(shape)}")
    if datatype not in DATATYPES:
        raise RequestError(f"{where}.datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    size = _parameters(item, where).get("binary_data_size")
    if size is None and "data" not in item:
        raise RequestError(f"{where} ({name!r}) has no data: give data, or parameters.binary_data_size and binary data")
    if size is not None and "data" in item:
        raise RequestError(f"{where} ({name!r}) has both data and parameters.binary_data_size; send one")
    if size is not None and (type(size) is not int or size < 0):
        raise RequestError(f"{where}.parameters.binary_data_size must be a byte count, got {_shown(size)}")
    return name, datatype, shape, size


def _json_data(values: Any, where: str, datatype: str, shape: list[int]) -> np.ndarray:
    if not isinstance(values, list):
        raise RequestError(f"{where}.data must be a list (flat or nested, row-major), got {_shown(values)}")
    while values and type(values[0]) is list:  # nested: flatten a level at a time
        if not all(type(v) is list for v in values):
            raise RequestError(f"{where}.data mixes lists and values at one level of nesting")
        values = list(chain.from_iterable(values))
    if len(values) != math.prod(shape):
        raise RequestError(f"{where}.shape {shape} has {math.prod(shape)} elements, data has {len(values)}")
    kinds, expected = _JSON_VALUES.get(
        datatype, ({int, float} if datatype.startswith(("FP", "BF")) else {int}, "a number")
    )
    if not {type(v) for v in values} <= kinds:
        index = next(i for i, v in enumerate(values) if type(v) not in kinds)
        raise RequestError(
            f"{where}.data element {index}: expected {expected} for {datatype}, got {_shown(values[index])}"
        )
    if datatype == "BYTES":
        return _object_array([v.encode("utf-8") for v in values]).reshape(shape)
    # JSON numbers are finite or, past float64's range, infinite (JSON has no NaN): a float type
    # holds them all when the largest fits. Integers out of range make numpy raise OverflowError.
    limit = _FLOAT_LIMITS.get(datatype)
    if limit is not None and values and not -limit <= min(values) <= max(values) <= limit:
        raise RequestError(f"{where}.data holds a value out of range for {datatype}")
    try:
        array = np.array(values, dtype=np.float32 if datatype == "BF16" else _WIRE[datatype])
    except OverflowError:
        raise RequestError(f"{where}.data holds a value out of range for {datatype}") from None
    return array.reshape(shape)


def _binary_data(chunk: memoryview, where: str, datatype: str, shape: list[int]) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        elements, offset = [], 0
        while offset < len(chunk):
            size = struct.unpack_from("<I", chunk, offset)[0] if offset + 4 <= len(chunk) else -1
            if size < 0 or offset + 4 + size > len(chunk):
                raise RequestError(f"{where}: BYTES element {len(elements)} runs past its binary_data_size")
            elements.append(bytes(chunk[offset + 4 : offset + 4 + size]))
            offset += 4 + size
        if len(elements) != count:
            raise RequestError(f"{where}.shape {shape} has {count} elements, its binary data holds {len(elements)}")
        return _object_array(elements).reshape(shape)
    wire = _WIRE[datatype]
    if len(chunk) != count * wire.itemsize:
        raise RequestError(
            f"binary_data_size of {where} is {len(chunk)} but {datatype} {shape} needs {count * wire.itemsize}"
        )
    array = np.frombuffer(chunk, dtype=wire)
    if datatype == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(shape)


def _requested_outputs(value: Any) -> tuple[RequestedOutput, ...] | None:
    if not value:  # absent or empty: every output
        return None
    if not isinstance(value, list):
        raise RequestError(f'outputs must be a list of objects such as {{"name": "predictions"}}, got {_shown(value)}')
    outputs = []
    for index, item in enumerate(value):
        where = f"outputs[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(f'{where} must be an object with a "name" string, got {_shown(item)}')
        _refuse_unknown(item, ("name", "parameters"), where)
        binary = _parameters(item, where).get("binary_data")
        if binary is not None and type(binary) is not bool:
            raise RequestError(f"{where}.parameters.binary_data must be true or false, got {_shown(binary)}")
        outputs.append(RequestedOutput(name=item["name"], binary=binary))
    _refuse_repeats([o.name for o in outputs], "outputs")
    return tuple(outputs)


def _parameters(item: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = item.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError(f"parameters of {where} must be a JSON object, got {_shown(parameters)}")
    for key in parameters:
        if key.startswith("shared_memory") or key == "classification":
            extension = "shared-memory" if key.startswith("shared_memory") else "classification"
            raise RequestError(f"parameters.{key} of {where}: the {extension} extension is not supported")
    return parameters


def _refuse_unknown(item: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    if len(item) <= len(allowed) and all(key in allowed for key in item):
        return
    unknown = sorted(set(item) - set(allowed))
    if unknown:
        raise RequestError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(allowed)}")


def _refuse_repeats(names: list[str], where: str) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RequestError(f"{where} name {', '.join(map(repr, repeated))} more than once")


def _python_rows(block: np.ndarray, tensor: InferTensor, index: int) -> list[list[Any]]:
    if tensor.datatype != "BYTES":
        return block.tolist()
    try:
        return [[value.decode("utf-8") for value in row] for row in block.tolist()]
    except UnicodeDecodeError:
        raise RequestError(f"inputs[{index}] ({tensor.name!r}) holds BYTES that are not UTF-8 text") from None


def _prediction_tensors(predictions: Any) -> dict[str, np.ndarray]:
    if isinstance(predictions, list) and predictions and all(isinstance(row, dict) for row in predictions):
        predictions = {key: [row.get(key) for row in predictions] for key in predictions[0]}
    if isinstance(predictions, dict):
        return {str(key): np.asarray(value) for key, value in predictions.items()}
    if hasattr(predictions, "columns") and hasattr(predictions, "iloc"):  # a pandas DataFrame
        return {str(c): predictions.iloc[:, i].to_numpy() for i, c in enumerate(predictions.columns)}
    return {PREDICTIONS: np.asarray(predictions)}


def _typed(array: np.ndarray) -> tuple[str, np.ndarray]:
    """The output's datatype, and its values as that datatype holds them (BYTES: ``bytes`` objects)."""
    kind = array.dtype.kind
    if kind == "O":  # a pandas object column, a list of mixed values: numbers if they all are
        try:
            inferred = np.array(array.tolist())
        except ValueError:  # ragged lists: sent as text
            inferred = array
        if inferred.dtype.kind in "biuf" and inferred.shape == array.shape:
            return _typed(inferred)
    if (kind, array.dtype.itemsize) in _DATATYPE_OF:
        return _DATATYPE_OF[kind, array.dtype.itemsize], array
    if kind == "f":  # longdouble
        return "FP64", array.astype(np.float64)
    values = array.ravel().tolist() if kind in "OSU" else [str(v) for v in array.ravel()]
    return "BYTES", _object_array([v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]).reshape(
        array.shape
    )


def _raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.ravel().tolist())
    return np.ascontiguousarray(array, dtype=_WIRE[datatype]).tobytes()


def _json_values(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in array.ravel().tolist()]
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        values = array.astype(object)
        values[~np.isfinite(array)] = None
        return values.ravel().tolist()
    return array.ravel().tolist()


def _object_array(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."
