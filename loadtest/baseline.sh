#!/usr/bin/env bash
# The fetch baseline of docs/PERFORMANCE.md, end to end, on this machine:
#   for each backend and each size, seed N devices × 100 one-time prekeys through the API
#   (`loadtest --scenario register`), then, each run from an identical copy of that seed and on
#   a freshly started server:
#     - `loadtest --scenario fetch` (and `bulk`, 10 targets a call, with SCENARIOS="fetch bulk")
#       at each concurrency, with the server's CPU and peak RSS, the load generator's CPU, the
#       database's (PostgreSQL) and the whole machine's;
#     - PostgreSQL: the same statement under pgbench (loadtest/pgbench/fetch.sql), same clients,
#       with the database's CPU, so both can be compared per database core;
#     - PostgreSQL: `keyserver jobs refresh-bundles` alone, then under fetches at the first
#       concurrency, with the latency of the fetches that completed while it ran.
#   Every fetch run takes the same number of one-time keys, min(40 per device, $FETCHES) (a bulk
#   run makes a tenth as many calls): at 1,000 devices a run of fixed length would use up the
#   keys and measure empty bundles instead.
# Several builds or seeds can be measured side by side in one run (VARIANTS): each gets its own
#   seed, and their runs alternate at every size and concurrency (REPEAT times each), so they
#   share the machine's state; the tables give each run's ratio to the first variant's. A
#   variant `v` runs $BIN_v/keyserver and $BIN_v/loadtest (default $BIN), passes $ARGS_v to
#   every loadtest call (seed and fetch), $SERVE_v to `keyserver serve` (say TLS flags, with
#   ARGS_v='--url https://localhost:$PORT --ca-cert …') and runs pgbench with $PGBENCH_v
#   (default loadtest/pgbench/fetch.sql). Besides latency and CPU, each run records the loopback bytes
#   per fetch, and each seed its size on disk.
# Writes $OUT/results.tsv, $OUT/seeds.tsv and $OUT/baseline.md (the tables), and every run's
# JSON and SVG.
#   cargo build --release -p keyserver -p keyserver-loadtest
#   loadtest/baseline.sh                      # or SIZES="1000 10000" BACKENDS=postgres FETCHES=30000 …
#   VARIANTS="before pqxdh x3dh" BIN_before=../before/target/release \
#     PGBENCH_before=../before/loadtest/pgbench/fetch.sql ARGS_x3dh=--x3dh SIZES=10000 \
#     PGBENCH=0 REFRESH=0 REPEAT=2 loadtest/baseline.sh
# Disk: a PQXDH seed (100 one-time Kyber prekeys a device, as keyctl registers) takes about
# 0.64 MB a device on PostgreSQL, 0.5 MB on SQLite: 100,000 devices need some 64 GB for the seed
# and as much for the copy a run uses; ARGS_now='--kyber-prekeys 10' or smaller SIZES keep it small.
# Needs psql, createdb, pgbench, jq and python3, and $ADMIN_URL's cluster on this machine (its CPU
# is read from /proc). PostgreSQL databases named ks_base_* are dropped and recreated on that
# cluster: never point this at data you keep.
set -euo pipefail
cd "$(dirname "$0")/.."
ADMIN_URL=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432}
SIZES=${SIZES:-1000 10000 100000}
CONCURRENCY=${CONCURRENCY:-16 64}
SCENARIOS=${SCENARIOS:-fetch}    # fetch (one device a call), bulk (10 devices a call), replenish (uploads)
BACKENDS=${BACKENDS:-postgres sqlite}
FETCHES=${FETCHES:-90000}       # most fetches per run
VARIANTS=${VARIANTS:-now}
REPEAT=${REPEAT:-1}             # runs of each variant at each size and concurrency, alternating
PGBENCH=${PGBENCH:-1}           # 0: no pgbench runs
REFRESH=${REFRESH:-1}           # 0: no view-refresh runs
REFRESH_AFTER=${REFRESH_AFTER:-5}
PORT=${PORT:-50100}
OUT=${OUT:-target/baseline}
BIN=${BIN:-target/release}
SCRATCH=${SCRATCH:-/tmp/ks-baseline}

