#!/usr/bin/env bash
# Copies the run's gs:// inputs to this worker's disk; `launch/tpu_pod.sh setup` runs it on
# every worker. The trainer reads the model and data from local files (only its workdir may be a
# URL), so a bucket model, data file or image directory is copied once (a file inside a copied
# directory comes with it) to
# $VLCAL_INPUTS/BUCKET/PATH (default ~/vlcal_inputs), where launch/train_worker.sh points the
# trainer. Local paths are left alone; a finished copy is not repeated.
#
#   VLCAL_MODEL_PATH=gs://b/models/Qwen3-VL-4B-Instruct VLCAL_TRAIN_FILES=gs://b/data/train.parquet \
#   VLCAL_IMAGE_DIR=gs://b/data bash launch/stage_inputs.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

# True when PATH or a directory above it (under the staging root) was copied completely.
staged() {
  local path=$1 root=${VLCAL_INPUTS:-$HOME/vlcal_inputs}
  while [[ $path == "$root"/* ]]; do
    [[ -e $path && -e $path.staged ]] && return 0
    path=$(dirname "$path")
  done
  return 1
}

stage() {
  local url=${1%/} local_path
  local_path=$(staged_path "$url")
  if staged "$local_path"; then
    note "$url: already at $local_path"
    return
  fi
  mkdir -p "$(dirname "$local_path")"
  gcloud storage cp -r "$url" "$(dirname "$local_path")/"
  touch "$local_path.staged"
  note "$url -> $local_path"
}

IFS=, read -r -a train_files <<< "${VLCAL_TRAIN_FILES:-}"
# the image directory first: train files inside it then come with it
for path in "${VLCAL_IMAGE_DIR:-}" "${VLCAL_MODEL_PATH:-}" "${train_files[@]}"; do
  if is_url "$path"; then
    stage "$path"
  fi
done
