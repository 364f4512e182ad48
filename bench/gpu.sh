#!/usr/bin/env bash
# The optimizer step and the projection on a GPU backend, and the PyTorch reference on the same
# card, in one call; writes target/bench-gpu/<backend>/table.md.
#
#   bench/gpu.sh cuda    NVIDIA, through burn's CUDA backend
#   bench/gpu.sh wgpu    any Vulkan (or Metal, DX12) adapter; on Mesa's lavapipe, a CPU driver,
#                        only to check that everything runs: its times mean nothing
#
# The projection and the reference run on the same shapes: the reference's CUDA shapes (four
# Llama-7B-shaped layers, 4096 × 11008, k = 8) with cuda, or SPF_BENCH_SHAPES=d,f,layers when
# that is set (bench/gpu.sh wgpu on lavapipe: SPF_BENCH_SHAPES=128,344,1). The step bench runs
# its own sets (the lab transformer and one block of width 512). Every iteration ends with a
# device sync, so the times are the device's. PyTorch uses the card when it sees one (CUDA),
# else the CPU; the table says which.
set -euo pipefail
cd "$(dirname "$0")/.."

backend=${1:?usage: bench/gpu.sh cuda|wgpu}
case "$backend" in
cuda) export SPF_BENCH_SHAPES=${SPF_BENCH_SHAPES:-4096,11008,4} ;;
wgpu) ;;
*) echo "bench/gpu.sh: backend is cuda or wgpu, not $backend" >&2; exit 2 ;;
esac
out=target/bench-gpu/$backend
mkdir -p "$out"
PYTHON=$(bench/torch_python.sh)

echo "== cargo bench --features $backend --bench projection"
cargo bench --quiet --features "$backend" --bench projection -- --noplot 2>&1 |
    tee "$out/projection.txt" | grep -E '^\|'
echo "== cargo bench --features $backend --bench step (AdamW and ConflictOnly, k = 8)"
cargo bench --quiet --features "$backend" --bench step -- --noplot 'adamw|spf/k8/ConflictOnly' 2>&1 |
    tee "$out/step.txt" | grep -E '^\|'
echo "== PyTorch: bench/torch_ref_spf.py"
OUT="$out" "$PYTHON" bench/torch_ref_spf.py | grep TABLE

"$PYTHON" - "$out" "$backend" <<'PY' | tee "$out/table.md"
import json, sys
sys.path.insert(0, "bench")
from bench_rows import rows
out, backend = sys.argv[1], sys.argv[2]
p, s = rows(f"{out}/projection.txt"), rows(f"{out}/step.txt")
t = json.load(open(f"{out}/torch_ref.json"))
print(f"\n| side | device | AdamW step | conflict-only | hard (column space) |")
print("|---|---|---|---|---|")
print(f"| Rust, burn {backend} | {backend} | {p['adamw'][0][0]:.2f} ms | "
      f"{p['conflict_only, no statistics'][0][0]:.2f} ms | {p['hard_left, no statistics'][0][0]:.2f} ms |")
print(f"| PyTorch {t['torch']} | {t['device']} | {t['adamw_ms']:.2f} ms | "
      f"{t['conflict_only_ms']:.2f} ms | {t['hard_left_ms']:.2f} ms |")
print(f"\nRust / PyTorch conflict-only: {p['conflict_only, no statistics'][0][0] / t['conflict_only_ms']:.2f}x "
      f"(PyTorch on {t['device']}; shapes d, f, layers = {t['shapes']})\n")
print("| step bench row | lab transformer | block 512 |")
print("|---|---|---|")
for name, runs in s.items():
    print(f"| {name} | " + " | ".join(f"{ms:.3f} ms ({ratio:.2f}×)" for ms, ratio in runs) + " |")
PY
