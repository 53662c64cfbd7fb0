-- One single-device bundle fetch: the statement the server runs for a batch of one request of
-- one target (store/bundles/postgres.rs, FETCH_ONE_BUNDLE), for a random device of the seed,
-- its target a one-row CTE as there.
-- Devices are named as `loadtest` names them (loadtest/src/population.rs): device n is 'load-n'
-- of user 6c6f6164-7465-4000-8000-<n in hex>, so pgbench and loadtest can run on the same rows,
-- seeded by either.
-- Devices are served whether or not they have Kyber keys (the server without --require-pqxdh).
-- The fetch carries no idempotency key; the retry window is the server's default (600 s).
-- Run it prepared, as the server does (a named statement that PostgreSQL plans once):
--   pgbench -n -M prepared -f loadtest/pgbench/fetch.sql -D devices=1000 -c 16 -j 2 -T 30 "$DATABASE_URL"
\set d random(0, :devices - 1)
WITH targets AS (
    SELECT 0 AS req, 0 AS ord,
           ('6c6f6164-7465-4000-8000-' || lpad(to_hex(:d::int4), 12, '0'))::uuid AS user_id,
           'load-' || :d::int4 AS device_id,
           FALSE AS pqxdh_only,
           '6c6f6164-7465-4000-8000-ffffffffffff'::uuid AS requester,
           NULL::text AS fetch_key
),
fence AS (
    SELECT moved_to FROM keyserver_fence FOR SHARE
),
matched AS (
    SELECT t.req, t.ord, t.requester, t.fetch_key, ik.device_id, ik.registration_id,
           ik.identity_key_public, sp.signed_prekey_id, sp.signed_prekey_public,
           sp.signature, sp.rotation_date
    FROM targets t
    JOIN nchat_identity_keys ik
      ON ik.user_id = t.user_id AND (t.device_id IS NULL OR ik.device_id = t.device_id)
    JOIN nchat_signed_prekeys sp ON sp.device_id = ik.device_id AND sp.is_active = TRUE
    WHERE NOT EXISTS (SELECT 1 FROM fence)
      AND (NOT t.pqxdh_only OR EXISTS (
        SELECT 1 FROM nchat_kyber_prekeys lr
        WHERE lr.device_id = ik.device_id AND lr.is_last_resort = TRUE
          AND lr.is_active = TRUE))
),
asks AS (
    SELECT DISTINCT req, requester, fetch_key, device_id FROM matched
),
again AS (
    SELECT a.req, g.device_id, g.prekey_id, g.prekey_public
    FROM asks a
    CROSS JOIN LATERAL (
        SELECT o.device_id, o.prekey_id, o.prekey_public
        FROM nchat_one_time_prekeys o
        WHERE o.device_id = a.device_id AND o.fetch_key = a.fetch_key
          AND o.consumed_by = a.requester AND o.is_consumed = TRUE
          AND o.consumed_at > NOW() - make_interval(secs => 600)
        ORDER BY o.id
        LIMIT 1
    ) g
    WHERE a.fetch_key IS NOT NULL
),
kyber_again AS (
    SELECT a.req, g.device_id, g.kyber_prekey_id, g.kyber_prekey_public, g.signature
    FROM asks a
    CROSS JOIN LATERAL (
        SELECT q.device_id, q.kyber_prekey_id, q.kyber_prekey_public, q.signature
        FROM nchat_kyber_prekeys q
        WHERE q.device_id = a.device_id AND q.fetch_key = a.fetch_key
          AND q.consumed_by = a.requester AND q.is_consumed = TRUE
          AND q.consumed_at > NOW() - make_interval(secs => 600)
        ORDER BY q.id
        LIMIT 1
    ) g
    WHERE a.fetch_key IS NOT NULL
),
wants AS (
    SELECT a.req, a.requester, a.fetch_key, a.device_id,
           row_number() OVER (PARTITION BY a.device_id ORDER BY a.req) AS rank
    FROM asks a
    WHERE NOT EXISTS (
              SELECT 1 FROM again g WHERE g.req = a.req AND g.device_id = a.device_id)
      AND NOT EXISTS (
              SELECT 1 FROM kyber_again g
              WHERE g.req = a.req AND g.device_id = a.device_id)
),
demand AS (
    SELECT device_id, count(*) AS n FROM wants GROUP BY device_id
),
picked AS (
    SELECT d.device_id, next.id,
           row_number() OVER (PARTITION BY d.device_id ORDER BY next.id) AS rank
    FROM demand d
    CROSS JOIN LATERAL (
        SELECT o.id FROM nchat_one_time_prekeys o
        WHERE o.device_id = d.device_id AND o.is_consumed = FALSE
        ORDER BY o.id
        LIMIT d.n
        FOR UPDATE SKIP LOCKED
    ) next
),
taken AS (
    UPDATE nchat_one_time_prekeys o
    SET is_consumed = TRUE, consumed_at = NOW(), consumed_by = w.requester,
        fetch_key = w.fetch_key
    FROM picked p
    JOIN wants w ON w.device_id = p.device_id AND w.rank = p.rank
    WHERE o.id = p.id AND o.is_consumed = FALSE
    RETURNING w.req, o.device_id, o.prekey_id, o.prekey_public
),
kyber_picked AS (
    SELECT d.device_id, next.id,
           row_number() OVER (PARTITION BY d.device_id ORDER BY next.id) AS rank
    FROM demand d
    CROSS JOIN LATERAL (
        SELECT q.id FROM nchat_kyber_prekeys q
        WHERE q.device_id = d.device_id AND q.is_last_resort = FALSE
          AND q.is_consumed = FALSE
        ORDER BY q.id
        LIMIT d.n
        FOR UPDATE SKIP LOCKED
    ) next
),
kyber_taken AS (
    UPDATE nchat_kyber_prekeys q
    SET is_consumed = TRUE, consumed_at = NOW(), consumed_by = w.requester,
        fetch_key = w.fetch_key
    FROM kyber_picked p
    JOIN wants w ON w.device_id = p.device_id AND w.rank = p.rank
    WHERE q.id = p.id AND q.is_consumed = FALSE
    RETURNING w.req, q.device_id, q.kyber_prekey_id, q.kyber_prekey_public,
              q.signature
),
served AS (
    SELECT * FROM taken UNION ALL SELECT * FROM again
),
kyber_served AS (
    SELECT * FROM kyber_taken UNION ALL SELECT * FROM kyber_again
)
SELECT m.req, m.ord, m.device_id, COALESCE(m.registration_id, 0) AS registration_id,
       m.identity_key_public, m.signed_prekey_id, m.signed_prekey_public, m.signature,
       m.rotation_date, k.prekey_id, k.prekey_public,
       COALESCE(kt.kyber_prekey_id, lr.kyber_prekey_id) AS kyber_prekey_id,
       COALESCE(kt.kyber_prekey_public, lr.kyber_prekey_public) AS kyber_prekey_public,
       COALESCE(kt.signature, lr.signature) AS kyber_signature,
       kt.device_id IS NOT NULL AS kyber_one_time
FROM matched m
LEFT JOIN served k ON k.req = m.req AND k.device_id = m.device_id
LEFT JOIN kyber_served kt ON kt.req = m.req AND kt.device_id = m.device_id
LEFT JOIN nchat_kyber_prekeys lr
  ON kt.device_id IS NULL AND lr.device_id = m.device_id
 AND lr.is_last_resort = TRUE AND lr.is_active = TRUE
ORDER BY m.req, m.ord, m.device_id;
