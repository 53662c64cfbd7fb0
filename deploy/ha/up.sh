#!/usr/bin/env bash
# Brings up a replicated PostgreSQL on this machine, for tests and demos of the key server's
# high availability: ETCD_MEMBERS etcd members, NODES PostgreSQL nodes under Patroni (synchronous
# by default) and HAProxy routing a primary port to whichever node Patroni elected and a replica
# port to the standbys. Everything listens on 127.0.0.1, every port is a parameter, and all
# state is under HA_DIR; deploy/ha/down.sh stops it all.
#   deploy/ha/up.sh                         # then DATABASE_URL=postgres://postgres@127.0.0.1:5450/keyserver
#   SYNC=off NODES=3 HA_DIR=/tmp/ha2 PG_PORT=6441 PRIMARY_PORT=6450 … deploy/ha/up.sh
# Settings (environment): HA_DIR (target/ha), NODES (2), SYNC (on | strict | off), TTL (10 s,
# the leader key's lifetime: about the longest a failover takes), MAX_LAG (1048576: bytes of
# WAL a standby may be behind and still be promoted, Patroni's maximum_lag_on_failover),
# ETCD_MEMBERS (3: a quorum
# survives losing one), ETCD_PORT (2479: member i listens for clients on ETCD_PORT+2(i-1) and
# for its peers on the port after), PG_PORT (5441: nodes on PG_PORT, PG_PORT+1, …), REST_PORT (8011,
# likewise), PRIMARY_PORT (5450), REPLICA_PORT (5451), DATABASE (keyserver, created on the
# primary), PG_BIN (the newest /usr/lib/postgresql/*/bin).
# Needs Debian's patroni, etcd-server and haproxy packages; PostgreSQL runs as the postgres
# user when this runs as root (initdb refuses root).
set -euo pipefail
cd "$(dirname "$0")"
here=$PWD
cd ../..
HA_DIR=$(realpath -m "${HA_DIR:-target/ha}")
NODES=${NODES:-2} SYNC=${SYNC:-on} TTL=${TTL:-10} ETCD_MEMBERS=${ETCD_MEMBERS:-3}
MAX_LAG=${MAX_LAG:-1048576}
ETCD_PORT=${ETCD_PORT:-2479} PG_PORT=${PG_PORT:-5441} REST_PORT=${REST_PORT:-8011}
PRIMARY_PORT=${PRIMARY_PORT:-5450} REPLICA_PORT=${REPLICA_PORT:-5451} DATABASE=${DATABASE:-keyserver}
PG_BIN=${PG_BIN:-$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d | sort -V | tail -1)}

for tool in patroni etcd haproxy; do
    if ! command -v "$tool" >/dev/null; then
        echo "up.sh: $tool is not installed (apt-get install patroni etcd-server haproxy)" >&2
        exit 1
    fi
done
case $SYNC in
    on) sync_mode=true strict=false ;;
    strict) sync_mode=true strict=true ;;
    off) sync_mode=false strict=false ;;
    *) echo "up.sh: SYNC is on, strict or off, not '$SYNC'" >&2; exit 1 ;;
esac
if compgen -G "$HA_DIR/etcd*" >/dev/null; then
    echo "up.sh: $HA_DIR holds a stack already; deploy/ha/down.sh first" >&2
    exit 1
fi
mkdir -p "$HA_DIR"
# The database processes run as postgres when this runs as root.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        # setpriv runs the program itself as postgres (runuser would stay as its parent).
        HOME=$HA_DIR setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
    else
        "$@"
    fi
}
if [ "$(id -u)" = 0 ]; then chown postgres: "$HA_DIR"; fi

etcd_cluster= etcd_hosts=
for i in $(seq "$ETCD_MEMBERS"); do
    client=$((ETCD_PORT + 2 * (i - 1)))
    etcd_cluster+="${etcd_cluster:+,}etcd$i=http://127.0.0.1:$((client + 1))"
    etcd_hosts+="${etcd_hosts:+,}127.0.0.1:$client"
