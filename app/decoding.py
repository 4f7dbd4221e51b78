"""Client inputs to model rows: nested number arrays, base64 PNG/JPEG and uploaded image files.

Every refusal is a ClientError whose message names the instance and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError

from app.errors import ClientError, excerpt
from contract.model_dir import RESIZE
from contract.pydantic_errors import describe_errors

MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before decoding (decompression bombs)
IMAGE_FORMATS = ["PNG", "JPEG"]


Body = TypeVar("Body", bound=BaseModel)


def media_type(headers: Mapping[str, str], default: str = "") -> str:
    """The Content-Type without its parameters, lower case: 'application/json; charset=utf-8'
    -> 'application/json'."""
    return headers.get("content-type", default).split(";")[0].strip().lower()


def max_values(spec: InputSpec, max_instances: int) -> int:
    """The most JSON values (so commas) a valid request holds: every number of max_instances
    instances, the brackets between them, and a few options."""
    return max_instances * (math.prod(spec.shape) + 64) + 64


def parse_json_body(model: type[Body], body: bytes, example: str, limit: int | None = None) -> Body:
    """A JSON request body validated as `model`: 400 when it is not JSON, 422 when it does not fit,
    413 when it holds more values than `limit` (counted before parsing: a 16 MB body of numbers
    parses into half a GB of objects).

    Pydantic parses the bytes itself (in Rust): for 3x32x32 instances that is about 8x faster
    than json.loads followed by validation, and NaN / Infinity tokens still reach check_values.
    """
    if limit is not None and body.count(b",") > limit:
        raise ClientError(413, f"the body holds more than {limit} values, more than the largest "
                               "valid request (HFF_MAX_INSTANCES instances of the model's shape)")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors()
        if errors[0]["type"] == "json_invalid":
            raise ClientError(400, f"the body is not valid JSON ({errors[0]['msg']})") from None
        if errors[0]["type"] == "model_type" and not errors[0]["loc"]:
            raise ClientError(422, f"the body must be a JSON object like {example}") from None
        raise ClientError(422, describe_errors(
            [{**err, "loc": ("body", *err["loc"])} for err in errors])) from None


class InputSpec:
    """What one row must look like: (C, H, W) float32 with values in [lo, hi]; images of another
    size are resampled with `resize` (the manifest's, which training used)."""

    def __init__(self, shape: tuple[int, int, int] | list[int], value_range: list[float],
                 resize: str = RESIZE):
        c, h, w = shape
        self.shape = (c, h, w)
        self.lo, self.hi = float(value_range[0]), float(value_range[1])
        self.resampling = Image.Resampling[resize.upper()]
        # bytes one instance takes as a binary FP32 tensor (the only binary datatype accepted)
        self.binary_row_bytes = 4 * math.prod(self.shape)
        # check_values' one-pass test: with lo <= 0 < hi, float32 values whose bit patterns (as
        # unsigned ints) are at most those of the largest float32 <= hi are all in [+0, hi]
        # (negative numbers, NaN and infinity have larger patterns)
        self.max_bits: int | None = None
        if self.lo <= 0.0 < self.hi:
            top = np.float32(self.hi)
            if float(top) > self.hi:
                top = np.nextafter(top, np.float32(0.0))
            self.max_bits = int(top.view(np.uint32))

    def accepted_shapes(self) -> str:
        c, h, w = self.shape
        return f"[{c}, {h}, {w}]" + (f" or [{h}, {w}]" if c == 1 else "")


def decode_array(value: Any, where: str, spec: InputSpec) -> np.ndarray:
    """A nested list of numbers of the input shape (2-D for 1-channel models) -> (C, H, W)."""
    try:
        arr = np.array(value)
    except (ValueError, TypeError):
        raise ClientError(422, f"{where} is not a rectangular array: its rows have different "
                               f"lengths (expected shape {spec.accepted_shapes()})") from None
    if arr.dtype.kind not in "iuf":
        kind = "strings" if arr.dtype.kind in "US" else "values that are not numbers"
        if arr.dtype == object:
            kind = "nested lists of different lengths or values that are not numbers"
        raise ClientError(422, f"{where} holds {kind}; expected numbers in an array of shape "
                               f"{spec.accepted_shapes()}")
    c, h, w = spec.shape
    if arr.shape == (h, w) and c == 1:
        arr = arr[None]  # (H, W) -> (1, H, W)
    if arr.shape != spec.shape:
        raise ClientError(422, f"{where} has shape {list(arr.shape)}, expected "
                               f"{spec.accepted_shapes()}")
    return check_values(arr.astype(np.float32), where, spec)


def check_values(arr: np.ndarray, where: str, spec: InputSpec) -> np.ndarray:
    """Refuse NaN, infinity and pixels outside the model's input range."""
    if spec.max_bits is not None and arr.dtype == np.float32 and arr.size \
            and arr.view(np.uint32).max() <= spec.max_bits:
        return arr  # one reduction instead of two for the usual [0, 1] input
    low, high = arr.min(), arr.max()
    if spec.lo <= low and high <= spec.hi:  # False for NaN too: one pass less for good input
        return arr
    if not np.isfinite(arr).all():
        raise ClientError(422, f"{where} contains NaN or infinity; only finite numbers are allowed")
    raise ClientError(422, f"{where} has values in [{low:g}, {high:g}], expected "
                           f"pixels in [{spec.lo:g}, {spec.hi:g}] (scale 0-255 images by 1/255)")


def decode_image(data: bytes, where: str, spec: InputSpec) -> np.ndarray:
    """PNG or JPEG bytes -> (C, H, W) in [0, 1], converted to the model's channels and size."""
    if not data:
        raise ClientError(400, f"{where} is empty: expected a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ClientError(415, f"{where} is not a PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ClientError(413, f"{where} is too large an image (decompression bomb?); the limit "
                               f"is {MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ClientError(400, f"{where} is a corrupt image ({e})") from None
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ClientError(413, f"{where} is {width}x{height} pixels, more than the limit of "
                                   f"{MAX_IMAGE_PIXELS} (decompression bomb?)")
        try:
            image.load()  # decodes now: truncated files fail here, not later
        except (OSError, SyntaxError, ValueError) as e:
            raise ClientError(400, f"{where} is a truncated or corrupt {image.format} image "
                                   f"({e})") from None
        c, h, w = spec.shape
        mode = "L" if c == 1 else "RGB"
        if c not in (1, 3):
            raise ClientError(415, f"{where}: images cannot feed a {c}-channel model; send arrays")
        converted = image.convert(mode)
        if converted.size != (w, h):
            converted = converted.resize((w, h), spec.resampling)
        arr = np.asarray(converted, dtype=np.float32) / 255.0
    # (H, W) -> (1, H, W), or (H, W, 3) -> (3, H, W)
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr * (spec.hi - spec.lo) + spec.lo)


def decode_b64(value: Any, where: str, spec: InputSpec) -> np.ndarray:
    if not isinstance(value, str):
        raise ClientError(422, f"{where}.b64 must be a base64 string, got {type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, f"{where}.b64 is not valid base64") from None
    return decode_image(data, f"{where}.b64", spec)


def decode_instance(value: Any, where: str, spec: InputSpec) -> np.ndarray:
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise ClientError(422, f"{where} is an object with keys {excerpt(sorted(value))}; the only "
                                   'object form is {"b64": "<base64 PNG or JPEG>"}')
        return decode_b64(value["b64"], where, spec)
    if isinstance(value, list):
        return decode_array(value, where, spec)
    raise ClientError(422, f"{where} is a {type(value).__name__}; expected a nested number array "
                           f"of shape {spec.accepted_shapes()} or {{\"b64\": ...}}")


def check_count(n: int, max_instances: int, what: str = "instances") -> None:
    if n == 0:
        raise ClientError(422, f"{what} is empty: send at least one instance")
    if n > max_instances:
        raise ClientError(413, f"{n} {what} in one request, the limit is {max_instances}")


def decode_instances(values: list[Any], spec: InputSpec, max_instances: int) -> np.ndarray:
    """The request's instances as one (N, C, H, W) float32 array, in request order."""
    check_count(len(values), max_instances)
    rows = [decode_instance(v, f"instances[{i}]", spec) for i, v in enumerate(values)]
    if len(rows) == 1:
        return rows[0][None]  # (C, H, W) -> (1, C, H, W) without np.stack's checks
    return np.stack(rows)  # N x (C, H, W) -> (N, C, H, W)


def _tensor_shape(shape: list[int], where: str, spec: InputSpec, max_instances: int) -> list[int]:
    """A KServe v2 input shape checked against the model's: [N, C, H, W] ([N, H, W] for 1 channel)."""
    c, h, w = spec.shape
    if len(shape) == 3 and c == 1 and shape[1:] == [h, w]:
        shape = [shape[0], 1, h, w]  # (N, H, W) -> (N, 1, H, W) for 1-channel models
    if len(shape) != 4 or shape[1:] != [c, h, w]:
        raise ClientError(422, f"{where}.shape is {shape}, expected [N, {c}, {h}, {w}]")
    check_count(shape[0], max_instances, f"{where} batch")
    return shape


def decode_tensor(data: Any, shape: list[int], where: str, spec: InputSpec,
                  max_instances: int) -> np.ndarray:
    """A KServe v2 FP32 tensor (flat or nested `data` plus `shape`) -> (N, C, H, W)."""
    shape = _tensor_shape(shape, where, spec, max_instances)
    try:
        arr = np.array(data)
    except (ValueError, TypeError):
        raise ClientError(422, f"{where}.data is not a rectangular array") from None
    if arr.dtype.kind not in "iuf":
        raise ClientError(422, f"{where}.data holds values that are not numbers")
    if arr.size != math.prod(shape):
        raise ClientError(422, f"{where}.data has {arr.size} values, shape {shape} needs "
                               f"{math.prod(shape)}")
    arr = arr.astype(np.float32).reshape(shape)  # flat or nested -> (N, C, H, W)
    return check_values(arr, f"{where}.data", spec)


# The binary tensor data extension: a JSON header of this many bytes, then the raw tensors.
BINARY_HEADER = "inference-header-content-length"


def decode_binary_tensor(data: bytes, shape: list[int], where: str, spec: InputSpec,
                         max_instances: int) -> np.ndarray:
    """A KServe v2 binary FP32 tensor (little-endian, row-major, no padding) -> (N, C, H, W).

    The binary tensor data extension: no JSON numbers to parse, which is most of what a
    3x32x32 instance costs the server in JSON.
    """
    shape = _tensor_shape(shape, where, spec, max_instances)
    need = 4 * math.prod(shape)
    if len(data) != need:
        raise ClientError(422, f"{where} has {len(data)} bytes of binary data, shape {shape} "
                               f"in FP32 needs {need}")
    arr = np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(shape)  # a native copy
    return check_values(arr, f"{where} binary data", spec)