export KEYSERVER_LOG=${KEYSERVER_LOG:-warn} PGOPTIONS='-c client_min_messages=warning'
KEYSERVER_TOKEN_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n')
export KEYSERVER_TOKEN_SECRET
mkdir -p "$OUT"
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"
results=$OUT/results.tsv
printf 'variant\trepeat\tbackend\tscenario\tdevices\tconcurrency\tfetches_per_s\tp50\tp95\tp99\tp999\tmax\tserved_twice\twithout_key_while_left\tserver_cores\tserver_rss_mb\tloadtest_cores\tmachine_busy\tdatabase_cores\tbytes_per_fetch\tpgbench_per_s\tpgbench_p50\tpgbench_p99\tpgbench_database_cores\n' >"$results"
seeds=$OUT/seeds.tsv
printf 'variant\tbackend\tdevices\tseconds\tregistrations_per_s\tdatabase_mb\n' >"$seeds"
refreshes=$OUT/refresh.tsv
printf 'variant\tdevices\tview_rows\trefresh_alone_s\trefresh_under_load_s\tduring_per_s\tduring_p50\tduring_p99\tduring_max\toutside_per_s\toutside_p50\toutside_p99\toutside_max\n' >"$refreshes"

db_url() { echo "$ADMIN_URL/$1"; }
psql_admin() { psql -qAt "$(db_url postgres)" -c "$1"; }
recreate_db() { # name [template]
    psql_admin "DROP DATABASE IF EXISTS $1" >/dev/null
    if [ -n "${2:-}" ]; then
        psql_admin "CREATE DATABASE $1 TEMPLATE $2 STRATEGY FILE_COPY" >/dev/null
    else
        psql_admin "CREATE DATABASE $1" >/dev/null
    fi
}

# The database a server or job of this backend uses, by name.
url_for() { # backend name
    if [ "$1" = postgres ]; then db_url "$2"; else echo "sqlite://$SCRATCH/$2/keyserver.db"; fi
}
# An identical copy of the seed `from` named `to`.
copy_seed() { # backend from to
    if [ "$1" = postgres ]; then
        recreate_db "$3" "$2"
    else
        rm -rf "${SCRATCH:?}/$3"
        cp -a "$SCRATCH/$2" "$SCRATCH/$3"
    fi
}

# The current variant's binaries, loadtest arguments and pgbench script.
bin=$BIN args=() serve_args=() pgbench_script=loadtest/pgbench/fetch.sql
use_variant() { # name
    local b="BIN_$1" a="ARGS_$1" s="SERVE_$1" p="PGBENCH_$1"
    bin=${!b:-$BIN}
    read -r -a args <<<"${!a:-}"
    read -r -a serve_args <<<"${!s:-}"
    pgbench_script=${!p:-loadtest/pgbench/fetch.sql}
}
database_mb() { # backend name
    if [ "$1" = postgres ]; then
        psql_admin "SELECT pg_database_size('$2') / 1048576"
    else
        du -sm "$SCRATCH/$2" | cut -f1
    fi
}
loopback_bytes() { awk '$1 == "lo:" { print $2 }' /proc/net/dev; }