done
for i in $(seq "$ETCD_MEMBERS"); do
    client=$((ETCD_PORT + 2 * (i - 1)))
    as_pg etcd --name "etcd$i" --data-dir "$HA_DIR/etcd$i" \
        --listen-client-urls "http://127.0.0.1:$client" \
        --advertise-client-urls "http://127.0.0.1:$client" \
        --listen-peer-urls "http://127.0.0.1:$((client + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((client + 1))" \
        --initial-cluster "$etcd_cluster" --initial-cluster-token "keyserver-$ETCD_PORT" \
        >"$HA_DIR/etcd$i.log" 2>&1 &
done

primary_servers= replica_servers=
for n in $(seq "$NODES"); do
    name=pg$n pg=$((PG_PORT + n - 1)) rest=$((REST_PORT + n - 1))
    as_pg mkdir -p "$HA_DIR/$name"
    sed -e "s|@SCOPE@|keyserver|" -e "s|@NAME@|$name|g" -e "s|@REST_PORT@|$rest|g" \
        -e "s|@ETCD_HOSTS@|$etcd_hosts|" -e "s|@TTL@|$TTL|" -e "s|@SYNC_MODE@|$sync_mode|" \
        -e "s|@SYNC_STRICT@|$strict|" -e "s|@MAX_LAG@|$MAX_LAG|" -e "s|@PG_PORT@|$pg|g" -e "s|@DIR@|$HA_DIR|g" \
        -e "s|@PG_BIN@|$PG_BIN|" "$here/patroni.yml.in" >"$HA_DIR/$name.yml"
    primary_servers+="    server $name 127.0.0.1:$pg check port $rest"$'\n'
    replica_servers+="    server $name 127.0.0.1:$pg check port $rest"$'\n'
done
if [ "$(id -u)" = 0 ]; then chown -R postgres: "$HA_DIR"; fi
python3 - "$here/haproxy.cfg.in" "$HA_DIR/haproxy.cfg" "$PRIMARY_PORT" "$REPLICA_PORT" \
    "$primary_servers" "$replica_servers" <<'PY'
import sys
src, dst, primary, replica, ps, rs = sys.argv[1:]
text = open(src).read()
for k, v in (("@PRIMARY_PORT@", primary), ("@REPLICA_PORT@", replica),
             ("@PRIMARY_SERVERS@\n", ps), ("@REPLICA_SERVERS@\n", rs)):
    text = text.replace(k, v)
open(dst, "w").write(text)
PY

# The first node bootstraps the cluster; the others join it as standbys.
for n in $(seq "$NODES"); do
    as_pg patroni "$HA_DIR/pg$n.yml" >"$HA_DIR/pg$n.log" 2>&1 &
    if [ "$n" = 1 ]; then
        for _ in $(seq 120); do
            if curl -sf "http://127.0.0.1:$REST_PORT/primary" >/dev/null; then break; fi
            sleep 0.5
        done
    fi
done
haproxy -f "$HA_DIR/haproxy.cfg" -D -p "$HA_DIR/haproxy.pid"

# Ready when the primary port reaches a writable node and, synchronous, a standby is in sync.
want_standbys=$((NODES - 1))
for i in $(seq 240); do
    ok=$(psql -qAt "postgres://postgres@127.0.0.1:$PRIMARY_PORT/postgres?connect_timeout=2" \
        -c "SELECT NOT pg_is_in_recovery() AND count(*) FILTER (WHERE state = 'streaming'
                   AND ('$SYNC' = 'off' OR sync_state IN ('sync', 'quorum'))) >= LEAST(1, $want_standbys)
            FROM pg_stat_replication" 2>/dev/null || true)
    if [ "$ok" = t ]; then break; fi
    if [ "$i" = 240 ]; then
        echo "up.sh: the cluster did not come up within 120 s; see $HA_DIR/*.log" >&2
        exit 1
    fi
    sleep 0.5
done
psql -qAt "postgres://postgres@127.0.0.1:$PRIMARY_PORT/postgres" \
    -c "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'" | grep -q 1 ||
    psql -q "postgres://postgres@127.0.0.1:$PRIMARY_PORT/postgres" -c "CREATE DATABASE $DATABASE"
echo "primary:  postgres://postgres@127.0.0.1:$PRIMARY_PORT/$DATABASE"
echo "replicas: postgres://postgres@127.0.0.1:$REPLICA_PORT/$DATABASE"
echo "patronictl -c $HA_DIR/pg1.yml list    # members and roles"
