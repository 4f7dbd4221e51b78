"""Input decoding and settings: what is accepted, what is refused, and the words used."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from app.decoding import (
    InputSpec,
    decode_binary_tensor,
    decode_image,
    decode_instance,
    decode_instances,
    decode_tensor,
)
from app.errors import ClientError
from app.routes import kserve
from app.schemas import V2InferRequest, V2Parameters, V2Tensor
from app.settings import Settings

GRAY = InputSpec([1, 8, 8], [0.0, 1.0])
RGB = InputSpec([3, 32, 32], [0.0, 1.0])


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def refused(fn, *args) -> ClientError:
    with pytest.raises(ClientError) as e:
        fn(*args)
    return e.value


def test_arrays_accept_3d_and_2d_for_one_channel():
    x = np.random.default_rng(0).random((8, 8))
    a = decode_instance(x.tolist(), "instances[0]", GRAY)
    b = decode_instance(x[None].tolist(), "instances[0]", GRAY)
    assert a.shape == b.shape == (1, 8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert decode_instances([x.tolist()] * 3, GRAY, 8).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("value, status, words", [
    ([[0.5] * 8] * 7, 422, "shape [7, 8], expected [1, 8, 8] or [8, 8]"),
    ([[0.5] * 8] * 7 + [[0.5] * 7], 422, "not a rectangular array"),
    ([["a"] * 8] * 8, 422, "strings"),
    ([[float("nan")] * 8] * 8, 422, "NaN or infinity"),
    ([[255.0] * 8] * 8, 422, "expected pixels in [0, 1]"),
    ([[True] * 8] * 8, 422, "not numbers"),
    ("abc", 422, "is a str"),
    ({"image": "x"}, 422, "only object form"),
    ({"b64": "not base64!"}, 400, "not valid base64"),
    ({"b64": base64.b64encode(b"GIF89a hello").decode()}, 415, "not a PNG or JPEG"),
])
def test_bad_instances_name_the_problem(value, status, words):
    err = refused(decode_instance, value, "instances[3]", GRAY)
    assert err.status == status
    assert err.message.startswith("instances[3]") and words in err.message


def test_instance_count_limits():
    assert refused(decode_instances, [], GRAY, 4).status == 422
    err = refused(decode_instances, [[[0.0] * 8] * 8] * 5, GRAY, 4)
    assert err.status == 413 and "limit is 4" in err.message


def test_png_and_jpeg_convert_channels_and_size():
    img = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    x = decode_image(png(img), "file", GRAY)
    np.testing.assert_allclose(x[0], img / 255.0, atol=1e-6)
    rgb = np.zeros((16, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=95)
    x = decode_image(buf.getvalue(), "file", RGB)
    assert x.shape == (3, 32, 32)
    assert x[0].mean() > 0.9 and x[1].mean() < 0.1  # red stays red
    x = decode_image(png(img), "file", RGB)  # gray -> 3 equal channels
    np.testing.assert_array_equal(x[0], x[2])


def test_decompression_bomb_and_truncated_images_are_refused():
    big = Image.new("L", (5000, 5000))  # 25 M pixels of zeros: a small PNG, a large image
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    err = refused(decode_image, buf.getvalue(), "file", GRAY)
    assert err.status == 413 and "5000x5000" in err.message
    data = png(np.full((64, 64), 200, dtype=np.uint8))
    err = refused(decode_image, data[: len(data) // 2], "file", GRAY)
    assert err.status == 400 and "truncated or corrupt" in err.message
    assert refused(decode_image, b"", "file", GRAY).status == 400


def test_kserve_tensors_flat_or_nested():
    x = np.random.default_rng(1).random((2, 1, 8, 8)).astype(np.float32)
    flat = decode_tensor(x.reshape(-1).tolist(), [2, 1, 8, 8], "inputs[0]", GRAY, 8)
    nested = decode_tensor(x.tolist(), [2, 1, 8, 8], "inputs[0]", GRAY, 8)
    np.testing.assert_array_equal(flat, x)
    np.testing.assert_array_equal(nested, x)
    err = refused(decode_tensor, x.reshape(-1).tolist(), [2, 3, 8, 8], "inputs[0]", GRAY, 8)
    assert "expected [N, 1, 8, 8]" in err.message
    err = refused(decode_tensor, x.reshape(-1)[:-1].tolist(), [2, 1, 8, 8], "inputs[0]", GRAY, 8)
    assert "127 values" in err.message



def test_binary_tensors_are_little_endian_fp32_of_the_declared_shape():
    x = np.random.default_rng(2).random((3, 1, 8, 8)).astype(np.float32)
    out = decode_binary_tensor(x.astype("<f4").tobytes(), [3, 8, 8], "inputs[0]", GRAY, 8)
    assert out.shape == (3, 1, 8, 8) and out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out, x)
    err = refused(decode_binary_tensor, x.tobytes()[:-1], [3, 1, 8, 8], "inputs[0]", GRAY, 8)
    assert err.status == 422 and "767 bytes" in err.message
    err = refused(decode_binary_tensor, x.tobytes(), [9, 1, 8, 8], "inputs[0]", GRAY, 8)
    assert err.status == 413 and "limit is 8" in err.message

def test_range_check_takes_the_same_values_in_one_pass():
    """check_values' bit-pattern test for ranges from 0 agrees with min/max at the edges."""
    for spec in (GRAY, InputSpec([1, 8, 8], [0.0, 0.3]), InputSpec([1, 8, 8], [-1.0, 1.0])):
        for value in (0.0, -0.0, spec.hi, spec.lo, np.nextafter(np.float32(spec.hi), 2),
                      np.nextafter(np.float32(spec.lo), -2), -1e-30, 1e-30, np.inf, -np.inf,
                      np.nan):
            x = np.full((1, 1, 8, 8), 0.5 * spec.hi, np.float32)
            x[0, 0, 3, 4] = value
            inside = bool(spec.lo <= x.min() and x.max() <= spec.hi)  # the two-pass check
            if inside:
                assert decode_binary_tensor(x.tobytes(), [1, 1, 8, 8], "t", spec, 8) is not None
            else:
                err = refused(decode_binary_tensor, x.tobytes(), [1, 1, 8, 8], "t", spec, 8)
                assert err.status == 422 and ("NaN" in err.message or "values in" in err.message)


