-- Reverses 0001: drops the E2EE schema in reverse dependency order.
DROP VIEW IF EXISTS nchat_prekey_bundles;
DROP TABLE IF EXISTS nchat_e2ee_audit_log;
DROP TABLE IF EXISTS nchat_safety_numbers;
DROP TABLE IF EXISTS nchat_signal_sessions;
DROP TABLE IF EXISTS nchat_one_time_prekeys;
DROP TABLE IF EXISTS nchat_signed_prekeys;
DROP TABLE IF EXISTS nchat_identity_keys;
DROP TABLE IF EXISTS nchat_user_master_keys;
DROP TABLE IF EXISTS nchat_users;
