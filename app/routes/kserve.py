"""KServe / Open Inference Protocol v2 REST: server and model metadata, readiness, infer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app import __version__
from app.decoding import (
    BINARY_HEADER,
    decode_binary_tensor,
    decode_tensor,
    max_values,
    media_type,
    parse_json_body,
)
from app.deps import ApiKey, NamedServiceDep, RepositoryDep, VersionedServiceDep
from app.early_exit import parse_early_exit
from app.errors import ClientError, excerpt
from app.schemas import (
    MAX_DEADLINE_MS,
    MIN_DEADLINE_MS,
    ErrorResponse,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    inline_refs,
)
from app.service import INLINE_DECODE_BYTES, Service

router = APIRouter(prefix="/v2", tags=["kserve-v2"], dependencies=[ApiKey])
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 415, 422, 429, 503, 504)}


@router.get("")
async def server_metadata(repository: RepositoryDep) -> dict[str, Any]:
    """Server metadata."""
    return {"name": "hff-serve", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=_ERRORS)
async def model_metadata(service: NamedServiceDep) -> dict[str, Any]:
    """Model metadata: input tensor and the outputs infer returns."""
    return _metadata(service)


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata,
            responses=_ERRORS)
async def model_version_metadata(service: VersionedServiceDep) -> dict[str, Any]:
    """Model metadata of one version (404 unless it is the version serving)."""
    return _metadata(service)


def _metadata(service: Service) -> dict[str, Any]:
    c, h, w = service.spec.shape
    return {
        "name": service.name, "versions": [service.version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, service.manifest.num_classes]},
            {"name": "exit_block", "datatype": "INT32", "shape": [-1]},
            {"name": "operating_point", "datatype": "INT32", "shape": [-1]},
        ],
    }


@router.get("/models/{name}/ready", response_model=None, responses=_ERRORS)
async def model_ready(service: NamedServiceDep):
    """Model readiness (503 while warming up or shutting down)."""
    return _ready(service)


@router.get("/models/{name}/versions/{version}/ready", response_model=None, responses=_ERRORS)
async def model_version_ready(service: VersionedServiceDep):
    """Readiness of one version of a model (404 unless it is the version serving)."""
    return _ready(service)


def _ready(service: Service) -> dict[str, Any]:
    if not service.ready:
        raise service.not_ready_error()
    return {"name": service.name, "ready": True}


_INFER_BODY = {"required": True, "content": {
    "application/json": {"schema": inline_refs(V2InferRequest.model_json_schema())},
    "application/octet-stream": {"schema": {
        "type": "string", "format": "binary",
        "description": "binary tensor data extension: the JSON request (its size in the "
                       "Inference-Header-Content-Length header, the input declaring "
                       "parameters.binary_data_size) followed by the FP32 tensor, little-endian"}},
}}


@router.post("/models/{name}/infer", response_model=V2InferResponse, responses=_ERRORS,
             openapi_extra={"requestBody": _INFER_BODY})
async def infer(request: Request, service: NamedServiceDep) -> JSONResponse:
    """Run inference on an FP32 tensor named `input` of shape [N, C, H, W]."""
    # app/middleware.py answers these itself; this serves direct ASGI use. A built response
    # skips re-validating what infer_json just made against response_model (which stays for
    # the OpenAPI document).
    return JSONResponse(await infer_json(service, request.headers, request.body))


@router.post("/models/{name}/versions/{version}/infer", response_model=V2InferResponse,
             responses=_ERRORS, openapi_extra={"requestBody": _INFER_BODY})
async def infer_version(request: Request, service: VersionedServiceDep) -> JSONResponse:
    """Inference on one version of a model (404 unless it is the version serving)."""
    return JSONResponse(await infer_json(service, request.headers, request.body))


class InferOptions(NamedTuple):
    """What an infer request asks besides its tensor: the id the response echoes, and the
    parameters the server reads."""

    id: str | None
    early_exit: str | float | None
    deadline_ms: float | None


async def infer_json(service: Service, headers: Mapping[str, str],
                     read_body: Callable[[], Awaitable[bytes]]) -> dict[str, Any]:
    """A KServe v2 infer request -> the response body: the one implementation, for the FastAPI
    route and for the hot path in app/middleware.py (`headers`: lower-case names). The body is
    read only once the request is admitted (app.admission), so `read_body` is a callable."""
    async with service.admit(headers) as ticket:
        header, binary = split_body(headers, await read_body())
        heavy = len(header) > INLINE_DECODE_BYTES
        options, x = await service.decode(ticket, heavy, decode_infer, header, binary, service)
        job = await service.infer(x, options.early_exit, ticket, deadline_ms=options.deadline_ms)
        return infer_response(options, job, service)


def decode_infer(header: bytes, binary: bytes | memoryview, service: Service
                 ) -> tuple[InferOptions, np.ndarray]:
    """The JSON header (and the binary tensor after it) -> (options, (N, C, H, W) rows).

    The usual binary request (one input named 'input', FP32, parameters.binary_data_size, and at
    most the early_exit, deadline_ms and id options) is parsed with orjson and checked here: no
    pydantic model per request. Any other header (JSON data, other keys or types, anything
    invalid) goes through the V2InferRequest model, which gives the errors.
    """
    limit = max_values(service.spec, service.settings.MAX_INSTANCES)
    # only with a binary part: a JSON-data body (up to megabytes of numbers) would be parsed in
    # full by orjson just to be found not simple and parsed again by the model
    if binary and header.count(b",") <= limit:  # else parse_json_body refuses it (413) unparsed
        simple = _simple_binary_header(header)
        if simple is not None:
            options, shape, size = simple
            return options, _input_array(None, shape, {"binary_data_size": size}, binary, service)
    req = parse_json_body(V2InferRequest, header, '{"inputs": [...]}', limit)
    names = [t.name for t in req.inputs]
    if len(names) != len(set(names)):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ClientError(400, f"input names must be unique; {excerpt(twice)} appear more than once")
    if names != ["input"]:
        raise ClientError(422, f"expected one input tensor named 'input', got {excerpt(names)}")
    tensor = req.inputs[0]
    if tensor.datatype.upper() != "FP32":
        raise ClientError(422, f"inputs[0].datatype is {excerpt(tensor.datatype)}, expected 'FP32'")
    params = req.parameters
    options = InferOptions(req.id, params.early_exit if params else None,
                           params.deadline_ms if params else None)
    return options, _input_array(tensor.data, tensor.shape, tensor.parameters, binary, service)


# the fields of V2InferRequest and of a binary V2Tensor the fast path knows; a field added to the
# models must be taught to it (tests/app/test_service_decoding.py fails until it is)
_REQUEST_KEYS = frozenset(("id", "inputs", "outputs", "parameters"))
_BINARY_TENSOR_KEYS = frozenset(("name", "shape", "datatype", "parameters"))


# Headers read before, by their bytes: a client sends the same header with every request of
# one shape and options (no id), so it is parsed once, not once per request. Bounded: emptied
# when full; headers with a request id (unique per request) and long ones are not kept.
_HEADERS_READ: dict[bytes, tuple[InferOptions, list[int], int] | None] = {}
_HEADERS_KEPT = 256
_HEADER_KEPT_BYTES = 512


def _simple_binary_header(header: bytes) -> tuple[InferOptions, list[int], int] | None:
    """(options, shape, binary_data_size) of a header that V2InferRequest would accept as it is
    and that the checks after it pass; None for anything else (which the model then parses)."""
    try:
        found = _HEADERS_READ[header]
    except KeyError:
        found = _read_simple_binary_header(header)
        if len(header) <= _HEADER_KEPT_BYTES and (found is None or found[0].id is None):
            if len(_HEADERS_READ) >= _HEADERS_KEPT:
                _HEADERS_READ.clear()
            _HEADERS_READ[header] = found
    if found is None:
        return None
    options, shape, size = found
    return options, list(shape), size  # the caller's own list


def _read_simple_binary_header(header: bytes) -> tuple[InferOptions, list[int], int] | None:
    try:
        req = orjson.loads(header)
    except orjson.JSONDecodeError:
        return None
    if type(req) is not dict or not req.keys() <= _REQUEST_KEYS or req.get("outputs") is not None:
        return None
    rid, inputs, params = req.get("id"), req.get("inputs"), req.get("parameters")
    if (rid is not None and type(rid) is not str) or type(inputs) is not list or len(inputs) != 1:
        return None
    tensor = inputs[0]
    if type(tensor) is not dict or tensor.keys() != _BINARY_TENSOR_KEYS:
        return None
    shape, datatype, tensor_params = tensor["shape"], tensor["datatype"], tensor["parameters"]
    if (tensor["name"] != "input" or type(datatype) is not str or datatype.upper() != "FP32"
            or type(shape) is not list or any(type(d) is not int for d in shape)
            or type(tensor_params) is not dict):
        return None
    size = tensor_params.get("binary_data_size")
    if type(size) is not int:
        return None
    mode = deadline = None
    if params is not None:
        if type(params) is not dict:
            return None
        mode, deadline = params.get("early_exit"), params.get("deadline_ms")
        if mode is not None:
            try:
                mode = parse_early_exit(mode)
            except ValueError:
                return None
        if deadline is not None:
            if type(deadline) not in (int, float) or not (
                    MIN_DEADLINE_MS <= deadline <= MAX_DEADLINE_MS):
                return None
            deadline = float(deadline)
    return InferOptions(rid, mode, deadline), shape, size


def infer_response(options: InferOptions, job, service: Service) -> dict[str, Any]:
    assert job.probs is not None and job.exit_block is not None
    n, classes = job.probs.shape
    # the v2 protocol echoes a request's id and has none to echo otherwise (its type is a string)
    echo = {} if options.id is None else {"id": options.id}
    return {
        "model_name": service.name, "model_version": service.version, **echo,
        "outputs": [
            {"name": "probabilities", "shape": [n, classes], "datatype": "FP32",
             "data": job.probs.reshape(-1).tolist()},  # (N, C) -> flat, row-major
            {"name": "exit_block", "shape": [n], "datatype": "INT32",
             "data": job.exit_block.tolist()},
            # index of the operating point that answered each row; -1: off, a fixed threshold
            # or a missed deadline
            {"name": "operating_point", "shape": [n], "datatype": "INT32",
             "data": job.operating_point.tolist()},
        ],
    }


def split_body(headers: Mapping[str, str], body: bytes) -> tuple[bytes, bytes | memoryview]:
    """(JSON header, binary tensor bytes after it: a view, not a copy); the binary part is empty
    without the extension."""
    ctype = media_type(headers, "application/json")
    raw_length = headers.get(BINARY_HEADER)
    if raw_length is None:
        if ctype != "application/json":
            hint = (" (binary tensors also need the Inference-Header-Content-Length header)"
                    if ctype == "application/octet-stream" else "")
            raise ClientError(415, f"content type {excerpt(ctype)} is not accepted: send "
                                   f"application/json{hint}")
        return body, b""
    if ctype not in ("application/json", "application/octet-stream"):
        raise ClientError(415, f"content type {excerpt(ctype)} is not accepted: send "
                               "application/octet-stream or application/json")
    try:
        length = int(raw_length)
    except ValueError:
        raise ClientError(400, f"Inference-Header-Content-Length is {excerpt(raw_length)}, expected the "
                               "JSON header's size in bytes") from None
    if not 0 < length <= len(body):
        raise ClientError(400, f"Inference-Header-Content-Length is {length}, but the body has "
                               f"{len(body)} bytes")
    return body[:length], memoryview(body)[length:]


def _input_array(data: list[Any] | None, shape: list[int], parameters: dict[str, Any] | None,
                 binary: bytes | memoryview, service: Service) -> np.ndarray:
    """The input tensor from its JSON `data` or from the binary part of the body."""
    spec, limit = service.spec, service.settings.MAX_INSTANCES
    size = (parameters or {}).get("binary_data_size")
    if size is None:
        if data is None:
            raise ClientError(422, "inputs[0] has neither data nor parameters.binary_data_size")
        if binary:
            raise ClientError(400, f"the body has {len(binary)} bytes after the JSON header, but "
                                   "no input declares parameters.binary_data_size")
        return decode_tensor(data, shape, "inputs[0]", spec, limit)
    if data is not None:
        raise ClientError(422, "inputs[0] has both data and parameters.binary_data_size; send one")
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise ClientError(400, f"inputs[0].parameters.binary_data_size is {excerpt(size)}, but "
                               f"{len(binary)} bytes follow the JSON header")
    return decode_binary_tensor(binary, shape, "inputs[0]", spec, limit)
