#!/usr/bin/env bash
# The Rust projection against the PyTorch reference, on this machine's CPU, back to back:
# `cargo bench --bench projection` (ndarray) and bench/torch_ref_spf.py on the same shapes
# (two Llama-shaped blocks of width 512, MLP width 1376, k = 8), then one line of ratios.
#
# PyTorch comes from $PYTHON when it names an interpreter that imports torch; otherwise this
# script installs the pinned version into target/bench-venv (about 5 GiB with its CUDA wheels).
# The reference runs twice: with PyTorch's default threads (all cores) and with one thread,
# since burn's ndarray backend, as this project builds it, runs on one.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.15.0
out=target/bench-compare
mkdir -p "$out"

if [ -z "${PYTHON:-}" ] || ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    venv=target/bench-venv
    if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
        echo "compare.sh: installing torch==$TORCH_VERSION into $venv" >&2
        python3 -m venv "$venv"
        if ! "$venv/bin/pip" install --quiet "torch==$TORCH_VERSION" numpy; then
            echo "compare.sh: could not install torch==$TORCH_VERSION from PyPI; set PYTHON to an" \
                "interpreter that has PyTorch" >&2
            exit 1
        fi
    fi
    PYTHON=$venv/bin/python
fi

echo "== Rust: cargo bench --bench projection"
cargo bench --quiet --bench projection -- --noplot 2>&1 | tee "$out/rust.txt" | grep -E '^\|'

for threads in default 1; do
    echo "== PyTorch ($threads threads): bench/torch_ref_spf.py"
    mkdir -p "$out/torch-$threads"
    if [ "$threads" = default ]; then
        OUT="$out/torch-$threads" "$PYTHON" bench/torch_ref_spf.py | grep TABLE
    else
        OMP_NUM_THREADS=1 OUT="$out/torch-$threads" "$PYTHON" bench/torch_ref_spf.py | grep TABLE
    fi
done

"$PYTHON" - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
rust = {}
for line in open(f"{out}/rust.txt"):
    m = re.match(r"\| ([^|]+) \| ([0-9.]+) ms \|", line)
    if m:
        rust[m.group(1).strip()] = float(m.group(2))
print("\n| side | AdamW step | conflict-only projection | hard (column space) | projection / AdamW |")
print("|---|---|---|---|---|")
print(f"| Rust, ndarray (1 thread) | {rust['adamw']:.2f} ms | {rust['conflict_only']:.2f} ms | "
      f"{rust['hard_left']:.2f} ms | {rust['conflict_only'] / rust['adamw']:.2f} |")
for threads in ["default", "1"]:
    t = json.load(open(f"{out}/torch-{threads}/torch_ref.json"))
    print(f"| PyTorch {t['torch']}, {threads} thread(s) | {t['adamw_ms']:.2f} ms | "
          f"{t['conflict_only_ms']:.2f} ms | {t['hard_left_ms']:.2f} ms | "
          f"{t['conflict_only_ms'] / t['adamw_ms']:.2f} |")
for threads in ["default", "1"]:
    t = json.load(open(f"{out}/torch-{threads}/torch_ref.json"))
    print(f"Rust conflict-only / PyTorch ({threads} threads): "
          f"{rust['conflict_only'] / t['conflict_only_ms']:.2f}x")
PY
