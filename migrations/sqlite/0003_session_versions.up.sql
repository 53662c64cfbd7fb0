-- Mirrors migrations/postgres/0003: the compare-and-swap version of each session.
ALTER TABLE nchat_signal_sessions ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
