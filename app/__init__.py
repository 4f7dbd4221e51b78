"""The HFF inference service: FastAPI on onnxruntime, dynamic batching, per-sample early exit."""
