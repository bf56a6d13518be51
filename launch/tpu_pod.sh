#!/usr/bin/env bash
# Trains VL-Calibration on a Cloud TPU VM slice, one host or many, with gcloud.
#
#   bash launch/tpu_pod.sh SUBCOMMAND [FLAGS] [--config.KEY=VALUE ...]
#
#   create   creates the slice: `tpu-vm create`, or a queued resource (the default for v5e and
#            v6e, or with --queued) and waits until it is ACTIVE (--queued-timeout, seconds)
#   setup    copies HEAD (a `git archive` tarball; --repo-url clones instead) to every worker,
#            installs the package with its TPU extra (launch/setup_tpu_vm.sh) and copies gs://
#            model and data inputs to each worker's disk (launch/stage_inputs.sh)
#   train    runs `python -m vlcal_jax.train --config CONFIG [--config.* overrides]` on every
#            worker at once (launch/train_worker.sh); each worker logs to
#            ~/vlcal_logs/RUN/worker-N.log, copied to WORKDIR/logs/worker-N.log every
#            --log-sync seconds and at the end (also on failure); worker 0's log streams here
#   tail     follows worker 0's log (after a lost connection, or from another terminal)
#   delete   deletes the slice (or the queued resource with its node)
#   all      create, setup, train, then delete, also on failure or Ctrl-C, unless --keep
#
# Every flag has an environment variable; the flag wins:
#   --name TPU_NAME            slice name (default vlcal-ACCELERATOR_TYPE)
#   --zone ZONE                required, e.g. us-central2-b (v4), us-west4-a (v5e)
#   --project PROJECT          default: gcloud's core/project
#   --accelerator-type ACCELERATOR_TYPE   required by create/delete/all: v4-32, v5e-16
#                              (passed to gcloud as v5litepod-16), v5p-16, v6e-16, ...
#   --runtime-version RUNTIME_VERSION     default by family: v4 tpu-ubuntu2204-base,
#                              v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   --spot / SPOT=1, --preemptible / PREEMPTIBLE=1 (tpu-vm create only)
#   --queued / QUEUED=1, --no-queued / QUEUED=0, --qr-id QR_ID (default NAME-qr),
#   --queued-timeout QUEUED_TIMEOUT (3600), --poll-interval POLL_INTERVAL (30)
#   --bucket BUCKET, --run RUN_NAME   the workdir is gs://BUCKET/RUN (RUN defaults to NAME)
#   --workdir VLCAL_WORKDIR    instead of --bucket/--run; must be gs:// (all workers share it)
#   --model-path VLCAL_MODEL_PATH, --train-files VLCAL_TRAIN_FILES (comma-separated),
#   --image-dir VLCAL_IMAGE_DIR       paths on the workers, or gs:// URLs that setup copies to
#                              each worker's disk (the trainer reads the model and data locally)
#   --config CONFIG            default experiments/tpu_v4.py
#   --env KEY=VALUE            (flag only, repeatable) extra trainer environment, e.g. XLA_FLAGS
#   --repo-url REPO_URL (or VLCAL_REPO_URL), --ref REPO_REF   clone this instead of copying HEAD
#   --remote-dir REMOTE_DIR    the repository's directory under each worker's home (vlcal_jax)
#   --log-sync LOG_SYNC_SECONDS  seconds between log copies to the bucket (300)
#   --keep / KEEP=1            all: keep the slice at the end
#   --dry-run / DRY_RUN=1      print every command, one per line, and run none (the queued
#                              resource's describe, polled until ACTIVE, is printed once)
#
# The workers' service account needs read and write access to the bucket (checkpoints, logs).
# Multi-host: every worker runs the same command; jax.distributed finds the slice by itself.
# Resume (preemption, a crash): run the same command again; the trainer resumes from the newest
# checkpoint in the workdir. `all` makes a fresh slice; `train` reuses a slice that is still up.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
PREEMPTIBLE=${PREEMPTIBLE:-0}
QUEUED=${QUEUED:-}
QR_ID=${QR_ID:-}
QUEUED_TIMEOUT=${QUEUED_TIMEOUT:-3600}
POLL_INTERVAL=${POLL_INTERVAL:-30}
BUCKET=${BUCKET:-}
RUN_NAME=${RUN_NAME:-}
VLCAL_WORKDIR=${VLCAL_WORKDIR:-}
VLCAL_MODEL_PATH=${VLCAL_MODEL_PATH:-}
VLCAL_TRAIN_FILES=${VLCAL_TRAIN_FILES:-}
VLCAL_IMAGE_DIR=${VLCAL_IMAGE_DIR:-}
CONFIG=${CONFIG:-experiments/tpu_v4.py}
REPO_URL=${REPO_URL:-${VLCAL_REPO_URL:-}}  # the Colab notebook reads VLCAL_REPO_URL
REPO_REF=${REPO_REF:-}
REMOTE_DIR=${REMOTE_DIR:-vlcal_jax}
LOG_SYNC_SECONDS=${LOG_SYNC_SECONDS:-300}
KEEP=${KEEP:-0}
DRY_RUN=${DRY_RUN:-0}
EXTRA_ENV=()
OVERRIDES=()

