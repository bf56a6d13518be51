#!/usr/bin/env bash
# Runs the trainer on one TPU VM worker; `launch/tpu_pod.sh train` runs it on every worker at
# once, from the repository's directory:
#
#   VLCAL_WORKDIR=gs://BUCKET/RUN [VLCAL_MODEL_PATH=...] bash launch/train_worker.sh --config CONFIG [--config.*]
#
# The trainer's stdout and stderr go to ~/vlcal_logs/RUN/worker-N.log (appended: a resumed run
# keeps its history), which is copied to WORKDIR/logs/worker-N.log every LOG_SYNC_SECONDS (300)
# and when the trainer ends, whatever its exit status. Worker 0 also streams its log to stdout.
# gs:// inputs are read from their copies made by launch/stage_inputs.sh. SIGTERM (preemption)
# is passed on to the trainer, which checkpoints and exits. The trainer's exit status is ours.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

[[ -n ${VLCAL_WORKDIR:-} ]] || die "set VLCAL_WORKDIR (gs://BUCKET/RUN: the run's checkpoints, metrics and logs)"
PYTHON=${PYTHON:-$HOME/vlcal_venv/bin/python}
LOG_SYNC_SECONDS=${LOG_SYNC_SECONDS:-300}

# The worker's index in the slice (TPU VM metadata); VLCAL_WORKER_ID overrides it.
worker_id() {
  local id
  if [[ -n ${VLCAL_WORKER_ID:-} ]]; then
    echo "$VLCAL_WORKER_ID"
  elif id=$(curl -sf -m 5 -H "Metadata-Flavor: Google" \
      http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) \
      && [[ $id =~ ^[0-9]+$ ]]; then
    echo "$id"
  else
    hostname
  fi
}

WORKER=$(worker_id)
LOG_DIR=${VLCAL_LOG_DIR:-$HOME/vlcal_logs/$(base_name "$VLCAL_WORKDIR")}
LOG=$LOG_DIR/worker-$WORKER.log
REMOTE_LOG=""
if is_url "$VLCAL_WORKDIR"; then
  REMOTE_LOG=${VLCAL_WORKDIR%/}/logs/worker-$WORKER.log
fi
mkdir -p "$LOG_DIR"

upload_log() {
  [[ -n $REMOTE_LOG ]] || return 0
  local output  # gcloud's progress lines would land in the log on every copy
  output=$(gcloud storage cp "$LOG" "$REMOTE_LOG" 2>&1) \
    || note "worker $WORKER: could not copy $LOG to $REMOTE_LOG: $output"
}

for name in VLCAL_MODEL_PATH VLCAL_TRAIN_FILES VLCAL_IMAGE_DIR; do
  if [[ -n ${!name:-} ]]; then
    export "$name=$(staged_paths "${!name}")"
  fi
done

echo "=== $(date -u +%FT%TZ) worker $WORKER: python -m vlcal_jax.train $*" >> "$LOG"
"$PYTHON" -m vlcal_jax.train "$@" >> "$LOG" 2>&1 &
TRAIN_PID=$!
trap 'kill -TERM "$TRAIN_PID" 2> /dev/null' TERM INT HUP

TAIL_PID=""
if [[ $WORKER == 0 ]]; then
  tail -n +1 -F -s 0.2 --pid="$TRAIN_PID" "$LOG" 2> /dev/null &
  TAIL_PID=$!
fi
# its own output goes to the log, so that nothing it leaves behind holds the ssh session open
(while sleep "$LOG_SYNC_SECONDS"; do upload_log; done) >> "$LOG" 2>&1 &
SYNC_PID=$!

while true; do
  wait "$TRAIN_PID"
  STATUS=$?
  kill -0 "$TRAIN_PID" 2> /dev/null || break  # a trapped signal interrupted the wait
done
kill "$SYNC_PID" 2> /dev/null
if [[ -n $TAIL_PID ]]; then  # tail --pid prints the rest and stops within its 0.2 s poll
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    kill -0 "$TAIL_PID" 2> /dev/null || break
    sleep 0.2
  done
  kill "$TAIL_PID" 2> /dev/null
  wait "$TAIL_PID"
fi
echo "=== $(date -u +%FT%TZ) worker $WORKER: exit status $STATUS" >> "$LOG"
upload_log
exit "$STATUS"
