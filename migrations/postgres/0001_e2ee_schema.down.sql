-- Reverses 0001: drops the E2EE schema in reverse dependency order. nchat_users is dropped only
-- when 0001 created it (it carries the keyserver comment); a chat app's own table stays.
DROP MATERIALIZED VIEW IF EXISTS nchat_prekey_bundles;
DROP TABLE IF EXISTS nchat_e2ee_audit_log;
DROP TABLE IF EXISTS nchat_safety_numbers;
DROP TABLE IF EXISTS nchat_signal_sessions;
DROP TABLE IF EXISTS nchat_one_time_prekeys;
DROP TABLE IF EXISTS nchat_signed_prekeys;
DROP TABLE IF EXISTS nchat_identity_keys;
DROP TABLE IF EXISTS nchat_user_master_keys;

DO $$
BEGIN
    IF to_regclass('nchat_users') IS NOT NULL
       AND obj_description('nchat_users'::regclass, 'pg_class') = 'keyserver: minimal users table' THEN
        DROP TABLE nchat_users;
    END IF;
END
$$;
