#!/usr/bin/env bash
# Issue 16's comparison in one command: a base commit (BASE, default 2d25e2f, the last commit
# before fetch coalescing) against this work tree, their runs alternating at every backend,
# size, concurrency and scenario (single fetches and 10-target bulk fetches), with pgbench
# running the single-fetch statement on the same rows (loadtest/baseline.sh does the runs and
# writes the tables to $OUT/baseline.md).
#   loadtest/compare.sh
#   SIZES="1000 10000" CONCURRENCY="1 16 64" REPEAT=2 loadtest/compare.sh
# The base is checked out as a detached git worktree ($WORKTREE, default target/compare-base)
# and built there with its own target folder; both builds are release builds. Every other
# setting is baseline.sh's (ADMIN_URL, BACKENDS, FETCHES, PGBENCH, OUT, …); the defaults here
# are the issue's grid. Disk: seeds are PQXDH with 10 one-time Kyber prekeys a device unless
# ARGS says otherwise (ARGS='' for 100 a device, about 0.64 MB a device on PostgreSQL).
# PostgreSQL databases named ks_base_* are dropped and recreated: never point this at data you
# keep.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-2d25e2f}
WORKTREE=${WORKTREE:-target/compare-base}

if [ ! -d "$WORKTREE" ]; then
    git worktree add --detach "$WORKTREE" "$BASE"
fi
if [ "$(git -C "$WORKTREE" rev-parse HEAD)" != "$(git rev-parse "$BASE^{commit}")" ]; then
    echo "$WORKTREE is not at $BASE; remove it (git worktree remove $WORKTREE) or set WORKTREE" >&2
    exit 1
fi
(cd "$WORKTREE" && CARGO_TARGET_DIR="$PWD/target" cargo build --release -q -p keyserver -p keyserver-loadtest)
cargo build --release -q -p keyserver -p keyserver-loadtest

args=${ARGS---kyber-prekeys 10}
export VARIANTS="before now"
export BIN_before="$WORKTREE/target/release" PGBENCH_before="$WORKTREE/loadtest/pgbench/fetch.sql"
export ARGS_before="$args" ARGS_now="$args"
export SIZES=${SIZES:-1000 10000 100000} CONCURRENCY=${CONCURRENCY:-1 16 64}
export SCENARIOS=${SCENARIOS:-fetch bulk} REFRESH=${REFRESH:-0} OUT=${OUT:-target/compare}
echo "comparing $BASE ($(git -C "$WORKTREE" log -1 --format=%s | cut -c1-60)…) with the work tree at $(git rev-parse --short HEAD)"
exec loadtest/baseline.sh
