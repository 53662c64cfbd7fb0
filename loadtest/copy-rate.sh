#!/usr/bin/env bash
# How fast `keyserver db cutover` moves a SQLite store to PostgreSQL, for the downtime a cutover
# needs: fills a fresh SQLite file with KEYS one-time prekeys (100 per device, 10% handed out,
# each device with its identity key and signed prekey; rows written by SQL, not the API, since
# only their size matters here), then times the cutover into a fresh PostgreSQL database. The
# command prints the copy time and the verification time; this prints rows/s.
#   KEYS=1000000 DATABASE_URL=postgres://postgres@127.0.0.1/test loadtest/copy-rate.sh
set -euo pipefail
KEYS=${KEYS:-1000000}
: "${DATABASE_URL:?a PostgreSQL server to copy into (its database is left alone)}"
BIN=${BIN:-target/release/keyserver}
WORK=${WORK:-$(mktemp -d)}
TARGET_DB=${TARGET_DB:-keyserver_copy_rate}
devices=$(( (KEYS + 99) / 100 ))
source_db="$WORK/source.db"
rm -f "$source_db"*

step() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
step "migrating $source_db"
"$BIN" migrate --database-url "sqlite://$source_db" up >/dev/null 2>&1
step "filling it: $devices devices, $KEYS one-time prekeys"
started=$SECONDS
python3 - "$source_db" "$devices" <<'PY'
import sqlite3, sys
db, devices = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db)
c.executescript(f"""
PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;
BEGIN;
CREATE TEMP TABLE n AS WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {devices} - 1) SELECT i FROM n;
CREATE TEMP TABLE k AS WITH RECURSIVE k(j) AS (SELECT 1 UNION ALL SELECT j + 1 FROM k WHERE j < 100) SELECT j FROM k;
INSERT INTO nchat_users (id) SELECT printf('00000000-0000-4000-8000-%012x', i) FROM n;
INSERT INTO nchat_identity_keys (device_id, user_id, identity_key_public, identity_key_private_encrypted, registration_id)
  SELECT 'dev-' || i, printf('00000000-0000-4000-8000-%012x', i), X'05' || randomblob(32), randomblob(61), 1 + i % 16383 FROM n;
INSERT INTO nchat_signed_prekeys (device_id, signed_prekey_id, signed_prekey_public, signed_prekey_private_encrypted, signature)
  SELECT 'dev-' || i, 1, X'05' || randomblob(32), randomblob(61), randomblob(64) FROM n;
INSERT INTO nchat_one_time_prekeys (device_id, prekey_id, prekey_public, prekey_private_encrypted, is_consumed, consumed_at)
  SELECT 'dev-' || i, j, X'05' || randomblob(32), randomblob(61), j <= 10,
         CASE WHEN j <= 10 THEN strftime('%Y-%m-%dT%H:%M:%fZ', 'now') END
  FROM n, k ORDER BY i, j;
COMMIT;
""")
PY
step "filled in $((SECONDS - started)) s: $(du -h "$source_db" | cut -f1)"
psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $TARGET_DB" -c "CREATE DATABASE $TARGET_DB"
target="${DATABASE_URL%/*}/$TARGET_DB"
step "cutover into $TARGET_DB"
started=$(date +%s.%N)
"$BIN" db cutover --from "sqlite://$source_db" --to "$target" 2>/dev/null | grep -E "^(copied|verified|nchat_one_time|copy verified|fenced)"
elapsed=$(echo "$(date +%s.%N) - $started" | bc)
rows=$(psql -qtA "$target" -c "SELECT (SELECT count(*) FROM nchat_one_time_prekeys) + (SELECT count(*) FROM nchat_identity_keys) * 3")
printf 'cutover of %s rows (%s one-time prekeys) took %.1f s: %.0f rows/s, %.0f one-time prekeys/s overall\n' \
  "$rows" "$KEYS" "$elapsed" "$(echo "$rows / $elapsed" | bc -l)" "$(echo "$KEYS / $elapsed" | bc -l)"
