"""What the exporter, the trainer and the service agree on; torch-free, imports nothing of ours."""
