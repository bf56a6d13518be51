#!/usr/bin/env bash
# Installs vlcal_jax with its TPU extra on one TPU VM worker, in a virtual environment at
# $VENV (default ~/vlcal_venv); `launch/tpu_pod.sh setup` runs it on every worker at once.
#
#   bash launch/setup_tpu_vm.sh
#
# JAX needs Python 3.11 or newer. The TPU runtimes' Ubuntu 22.04 has 3.10, so when python3 is
# older (or lacks venv), uv (pip-installed for the user) makes the environment with a managed
# Python 3.12. It checks the install by importing the package, without touching the TPU (another
# process may hold it, and a pod's hosts only start their TPUs together).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-$HOME/vlcal_venv}
PYTHON=${PYTHON:-python3}
MODERN='import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))'

if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c "$MODERN" 2> /dev/null; then
  echo "reusing $VENV"
elif "$PYTHON" -c "$MODERN" 2> /dev/null; then
  "$PYTHON" -m venv "$VENV"
else
  # an externally managed python (PEP 668) refuses --user installs without the override,
  # which older pips do not know
  "$PYTHON" -m pip install --user --quiet uv 2> /dev/null \
    || "$PYTHON" -m pip install --user --quiet --break-system-packages uv
  "$HOME/.local/bin/uv" venv --seed --python 3.12 "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e '.[tpu]'
"$VENV/bin/python" -c "import jax, vlcal_jax; print('vlcal_jax installed, jax', jax.__version__)"
