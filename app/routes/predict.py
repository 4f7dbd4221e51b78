"""POST /predict: JSON instances (arrays or base64 images) or multipart image uploads."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
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
    PredictOptions,
    PredictRequest,
    PredictResponse,
    inline_refs,
)
from contract.pydantic_errors import describe_errors

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
                "early_exit": {"type": "string", "description": "auto, off or a threshold such "
                               "as 0.9", "pattern": r"^(auto|off|0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$"},
                "top_k": {"type": "integer", "minimum": 1},
                "return_blocks": {"type": "boolean"},
            },
        }},
    },
}


async def _parse_multipart(request: Request, service) -> tuple[Any, PredictOptions]:
    max_files = service.settings.MAX_INSTANCES
    form = await request.form(max_files=max_files + 1, max_fields=16,
                              max_part_size=service.settings.MAX_BODY_BYTES)
    files = [(name, v) for name, v in form.multi_items() if isinstance(v, UploadFile)]
    check_count(len(files), max_files, "uploaded files")
    rows = []
    for i, (name, upload) in enumerate(files):
        data = await upload.read()
        rows.append(decode_image(data, f"file {i} ({name}={upload.filename!r})", service.spec))
    fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
    unknown = set(fields) - set(PredictOptions.model_fields)
    if unknown:
        raise ClientError(422, f"unknown form fields {sorted(unknown)}; the options are "
                               f"{', '.join(PredictOptions.model_fields)}")
    try:
        return rows, PredictOptions.model_validate(fields)
    except ValidationError as e:
        raise ClientError(422, describe_errors(e, root="form")) from None


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS,
             openapi_extra={"requestBody": _BODY})
async def predict(request: Request, service: ServiceDep) -> JSONResponse:
    """Classify instances; each answer names the block that made the decision."""
    ctype = media_type(request.headers)
    if ctype == "application/json" or ctype.endswith("+json"):
        req = parse_json_body(PredictRequest, await request.body(), '{"instances": [...]}')
        x = decode_instances(req.instances, service.spec, service.settings.MAX_INSTANCES)
        options: PredictOptions = req
    elif ctype == "multipart/form-data":
        rows, options = await _parse_multipart(request, service)
        x = np.stack(rows)  # N x (C, H, W) -> (N, C, H, W)
    else:
        raise ClientError(415, f"content type {ctype or '(none)'!r} is not accepted: send "
                               "application/json or multipart/form-data")
    job = await service.infer(x, options.early_exit, options.return_blocks)
    return JSONResponse({"model": service.model_ref(),
                         "predictions": service.predictions(job, options.top_k)})
