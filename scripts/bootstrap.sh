#!/usr/bin/env bash
# Create .venv and install Prism with the given extras, once per pyproject.toml version.
# Usage: scripts/bootstrap.sh [extras]   e.g. "test"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="$root/.venv"
stamp="$venv/.prism-installed-${extras:-base}"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
echo "prism: setting up $venv (extras: ${extras:-none}) ..." >&2
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# Pin torch first: an unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
spec="$root"
[[ -n "$extras" ]] && spec="$root[$extras]"
"${pip[@]}" -e "$spec"
echo "$want" > "$stamp"
