#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite. Extra arguments go to pytest
# (for example -m "not slow" for the quick tests only, or -k roundtrip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
