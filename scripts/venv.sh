# Sourced by scripts/demo and scripts/test: a virtualenv in .venv with the project installed.
# $EXTRAS: the pip extras to install (e.g. "[test]"), or nothing. (A variable, not an argument:
# POSIX sh passes no arguments to a sourced file.)
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:-}"
