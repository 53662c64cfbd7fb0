-- Adds :expired one-time prekeys per seeded device that were handed out 40 days ago: the backlog
-- `keyserver jobs cleanup` deletes (ids above the 100 live keys seed.sql made).
--   psql "$DATABASE_URL" -v devices=10000 -v expired=100 -f loadtest/pgbench/backlog.sql
\set ON_ERROR_STOP on
INSERT INTO nchat_one_time_prekeys (device_id, prekey_id, prekey_public, prekey_private_encrypted,
                                    is_consumed, consumed_at)
SELECT 'load-' || n, 1000 + k, decode(md5('x' || n || '/' || k) || md5('y' || n || '/' || k), 'hex'),
       decode(repeat('ab', 61), 'hex'), TRUE, NOW() - INTERVAL '40 days' - k * INTERVAL '1 second'
FROM generate_series(0, :devices - 1) AS n, generate_series(1, :expired) AS k
ORDER BY k, n;
VACUUM ANALYZE nchat_one_time_prekeys;
