#!/usr/bin/env bash
# How long `keyserver jobs cleanup` takes on a backlog of expired one-time prekeys, and what it
# does to the latency of concurrent fetches (the fetch statement under pgbench), side by side:
#   1. fetches alone for $SECONDS_ALONE s;
#   2. cleanup alone;
#   3. fetches while cleanup runs (latency counted over the cleanup's own window).
# Each phase starts from the same freshly seeded database. Needs psql, pgbench and python3.
#   DATABASE_URL=postgres://…/scratch loadtest/cleanup-under-fetch.sh
# The database is emptied and reseeded: never point this at data you keep.
set -euo pipefail
: "${DATABASE_URL:?set DATABASE_URL to a scratch PostgreSQL database}"
cd "$(dirname "$0")/.."
KEYSERVER=${KEYSERVER:-target/release/keyserver}
DEVICES=${DEVICES:-10000}
EXPIRED=${EXPIRED:-100}        # per device: DEVICES × EXPIRED expired rows
CLIENTS=${CLIENTS:-8}
SECONDS_ALONE=${SECONDS_ALONE:-30}
BATCH=${BATCH:-5000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$KEYSERVER" migrate up >/dev/null
seed() {
    psql -q "$DATABASE_URL" -v devices="$DEVICES" -f loadtest/pgbench/seed.sql >/dev/null
    psql -q "$DATABASE_URL" -v devices="$DEVICES" -v expired="$EXPIRED" \
        -f loadtest/pgbench/backlog.sql >/dev/null
    psql -q "$DATABASE_URL" -c "CHECKPOINT" >/dev/null
}
fetches() { # duration, log prefix
    pgbench -n -f loadtest/pgbench/fetch.sql -D devices="$DEVICES" -c "$CLIENTS" -j 2 -T "$1" \
        -l --log-prefix="$work/$2" "$DATABASE_URL" >"$work/$2.out" 2>&1
}
cleanup() {
    local start end
    start=$(date +%s.%N)
    "$KEYSERVER" jobs cleanup --cleanup-batch-size "$BATCH" >"$work/$1.report"
    end=$(date +%s.%N)
    echo "$start $end" >"$work/$1.window"
}
latency() { # log prefix, [window file]: percentiles of fetches that completed in the window
    python3 - "$work" "$1" "${2:-}" <<'PY'
import glob, sys
work, prefix, window = sys.argv[1:4]
lo, hi = (map(float, open(window).read().split())) if window else (0, float("inf"))
lat = []
for path in glob.glob(f"{work}/{prefix}.*"):
    if path.endswith((".out", ".report", ".window")):
        continue
    for line in open(path):
        f = line.split()
        done = int(f[4]) + int(f[5]) / 1e6
        if lo <= done <= hi:
            lat.append(int(f[2]) / 1000)
lat.sort()
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"fetches {len(lat)}  p50 {pick(.5):.2f} ms  p95 {pick(.95):.2f} ms  "
      f"p99 {pick(.99):.2f} ms  max {lat[-1]:.2f} ms")
PY
}

echo "== $((DEVICES * EXPIRED)) expired rows, $DEVICES devices, $CLIENTS fetch clients, batch $BATCH"
seed
fetches "$SECONDS_ALONE" alone
echo "fetches alone ($SECONDS_ALONE s):   $(grep -E '^tps' "$work/alone.out" | head -1)"
echo "  $(latency alone)"

seed
cleanup quiet
echo "cleanup alone:"
cat "$work/quiet.report"

seed
fetches 600 busy &
bench=$!
sleep 5
cleanup busy
kill -INT "$bench" 2>/dev/null || true
wait "$bench" 2>/dev/null || true
read -r s e <"$work/busy.window"
echo "cleanup under fetches:"
cat "$work/busy.report"
echo "fetches during that cleanup ($(python3 -c "print(f'{$e - $s:.1f}')") s):"
echo "  $(latency busy "$work/busy.window")"
