#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and print its path on stdout.
#
# The venv lives outside the clone, in ${TWOTOWER_CACHE_DIR:-~/.cache/twotower}/venv-<hash>, keyed
# by a hash of pyproject.toml's dependency lists, constraints.txt (the exact versions installed) and the
# Python version: a dependency change builds a new one,
# anything else reuses it (the first install pulls torch and is big; pip's cache is kept).
# The project itself is installed editable; if the venv last pointed at another clone, it is
# re-pointed at this one (a few seconds, no downloads). All progress goes to stderr.
#
# Environment: PYTHON (interpreter, default python3, must be >= 3.11), TWOTOWER_CACHE_DIR,
# TWOTOWER_EXTRAS (default "test,eval").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
python="${PYTHON:-python3}"
extras="${TWOTOWER_EXTRAS:-test,eval}"
cache="${TWOTOWER_CACHE_DIR:-$HOME/.cache/twotower}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "venv.sh: $python is missing or older than 3.11 (set PYTHON=...)" >&2
    exit 1
fi
pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
# Only the dependency lists matter for the key: editing the rest of pyproject.toml reuses the venv.
deps="$("$python" -c 'import sys, tomllib, json; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; print(json.dumps([p["dependencies"], p.get("optional-dependencies", {})], sort_keys=True))' "$root/pyproject.toml")"
# ... and the exact versions they resolve to (constraints.txt)
constraints="$root/constraints.txt"
key="$( (echo "$deps"; echo "python=$pyver extras=$extras"; grep -v '^#' "$constraints") | sha256sum | cut -c1-12)"
venv="$cache/venv-$key"
mkdir -p "$cache"

(
    flock 9
    if [[ ! -f "$venv/.installed" ]]; then
        echo "venv.sh: creating $venv (first install downloads torch; this takes a while)" >&2
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel >&2
        "$venv/bin/python" -m pip install --progress-bar off -c "$constraints" -e "$root[$extras]" >&2
        touch "$venv/.installed"
    fi
    # Re-point the editable install if it belongs to another clone (or was never made).
    # (Run from / so that the current directory does not shadow the installed package.)
    where="$(cd / && "$venv/bin/python" -c 'import pathlib, twotower; print(pathlib.Path(twotower.__file__).resolve().parents[1])' 2>/dev/null || true)"
    # Also when pyproject.toml changed (e.g. a new package in the list): editable installs map
    # packages statically.
    stamp="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
    if [[ "$where" != "$root" || "$(cat "$venv/.project-stamp" 2>/dev/null)" != "$stamp" ]]; then
        echo "venv.sh: installing $root into $venv (editable, no deps)" >&2
        "$venv/bin/python" -m pip install --quiet --no-deps -e "$root" >&2
        echo "$stamp" > "$venv/.project-stamp"
    fi
) 9>"$cache/venv-$key.lock"

echo "$venv"