def _header(**changes) -> bytes:
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
              "parameters": {"binary_data_size": 256}}
    body = {"inputs": [{**tensor, **changes.pop("tensor", {})}], **changes}
    return json.dumps({k: v for k, v in body.items() if v != "drop"}).encode()


FAST = [_header(), _header(id="r1"), _header(parameters={"early_exit": "off"}),
        _header(parameters={"early_exit": {"threshold": 0.8}, "deadline_ms": 250}),
        _header(parameters={"early_exit": " AUTO ", "deadline_ms": 50.0}, outputs=None),
        _header(parameters=None, tensor={"datatype": "fp32"})]
SLOW = [_header(id=7), _header(parameters={"deadline_ms": 10}), _header(extra=1),
        _header(parameters={"early_exit": "sometimes"}), _header(parameters={"deadline_ms": "60"}),
        _header(tensor={"shape": [1.0, 1, 8, 8]}), _header(tensor={"name": "x"}),
        _header(tensor={"datatype": "FP16"}), _header(tensor={"data": None}),
        _header(tensor={"parameters": {"binary_data_size": True}}),
        _header(outputs=[{"name": "probabilities"}]), b'[1]', b'{"inputs": [', b'{"inputs": []}']


@pytest.mark.parametrize("header", FAST)
def test_kserve_binary_headers_without_pydantic_read_as_the_model_does(header):
    """The usual binary header is parsed with orjson (no pydantic model per request): the same
    options and tensor as through V2InferRequest."""
    service = SimpleNamespace(spec=GRAY, settings=SimpleNamespace(MAX_INSTANCES=8))
    x = np.random.default_rng(3).random((1, 1, 8, 8)).astype(np.float32)
    assert kserve._simple_binary_header(header) is not None
    options, rows = kserve.decode_infer(header, memoryview(x.tobytes()), service)
    req = V2InferRequest.model_validate_json(header)
    params = req.parameters
    assert options == (req.id, params.early_exit if params else None,
                       params.deadline_ms if params else None)
    np.testing.assert_array_equal(rows, x)


