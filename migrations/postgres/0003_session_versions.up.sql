-- Sessions are written compare-and-swap: every write increments `version`, and a writer names
-- the version it replaces, so a stale writer cannot overwrite newer ratchet state.
ALTER TABLE nchat_signal_sessions ADD COLUMN IF NOT EXISTS version INTEGER NOT NULL DEFAULT 1;