server_pid=
start_server() { # backend name
    mkdir -p "$SCRATCH/$2"
    DATABASE_URL=$(url_for "$1" "$2") "$bin/keyserver" serve --listen "127.0.0.1:$PORT" \
        --data-dir "$SCRATCH/$2" --bundle-view-refresh 0s --rotation-check-every 0s \
        --cleanup-every 0s "${serve_args[@]}" 2>>"$OUT/server.log" &
    server_pid=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return; fi
        sleep 0.1
    done
    echo "the server did not start; see $OUT/server.log" >&2
    exit 1
}
stop_server() {
    kill -TERM "$server_pid"
    wait "$server_pid" || true
    server_pid=
}
# A failed step ends the script; it must not leave a server behind on the port.
trap 'if [ -n "$server_pid" ]; then stop_server; fi' EXIT
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # user + system, in clock ticks
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }
idle_ticks() { awk '/^cpu / { print $5 + $6; exit }' /proc/stat; }
peak_rss_mb() { awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
postmaster=$(head -1 "$(psql_admin 'SHOW data_directory')/postmaster.pid")
# Every PostgreSQL process's user + system time: the postmaster's own, that of the backends it
# has reaped (its children's times) and that of those still running.
database_ticks() {
    { cat "/proc/$postmaster/stat"
      pgrep -P "$postmaster" | sed 's|.*|/proc/&/stat|' | xargs -r cat 2>/dev/null || true; } |
        awk -v pm="$postmaster" '{ t += $14 + $15; if ($1 == pm) t += $16 + $17 } END { print t }'
}
# Seconds since a `date +%s.%N` reading.
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { print b - a }'; }
# Cores used between two readings of a tick counter over `seconds`.
cores() { awk -v a="$1" -v b="$2" -v s="$3" -v hz="$hz" 'BEGIN { printf "%.2f", (b - a) / hz / s }'; }

# One loadtest run of $calls calls of $scenario against the running server; its JSON in
# $OUT/$name.json, and the CPU it, the server, the whole machine and the database used (cores),
# and the loopback bytes per call, in $OUT/$name.cpu.
load() { # name devices concurrency [loadtest args…]
    local name=$1 devices=$2 concurrency=$3
    shift 3
    local s0 b0 i0 d0 t0 n0 took database=
    s0=$(cpu_ticks "$server_pid") b0=$(busy_ticks) i0=$(idle_ticks) d0=$(database_ticks)
    n0=$(loopback_bytes) t0=$(date +%s.%N)
    TIMEFORMAT='%U %S'
    { time "$bin/loadtest" --url "http://127.0.0.1:$PORT" --scenario "$scenario" \
        --devices "$devices" --concurrency "$concurrency" --requests "$calls" --duration 30m \
        --json "$OUT/$name.json" --svg "$OUT/$name.svg" "${args[@]}" "$@" >"$OUT/$name.txt" 2>&1; } \
        2>"$OUT/$name.time"
    took=$(since "$t0")
    if [ "$backend" = postgres ]; then database=$(cores "$d0" "$(database_ticks)" "$took"); fi
    read -r user sys <"$OUT/$name.time"
    { cores "$s0" "$(cpu_ticks "$server_pid")" "$took"
      echo " $(busy_ticks) $b0 $(idle_ticks) $i0 $took $user $sys $(loopback_bytes) $n0" |
          awk -v db="$database" -v n="$calls" '{ printf "\t%.2f\t%.0f%%\t%.0f\t%s\n",
              ($6 + $7) / $5, 100 * ($1 - $2) / (($1 - $2) + ($3 - $4)), ($8 - $9) / n, db }'; } \
        >"$OUT/$name.cpu"
}
rpc_of() { # the call a scenario's row reports
    case $1 in
        bulk) echo FetchPreKeyBundles ;;
        replenish) echo UploadOneTimePreKeys ;;
        *) echo FetchPreKeyBundle ;;
    esac
}
fetch_figures() { # json rpc: calls/s p50 p95 p99 p99.9 max served_twice without_while_left
    jq -r --arg rpc "$2" '[.rpcs[$rpc] | .per_second, .p50_ms, .p95_ms, .p99_ms, .p999_ms, .max_ms]
           + [.correctness.served_twice, .correctness.without_one_time_prekey_while_keys_were_left]
           | @tsv' "$1"
}

