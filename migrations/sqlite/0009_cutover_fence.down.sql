-- Reverses 0009. SQLite has no way to raise from a script; the keyserver refuses to revert
-- past 0009 while a fence is set (migrations.rs), so a fenced database never serves again.
DROP TABLE keyserver_fence;
