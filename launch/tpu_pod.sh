#!/usr/bin/env bash
# Runs VL-Calibration on a TPU VM slice (single-host slices such as v4-8 and v5e-8 today: the
# trainer is one controller process; multi-host slices are an open issue).
#
#   TPU_NAME=my-v4-8 ZONE=us-central2-b \
#   VLCAL_MODEL_PATH=/mnt/disks/models/Qwen3-VL-4B-Instruct \
#   VLCAL_TRAIN_FILES=/mnt/disks/data/vl_calibration_12k.parquet VLCAL_IMAGE_DIR=/mnt/disks/data \
#   CONFIG=experiments/tpu_v4.py bash launch/tpu_pod.sh [--config.rl.steps=300 ...]
#
# The model directory and data must be present on every worker (a persistent disk or a
# gcsfuse mount); nothing is downloaded at run time. jax.distributed discovers the pod itself.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG="${CONFIG:-experiments/tpu_v4.py}"
REPO_DIR="${REPO_DIR:-\$HOME/vlcal_jax}"
EXTRA_ARGS="$*"
ENV="VLCAL_MODEL_PATH=${VLCAL_MODEL_PATH:-} VLCAL_TRAIN_FILES=${VLCAL_TRAIN_FILES:-} VLCAL_IMAGE_DIR=${VLCAL_IMAGE_DIR:-} VLCAL_WORKDIR=${VLCAL_WORKDIR:-}"
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$ZONE" . "$TPU_NAME:vlcal_jax"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO_DIR && bash launch/setup_tpu_vm.sh && . \$HOME/vlcal_venv/bin/activate && $ENV python -m vlcal_jax.train --config $CONFIG $EXTRA_ARGS"
