#!/bin/sh
# The compose `train` job: train the bundled default and export it into the model volume, unless
# a model is already there, so `docker compose up` trains only the first time. A run killed
# half-way is resumed; a finished run that was not exported yet is only exported.
set -eu

dataset="${HFF_DATASET:-digits}"
model_dir="${HFF_MODEL_DIR:-/models/default}"
run_dir="${HFF_RUN_DIR:-/runs/$dataset}"
epochs="${HFF_TRAIN_EPOCHS:-}"  # empty: the trainer's default

if [ -f "$model_dir/manifest.json" ]; then
    echo "hff-train-default: $model_dir already holds a model; skipping training and export"
    exit 0
fi
if [ -f "$run_dir/metrics.json" ]; then
    echo "hff-train-default: $run_dir holds a finished run; exporting it"
elif [ -f "$run_dir/train_state.pt" ]; then
    hff-train --out "$run_dir" --resume --no-progress
else
    hff-train --dataset "$dataset" --out "$run_dir" --overwrite --no-progress ${epochs:+--epochs "$epochs"}
fi
hff-export "$run_dir" --out "$model_dir" --name "$dataset"
echo "hff-train-default: exported $run_dir to $model_dir"
