# Sourced by scripts/demo and scripts/test: a virtualenv with the project installed, in $VENV
# (default .venv). $EXTRAS: the pip extras to install (e.g. "[test]"), or nothing. (Variables,
# not arguments: POSIX sh passes no arguments to a sourced file.)
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:-}"