set_flag() {
  local flag=$1 value=$2
  case $flag in
    --name) TPU_NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --accelerator-type) ACCELERATOR_TYPE=$value ;;
    --runtime-version) RUNTIME_VERSION=$value ;;
    --qr-id) QR_ID=$value ;;
    --queued-timeout) QUEUED_TIMEOUT=$value ;;
    --poll-interval) POLL_INTERVAL=$value ;;
    --bucket) BUCKET=$value ;;
    --run) RUN_NAME=$value ;;
    --workdir) VLCAL_WORKDIR=$value ;;
    --model-path) VLCAL_MODEL_PATH=$value ;;
    --train-files) VLCAL_TRAIN_FILES=$value ;;
    --image-dir) VLCAL_IMAGE_DIR=$value ;;
    --config) CONFIG=$value ;;
    --env)
      [[ $value == [A-Za-z_]*=* ]] || die "--env takes KEY=VALUE, got '$value'"
      EXTRA_ENV+=("$value") ;;
    --repo-url) REPO_URL=$value ;;
    --ref) REPO_REF=$value ;;
    --remote-dir) REMOTE_DIR=$value ;;
    --log-sync) LOG_SYNC_SECONDS=$value ;;
    *) die "unknown flag $flag (bash launch/tpu_pod.sh help lists them)" ;;
  esac
}

parse_args() {
  while (($#)); do
    local arg=$1
    shift
    case $arg in
      --config.*=*) OVERRIDES+=("$arg") ;;
      --config.*)  # `--config.KEY VALUE` goes on as --config.KEY=VALUE
        if (($#)) && [[ $1 != -* ]]; then
          arg+="=$1"
          shift
        fi
        OVERRIDES+=("$arg") ;;
      --) OVERRIDES+=("$@"); break ;;
      --spot) SPOT=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      --queued) QUEUED=1 ;;
      --no-queued) QUEUED=0 ;;
      --keep) KEEP=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --*=*) set_flag "${arg%%=*}" "${arg#*=}" ;;
      --*)
        (($#)) || die "$arg needs a value"
        set_flag "$arg" "$1"
        shift ;;
      *) die "unexpected argument '$arg' (trainer overrides look like --config.rl.steps=300)" ;;
    esac
  done
}

# v5e's gcloud name is v5litepod-N; the family picks the runtime and whether to queue.
normalize_accelerator() {
  if [[ $ACCELERATOR_TYPE == v5e-* ]]; then
    ACCELERATOR_TYPE=v5litepod-${ACCELERATOR_TYPE#v5e-}
  fi
}

accelerator_family() {
  case $ACCELERATOR_TYPE in
    v4-*) echo v4 ;;
    v5litepod-*) echo v5e ;;
    v5p-*) echo v5p ;;
    v6e-*) echo v6e ;;
    *) echo "" ;;
  esac
}

default_runtime() {
  case $(accelerator_family) in
    v4) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5e) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator type '$ACCELERATOR_TYPE': pass --runtime-version (or set RUNTIME_VERSION)" ;;
  esac
}

need_accelerator() {
  [[ -n $ACCELERATOR_TYPE ]] || die "no accelerator type: pass --accelerator-type (e.g. v4-32, v5e-16) or set ACCELERATOR_TYPE"
}

