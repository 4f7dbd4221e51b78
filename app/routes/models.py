"""GET /v1/models[/{name}]: what is served, on which device, with which early-exit settings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import ApiKey, NamedServiceDep, RepositoryDep
from app.schemas import ErrorResponse, ModelInfo, ModelsResponse

router = APIRouter(tags=["models"], dependencies=[ApiKey])
POINT_FIELDS = {"thresholds", "expected_accuracy", "compute_fraction", "test_accuracy",
                "test_compute_fraction"}


def model_info(service) -> dict[str, Any]:
    m = service.manifest
    return {
        "name": service.name,
        "version": service.version,
        "graphs_version": m.version,
        "device": service.runtime.device,
        "execution_providers": service.runtime.providers,
        "input": {"name": m.input.name, "shape": m.input.shape, "dtype": m.input.dtype,
                  "range": m.input.range},
        "class_names": m.class_names,
        "num_classes": m.num_classes,
        "num_blocks": m.num_blocks,
        "early_exit": {
            "default_mode": service.settings.EARLY_EXIT, "thresholds": m.thresholds,
            "operating_points": [p.model_dump(include=POINT_FIELDS)
                                 for p in service.controller.points],
            "current_point": service.controller.index,
            "latency_target_ms": service.settings.LATENCY_TARGET_MS,
            "min_accuracy": service.controller.min_accuracy,
            "scheduling": service.settings.SCHEDULING,
        },
        "test_accuracy_per_block": m.test_accuracy_per_block,
        "max_batch_size": service.settings.MAX_BATCH_SIZE,
    }


@router.get("/v1/models", response_model=ModelsResponse)
async def list_models(repository: RepositoryDep) -> dict[str, Any]:
    """The served models' metadata, the default model first (the demo page reads it)."""
    names = sorted(repository.models, key=lambda n: (n != repository.default, n))
    return {"models": [model_info(repository.models[n]) for n in names]}


@router.get("/v1/models/{name}", response_model=ModelInfo,
            responses={404: {"model": ErrorResponse}})
async def get_model(service: NamedServiceDep) -> dict[str, Any]:
    """One served model's metadata."""
    return model_info(service)
