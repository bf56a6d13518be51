#!/usr/bin/env bash
# Installs vlcal_jax on one TPU VM worker (run on every worker; tpu_pod.sh does that).
set -euo pipefail
REPO_DIR="${REPO_DIR:-$HOME/vlcal_jax}"
cd "$REPO_DIR"
python3 -m venv "$HOME/vlcal_venv"
. "$HOME/vlcal_venv/bin/activate"
pip install -q --upgrade pip
pip install -q -e ".[tpu]"
python -c "import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].platform)"
