"""The OpenAPI document of the served model, for clients and schema-based fuzzers alike.

FastAPI's document is built from the routes, which do not know the model; this fills in what
does: `{name}` is an enum of the served models (a generated name reaches the route instead of a
404), `instances` and the KServe input tensor carry the model's shape and pixel range, and every
operation documents the JSON error body {"error": "..."}.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.repository import ModelRepository
from contract.model_dir import GRAPH_INPUT, Manifest

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def install_openapi(app: FastAPI, repository: ModelRepository, max_instances: int) -> None:
    """Serve the tailored document at /openapi.json (and /docs); built on first request, and
    again when the models served change. The shapes are the default model's."""
    built_for: list[Any] = [None]

    def openapi() -> dict[str, Any]:
        served = [(n, s.version) for n, s in sorted(repository.models.items())]
        if app.openapi_schema is None or built_for[0] != served:
            schema = copy.deepcopy(get_openapi(  # routes share their openapi_extra dicts
                title=app.title, version=app.version, description=app.description,
                routes=app.routes))
            default = repository.models.get(repository.default)  # type: ignore[arg-type]
            if default is not None:
                tailor(schema, default.manifest, max_instances, sorted(repository.models))
            app.openapi_schema, built_for[0] = schema, served
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def tailor(schema: dict[str, Any], manifest: Manifest, max_instances: int,
           names: list[str]) -> None:
    """Fill the model's names, shapes and the error body into FastAPI's document, in place."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "name":
                    parameter["schema"] = {"type": "string", "enum": names,
                                           "title": "Name", "description": "a served model"}
            _document_errors(operation)
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, not ours
        schema.get("components", {}).get("schemas", {}).pop(unused, None)
    c, h, w = manifest.input.shape
    blank = [[[0.0] * w for _ in range(h)] for _ in range(c)]  # one all-zero image, (C, H, W)
    predict = _body(schema, "/predict", "application/json")
    if predict is not None:
        instances = predict["schema"]["properties"]["instances"]
        instances.update(minItems=1, maxItems=max_instances,
                         items={"anyOf": [*_nested_arrays(manifest), _B64]})
        predict["example"] = {"instances": [blank], "early_exit": "auto", "top_k": 3}
    form = _body(schema, "/predict", "multipart/form-data")
    if form is not None:
        form["schema"]["required"] = ["file"]
        form["schema"]["properties"]["file"]["minItems"] = 1
    infer = _body(schema, "/v2/models/{name}/infer", "application/json")
    if infer is not None:
        infer["schema"]["properties"]["inputs"]["items"] = _kserve_input(manifest, max_instances)
        infer["schema"]["properties"]["inputs"]["maxItems"] = 1
        infer["example"] = {"inputs": [{"name": GRAPH_INPUT, "shape": [1, c, h, w],
                                        "datatype": "FP32", "data": blank}],
                            "parameters": {"early_exit": "off"}}


def _document_errors(operation: dict[str, Any]) -> None:
    """Every error an operation answers has the one JSON body, whatever its status."""
    responses = operation.setdefault("responses", {})
    for status, response in responses.items():
        if status[0] in "45":
            response["content"] = {"application/json": {"schema": ERROR_REF}}
    responses.setdefault("default", {
        "description": "any other error, e.g. 401 without the API key, 405, 413 for a body over "
                       "the limit, 500 for a bug",
        "content": {"application/json": {"schema": ERROR_REF}},
    })


def _body(schema: dict[str, Any], path: str, media_type: str) -> dict[str, Any] | None:
    """The media type object (schema, example) of a POST body, if the route is there."""
    operation = schema["paths"].get(path, {}).get("post")
    if operation is None:
        return None
    return operation["requestBody"]["content"].get(media_type)


_B64 = {"type": "object", "properties": {"b64": {"type": "string", "contentEncoding": "base64",
                                                 "description": "a PNG or JPEG image"}},
        "required": ["b64"], "additionalProperties": False}


def _pixel(manifest: Manifest) -> dict[str, Any]:
    lo, hi = manifest.input.range
    return {"type": "number", "minimum": lo, "maximum": hi}


def _array(items: dict[str, Any], length: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": length, "maxItems": length}


def _nested_arrays(manifest: Manifest) -> list[dict[str, Any]]:
    """(C, H, W) nested arrays of pixels; also (H, W) for a 1-channel model."""
    c, h, w = manifest.input.shape
    plane = _array(_array(_pixel(manifest), w), h)
    shapes = [_array(plane, c)]
    if c == 1:
        shapes.append(plane)
    for s, shape in zip(shapes, ([c, h, w], [h, w]), strict=False):
        s["description"] = f"pixels of shape {shape}"
    return shapes


def _kserve_input(manifest: Manifest, max_instances: int) -> dict[str, Any]:
    """The one input tensor: FP32 of shape [N, C, H, W] ([N, H, W] for 1 channel)."""
    c, h, w = manifest.input.shape
    batch = {"type": "integer", "minimum": 1, "maximum": max_instances}
    shapes = [{"type": "array", "prefixItems": [batch, *({"const": d} for d in (c, h, w))],
               "minItems": 4, "maxItems": 4}]
    if c == 1:
        shapes.append({"type": "array", "prefixItems": [batch, {"const": h}, {"const": w}],
                       "minItems": 3, "maxItems": 3})
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [GRAPH_INPUT]},
            "datatype": {"type": "string", "enum": ["FP32"]},
            "shape": {"anyOf": shapes, "description": f"[N, {c}, {h}, {w}]"},
            "data": {"type": "array", "items": {"anyOf": [_pixel(manifest), {"type": "array"}]},
                     "description": "N*C*H*W pixels, flat or nested, row-major; absent with "
                                    "parameters.binary_data_size (binary tensor extension)"},
            "parameters": {"type": "object", "properties": {
                "binary_data_size": {"type": "integer", "minimum": 0}}},
        },
        "required": ["name", "shape", "datatype"],
        # the pixels come as `data` or, with the binary extension, after the JSON
        "oneOf": [{"required": ["data"]},
                  {"required": ["parameters"],
                   "properties": {"parameters": {"required": ["binary_data_size"]}}}],
    }
