-- Aloft store, schema 3: the leader lease. One row: who holds it, its fencing token, and
-- until when, on the database's clock. `store::pg_lease` takes or renews it in one statement
-- (the token goes up only when the holder changes); every commit of a serving process reads
-- the token FOR SHARE in its own transaction and fails if it is no longer the one it holds,
-- so a process that lost the lease (paused, partitioned) commits nothing after the new holder
-- took over. An empty holder with an expiry in the past: nobody holds it yet.
CREATE TABLE aloft_lease (
    id smallint PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL,
    token bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
INSERT INTO aloft_lease (id, holder, token, expires_at) VALUES (1, '', 0, '-infinity');