for backend in $BACKENDS; do
    for devices in $SIZES; do
        run=ks_base_run
        for variant in $VARIANTS; do
            use_variant "$variant"
            seed=ks_base_seed_${variant}_$devices
            echo "== $backend, $devices devices, $variant: seeding through the API"
            if [ "$backend" = postgres ]; then recreate_db "$seed"; else rm -rf "${SCRATCH:?}/$seed"; fi
            start_server "$backend" "$seed"
            "$bin/loadtest" --url "http://127.0.0.1:$PORT" --scenario register --devices "$devices" \
                --concurrency 16 --duration 60m --json "$OUT/$variant-$backend-$devices-seed.json" \
                "${args[@]}" >"$OUT/$variant-$backend-$devices-seed.txt" 2>&1
            stop_server
            if [ "$backend" = postgres ]; then
                psql -q "$(db_url "$seed")" -c "VACUUM ANALYZE" -c "CHECKPOINT"
            fi
            jq -r --arg v "$variant" --arg b "$backend" --arg d "$devices" \
                --arg mb "$(database_mb "$backend" "$seed")" \
                '[$v, $b, $d, .seconds, .rpcs.RegisterDevice.per_second, $mb] | @tsv' \
                "$OUT/$variant-$backend-$devices-seed.json" >>"$seeds"
            tail -1 "$seeds"
        done
        fetches=$((devices * 40 < FETCHES ? devices * 40 : FETCHES))

        for scenario in $SCENARIOS; do
        calls=$fetches
        if [ "$scenario" = bulk ]; then calls=$((fetches / 10)); fi
        for c in $CONCURRENCY; do
            for rep in $(seq "$REPEAT"); do
                for variant in $VARIANTS; do
                    use_variant "$variant"
                    seed=ks_base_seed_${variant}_$devices
                    name=$variant-$backend-$scenario-$devices-c$c-$rep
                    copy_seed "$backend" "$seed" "$run"
                    start_server "$backend" "$run"
                    load "$name" "$devices" "$c"
                    rss=$(peak_rss_mb "$server_pid")
                    stop_server
                    # The database's CPU last: it is empty on SQLite.
                    IFS=$'\t' read -r server_cores loadtest_cores busy bytes database_cores \
                        <"$OUT/$name.cpu"
                    bench=$'\t\t\t'
                    if [ "$backend" = postgres ] && [ "$PGBENCH" = 1 ] && [ "$scenario" = fetch ]; then
                        copy_seed "$backend" "$seed" "$run"
                        rm -f "$OUT/$name-pgbench".*
                        d0=$(database_ticks) t0=$(date +%s.%N)
                        pgbench -n -M prepared -f "$pgbench_script" -D devices="$devices" -c "$c" \
                            -j 2 -t $((fetches / c)) -l --log-prefix="$OUT/$name-pgbench" \
                            "$(db_url "$run")" >"$OUT/$name-pgbench.txt" 2>&1
                        bench_database=$(cores "$d0" "$(database_ticks)" "$(since "$t0")")
                        tps=$(awk '/^tps/ { printf "%.0f", $3; exit }' "$OUT/$name-pgbench.txt")
                        read -r _ _ _ p50 _ _ _ p99 _ _ _ _ \
                            < <(python3 loadtest/pgbench/latency.py "$OUT/$name-pgbench")
                        bench="$tps"$'\t'"$p50"$'\t'"$p99"$'\t'"$bench_database"
                        rm -f "$OUT/$name-pgbench".[0-9]*
                    fi
                    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                        "$variant" "$rep" "$backend" "$scenario" "$devices" "$c" \
                        "$(fetch_figures "$OUT/$name.json" "$(rpc_of "$scenario")")" \
                        "$server_cores" "$rss" "$loadtest_cores" "$busy" "$database_cores" \
                        "$bytes" "$bench" >>"$results"
                    tail -1 "$results"
                done
            done
        done
        done

        if [ "$backend" = postgres ] && [ "$REFRESH" = 1 ]; then
            # The first refresh fills the view; the measured ones are concurrent refreshes of a
            # populated view, as the server's refresher runs them.
            # The load must outlast the refresh under it (some 10 s at 100,000 devices): at least
            # 100,000 calls, within the 40 keys a device the fetch runs keep to.
            c=${CONCURRENCY%% *} scenario=fetch
            calls=$((FETCHES > 100000 ? FETCHES : 100000))
            calls=$((devices * 40 < calls ? devices * 40 : calls))
            for variant in $VARIANTS; do
                use_variant "$variant"
                seed=ks_base_seed_${variant}_$devices
                name=$variant-$backend-$devices-refresh
                copy_seed "$backend" "$seed" "$run"
                export DATABASE_URL; DATABASE_URL=$(db_url "$run")
                "$bin/keyserver" jobs refresh-bundles >/dev/null
                t0=$(date +%s.%N)
                "$bin/keyserver" jobs refresh-bundles >"$OUT/$name-alone.txt"
                alone=$(since "$t0")
                rows=$(psql -qAt "$DATABASE_URL" -c "SELECT count(*) FROM nchat_prekey_bundles")
                start_server "$backend" "$run"
                load "$name" "$devices" "$c" --during "$bin/keyserver jobs refresh-bundles" \
                    --during-after "${REFRESH_AFTER}s"
                stop_server
                unset DATABASE_URL
                jq -r --arg v "$variant" --arg devices "$devices" --arg rows "$rows" \
                    --arg alone "$alone" \
                    '[$v, $devices, $rows, ($alone | tonumber), .during.seconds]
                     + (.during.rpcs.FetchPreKeyBundle | [.per_second, .p50_ms, .p99_ms, .max_ms])
                     + (.outside.rpcs.FetchPreKeyBundle | [.per_second, .p50_ms, .p99_ms, .max_ms])
                     | @tsv' "$OUT/$name.json" >>"$refreshes"
                tail -1 "$refreshes"
            done
        fi
    done
done
psql_admin "DROP DATABASE IF EXISTS ks_base_run" >/dev/null
for variant in $VARIANTS; do
    for devices in $SIZES; do
        psql_admin "DROP DATABASE IF EXISTS ks_base_seed_${variant}_$devices" >/dev/null
    done
done

