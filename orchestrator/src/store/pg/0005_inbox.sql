-- Aloft store, schema 5: the replicas' inbox. Every `aloft serve` replica on this database
-- receives a share of the devices' and operators' messages (MQTT 5 shared subscriptions); it
-- inserts each one here, and the replica holding the leader lease applies them in `id` order,
-- deleting each row in the very transaction that commits what it caused. A row is therefore
-- applied once, by one process, whoever received it; `kind` 0 is a device's message as received
-- (topic and payload), 2 an operator's, 1 a note that a replica began serving chunks to a member
-- (topic: the device, payload: the campaign), made durable before its first chunk leaves.
-- Operators' requests are read first (their own index): a pause must not wait behind a fleet's
-- backlog of reports.
CREATE TABLE aloft_inbox (
    id bigserial PRIMARY KEY,
    kind smallint NOT NULL,
    replica text NOT NULL,
    topic text NOT NULL,
    payload bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX aloft_inbox_operators ON aloft_inbox (id) WHERE kind = 2;
-- A device's message waits here once: a copy of one still waiting (a device sending its report
-- again while the leader is behind, the same report reaching two replicas) is not written. Once
-- applied (deleted), the same message may come in again: a device whose acknowledgement was lost
-- gets one.
CREATE UNIQUE INDEX aloft_inbox_once ON aloft_inbox (topic, md5(payload)) WHERE kind = 0;
