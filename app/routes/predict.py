"""POST /predict: JSON instances (arrays or base64 images) or multipart image uploads."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from app.decoding import (
    check_count,
    decode_image,
    decode_instances,
    media_type,
    parse_json_body,
)
from app.deps import ApiKey, ServiceDep
from app.errors import ClientError
from app.schemas import (
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    ThresholdMode,
    inline_refs,
)
from app.service import Service

router = APIRouter(tags=["predict"], dependencies=[ApiKey])

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 413, 415, 422, 429, 503, 504)}
_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": inline_refs(PredictRequest.model_json_schema())},
        "multipart/form-data": {"schema": {
            "type": "object",
            "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": "PNG or JPEG images (any field name); one prediction each"},
                "early_exit": {"type": "string", "description": "auto, off or a threshold"},
                "top_k": {"type": "integer"},
                "return_blocks": {"type": "boolean"},
            },
        }},
    },
}


async def _parse_multipart(request: Request, service) -> tuple[Any, dict[str, Any]]:
    max_files = service.settings.MAX_INSTANCES
    form = await request.form(max_files=max_files + 1, max_fields=16,
                              max_part_size=service.settings.MAX_BODY_BYTES)
    files = [(name, v) for name, v in form.multi_items() if isinstance(v, UploadFile)]
    check_count(len(files), max_files, "uploaded files")
    rows = []
    for i, (name, upload) in enumerate(files):
        data = await upload.read()
        rows.append(decode_image(data, f"file {i} ({name}={upload.filename!r})", service.spec))
    options: dict[str, Any] = {}
    for key in ("early_exit", "top_k", "return_blocks"):
        if key in form and not isinstance(form[key], UploadFile):
            options[key] = form[key]
    unknown = {k for k, v in form.multi_items() if not isinstance(v, UploadFile)} - set(options)
    if unknown:
        raise ClientError(422, f"unknown form fields {sorted(unknown)}; the options are "
                               "early_exit, top_k and return_blocks")
    return rows, options


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS,
             openapi_extra={"requestBody": _BODY})
async def predict(request: Request, service: ServiceDep) -> JSONResponse:
    """Classify instances; each answer names the block that made the decision."""
    ctype = media_type(request.headers)
    if is_json(ctype):  # app/middleware.py answers these itself; this serves direct ASGI use
        return JSONResponse(await predict_json(service, await request.body()))
    if ctype != "multipart/form-data":
        raise ClientError(415, f"content type {ctype or '(none)'!r} is not accepted: send "
                               "application/json or multipart/form-data")
    rows, options = await _parse_multipart(request, service)
    x = np.stack(rows)  # N x (C, H, W) -> (N, C, H, W)
    mode = service.parse_mode(options.get("early_exit"))
    top_k = _form_int(options.get("top_k", "1"), "top_k")
    return_blocks = str(options.get("return_blocks", "false")).lower() in ("1", "true", "yes")
    job = await service.infer(x, mode, return_blocks)
    return JSONResponse({"model": service.model_ref(),
                         "predictions": service.predictions(job, top_k)})


def is_json(ctype: str) -> bool:
    return ctype == "application/json" or ctype.endswith("+json")


async def predict_json(service: Service, body: bytes) -> dict[str, Any]:
    """A JSON /predict body -> the response body: the one implementation, for the FastAPI route
    and for the hot path in app/middleware.py."""
    req = parse_json_body(PredictRequest, body, '{"instances": [...]}')
    x = decode_instances(req.instances, service.spec, service.settings.MAX_INSTANCES)
    early_exit = req.early_exit
    mode = service.parse_mode(early_exit.threshold if isinstance(early_exit, ThresholdMode)
                              else early_exit)
    job = await service.infer(x, mode, req.return_blocks)
    return {"model": service.model_ref(), "predictions": service.predictions(job, req.top_k)}


def _form_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ClientError(422, f"{name} must be a whole number, got {value!r}") from None
    if number < 1:
        raise ClientError(422, f"{name} must be at least 1, got {number}")
    return number
