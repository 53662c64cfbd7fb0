-- Reverses 0003.
ALTER TABLE nchat_signal_sessions DROP COLUMN IF EXISTS version;
