#!/usr/bin/env bash
# The high-availability promises, checked through real failures: no one-time prekey handed out
# twice, no acknowledged upload lost, no key served that was never uploaded, and clients seeing
# UNAVAILABLE and nothing else while it happens.
#
# Brings up the deploy/ha stack (Patroni, three etcd members, HAProxy) on its own ports, two
# `keyserver serve` processes on HAProxy's primary port, seeds PQXDH devices, then runs
# `loadtest --scenario mixed` (fetches, uploads, rotations) over both servers with a ledger of
# every key handed out and every upload acknowledged, and meanwhile:
#   at KILL_PRIMARY_AT s  stops the primary's WAL sender for LAG s (a hiccup on the link between
#                         the nodes), then kills the primary's Patroni and postmaster with SIGKILL
#                         (the machine is lost) before it sent what it wrote meanwhile;
#   at KILL_SERVER_AT s   kills one server process with SIGKILL;
#   at KILL_ETCD_AT s     kills etcd's leader with SIGKILL (two members keep the quorum).
# Afterwards the ledger is checked against the new primary: every acknowledged upload stored,
# every key handed out recorded as taken (else it would be handed out again).
#
#   deploy/ha/failover-test.sh              # synchronous replication: every figure must be 0
#   SYNC=off deploy/ha/failover-test.sh     # asynchronous: reports what it loses, fails nothing
# Asynchronous, the standby may be promoted however far behind (MAX_LAG 1 GB): with Patroni's
# default bound (1 MB) a stall this long can leave no primary at all instead of a lossy one.
#
# Settings (environment): SYNC (on | strict | off), DEVICES (400), CONCURRENCY (8), DURATION
# (42 s), KILL_PRIMARY_AT (8), LAG (0.5 s), KILL_SERVER_AT (25), KILL_ETCD_AT (32), OUT
# (target/failover-$SYNC: logs, the run's JSON, the ledger and report.txt), BIN (target/release,
# built when keyserver or loadtest is missing), and the stack's ports, apart from up.sh's
# defaults: ETCD_PORT (2579), PG_PORT (5541), REST_PORT (8111), PRIMARY_PORT (5550),
# REPLICA_PORT (5551), SERVER_PORT (50161, and the next port for the second server).
# Needs what up.sh needs (Debian's patroni, etcd-server, haproxy), psql, curl and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SYNC=${SYNC:-on} NODES=2 ETCD_MEMBERS=3
if [ "$SYNC" = off ]; then export MAX_LAG=${MAX_LAG:-1073741824}; fi
export ETCD_PORT=${ETCD_PORT:-2579} PG_PORT=${PG_PORT:-5541} REST_PORT=${REST_PORT:-8111}
export PRIMARY_PORT=${PRIMARY_PORT:-5550} REPLICA_PORT=${REPLICA_PORT:-5551}
DEVICES=${DEVICES:-400} CONCURRENCY=${CONCURRENCY:-8} DURATION=${DURATION:-42}
KILL_PRIMARY_AT=${KILL_PRIMARY_AT:-8} LAG=${LAG:-0.5}
KILL_SERVER_AT=${KILL_SERVER_AT:-25} KILL_ETCD_AT=${KILL_ETCD_AT:-32}
SERVER_PORT=${SERVER_PORT:-50161}
OUT=$(realpath -m "${OUT:-target/failover-$SYNC}")
BIN=$(realpath -m "${BIN:-target/release}")
export HA_DIR=$OUT/ha

if [ ! -x "$BIN/keyserver" ] || [ ! -x "$BIN/loadtest" ]; then
    cargo build --release -p keyserver -p keyserver-loadtest
