"""The rows of the tables the Rust benches print (`| name | 1.234 ms | 1.000× |`), for the
scripts that put them beside the PyTorch reference (bench/compare.sh, bench/gpu.sh)."""
import re

ROW = re.compile(r"\| ([^|]+) \| ([0-9.]+) ms \| ([0-9.]+)× \|")


def rows(path):
    """Each benchmark's (median ms, ratio) in the file, by name, in the order printed: a name
    printed by several groups (the step bench's two parameter sets) has several entries."""
    found = {}
    for line in open(path):
        m = ROW.match(line)
        if m:
            found.setdefault(m.group(1).strip(), []).append((float(m.group(2)), float(m.group(3))))
    return found
