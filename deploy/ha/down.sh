#!/usr/bin/env bash
# Stops what deploy/ha/up.sh started under HA_DIR (the same default, target/ha) and removes its
# state; KEEP=1 keeps the data directories and logs.
set -euo pipefail
cd "$(dirname "$0")/../.."
HA_DIR=$(realpath -m "${HA_DIR:-target/ha}")
if [ -f "$HA_DIR/haproxy.pid" ]; then kill "$(cat "$HA_DIR/haproxy.pid")" 2>/dev/null || true; fi
# Patroni stops its PostgreSQL when it is told to stop; then etcd, which Patroni needs until then.
pkill -f "patroni $HA_DIR/pg[0-9]*.yml" || true
for _ in $(seq 60); do
    if ! pgrep -f "patroni $HA_DIR/pg[0-9]*.yml" >/dev/null &&
        ! pgrep -f "postgres -D $HA_DIR/" >/dev/null; then break; fi
    sleep 0.5
done
pkill -9 -f "postgres -D $HA_DIR/" || true
# Wait until etcd and HAProxy are gone, so a stack brought up next on the same ports can bind.
etcd="etcd --name etcd[0-9]* --data-dir $HA_DIR/etcd"
pkill -f "$etcd" || true
for _ in $(seq 40); do
    if ! pgrep -f "$etcd" >/dev/null && ! pgrep -f "haproxy -f $HA_DIR/" >/dev/null; then break; fi
    sleep 0.25
done
pkill -9 -f "$etcd" || true
pkill -9 -f "haproxy -f $HA_DIR/" || true
if [ "${KEEP:-0}" != 1 ]; then rm -rf "$HA_DIR"; fi
