-- A fenced database has handed its keys to another one (`keyserver db cutover`): at most one
-- row, naming where they went. Every key-taking and writing transaction reads it with
-- FOR SHARE first, so the fence (taken under an EXCLUSIVE table lock) waits for those in
-- flight, and every one after it sees the row and refuses. Never copied by `db copy`.
CREATE TABLE keyserver_fence (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    moved_to TEXT NOT NULL,
    fenced_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
