"""Training: data sets, local losses, the trainer, diagnostics and the hff-train CLI."""
