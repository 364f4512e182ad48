#!/usr/bin/env bash
# Prints the path of a Python interpreter that imports PyTorch, for the reference benchmarks:
# $PYTHON when it has torch, else target/bench-venv, where it installs the pinned version first
# (about 5 GiB with its CUDA wheels). Used by bench/compare.sh and bench/gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.15.0
if [ -n "${PYTHON:-}" ] && "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "$PYTHON"
    exit 0
fi
venv=target/bench-venv
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "installing torch==$TORCH_VERSION into $venv" >&2
    python3 -m venv "$venv"
    if ! "$venv/bin/pip" install --quiet "torch==$TORCH_VERSION" numpy >&2; then
        echo "could not install torch==$TORCH_VERSION from PyPI; set PYTHON to an interpreter" \
            "that has PyTorch" >&2
        exit 1
    fi
fi
echo "$PWD/$venv/bin/python"
