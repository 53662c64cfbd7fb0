#!/usr/bin/env bash
# Fetch throughput against database size on PostgreSQL, alternating: for each of $ROUNDS rounds
# and each size in $SIZES, a fresh copy of baseline.sh's seed of that size (ks_base_seed_now_<N>,
# left by `BACKENDS=postgres SIZES=… loadtest/baseline.sh`), a CHECKPOINT, one server, and a
# `loadtest --scenario fetch` run at each concurrency, with the buffer hits and the reads from
# outside shared_buffers per fetch (pg_stat_database), so a size's cost can be told from noise.
#   ROUNDS=2 SIZES="100000 1000" CONCURRENCY="16 64" loadtest/sizes.sh
# The database ks_base_run is dropped and recreated: never point this at data you keep.
set -euo pipefail
cd "$(dirname "$0")/.."
ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432}
ROUNDS=${ROUNDS:-2} SIZES=${SIZES:-100000 1000} CONCURRENCY=${CONCURRENCY:-16 64}
FETCHES=${FETCHES:-20000} PORT=${PORT:-50100} BIN=${BIN:-target/release}
ARGS=${ARGS---kyber-prekeys 10}
read -r -a args <<<"$ARGS"
export KEYSERVER_LOG=${KEYSERVER_LOG:-warn} PGOPTIONS='-c client_min_messages=warning'
KEYSERVER_TOKEN_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n')
export KEYSERVER_TOKEN_SECRET
data=$(mktemp -d)
server_pid=
trap 'if [ -n "$server_pid" ]; then kill "$server_pid"; fi; rm -rf "$data"' EXIT
blocks="SELECT blks_hit || ' ' || blks_read FROM pg_stat_database WHERE datname = 'ks_base_run'"

printf 'round\tdevices\tconcurrency\tfetches_per_s\tp50_ms\tp99_ms\thits_per_fetch\treads_per_fetch\n'
for round in $(seq "$ROUNDS"); do
    for devices in $SIZES; do
        psql -qAt "$ADMIN_URL/postgres" -c "DROP DATABASE IF EXISTS ks_base_run" \
            -c "CREATE DATABASE ks_base_run TEMPLATE ks_base_seed_now_$devices STRATEGY FILE_COPY"
        psql -qAt "$ADMIN_URL/ks_base_run" -c CHECKPOINT
        DATABASE_URL="$ADMIN_URL/ks_base_run" "$BIN/keyserver" serve --listen "127.0.0.1:$PORT" \
            --data-dir "$data" --bundle-view-refresh 0s --rotation-check-every 0s \
            --cleanup-every 0s 2>>"$data/server.log" &
        server_pid=$!
        for _ in $(seq 100); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
            sleep 0.1
        done
        for c in $CONCURRENCY; do
            read -r hit0 read0 < <(psql -qAt "$ADMIN_URL/ks_base_run" -c "$blocks")
            "$BIN/loadtest" --url "http://127.0.0.1:$PORT" --scenario fetch --devices "$devices" \
                --concurrency "$c" --requests "$FETCHES" --duration 30m \
                --json "$data/run.json" "${args[@]}" >/dev/null
            sleep 1 # the statistics collector's last report
            read -r hit1 read1 < <(psql -qAt "$ADMIN_URL/ks_base_run" -c "$blocks")
            jq -r --arg r "$round" --arg d "$devices" --arg c "$c" \
                --argjson hits "$(((hit1 - hit0) * 10 / FETCHES))" \
                --argjson reads "$(((read1 - read0) * 10 / FETCHES))" \
                '.rpcs.FetchPreKeyBundle | [$r, $d, $c, (.per_second | round), .p50_ms, .p99_ms,
                 ($hits / 10), ($reads / 10)] | @tsv' "$data/run.json"
        done
        kill "$server_pid"
        wait "$server_pid" || true
        server_pid=
    done
done
