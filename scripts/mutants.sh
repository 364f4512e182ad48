#!/usr/bin/env bash
# Mutation testing (docs/reliability.md, "Mutation testing"): cargo-mutants, at the version
# pinned here, mutates every function of the projection (its arithmetic and sign rules), the
# optimizer wrapper and the randomized SVD, one mutant at a time, and runs the tests that should
# notice: spf-core's and spf-theory's for the first two, spf-subspace's for the third (spf-theory's
# property tests take minutes per mutant there). A mutant the tests miss is listed in
# <out>/*/mutants.out/missed.txt.
#
# Usage: scripts/mutants.sh [out-dir] [extra cargo-mutants args, e.g. --in-place]
# Not part of CI: about 25 minutes on 2 cores with --in-place (each mutant rebuilds and tests);
# without it cargo-mutants first builds a copy of the workspace from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=27.1.0
if ! cargo mutants --version 2>/dev/null | grep -qF "$VERSION"; then
  cargo install cargo-mutants --version "$VERSION" --locked
fi
out=${1:-target/mutants}
shift || true
mkdir -p "$out/core" "$out/subspace"
# cargo-mutants exits 2 when a mutant is missed and 3 when one timed out: both are results to
# read below; anything else (1: a usage error, 4: the unmutated tests fail) stops the script.
mutants() {
  local rc=0
  cargo mutants --timeout 300 "$@" || rc=$?
  if ((rc == 1 || rc > 3)); then exit "$rc"; fi
}
mutants --package spf-core \
  --file crates/spf-core/src/projection.rs --file crates/spf-core/src/optimizer.rs \
  --test-package spf-core --test-package spf-theory --output "$out/core" "$@"
mutants --package spf-subspace --file crates/spf-subspace/src/rsvd.rs \
  --test-package spf-subspace --output "$out/subspace" "$@"
for part in core subspace; do
  echo "== $part: $(wc -l < "$out/$part/mutants.out/caught.txt") caught," \
    "$(wc -l < "$out/$part/mutants.out/missed.txt") missed," \
    "$(wc -l < "$out/$part/mutants.out/unviable.txt") unviable," \
    "$(wc -l < "$out/$part/mutants.out/timeout.txt") timed out"
  cat "$out/$part/mutants.out/missed.txt"
done