resolve_settings() {
  [[ -n $ZONE ]] || die "no zone: pass --zone (e.g. us-central2-b) or set ZONE"
  if [[ -z $TPU_NAME ]]; then
    [[ -n $ACCELERATOR_TYPE ]] || die "no slice name: pass --name or set TPU_NAME (or give --accelerator-type for the default vlcal-TYPE)"
    TPU_NAME=vlcal-$ACCELERATOR_TYPE
  fi
  normalize_accelerator
  QR_ID=${QR_ID:-$TPU_NAME-qr}
  if [[ -z $QUEUED ]]; then
    case $(accelerator_family) in
      v5e | v6e) QUEUED=1 ;;
      *) QUEUED=0 ;;
    esac
  fi
  if [[ -z $VLCAL_WORKDIR && -n $BUCKET ]]; then
    VLCAL_WORKDIR=gs://${BUCKET#gs://}
    VLCAL_WORKDIR=${VLCAL_WORKDIR%/}/${RUN_NAME:-$TPU_NAME}
  fi
  VLCAL_WORKDIR=${VLCAL_WORKDIR%/}
  GCLOUD_SCOPE=(--zone "$ZONE")
  if [[ -n $PROJECT ]]; then
    GCLOUD_SCOPE+=(--project "$PROJECT")
  fi
}

# Runs a command, or under --dry-run prints it (one line, as it would run) and runs nothing.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    shell_line "$@"
  else
    shell_line "$@" | sed 's/^/+ /' >&2
    "$@"
  fi
}

on_workers() {
  local workers=$1 command=$2
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --worker="$workers" --command "$command"
}

create_slice() {
  need_accelerator
  [[ -n $RUNTIME_VERSION ]] || default_runtime
  if [[ $QUEUED == 1 ]]; then
    [[ $PREEMPTIBLE == 0 ]] || die "queued resources take --spot, not --preemptible"
    local -a spot=()
    [[ $SPOT == 0 ]] || spot=(--spot)
    run gcloud compute tpus queued-resources create "$QR_ID" --node-id "$TPU_NAME" "${GCLOUD_SCOPE[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${spot[@]}"
    SLICE_CREATED=1
    wait_until_active
  else
    local -a capacity=()
    [[ $SPOT == 0 ]] || capacity+=(--spot)
    [[ $PREEMPTIBLE == 0 ]] || capacity+=(--preemptible)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_SCOPE[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${capacity[@]}"
    SLICE_CREATED=1
  fi
}

wait_until_active() {
  local -a describe=(gcloud compute tpus queued-resources describe "$QR_ID" "${GCLOUD_SCOPE[@]}"
    "--format=value(state.state)")
  if [[ $DRY_RUN == 1 ]]; then
    shell_line "${describe[@]}"
    return
  fi
  local start=$SECONDS state=""
  while true; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) note "queued resource $QR_ID is ACTIVE"; return ;;
      FAILED | SUSPENDED | SUSPENDING)
        die "queued resource $QR_ID is $state: gcloud compute tpus queued-resources describe $QR_ID --zone $ZONE says why" ;;
    esac
    if ((SECONDS - start >= QUEUED_TIMEOUT)); then
      die "queued resource $QR_ID is not ACTIVE after ${QUEUED_TIMEOUT}s (state: ${state:-unknown}); wait longer with --queued-timeout SECONDS (QUEUED_TIMEOUT)"
    fi
    note "queued resource $QR_ID: ${state:-unknown}, waiting"
    sleep "$POLL_INTERVAL"
  done
}

