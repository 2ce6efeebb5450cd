#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite on one pytest-xdist worker per core (at most 4;
# tests/conftest.py groups the tests that share a fixture). Extra arguments go to pytest, for example
# -m "not slow" for the quick tests only, -k roundtrip, or -n 0 for one process (pdb, -x, print output).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n auto "$@"
