#!/bin/sh
# The compose `train` job: train HFF_DATASET (the bundled digits by default) and export it into the model volume, unless
# a model is already there, so `docker compose up` trains only the first time. A run killed
# half-way is resumed; a finished run that was not exported yet is only exported.
set -eu

dataset="${HFF_DATASET:-digits}"
model_dir="${HFF_MODEL_DIR:-/models/default}"
run_dir="${HFF_RUN_DIR:-/runs/$dataset}"
epochs="${HFF_TRAIN_EPOCHS:-}"  # empty: the data set's default below, else the trainer's
batch=""
if [ "$dataset" = fashion-mnist ]; then  # the README's Fashion-MNIST recipe (Makefile TRAIN_ARGS)
    epochs="${epochs:-12}"
    batch=128
fi

if [ -f "$model_dir/manifest.json" ]; then
    served=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("dataset", ""))' \
        "$model_dir/manifest.json" 2>/dev/null || true)
    if [ "$served" = "$dataset" ]; then
        echo "hff-train-default: $model_dir already holds a $dataset model; skipping training and export"
        exit 0
    fi
    echo "hff-train-default: $model_dir holds a ${served:-unknown} model, HFF_DATASET is $dataset: replacing it"
fi
if [ -f "$run_dir/metrics.json" ]; then
    echo "hff-train-default: $run_dir holds a finished run; exporting it"
elif [ -f "$run_dir/train_state.pt" ]; then
    hff-train --out "$run_dir" --resume --no-progress
else
    hff-train --dataset "$dataset" --out "$run_dir" --overwrite --no-progress ${epochs:+--epochs "$epochs"} \
        ${batch:+--batch-size "$batch"}
fi
hff-export "$run_dir" --out "$model_dir" --name "$dataset"
echo "hff-train-default: exported $run_dir to $model_dir"
