-- Seeds :devices devices with an active signed prekey and 100 one-time prekeys each, as the API
-- would store them (random 32-byte keys; signatures are not checked by the database), named as
-- `loadtest` names them (device n is 'load-n', n from 0). `loadtest --scenario register` seeds
-- the same shape through the API, with real signatures.
--   psql "$DATABASE_URL" -v devices=1000 -f loadtest/pgbench/seed.sql
-- Run on a migrated database (keyserver migrate up); it empties the key tables first.
\set ON_ERROR_STOP on
TRUNCATE nchat_identity_keys, nchat_e2ee_audit_log CASCADE;
CREATE TEMP TABLE seed_devices AS
SELECT n, 'load-' || n AS device_id,
       ('6c6f6164-7465-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid AS user_id
FROM generate_series(0, :devices - 1) AS n;
INSERT INTO nchat_users (id) SELECT user_id FROM seed_devices ON CONFLICT DO NOTHING;
INSERT INTO nchat_identity_keys (device_id, user_id, identity_key_public, identity_key_private_encrypted, registration_id)
SELECT device_id, user_id, decode(md5('i' || n) || md5('j' || n), 'hex'), decode(repeat('ab', 61), 'hex'), 1 + n % 16383
FROM seed_devices;
INSERT INTO nchat_signed_prekeys (device_id, signed_prekey_id, signed_prekey_public, signed_prekey_private_encrypted, signature)
SELECT device_id, 1, decode(md5('s' || n) || md5('t' || n), 'hex'), decode(repeat('ab', 61), 'hex'),
       decode(md5('a' || n) || md5('b' || n) || md5('c' || n) || md5('d' || n), 'hex')
FROM seed_devices;
INSERT INTO nchat_one_time_prekeys (device_id, prekey_id, prekey_public, prekey_private_encrypted)
SELECT device_id, k, decode(md5('o' || n || '/' || k) || md5('p' || n || '/' || k), 'hex'), decode(repeat('ab', 61), 'hex')
FROM seed_devices, generate_series(1, 100) AS k
ORDER BY n, k;
VACUUM ANALYZE nchat_identity_keys, nchat_signed_prekeys, nchat_one_time_prekeys;
