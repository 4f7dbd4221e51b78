"""KServe / Open Inference Protocol v2 REST: server and model metadata, readiness, infer."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from app.decoding import decode_tensor
from app.deps import ApiKey, ServiceDep
from app.errors import ClientError, describe_validation_errors, error_response
from app.schemas import (
    ErrorResponse,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    inline_refs,
)

router = APIRouter(prefix="/v2", tags=["kserve-v2"], dependencies=[ApiKey])
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 415, 422, 429, 503, 504)}


def _check_name(service, name: str) -> None:
    if name != service.manifest.name:
        raise ClientError(404, f"unknown model {name!r} (this server serves "
                               f"{service.manifest.name!r})")


@router.get("")
async def server_metadata(service: ServiceDep) -> dict[str, Any]:
    """Server metadata."""
    return {"name": "hff-serve", "version": "0.1.0", "extensions": []}


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=_ERRORS)
async def model_metadata(name: str, service: ServiceDep) -> dict[str, Any]:
    """Model metadata: input tensor and the outputs infer returns."""
    _check_name(service, name)
    c, h, w = service.spec.shape
    return {
        "name": name, "versions": [service.manifest.version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, service.manifest.num_classes]},
            {"name": "exit_block", "datatype": "INT32", "shape": [-1]},
        ],
    }


@router.get("/models/{name}/ready", response_model=None, responses=_ERRORS)
async def model_ready(name: str, service: ServiceDep):
    """Model readiness (503 while warming up or shutting down)."""
    _check_name(service, name)
    if not service.ready:
        return error_response(503, f"not ready: {service.not_ready_reason()}", {"Retry-After": "1"})
    return {"name": name, "ready": True}


_INFER_BODY = {"required": True, "content": {"application/json": {
    "schema": inline_refs(V2InferRequest.model_json_schema())}}}


@router.post("/models/{name}/infer", response_model=V2InferResponse, responses=_ERRORS,
             openapi_extra={"requestBody": _INFER_BODY})
async def infer(name: str, request: Request, service: ServiceDep) -> dict[str, Any]:
    """Run inference on an FP32 tensor named `input` of shape [N, C, H, W]."""
    _check_name(service, name)
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ClientError(415, f"content type {ctype!r} is not accepted: send application/json")
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClientError(400, f"the body is not valid JSON ({e})") from None
    try:
        req = V2InferRequest.model_validate(payload)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        raise ClientError(422, describe_validation_errors(errors)) from None
    inputs = {t.name: t for t in req.inputs}
    if "input" not in inputs or len(inputs) != 1:
        raise ClientError(422, f"expected one input tensor named 'input', got {sorted(inputs)}")
    tensor = inputs["input"]
    if tensor.datatype.upper() != "FP32":
        raise ClientError(422, f"inputs[0].datatype is {tensor.datatype!r}, expected 'FP32'")
    x = decode_tensor(tensor.data, tensor.shape, "inputs[0]", service.spec,
                      service.settings.MAX_INSTANCES)
    mode = service.parse_mode((req.parameters or {}).get("early_exit"))
    job = await service.infer(x, mode)
    assert job.probs is not None and job.exit_block is not None
    n, classes = job.probs.shape
    return {
        "model_name": name, "model_version": service.manifest.version, "id": req.id,
        "outputs": [
            {"name": "probabilities", "shape": [n, classes], "datatype": "FP32",
             "data": job.probs.reshape(-1).tolist()},  # (N, C) -> flat, row-major
            {"name": "exit_block", "shape": [n], "datatype": "INT32",
             "data": job.exit_block.tolist()},
        ],
    }
