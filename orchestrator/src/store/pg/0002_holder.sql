-- Aloft store, schema 2: the store's holder generation. Every process that takes the store's
-- lock bumps it. A process whose connection was lost and made again finds it one above what
-- it left only if nobody else held the store meanwhile; otherwise what it keeps in memory may
-- be stale, and it must stop rather than write over another holder's work.
CREATE TABLE aloft_store_holder (
    id smallint PRIMARY KEY CHECK (id = 1),
    generation bigint NOT NULL
);
INSERT INTO aloft_store_holder (id, generation) VALUES (1, 0);
