"""Request and response bodies (they are also the OpenAPI docs at /docs)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.early_exit import EarlyExitMode

# Below 50 ms the HTTP path alone (body, parsing, queueing) may use the deadline up: a client
# asking for less would only collect 503s.
MIN_DEADLINE_MS = 50.0
MAX_DEADLINE_MS = 600_000.0
DeadlineMs = Annotated[float | None, Field(
    None, ge=MIN_DEADLINE_MS, le=MAX_DEADLINE_MS,
    description="milliseconds from the request's arrival (50 or more): an instance still waiting "
                "for a block then is answered from the block it reached (deadline_missed: true); "
                "a request with an instance that reached none gets 503")]


class PredictOptions(BaseModel):
    """The options of POST /predict, as JSON fields or as multipart form fields."""

    model_config = ConfigDict(extra="forbid")

    early_exit: EarlyExitMode | None = Field(None, description="default: the server's setting")
    deadline_ms: DeadlineMs = None
    top_k: int = Field(1, ge=1, description="how many of the most probable classes to list")
    return_blocks: bool = Field(False, description="also return every block's probabilities "
                                                   "for the blocks that ran for each instance")


class PredictRequest(PredictOptions):
    """Body of POST /predict (JSON). Multipart uploads take `file` fields plus the same options."""

    instances: list[Any] = Field(
        description="each a nested number array of the model's input shape (C, H, W) with pixels "
                    "in [0, 1] (a 2-D array for 1-channel models), or {\"b64\": \"<PNG or JPEG>\"}")


class ClassProbability(BaseModel):
    label: int
    class_name: str
    probability: float


class BlockOutput(BaseModel):
    block: int = Field(description="1-based block index")
    probabilities: list[float] = Field(description="softmax over the classes at this block")
    threshold: float | None = Field(description="the exit threshold applied at this block; null "
                                                "at the last block or where no exit was allowed")


class OperatingPointRef(BaseModel):
    index: int = Field(description="0 = the calibrated point; higher = cheaper")
    expected_accuracy: float | None = Field(description="on the validation split")


class Prediction(BaseModel):
    label: int
    class_name: str
    confidence: float = Field(description="probability of `label` at the exit block")
    exit_block: int = Field(description="1-based block that answered; num_blocks = no early exit")
    operating_point: OperatingPointRef | None = Field(
        description="the operating point whose thresholds answered this instance ('auto' early "
                    "exit); null with early exit off, an explicit threshold or a missed deadline")
    deadline_missed: bool = Field(description="answered from the block it reached because its "
                                              "deadline_ms passed")
    top_k: list[ClassProbability]
    blocks: list[BlockOutput] | None = Field(
        None, description="only with return_blocks: one entry per block that ran, in order")


class ModelRef(BaseModel):
    name: str
    version: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in words")


class OperatingPointInfo(BaseModel):
    thresholds: list[float | None]
    expected_accuracy: float | None
    compute_fraction: float | None
    test_accuracy: float | None
    test_compute_fraction: float | None


class EarlyExitInfo(BaseModel):
    default_mode: str | float
    thresholds: list[float | None]
    operating_points: list[OperatingPointInfo] = Field(
        description="the points 'auto' may use under load, calibrated first, down to the floor")
    current_point: int = Field(description="index of the point 'auto' uses now")
    latency_target_ms: float | None
    min_accuracy: float | None
    scheduling: str


class InputInfo(BaseModel):
    name: str
    shape: list[int]
    dtype: str
    range: list[float]


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="the repository's version directory (the manifest's "
                                     "version when one model dir is served)")
    graphs_version: str = Field(description="the manifest's version: a hash of the ONNX graphs")
    device: str
    execution_providers: list[str]
    input: InputInfo
    class_names: list[str]
    num_classes: int
    num_blocks: int
    early_exit: EarlyExitInfo
    test_accuracy_per_block: list[float] | None
    max_batch_size: int


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


# --- KServe / Open Inference Protocol v2 -----------------------------------------------------


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None  # absent when the tensor travels as binary data
    parameters: dict[str, Any] | None = None


class V2Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # other parameters are the client's business

    early_exit: EarlyExitMode | None = Field(None, description="default: the server's setting")
    deadline_ms: DeadlineMs = None


class V2InferRequest(BaseModel):
    id: str | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[dict[str, Any]] | None = None
    parameters: V2Parameters | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` inlined, to embed it in the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)
