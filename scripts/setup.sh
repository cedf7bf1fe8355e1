#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and register its
# Jupyter kernel "mpc". Sourced by scripts/run.sh and scripts/test.sh, so each README
# command works on a fresh machine that has only Python 3.11.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.mpc-installed"

pick_python() {
    for p in "${PYTHON:-}" python3.11 python3 python; do
        [ -n "$p" ] || continue
        if command -v "$p" >/dev/null 2>&1 && \
           "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    echo "mpc: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if [ ! -x "$venv/bin/python" ]; then
    py="$(pick_python)"
    echo "mpc: creating virtual environment in $venv" >&2
    "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "mpc: installing dependencies (first run takes a few minutes)" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch first and exactly pinned: the CPU build from this machine's disk.
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
    "$venv/bin/python" -m pip install -q -e "$root[inference]"
    "$venv/bin/python" -m ipykernel install --sys-prefix --name mpc --display-name "Python (mpc)" >/dev/null
    touch "$stamp"
fi
# ninja (for torch.utils.cpp_extension.load_inline) lives in the venv's bin.
export PATH="$venv/bin:$PATH"