def test_kserve_json_data_bodies_skip_the_binary_fast_path(monkeypatch):
    """A body with the tensor in JSON `data` (possibly megabytes of numbers) is parsed once, by
    the model, not first by the binary fast path too."""
    service = SimpleNamespace(spec=GRAY, settings=SimpleNamespace(MAX_INSTANCES=8))
    tried = []
    monkeypatch.setattr(kserve, "_simple_binary_header", lambda h: tried.append(h))
    x = np.random.default_rng(4).random((1, 1, 8, 8)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    _, rows = kserve.decode_infer(body, b"", service)
    assert tried == []
    np.testing.assert_allclose(rows, x, rtol=1e-6)
    kserve.decode_infer(_header(), memoryview(x.tobytes()), service)
    assert len(tried) == 1  # a binary request does try it


@pytest.mark.parametrize("header", SLOW)
def test_other_kserve_headers_go_to_the_model_for_its_answer(header):
    assert kserve._simple_binary_header(header) is None


def test_the_binary_fast_path_knows_every_field_of_the_request_model():
    # the fast path checks headers by hand and serves what it accepts without the model: a
    # field added to V2InferRequest, V2Tensor or V2Parameters must be taught to it (or sent to
    # the model) before this passes again
    assert set(V2InferRequest.model_fields) == kserve._REQUEST_KEYS
    assert set(V2Tensor.model_fields) - {"data"} == kserve._BINARY_TENSOR_KEYS
    assert set(V2Parameters.model_fields) == {"early_exit", "deadline_ms"}


def test_a_header_sent_again_is_not_parsed_again(monkeypatch):
    """A client's header repeats with every request of one shape and options: it is parsed
    once; headers with an id (unique per request) and long ones are parsed every time."""
    monkeypatch.setattr(kserve, "_HEADERS_READ", {})
    parsed = []
    read = kserve._read_simple_binary_header
    monkeypatch.setattr(kserve, "_read_simple_binary_header",
                        lambda h: parsed.append(h) or read(h))
    usual = _header(parameters={"early_exit": "off", "deadline_ms": 250})
    first, again = kserve._simple_binary_header(usual), kserve._simple_binary_header(usual)
    assert first == again == read(usual) and parsed == [usual]
    assert first[1] is not again[1]  # each caller gets its own shape list
    with_id = _header(id="r1")
    for _ in range(2):
        assert kserve._simple_binary_header(with_id) == read(with_id)
    assert parsed.count(with_id) == 2
    long = _header(parameters={"early_exit": "auto"})[:-1] + b" " * 600 + b"}"
    for _ in range(2):
        assert kserve._simple_binary_header(long) == read(long)
    assert parsed.count(long) == 2
    for header in SLOW[:3]:  # refused ones are kept too: the model parses them for the error
        assert kserve._simple_binary_header(header) is None
        assert kserve._simple_binary_header(header) is None
        assert parsed.count(header) == 1


def test_the_headers_kept_are_bounded(monkeypatch):
    monkeypatch.setattr(kserve, "_HEADERS_READ", {})
    for deadline in range(100, 100 + 3 * kserve._HEADERS_KEPT):
        header = _header(parameters={"deadline_ms": deadline})
        options, _, _ = kserve._simple_binary_header(header)
        assert options.deadline_ms == deadline
        assert len(kserve._HEADERS_READ) <= kserve._HEADERS_KEPT


def test_settings_from_environment_with_validated_limits(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setenv("HFF_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("HFF_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("HFF_EARLY_EXIT", "0.8")
    s = Settings()
    assert s.MAX_BATCH_SIZE == 8 and s.EARLY_EXIT == 0.8 and tmp_path == s.MODEL_DIR
    assert Settings(MAX_BATCH_SIZE=2).MAX_BATCH_SIZE == 2  # arguments beat the environment
    monkeypatch.setenv("HFF_EARLY_EXIT", "sometimes")
    with pytest.raises(ValidationError, match="'auto', 'off' or a threshold"):
        Settings()
    monkeypatch.setenv("HFF_EARLY_EXIT", "auto")
    with pytest.raises(ValidationError, match="holds no manifest.json"):
        Settings(MODEL_DIR=tmp_path.parent)
    with pytest.raises(ValidationError, match="at least 8 characters"):
        Settings(API_KEY="short")
    assert Settings(API_KEY="").API_KEY is None
