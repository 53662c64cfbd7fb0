#!/usr/bin/env bash
# How long `keyserver jobs cleanup` takes on a backlog of expired one-time prekeys, and what it
# does to the latency of concurrent fetches (the fetch statement under pgbench), side by side:
#   1. fetches alone for $SECONDS_ALONE s;
#   2. cleanup alone;
#   3. fetches for $SECONDS_BUSY s with cleanup started 10 s in: latency of the fetches that
#      completed during the cleanup, and of those before and after it, in the same run.
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
SECONDS_BUSY=${SECONDS_BUSY:-90}
BATCH=${BATCH:-5000}
PAUSE=${PAUSE:-0s}          # --cleanup-batch-pause
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

export KEYSERVER_LOG=${KEYSERVER_LOG:-warn}
"$KEYSERVER" migrate up >/dev/null
seed() {
    PGOPTIONS='-c client_min_messages=warning' psql -q "$DATABASE_URL" -v devices="$DEVICES" -f loadtest/pgbench/seed.sql >/dev/null
    psql -q "$DATABASE_URL" -v devices="$DEVICES" -v expired="$EXPIRED" \
        -f loadtest/pgbench/backlog.sql >/dev/null
    psql -q "$DATABASE_URL" -c "CHECKPOINT" >/dev/null
}
fetches() { # duration, log prefix
    pgbench -n -M prepared -f loadtest/pgbench/fetch.sql -D devices="$DEVICES" -c "$CLIENTS" -j 2 -T "$1" \
        -l --log-prefix="$work/$2" "$DATABASE_URL" >"$work/$2.out" 2>&1
}
cleanup() {
    local start end
    start=$(date +%s.%N)
    "$KEYSERVER" jobs cleanup --cleanup-batch-size "$BATCH" --cleanup-batch-pause "$PAUSE" >"$work/$1.report"
    end=$(date +%s.%N)
    echo "$start $end" >"$work/$1.window"
}
latency() { # log prefix, [window file, in|out]: percentiles (ms) of the fetches that completed
            # inside (or outside) the window
    python3 loadtest/pgbench/latency.py "$work/$1" "${2:-}" "${3:-in}"
}

echo "== $((DEVICES * EXPIRED)) expired rows, $DEVICES devices, $CLIENTS fetch clients, batch $BATCH, pause $PAUSE"
seed
fetches "$SECONDS_ALONE" alone
echo "fetches alone ($SECONDS_ALONE s):   $(grep -E '^tps' "$work/alone.out" | head -1)"
echo "  $(latency alone)"

seed
cleanup quiet
echo "cleanup alone:"
cat "$work/quiet.report"

seed
fetches "$SECONDS_BUSY" busy &
bench=$!
sleep 10
cleanup busy
wait "$bench"
read -r s e <"$work/busy.window"
echo "cleanup under fetches:"
cat "$work/busy.report"
echo "fetches of the same run ($SECONDS_BUSY s): $(grep -E '^tps' "$work/busy.out" | head -1)"
echo "  during the cleanup ($(python3 -c "print(f'{$e - $s:.1f}')") s): $(latency busy "$work/busy.window" in)"
echo "  before and after it:          $(latency busy "$work/busy.window" out)"
