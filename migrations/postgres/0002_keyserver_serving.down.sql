-- Reverses 0002. The design's refresh triggers are not put back: they are what 0002 replaced.
ALTER TABLE nchat_one_time_prekeys RESET (
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_threshold,
    autovacuum_analyze_scale_factor,
    autovacuum_vacuum_cost_delay
);
DROP INDEX IF EXISTS idx_one_time_prekeys_next;
DROP INDEX IF EXISTS idx_signed_prekeys_one_active;
ALTER TABLE nchat_identity_keys DROP COLUMN IF EXISTS registration_id;