# The tables, as docs/PERFORMANCE.md quotes them.
python3 - "$results" "$refreshes" "$seeds" >"$OUT/baseline.md" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
refresh = list(csv.DictReader(open(sys.argv[2]), delimiter="\t"))
seeds = list(csv.DictReader(open(sys.argv[3]), delimiter="\t"))
f = lambda v, d=2: f"{float(v):,.{d}f}" if v else ""
variants = list(dict.fromkeys(r["variant"] for r in rows))
several = len(variants) > 1
if several:
    print("\n### Seeds\n")
    print("| variant | backend | devices | seeded in | registrations/s | database size |")
    print("|---|---|---|---|---|---|")
    for s in seeds:
        print(f"| {s['variant']} | {s['backend']} | {int(s['devices']):,} | {f(s['seconds'], 0)} s "
              f"| {f(s['registrations_per_s'], 0)} | {int(s['database_mb']):,} MB |")
for backend, scenario in dict.fromkeys((r["backend"], r["scenario"]) for r in rows):
    mine = [r for r in rows if r["backend"] == backend and r["scenario"] == scenario]
    pg = backend == "postgres" and any(r["pgbench_per_s"] for r in mine)
    bulk = scenario == "bulk"
    print(f"\n### {backend}, {'bulk fetches of 10 devices' if bulk else 'single fetches'}\n")
    head = (["variant", "run"] if several else []) + [
        "devices", "concurrency", "calls/s" if bulk else "fetches/s", "p50", "p95", "p99", "p99.9", "max",
        "served twice", "server CPU", "server CPU per call", "server peak RSS", "loadtest CPU", "machine busy"]
    if backend == "postgres":
        head += ["database CPU"]
    head += ["loopback bytes per call"]
    if pg:
        head += ["pgbench/s", "pgbench p50", "pgbench p99",
                 "pgbench database CPU", "ratio to pgbench", "per database core, ratio to pgbench"]
    head += [f"ratio to {variants[0]}, same run" if several else "ratio to 1,000 devices"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in mine:
        if several:
            base = next(b for b in mine if b["variant"] == variants[0] and b["repeat"] == r["repeat"]
                        and b["devices"] == r["devices"] and b["concurrency"] == r["concurrency"])
        else:
            base = next((b for b in mine if b["devices"] == "1000"
                         and b["concurrency"] == r["concurrency"]), None)
        cells = ([r["variant"], r["repeat"]] if several else []) + [
                 f"{int(r['devices']):,}", r["concurrency"], f(r["fetches_per_s"], 0),
                 *(f(r[k]) + " ms" for k in ("p50", "p95", "p99", "p999", "max")),
                 r["served_twice"], r["server_cores"] + " cores",
                 f(1000 * float(r["server_cores"]) / float(r["fetches_per_s"]), 3) + " ms",
                 r["server_rss_mb"] + " MB",
                 r["loadtest_cores"] + " cores", r["machine_busy"]]
        if backend == "postgres":
            cells += [r["database_cores"] + " cores"]
        cells += [f"{int(r['bytes_per_fetch']):,}"]
        if pg:
            ours, bench = float(r["fetches_per_s"]), float(r["pgbench_per_s"])
            cells += [f(bench, 0), f(r["pgbench_p50"]) + " ms",
                      f(r["pgbench_p99"]) + " ms", r["pgbench_database_cores"] + " cores",
                      f(ours / bench),
                      # A run too short for the database's CPU to register has no ratio.
                      f(ours / float(r["database_cores"])
                        / (bench / float(r["pgbench_database_cores"])))
                      if float(r["database_cores"]) and float(r["pgbench_database_cores"])
                      else ""]
        cells += [f(float(r["fetches_per_s"]) / float(base["fetches_per_s"])) if base else ""]
        print("| " + " | ".join(cells) + " |")
if refresh:
    print("\n### Concurrent refresh of nchat_prekey_bundles (PostgreSQL)\n")
    print("| variant | devices | view rows | refresh alone | refresh under fetches | fetches/s during "
          "| p50 during | p99 during | max during | fetches/s outside | p50 outside "
          "| p99 outside | max outside |")
    print("|" + "---|" * 13)
    for r in refresh:
        print("| " + " | ".join([
            r["variant"], f"{int(r['devices']):,}", f"{int(r['view_rows']):,}",
            f(r["refresh_alone_s"]) + " s", f(r["refresh_under_load_s"]) + " s",
            f(r["during_per_s"], 0), f(r["during_p50"]) + " ms", f(r["during_p99"]) + " ms",
            f(r["during_max"]) + " ms", f(r["outside_per_s"], 0),
            f(r["outside_p50"]) + " ms", f(r["outside_p99"]) + " ms",
            f(r["outside_max"]) + " ms"]) + " |")
PY
cat "$OUT/baseline.md"
