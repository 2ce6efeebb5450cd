#!/usr/bin/env bash
# Set up (first time only) and open the course in JupyterLab, offline. Extra arguments go to
# `jupyter lab` (for example --no-browser --port 8899).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Convert SmolLM2 once into ~/.cache/peftlab (about half a minute), so notebooks load it in a second.
.venv/bin/python -m peftlab.models
export HF_HUB_OFFLINE=1
exec .venv/bin/jupyter lab --notebook-dir=course "$@"
