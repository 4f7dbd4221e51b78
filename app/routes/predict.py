"""POST /predict: JSON instances (arrays or base64 images) or multipart image uploads."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.admission import Ticket
from app.batcher import Job
from app.decoding import (
    check_count,
    decode_image,
    decode_instances,
    max_values,
    media_type,
    parse_json_body,
)
from app.deps import ApiKey, NamedServiceDep, ServiceDep, VersionedServiceDep
from app.errors import ClientError, excerpt
from app.schemas import (
    MIN_DEADLINE_MS,
    ErrorResponse,
    PredictOptions,
    PredictRequest,
    PredictResponse,
    inline_refs,
)
from app.service import INLINE_DECODE_BYTES, Service
from contract.pydantic_errors import describe_errors

router = APIRouter(tags=["predict"], dependencies=[ApiKey])
MAX_FORM_FIELDS = 16  # the options are a handful; more is a malformed or hostile form

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 415, 422, 429, 503, 504)}
_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": inline_refs(PredictRequest.model_json_schema())},
        "multipart/form-data": {"schema": {
            "type": "object",
            "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": "PNG or JPEG images (any field name); one prediction each"},
                "early_exit": {"type": "string", "description": "auto, off or a threshold such "
                               "as 0.9", "pattern": r"^(auto|off|0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$"},
                "deadline_ms": {"type": "number", "minimum": MIN_DEADLINE_MS,
                                "maximum": 600_000},
                "top_k": {"type": "integer", "minimum": 1},
                "return_blocks": {"type": "boolean"},
            },
        }},
    },
}


async def _parse_multipart(request: Request, service: Service,
                           ticket: Ticket) -> tuple[np.ndarray, PredictOptions]:
    max_files = service.settings.MAX_INSTANCES
    try:
        form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS,
                                  max_part_size=service.settings.MAX_BODY_BYTES)
    except HTTPException as e:  # python-multipart's limits; the README promises 413 for counts
        if e.status_code == 400 and str(e.detail).startswith(("Too many files", "Too many fields")):
            what = "uploaded files" if "files" in str(e.detail) else "form fields"
            limit = max_files if what == "uploaded files" else MAX_FORM_FIELDS
            raise ClientError(413, f"more than {limit} {what} in one request (the limit; "
                                   "HFF_MAX_INSTANCES for files)") from None
        raise
    files = [(name, v) for name, v in form.multi_items() if isinstance(v, UploadFile)]
    check_count(len(files), max_files, "uploaded files")
    images = [(await upload.read(), f"file {i} ({name}={excerpt(upload.filename)})")
              for i, (name, upload) in enumerate(files)]
    x = await service.decode(ticket, True, decode_images, images, service.spec)
    fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
    unknown = set(fields) - set(PredictOptions.model_fields)
    if unknown:
        raise ClientError(422, f"unknown form fields {excerpt(sorted(unknown))}; the options are "
                               f"{', '.join(PredictOptions.model_fields)}")
    try:
        return x, PredictOptions.model_validate(fields)
    except ValidationError as e:
        raise ClientError(422, describe_errors(e, root="form")) from None


def decode_images(images: list[tuple[bytes, str]], spec) -> np.ndarray:
    """Uploaded images -> (N, C, H, W), on a decode thread."""
    return np.stack([decode_image(data, where, spec) for data, where in images])


DEFAULT_OPTIONS = PredictOptions()


def decode_json(body: bytes, service: Service) -> tuple[PredictOptions, np.ndarray]:
    """A JSON /predict body -> (options, (N, C, H, W) rows), for every route that takes one.

    The common body, {"instances": [...]} and nothing else, is parsed with orjson and needs no
    validation beyond decode_instances' (no pydantic model per request); any other body (options,
    NaN tokens, anything invalid) goes through the PredictRequest model, which gives the errors.
    """
    spec, limit = service.spec, service.settings.MAX_INSTANCES
    values = max_values(spec, limit)
    if body.count(b",") <= values:  # else parse_json_body refuses it (413) unparsed
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if type(data) is dict and len(data) == 1 and type(data.get("instances")) is list:
            return DEFAULT_OPTIONS, decode_instances(data["instances"], spec, limit)
    req = parse_json_body(PredictRequest, body, '{"instances": [...]}', values)
    return req, decode_instances(req.instances, spec, limit)


def is_heavy(body: bytes) -> bool:
    """Decode on the decode threads (large bodies, images) rather than on the event loop."""
    return len(body) > INLINE_DECODE_BYTES or b'"b64"' in body


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS,
             openapi_extra={"requestBody": _BODY})
async def predict(request: Request, service: ServiceDep) -> JSONResponse:
    """Classify instances with the default model (the only one, or the first by name); each
    answer names the block that made the decision."""
    return await _predict_request(request, service)


@router.post("/v1/models/{name}:predict", response_model=PredictResponse,
             responses=_ERRORS, openapi_extra={"requestBody": _BODY})
async def predict_named(request: Request, service: NamedServiceDep) -> JSONResponse:
    """/predict with the model named in the path (TF Serving's REST convention)."""
    return await _predict_request(request, service)


@router.post("/v1/models/{name}/versions/{version}:predict", response_model=PredictResponse,
             responses=_ERRORS, openapi_extra={"requestBody": _BODY})
async def predict_version(request: Request, service: VersionedServiceDep) -> JSONResponse:
    """/predict with one version of a model (404 unless it is the version serving)."""
    return await _predict_request(request, service)


async def _predict_request(request: Request, service: Service) -> JSONResponse:
    ctype = media_type(request.headers)
    if is_json(ctype):  # app/middleware.py answers these itself; this serves direct ASGI use
        return JSONResponse(await predict_json(service, request.headers, request.body))
    if ctype != "multipart/form-data":
        raise ClientError(415, f"content type {excerpt(ctype or '(none)')} is not accepted: send "
                               "application/json or multipart/form-data")
    async with service.admit(request.headers) as ticket:
        x, options = await _parse_multipart(request, service, ticket)
        return JSONResponse(await _predict(service, x, options, ticket))


def is_json(ctype: str) -> bool:
    return ctype == "application/json" or ctype.endswith("+json")


async def predict_json(service: Service, headers: Mapping[str, str],
                       read_body: Callable[[], Awaitable[bytes]]) -> dict[str, Any]:
    """A JSON /predict request -> the response body: the one implementation, for the FastAPI
    route and for the hot path in app/middleware.py. The body is read only once the request is
    admitted (app.admission), so `read_body` is a callable."""
    async with service.admit(headers) as ticket:
        body = await read_body()
        options, x = await service.decode(ticket, is_heavy(body), decode_json, body, service)
        return await _predict(service, x, options, ticket)


async def _predict(service: Service, x: np.ndarray, options: PredictOptions,
                   ticket: Ticket) -> dict[str, Any]:
    job = await service.infer(x, options.early_exit, ticket, options.return_blocks,
                              options.deadline_ms)
    return response(service, job, options)


def response(service: Service, job: Job, options: PredictOptions) -> dict[str, Any]:
    """The /predict response body for a job that has been answered."""
    return {"model": service.model_ref(), "predictions": service.predictions(job, options.top_k)}
