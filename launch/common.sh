# shellcheck shell=bash
# Helpers shared by the launch scripts, on the launching machine and on the TPU VM workers.
# Sourced, not run: `. "$(dirname "${BASH_SOURCE[0]}")/common.sh"`.

die() {
  echo "error: $*" >&2
  exit 2
}

note() {
  echo "[vlcal] $*" >&2
}

# One argument as a shell word that pastes back as the same argument: bare when it has only
# safe characters, else in single quotes, or in double quotes when it holds single quotes and
# nothing that double quotes expand (so remote --command strings stay readable).
shell_word() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word != *"'"* ]]; then
    printf "'%s'" "$word"
  elif [[ $word != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# A command line, one shell word per argument, ending in a newline.
shell_line() {
  local sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    shell_word "$word"
    sep=" "
  done
  printf '\n'
}

# NAME=VALUE as a shell word that stays an assignment (a quoted name would not be one).
shell_assignment() {
  printf '%s=' "${1%%=*}"
  shell_word "${1#*=}"
}

is_url() {
  [[ $1 == *://* ]]
}

# The last component of a path or URL: gs://bucket/runs/v4-32/ -> v4-32.
base_name() {
  local path=${1%/}
  printf '%s' "${path##*/}"
}

# Where launch/stage_inputs.sh puts a bucket input on a worker's disk, and where
# launch/train_worker.sh then points the trainer: gs://b/models/m -> $VLCAL_INPUTS/b/models/m
# (the trainer reads the model and data from local files; only the workdir may be a URL).
staged_path() {
  local url=${1%/}
  printf '%s/%s' "${VLCAL_INPUTS:-$HOME/vlcal_inputs}" "${url#*://}"
}

# A path or a comma-separated list of them with every URL replaced by its staged copy.
staged_paths() {
  local out="" sep="" item
  local -a items
  IFS=, read -r -a items <<< "$1"
  for item in "${items[@]}"; do
    if is_url "$item"; then
      item=$(staged_path "$item")
    fi
    out+="$sep$item"
    sep=,
  done
  printf '%s' "$out"
}
