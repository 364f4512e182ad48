#!/usr/bin/env bash
# The Rust projection against the PyTorch reference, on this machine's CPU, back to back:
# `cargo bench --bench projection` (ndarray) and bench/torch_ref_spf.py on the same shapes
# (two Llama-shaped blocks of width 512, MLP width 1376, k = 8), then one line of ratios.
#
# PyTorch comes from bench/torch_python.sh: $PYTHON when it imports torch, else the pinned version
# in target/bench-venv, installed on first use.
# Each side runs twice, on one thread and on all cores: PyTorch with OMP_NUM_THREADS=1 and with its
# default; burn-ndarray as the workspace builds it (one thread) and with feature ndarray-fast.
# The Rust rows without statistics are the ones to compare: the reference computes none.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/bench-compare
mkdir -p "$out"
PYTHON=$(bench/torch_python.sh)

# Rust twice: burn-ndarray as the workspace builds it (one thread, no SIMD kernels), and with its
# SIMD and multi-threading on (feature ndarray-fast: burn's own defaults, all cores).
echo "== Rust, ndarray (1 thread): cargo bench --bench projection"
cargo bench --quiet --bench projection -- --noplot 2>&1 | tee "$out/rust-1.txt" | grep -E '^\|'
echo "== Rust, ndarray-fast (all cores): cargo bench --features ndarray-fast --bench projection"
cargo bench --quiet --features ndarray-fast --bench projection -- --noplot 2>&1 |
    tee "$out/rust-default.txt" | grep -E '^\|'

for threads in default 1; do
    echo "== PyTorch ($threads threads): bench/torch_ref_spf.py"
    mkdir -p "$out/torch-$threads"
    if [ "$threads" = default ]; then
        OUT="$out/torch-$threads" "$PYTHON" bench/torch_ref_spf.py | grep TABLE
    else
        OMP_NUM_THREADS=1 OUT="$out/torch-$threads" "$PYTHON" bench/torch_ref_spf.py | grep TABLE
    fi
done

"$PYTHON" - "$out" "$(nproc)" <<'PY'
import json, sys
sys.path.insert(0, "bench")
from bench_rows import rows
out, cores = sys.argv[1], sys.argv[2]
def rust(threads):
    return {name: runs[0][0] for name, runs in rows(f"{out}/rust-{threads}.txt").items()}
def torch(threads):
    return json.load(open(f"{out}/torch-{threads}/torch_ref.json"))
label = {"1": "1 thread", "default": f"{cores} threads"}
print("\n| side | threads | AdamW step | conflict-only, statistics | conflict-only | hard (column space) |")
print("|---|---|---|---|---|---|")
for threads in ["1", "default"]:
    r = rust(threads)
    print(f"| Rust, ndarray{'' if threads == '1' else '-fast'} | {label[threads]} | {r['adamw']:.2f} ms | "
          f"{r['conflict_only']:.2f} ms | {r['conflict_only, no statistics']:.2f} ms | "
          f"{r['hard_left, no statistics']:.2f} ms |")
for threads in ["1", "default"]:
    t = torch(threads)
    print(f"| PyTorch {t['torch']} | {label[threads]} | {t['adamw_ms']:.2f} ms | | "
          f"{t['conflict_only_ms']:.2f} ms | {t['hard_left_ms']:.2f} ms |")
print()
for threads in ["1", "default"]:
    r, t = rust(threads), torch(threads)
    print(f"Rust / PyTorch, {label[threads]}: conflict-only "
          f"{r['conflict_only, no statistics'] / t['conflict_only_ms']:.2f}x, hard "
          f"{r['hard_left, no statistics'] / t['hard_left_ms']:.2f}x, AdamW "
          f"{r['adamw'] / t['adamw_ms']:.2f}x")
PY
