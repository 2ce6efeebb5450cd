#!/usr/bin/env bash
# Set up (first time only) and open the course in JupyterLab, offline. Extra arguments go to
# `jupyter lab` (for example --no-browser --port 8899).
#
# Students get a JupyterLab without nbgrader's instructor tools (Create Assignment, Formgrader, the
# course and assignment lists; Validate stays) and without the news pop-up: scripts/student-lab.
# Instructors: PEFTLAB_INSTRUCTOR=1 bash scripts/lab.sh, from the repository root for the formgrader.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Convert SmolLM2 once into ~/.cache/peftlab (about half a minute), so notebooks load it in a second.
.venv/bin/python -m peftlab.models
export HF_HUB_OFFLINE=1
options=(--notebook-dir=course)
if [ -n "${PEFTLAB_INSTRUCTOR:-}" ]; then
  options=()
else
  export JUPYTER_CONFIG_PATH="$PWD/scripts/student-lab${JUPYTER_CONFIG_PATH:+:$JUPYTER_CONFIG_PATH}"
fi
if [ "$(id -u)" = 0 ]; then
  echo "note: running as root (a cloud VM or a container?), so JupyterLab starts with --allow-root" >&2
  options+=(--allow-root)
fi
exec .venv/bin/jupyter lab ${options[@]+"${options[@]}"} "$@"
