-- Aloft store, schema 6: a device's message already waiting in the inbox is found by a lookup,
-- not by a unique index. With schema 5's unique index, a replica's insert of a message that
-- another replica had inserted and not yet committed waited for that commit, and two replicas'
-- batches holding the same messages in different orders deadlocked until PostgreSQL broke the
-- cycle after `deadlock_timeout` (1 s by default): three replicas receiving the same devices'
-- repeated reports wrote 2.5 times slower than one. The index stays, for the lookup. Two
-- replicas inserting the same message at the same moment now both write it; the leader then
-- applies it twice, which changes nothing the second time (a report's sequence number makes
-- the copy a duplicate, which is acknowledged again; an operator's request id is answered from
-- its cache).
DROP INDEX aloft_inbox_once;
CREATE INDEX aloft_inbox_waiting ON aloft_inbox (topic, md5(payload)) WHERE kind = 0;
