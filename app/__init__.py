"""The HFF inference service: FastAPI on onnxruntime, dynamic batching, per-sample early exit."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hff-serve")  # pyproject.toml's, the one place it is written
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
