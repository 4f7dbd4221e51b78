"""Networks (HFF and FF baselines), their config, checkpoint I/O and the ONNX exporter."""