delete_slice() {
  need_accelerator
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$QR_ID" "${GCLOUD_SCOPE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --quiet
  fi
}

repo_root() {
  git -C "$HERE" rev-parse --show-toplevel
}

copy_code() {
  local dir
  dir=$(shell_word "$REMOTE_DIR")
  if [[ -n $REPO_URL ]]; then
    local clone
    clone="rm -rf $dir && git clone $(shell_word "$REPO_URL") $dir"
    [[ -z $REPO_REF ]] || clone+=" && git -C $dir checkout $(shell_word "$REPO_REF")"
    on_workers all "$clone"
    return
  fi
  local root tarball
  root=$(repo_root 2> /dev/null) || die "$HERE is not in a git checkout: pass --repo-url (or set REPO_URL) to clone on the workers"
  tarball=${TMPDIR:-/tmp}/vlcal_jax-$TPU_NAME.tar.gz
  if [[ -n $(git -C "$root" status --porcelain --untracked-files=no) ]]; then
    note "warning: uncommitted changes are not copied (git archive HEAD); commit them first"
  fi
  run git -C "$root" archive --format=tar.gz --output "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:vlcal_jax.tar.gz" --worker=all "${GCLOUD_SCOPE[@]}"
  on_workers all "rm -rf $dir && mkdir -p $dir && tar -xzf vlcal_jax.tar.gz -C $dir && rm vlcal_jax.tar.gz"
}

# KEY=VALUE words for the inputs that are set, quoted for the remote shell.
input_env() {
  local name
  for name in VLCAL_MODEL_PATH VLCAL_TRAIN_FILES VLCAL_IMAGE_DIR "$@"; do
    if [[ -n ${!name} ]]; then
      printf '%s ' "$(shell_assignment "$name=${!name}")"
    fi
  done
}

install() {
  local command
  command="cd $(shell_word "$REMOTE_DIR") && bash launch/setup_tpu_vm.sh"
  if is_url "$VLCAL_MODEL_PATH" || is_url "$VLCAL_IMAGE_DIR" || [[ $VLCAL_TRAIN_FILES == *://* ]]; then
    command+=" && $(input_env)bash launch/stage_inputs.sh"
  fi
  on_workers all "$command"
}

check_workdir() {
  [[ -n $VLCAL_WORKDIR ]] || die "no workdir: pass --bucket BUCKET (workdir gs://BUCKET/RUN) or --workdir gs://..., or set BUCKET or VLCAL_WORKDIR"
  is_url "$VLCAL_WORKDIR" || die "workdir $VLCAL_WORKDIR is not a gs:// URL: every worker must read and write the same checkpoints (pass --bucket or --workdir gs://...)"
}

train() {
  check_workdir
  local command
  command="cd $(shell_word "$REMOTE_DIR") && $(input_env VLCAL_WORKDIR)"
  local pair
  for pair in "${EXTRA_ENV[@]}"; do
    command+="$(shell_assignment "$pair") "
  done
  command+="$(shell_assignment "LOG_SYNC_SECONDS=$LOG_SYNC_SECONDS") bash launch/train_worker.sh --config $(shell_word "$CONFIG")"
  for pair in "${OVERRIDES[@]}"; do
    command+=" $(shell_word "$pair")"
  done
  on_workers all "$command"
}

tail_log() {
  [[ -n $VLCAL_WORKDIR ]] || die "no workdir: pass the --bucket (and --run) or --workdir the run was started with"
  on_workers 0 "tail -n +1 -F vlcal_logs/$(shell_word "$(base_name "$VLCAL_WORKDIR")")/worker-0.log"
}

SLICE_CREATED=0

cleanup() {
  local status=$?
  trap - EXIT
  if [[ $SLICE_CREATED == 1 ]]; then
    if [[ $KEEP == 1 ]]; then
      note "kept $TPU_NAME; delete it with: bash launch/tpu_pod.sh delete --name $TPU_NAME --zone $ZONE --accelerator-type $ACCELERATOR_TYPE"
    else
      [[ $status == 0 ]] || note "exit status $status: deleting $TPU_NAME (pass --keep to keep it)"
      delete_slice || note "could not delete $TPU_NAME: run bash launch/tpu_pod.sh delete --name $TPU_NAME --zone $ZONE --accelerator-type $ACCELERATOR_TYPE"
    fi
  fi
  exit "$status"
}

main() {
  (($#)) || { usage >&2; exit 2; }
  local subcommand=$1
  shift
  case $subcommand in
    help | -h | --help) usage; exit 0 ;;
    create | setup | train | tail | delete | all) ;;
    *) die "unknown sub-command '$subcommand': one of create, setup, train, tail, delete, all" ;;
  esac
  parse_args "$@"
  case $subcommand in
    create | delete | all) need_accelerator ;;
  esac
  resolve_settings
  case $subcommand in
    create) create_slice ;;
    setup) copy_code; install ;;
    train) train ;;
    tail) tail_log ;;
    delete) delete_slice ;;
    all)
      [[ -n $RUNTIME_VERSION ]] || default_runtime  # all that `all` needs is checked before it creates
      check_workdir
      trap cleanup EXIT
      trap 'exit 130' INT
      trap 'exit 143' TERM
      trap 'exit 129' HUP
      create_slice
      copy_code
      install
      train ;;
  esac
}

main "$@"
