"""Latency percentiles of pgbench per-transaction logs (`pgbench -l --log-prefix=PREFIX`).

    python3 loadtest/pgbench/latency.py PREFIX [WINDOW_FILE in|out]

Prints `fetches N p50 X p95 X p99 X p999 X max X` (milliseconds). With a window file holding
"start end" (epoch seconds), only the transactions that completed inside (or outside) it count.
"""
import glob
import sys

prefix = sys.argv[1]
window = sys.argv[2] if len(sys.argv) > 2 else ""
side = sys.argv[3] if len(sys.argv) > 3 else "in"
lo, hi = map(float, open(window).read().split()) if window else (0.0, float("inf"))
latencies = []
for path in glob.glob(f"{prefix}.[0-9]*"):
    for line in open(path):
        fields = line.split()
        done = int(fields[4]) + int(fields[5]) / 1e6
        if (lo <= done <= hi) == (side == "in"):
            latencies.append(int(fields[2]) / 1000)
latencies.sort()
if not latencies:
    sys.exit(f"no transactions logged under {prefix}")


def pick(q):
    return latencies[min(len(latencies) - 1, int(q * len(latencies)))]


print(f"fetches {len(latencies)} p50 {pick(.5):.2f} p95 {pick(.95):.2f} p99 {pick(.99):.2f} "
      f"p999 {pick(.999):.2f} max {latencies[-1]:.2f}")
