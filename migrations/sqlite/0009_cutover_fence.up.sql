-- A fenced database has handed its keys to another one (`keyserver db cutover`): at most one
-- row, naming where they went. Every key-taking and writing transaction reads it under the
-- write lock and refuses when it is set. Never copied by `db copy`.
CREATE TABLE keyserver_fence (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    moved_to TEXT NOT NULL,
    fenced_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