fi
deploy/ha/down.sh 2>/dev/null || true
rm -rf "$OUT"
mkdir -p "$OUT"
servers=()
cleanup() {
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    deploy/ha/down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT
fail() {
    echo "failover-test: $*" >&2
    for log in "$OUT"/*.log "$HA_DIR"/*.log; do
        [ -f "$log" ] && { echo "--- $log"; tail -n 15 "$log"; }
    done >&2
    exit 1
}

started=$SECONDS
deploy/ha/up.sh >"$OUT/up.log" 2>&1 || fail "the stack did not come up"
echo "stack up in $((SECONDS - started)) s (2 PostgreSQL nodes, SYNC=$SYNC, 3 etcd members)"
database=postgres://postgres@127.0.0.1:$PRIMARY_PORT/keyserver
export KEYSERVER_TOKEN_SECRET
KEYSERVER_TOKEN_SECRET=$(head -c 32 /dev/urandom | base64)

# Two servers on HAProxy's primary port; each applies pending migrations first (one at a time).
urls=()
for i in 0 1; do
    port=$((SERVER_PORT + i))
    "$BIN/keyserver" serve --listen "127.0.0.1:$port" --database-url "$database" \
        --read-database-url "postgres://postgres@127.0.0.1:$REPLICA_PORT/keyserver" \
        --data-dir "$OUT/server$i" >"$OUT/server$i.log" 2>&1 &
    servers+=($!)
    urls+=("http://127.0.0.1:$port")
    for _ in $(seq 150); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        kill -0 "${servers[$i]}" 2>/dev/null || fail "server $i exited"
        sleep 0.2
    done
done

"$BIN/loadtest" --url "${urls[0]}" --scenario register --devices "$DEVICES" --concurrency 4 \
    --duration 120s >"$OUT/seed.log" 2>&1 || fail "seeding $DEVICES devices failed"
echo "seeded $DEVICES PQXDH devices"

# The node whose Patroni says it is the primary (1-based), or nothing.
primary_node() {
    for n in $(seq "$NODES"); do
        if curl -sf "http://127.0.0.1:$((REST_PORT + n - 1))/primary" >/dev/null; then
            echo "$n"
            return
        fi
    done
}
postmaster() { head -n 1 "$HA_DIR/pg$1/data/postmaster.pid"; }

"$BIN/loadtest" --url "$(IFS=,; echo "${urls[*]}")" --scenario mixed --devices "$DEVICES" \
    --concurrency "$CONCURRENCY" --duration "${DURATION}s" --tolerate UNAVAILABLE \
    --ledger "$OUT/ledger.csv" --json "$OUT/run.json" >"$OUT/load.log" 2>&1 &
load=$!
load_started=$SECONDS
at() {
    local wait=$(($1 - (SECONDS - load_started)))
    if [ "$wait" -gt 0 ]; then sleep "$wait"; fi
}

at "$KILL_PRIMARY_AT"
old=$(primary_node)
[ -n "$old" ] || fail "no primary before the failover"
sender=$(pgrep -P "$(postmaster "$old")" -f walsender || true)
[ -n "$sender" ] || fail "the primary pg$old has no WAL sender"
# Synchronous, commits wait meanwhile; asynchronous, they are acknowledged and not yet sent.
kill -STOP "$sender"
sleep "$LAG"
primary_killed=$(date +%s.%N)
kill -9 "$(pgrep -f "patroni $HA_DIR/pg$old.yml")" "$(postmaster "$old")" "$sender"
echo "$((SECONDS - load_started)) s: killed the primary pg$old (its WAL unsent for the last ${LAG} s)"

at "$KILL_SERVER_AT"
server_killed=$(date +%s.%N)
kill -9 "${servers[0]}"
echo "$((SECONDS - load_started)) s: killed server 0"

at "$KILL_ETCD_AT"
leader=
for i in 1 2 3; do
    status=$(curl -sf -X POST -d '{}' "http://127.0.0.1:$((ETCD_PORT + 2 * (i - 1)))/v3/maintenance/status" || true)
    if [ -n "$status" ] && python3 -c 'import json,sys; s=json.loads(sys.argv[1]); sys.exit(s["leader"] != s["header"]["member_id"])' "$status"; then
        leader=$i
    fi
done
[ -n "$leader" ] || fail "no etcd leader found"
etcd_killed=$(date +%s.%N)
kill -9 "$(pgrep -f "etcd --name etcd$leader --data-dir $HA_DIR/etcd$leader")"
echo "$((SECONDS - load_started)) s: killed etcd's leader etcd$leader"

load_status=0
wait "$load" || load_status=$?
[ -f "$OUT/run.json" ] || fail "loadtest wrote no results (exit $load_status)"
now=$(primary_node)
[ -n "$now" ] || fail "no primary after the run"

# The ledger against the new primary.
read -r uploads_missing served_not_taken devices_missing < <(
    psql -v ON_ERROR_STOP=1 -qAt -F ' ' "$database" <<SQL
CREATE TEMP TABLE ledger (event TEXT, kind TEXT, device_id TEXT, key_id INTEGER);
\copy ledger FROM '$OUT/ledger.csv' CSV
WITH found AS (
    SELECT l.event,
           COALESCE(e.is_consumed, k.is_consumed) AS taken,
           COALESCE(e.id, k.id) IS NOT NULL AS stored
    FROM ledger l
    LEFT JOIN nchat_one_time_prekeys e
        ON l.kind = 'ec' AND e.device_id = l.device_id AND e.prekey_id = l.key_id
    LEFT JOIN nchat_kyber_prekeys k
        ON l.kind = 'kyber' AND NOT k.is_last_resort AND k.device_id = l.device_id
           AND k.kyber_prekey_id = l.key_id
)
SELECT count(*) FILTER (WHERE event = 'uploaded' AND NOT stored),
       count(*) FILTER (WHERE event = 'served' AND NOT COALESCE(taken, FALSE)),
       $DEVICES - (SELECT count(*) FROM nchat_identity_keys WHERE device_id LIKE 'load-%')
FROM found;
SQL
)
[ -n "$devices_missing" ] || fail "checking the ledger against the database failed"

python3 - "$OUT/run.json" "$OUT/report.json" "$SYNC" "$old" "$now" "$load_status" \
    "$uploads_missing" "$served_not_taken" "$devices_missing" \
    "$primary_killed" "$server_killed" "$etcd_killed" <<'PY' | tee "$OUT/report.txt"
import json, sys
(run, out, sync, old, new, load_status, uploads_missing, served_not_taken, devices_missing,
 *killed) = sys.argv[1:]
r = json.load(open(run))
c = r["correctness"]
# When each failure struck, in seconds of the load run (a moment before its kill).
at = [float(t) - r["started_unix_s"] for t in killed]
events = list(zip(["primary killed", "server killed", "etcd leader killed", "end"],
                  at + [r["seconds"] + 60]))
outages = r["outages"]["each"]
per_event = {}
for (name, start), (_, end) in zip(events, events[1:]):
    inside = [o for o in outages if start <= o["from_s"] < end]
    per_event[name] = {
        "at_s": round(start, 2),
        "workers_affected": len(inside),
        "longest_s": round(max((o["seconds"] for o in inside), default=0.0), 2),
        "first_error_to_last_recovery_s": round(
            max((o["from_s"] + o["seconds"] for o in inside), default=0.0)
            - min((o["from_s"] for o in inside), default=0.0), 2),
    }
codes = sorted({f["code"] for f in r["failures"]})
ok = sum(v["ok"] for v in r["rpcs"].values())
report = {
    "sync": sync, "old_primary": f"pg{old}", "new_primary": f"pg{new}",
    "calls_ok": ok, "failed_calls": sum(f["count"] for f in r["failures"]),
    "failure_codes": codes,
    "one_time_prekeys_served": c["one_time_prekeys_served"] + c["kyber_one_time_prekeys_served"],
    "served_twice": c["served_twice"] + c["kyber_served_twice"],
    "served_never_uploaded": c["served_never_uploaded"],
    "uploads_acknowledged": c["uploads_acknowledged"],
    "acknowledged_uploads_missing": int(uploads_missing),
    "served_keys_not_recorded_taken": int(served_not_taken),
    "registered_devices_missing": int(devices_missing),
    "outages": per_event,
    "loadtest_exit": int(load_status),
}
json.dump(report, open(out, "w"), indent=2)
print(f"SYNC={sync}: {ok} calls answered, {report['failed_calls']} failed with {codes or 'nothing'}")
print(f"  one-time prekeys handed out {report['one_time_prekeys_served']}, served twice "
      f"{report['served_twice']}, served but never uploaded {report['served_never_uploaded']}")
print(f"  uploads acknowledged {report['uploads_acknowledged']}, missing afterwards "
      f"{report['acknowledged_uploads_missing']}; keys handed out but not recorded taken on the "
      f"new primary {report['served_keys_not_recorded_taken']}; registered devices missing "
      f"{report['registered_devices_missing']}")
for (name, start), o in zip(events, per_event.values()):
    print(f"  {name} at {start:.1f} s: {o['workers_affected']} worker outages, longest {o['longest_s']} s, "
          f"first error to last recovery {o['first_error_to_last_recovery_s']} s")
PY

python3 - "$OUT/report.json" "$SYNC" <<'PY'
import json, sys
r, sync = json.load(open(sys.argv[1])), sys.argv[2]
lost = {k: r[k] for k in ("served_twice", "served_never_uploaded", "acknowledged_uploads_missing",
                          "served_keys_not_recorded_taken", "registered_devices_missing") if r[k]}
if sync == "off":
    print("asynchronous replication lost:", lost or "nothing this time")
    sys.exit(0)
problems = []
if lost:
    problems.append(f"lost or doubled: {lost}")
if r["failure_codes"] not in ([], ["Unavailable"]):
    problems.append(f"clients saw {r['failure_codes']}, not only UNAVAILABLE")
if r["loadtest_exit"] != 0:
    problems.append(f"loadtest exited {r['loadtest_exit']}")
if r["new_primary"] == r["old_primary"]:
    problems.append("no failover happened")
if r["outages"]["primary killed"]["workers_affected"] == 0:
    problems.append("no client noticed the primary's loss")
if problems:
    sys.exit("failover-test: " + "; ".join(problems))
print("failover-test: passed")
PY
