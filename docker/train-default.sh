#!/bin/sh
# The compose `train` job: train HFF_DATASET (the bundled digits by default) and publish it as the
# next version of model HFF_MODEL_NAME in the model repository, unless a version is already there,
# so `docker compose up` trains only the first time. HFF_RETRAIN=1 trains again from scratch and
# publishes the next version (the serving replicas load it within HFF_POLL_S, no restart). A run
# killed half-way is resumed; a finished run that was not published yet is only exported.
set -eu

dataset="${HFF_DATASET:-digits}"
repository="${HFF_MODEL_REPOSITORY:-/models/repository}"
name="${HFF_MODEL_NAME:-$dataset}"
run_dir="${HFF_RUN_DIR:-/runs/$dataset}"
epochs="${HFF_TRAIN_EPOCHS:-}"  # empty: the data set's default below, else the trainer's
batch=""
if [ "$dataset" = fashion-mnist ]; then  # the README's Fashion-MNIST recipe (Makefile TRAIN_ARGS)
    epochs="${epochs:-24}"
    batch=128
fi

# The newest complete version (a dir named by a number, with its manifest.json), if any.
newest=""
if [ -d "$repository/$name" ]; then
    for dir in $(ls "$repository/$name" | grep -E '^[0-9]+$' | sort -n); do
        if [ -f "$repository/$name/$dir/manifest.json" ]; then newest="$dir"; fi
    done
fi
retrain="${HFF_RETRAIN:-}"
if [ "$retrain" = 1 ]; then
    echo "hff-train-default: HFF_RETRAIN=1: training $dataset again for the next version of $name"
elif [ -n "$newest" ]; then
    echo "hff-train-default: $repository/$name already holds version $newest; skipping training and export"
    exit 0
fi
if [ "$retrain" != 1 ] && [ -f "$run_dir/metrics.json" ]; then
    echo "hff-train-default: $run_dir holds a finished run; exporting it"
elif [ "$retrain" != 1 ] && [ -f "$run_dir/train_state.pt" ]; then
    hff-train --out "$run_dir" --resume --no-progress
else
    hff-train --dataset "$dataset" --out "$run_dir" --overwrite --no-progress ${epochs:+--epochs "$epochs"} \
        ${batch:+--batch-size "$batch"}
fi
hff-export "$run_dir" --repository "$repository" --name "$name"
echo "hff-train-default: exported $run_dir to $repository/$name"
