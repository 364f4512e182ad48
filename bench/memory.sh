#!/usr/bin/env bash
# Peak resident memory of one training run (examples/memory.rs: a Llama-shaped block of width 512,
# 50 AdamW steps) without SPF, with SPF and fixed bases (statistics read, and not), and with SPF
# re-estimating every 10 steps, each measured by GNU time's "Maximum resident set size", beside
# the heap the example counts itself (peak, live at the end, and each step's transient).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/time ]; then
    echo "memory.sh: installing GNU time" >&2
    apt-get install -y -qq time >/dev/null || { echo "memory.sh: needs /usr/bin/time (Debian package 'time')" >&2; exit 1; }
fi
cargo build --quiet --release --example memory

echo "| run | peak RSS (GNU time) | vs plain | heap peak (counted) | heap live after the last step | step transient, median / largest | bases |"
echo "|---|---|---|---|---|---|---|"
plain=
for args in "" "--spf" "--spf --no-stats" "--spf --refresh 10"; do
    log=$(mktemp)
    # shellcheck disable=SC2086
    /usr/bin/time -v target/release/examples/memory $args >"$log" 2>&1
    kib=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$log")
    bases=$(sed -n 's/.*bases hold [0-9]* bytes (\(.*\))/\1/p' "$log")
    heap=$(sed -n 's/.*heap peak \([0-9.]*\) MiB, live after the last step \([0-9.]*\) MiB/\1 MiB | \2 MiB/p' "$log")
    step=$(sed -n 's/step transient: median \([0-9.]*\) MiB, largest \([0-9.]*\) MiB/\1 MiB \/ \2 MiB/p' "$log")
    plain=${plain:-$kib}
    awk -v run="${args:-plain AdamW}" -v kib="$kib" -v plain="$plain" -v heap="$heap" \
        -v step="$step" -v bases="${bases:--}" 'BEGIN {
            printf "| %s | %.1f MiB | %+.1f MiB | %s | %s | %s |\n", run, kib / 1024, (kib - plain) / 1024, heap, step, bases
        }'
    rm -f "$log"
done
