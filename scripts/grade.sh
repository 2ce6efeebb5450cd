#!/usr/bin/env bash
# Set up (first time only) and grade a folder or zip of submissions with the course's grading command.
#   bash scripts/grade.sh submissions.zip [--workers 2] [--assignment 05_quantization] ...
# Results land in autograder/ (grades.csv, reports/, feedback/); see autograder/grade.py for options.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m autograder.grade "$@"
