//! The replicas' inbox (`aloft_inbox`, schemas 5 and 6): how a message any replica received
//! reaches the one replica that applies it.
//!
//! [`InboxWriter`] (every replica) inserts what its broker link hands it, a group of rows per
//! transaction, and wakes the leader with `NOTIFY`. [`InboxReader`] (the leader) reads the rows
//! in `id` order and hands each to its engine, which deletes it in the commit that applies it
//! (`Store::consume_inbox`). So a row takes effect exactly once whoever received it, and a
//! leader that dies before its commit leaves the row for the next one.
//!
//! Both run on threads of their own with a connection each: rust-postgres's blocking client
//! must not run on a tokio thread, and neither may hold up the link or the engine.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::inbound::{Inbound, InboxRow};
use crate::metrics::Metrics;
use crate::store::pg::{describe_error, parse_url};
use crate::store::StoreError;

/// A device's message as received (topic and payload).
pub const KIND_MESSAGE: i16 = 0;
/// A replica began serving chunks to a member: topic is the device, payload the campaign.
pub const KIND_SERVED: i16 = 1;
/// An operator's request as received: read before devices' messages.
pub const KIND_OPERATOR: i16 = 2;
/// Operators' requests read at once, at most.
const OPERATOR_ROWS_PER_READ: i64 = 64;

/// Where operators' requests are published (`aloft/v1/admin/<operator>/<op>`).
const OPERATOR_PREFIX: &str = "aloft/v1/admin/";

/// Rows waiting for the writer's thread; beyond it the link waits (the broker then holds
/// back what it sends this replica).
const QUEUE: usize = 8192;
/// Most rows in one insert.
const ROWS_PER_INSERT: usize = 512;
/// Most rows the leader has read and not yet seen deleted; beyond it it reads no more. Four
/// of the engine's batches: enough to keep it busy, few enough that leaving them out of each
/// read stays cheap.
const IN_FLIGHT: usize = 1024;
/// Most rows read at once.
const ROWS_PER_READ: i64 = 512;
/// How long the reader sleeps when no `NOTIFY` came: a bound on a lost wake-up.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Waits between attempts while the database is unreachable.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Statement and connect bound of both threads' connections.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What runs once a row is committed.
pub type Committed = Box<dyn FnOnce() + Send>;

/// One row to insert, and what waits for its commit.
struct Item {
    kind: i16,
    topic: String,
    payload: Bytes,
    done: Option<Committed>,
}

/// Inserts what this replica received into the inbox. Clones share one thread.
#[derive(Clone)]
pub struct InboxWriter {
    tx: mpsc::Sender<Item>,
    metrics: Arc<Metrics>,
}

fn connect(config: &postgres::Config, label: &str) -> Result<Client, StoreError> {
    let mut client = config.connect(NoTls).map_err(|e| StoreError::Database {
        db: label.to_owned(),
        error: describe_error(&e),
    })?;
    client
        .batch_execute(&format!(
            "SET statement_timeout = {}",
            STATEMENT_TIMEOUT.as_millis()
        ))
        .map_err(|e| StoreError::Database {
            db: label.to_owned(),
            error: describe_error(&e),
        })?;
    Ok(client)
}

fn config(url: &str, application: &str) -> Result<(postgres::Config, String), StoreError> {
    let mut config = parse_url(url)?;
    config.connect_timeout(STATEMENT_TIMEOUT);
    config.application_name(application);
    let label = crate::store::pg::describe_url(&config);
    Ok((config, label))
}

impl InboxWriter {
    /// Starts the writer's thread on the store's database at `url`; rows are marked with
    /// `replica` (for an operator reading the table).
    pub fn start(url: &str, replica: String, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let (config, label) = config(url, "aloft-inbox-writer")?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let counted = metrics.clone();
        std::thread::Builder::new()
            .name("aloft-inbox-w".into())
            .spawn(move || write_loop(config, label, replica, rx, counted))
            .map_err(|e| StoreError::Database {
                db: url.to_owned(),
                error: format!("cannot start the inbox writer's thread: {e}"),
            })?;
        Ok(InboxWriter { tx, metrics })
    }

    /// Queues a message as received; returns once it is queued (not yet committed: the
    /// device's acknowledgement comes from the leader, after the commit that applies it).
    pub async fn message(&self, topic: String, payload: Bytes) -> bool {
        let kind = if topic.starts_with(OPERATOR_PREFIX) {
            KIND_OPERATOR
        } else {
            KIND_MESSAGE
        };
        let item = Item {
            kind,
            topic,
            payload,
            done: None,
        };
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(item)) => {
                // The database is slow or away: the link waits, and the broker holds back.
                self.metrics.inbox("queue_full", 1);
                self.tx.send(item).await.is_ok()
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Notes, without waiting, that this replica still serves chunks to `device` in
    /// `campaign`: the leader counts it as a sign of life, as it counts a chunk request it
    /// serves itself (a device timeout measures silence). Dropped, and counted, when the queue
    /// is full: the next one is due soon.
    pub fn touch(&self, device: &str, campaign: &str) {
        let item = Item {
            kind: KIND_SERVED,
            topic: device.to_owned(),
            payload: Bytes::copy_from_slice(campaign.as_bytes()),
            done: None,
        };
        if self.tx.try_send(item).is_err() {
            self.metrics.inbox("touch_dropped", 1);
        }
    }

    /// Notes that this replica serves chunks to `device` in `campaign`; `done` runs once the
    /// note is committed (the caller holds the chunks until then: none leaves before the
    /// leader can learn that it was served). `false`, and `done` dropped, if the queue is
    /// full (counted) or the writer stopped: the device asks again.
    pub fn served(&self, device: &str, campaign: &str, done: Committed) -> bool {
        let item = Item {
            kind: KIND_SERVED,
            topic: device.to_owned(),
            payload: Bytes::copy_from_slice(campaign.as_bytes()),
            done: Some(done),
        };
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(_) => {
                self.metrics.inbox("queue_full", 1);
                false
            }
        }
    }
}

fn write_loop(
    config: postgres::Config,
    label: String,
    replica: String,
    mut rx: mpsc::Receiver<Item>,
    metrics: Arc<Metrics>,
) {
    let mut client: Option<Client> = None;
    let mut wait = RETRY_MIN;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < ROWS_PER_INSERT {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        // The batch is kept until it is committed: the database may be away for a while, and
        // meanwhile the queue fills and the link waits.
        loop {
            if client.is_none() {
                match connect(&config, &label) {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        metrics.inbox("write_failed", 1);
                        warn!(error = %e, "connecting to write the replicas' inbox failed; trying again");
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(RETRY_MAX);
                        continue;
                    }
                }
            }
            let Some(c) = client.as_mut() else { continue };
            match insert(c, &replica, &batch) {
                Ok(inserted) => {
                    wait = RETRY_MIN;
                    metrics.inbox("written", inserted);
                    metrics.inbox(
                        "already_waiting",
                        (batch.len() as u64).saturating_sub(inserted),
                    );
                    for item in batch.drain(..) {
                        if let Some(done) = item.done {
                            done();
                        }
                    }
                    break;
                }
                Err(e) => {
                    client = None;
                    metrics.inbox("write_failed", 1);
                    warn!(error = %describe_error(&e), "writing the replicas' inbox failed; trying again");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }
    debug!("inbox writer stops: every sender is gone");
}

/// Inserts a batch in one transaction; returns how many rows were new.
fn insert(client: &mut Client, replica: &str, batch: &[Item]) -> Result<u64, postgres::Error> {
    // A device's message twice in one batch (sent again before the first was written) is
    // written once, where it came first: the statement's lookup sees only rows committed before.
    let mut seen = HashSet::new();
    let rows: Vec<&Item> = batch
        .iter()
        .filter(|i| i.kind != KIND_MESSAGE || seen.insert((i.topic.as_str(), &i.payload[..])))
        .collect();
    let kinds: Vec<i16> = rows.iter().map(|i| i.kind).collect();
    let topics: Vec<&str> = rows.iter().map(|i| i.topic.as_str()).collect();
    let payloads: Vec<&[u8]> = rows.iter().map(|i| &i.payload[..]).collect();
    let mut tx = client.transaction()?;
    // A message in the inbox is not yet acknowledged to anyone: the leader acknowledges it
    // after its own commit, which is synchronous and, the WAL being one sequence, makes this
    // insert durable too. So a batch of messages alone need not wait for the disk (a crash
    // loses only what no one was told of; devices send it again). A `served` note must be on
    // disk before its chunks leave, so a batch that carries one waits.
    if batch.iter().all(|i| i.done.is_none()) {
        tx.batch_execute("SET LOCAL synchronous_commit = off")?;
    }
    // A device's message already waiting is not written again (`aloft_inbox_waiting`). A
    // lookup, not a unique index: an index would make this insert wait for another replica's
    // uncommitted copy, and two replicas' batches deadlock on each other (schema 6). Rows
    // take their ids in the batch's order: a device's messages are applied as they came.
    let inserted = tx.execute(
        "INSERT INTO aloft_inbox (kind, replica, topic, payload) \
         SELECT k, $1, t, p \
         FROM unnest($2::smallint[], $3::text[], $4::bytea[]) WITH ORDINALITY AS u(k, t, p, n) \
         WHERE k <> 0 OR NOT EXISTS (SELECT 1 FROM aloft_inbox w \
             WHERE w.kind = 0 AND w.topic = u.t AND md5(w.payload) = md5(u.p) \
             AND w.payload = u.p) \
         ORDER BY n",
        &[&replica, &kinds, &topics, &payloads],
    )?;
    // Delivered at commit: the leader's reader wakes once the rows are visible.
    tx.batch_execute("NOTIFY aloft_inbox")?;
    tx.commit()?;
    Ok(inserted)
}

/// Reads the inbox for the leader's engine, until stopped or the engine is gone.
pub struct InboxReader {
    stop: Arc<AtomicBool>,
}

impl InboxReader {
    /// Starts the reader's thread: rows go to `engine` as [`Inbound::Inbox`], in `id` order,
    /// each once (a row is read again only if it is still there after the engine saw it,
    /// which it cannot be: the engine's commit deletes it or the process stops).
    pub fn start(
        url: &str,
        engine: mpsc::Sender<Inbound>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let (config, label) = config(url, "aloft-inbox-reader")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("aloft-inbox-r".into())
            .spawn(move || read_loop(config, label, engine, stopped, metrics))
            .map_err(|e| StoreError::Database {
                db: url.to_owned(),
                error: format!("cannot start the inbox reader's thread: {e}"),
            })?;
        Ok(InboxReader { stop })
    }
}

impl Drop for InboxReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn read_loop(
    config: postgres::Config,
    label: String,
    engine: mpsc::Sender<Inbound>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    // Rows handed to the engine and not yet seen deleted. Ids are handed out in order but
    // committed in any order, so the reader never skips ahead by position: it asks for every
    // row it has not handed over.
    let mut in_flight: BTreeSet<i64> = BTreeSet::new();
    let mut client: Option<Client> = None;
    let mut wait = RETRY_MIN;
    while !stop.load(Ordering::Acquire) && !engine.is_closed() {
        let c = match client.as_mut() {
            Some(c) => c,
            None => match connect(&config, &label).and_then(|mut c| {
                match c.batch_execute("LISTEN aloft_inbox") {
                    Ok(()) => Ok(c),
                    Err(e) => Err(StoreError::Database {
                        db: label.clone(),
                        error: describe_error(&e),
                    }),
                }
            }) {
                Ok(c) => client.insert(c),
                Err(e) => {
                    warn!(error = %e, "reading the replicas' inbox failed; trying again");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(RETRY_MAX);
                    continue;
                }
            },
        };
        match read_once(c, &mut in_flight) {
            Ok(rows) => {
                wait = RETRY_MIN;
                let full = rows.len() as i64 >= ROWS_PER_READ;
                metrics.inbox("read", rows.len() as u64);
                for row in rows {
                    if engine.blocking_send(Inbound::Inbox(row)).is_err() {
                        return;
                    }
                }
                if full && in_flight.len() < IN_FLIGHT {
                    continue;
                }
                // Sleeps until a replica's NOTIFY or the poll's bound, whichever comes first.
                let mut notes = c.notifications();
                let _ = notes.timeout_iter(IDLE_POLL).next();
                // Drains what else came, without waiting: a steady stream of NOTIFYs must not
                // keep the reader here.
                while let Ok(Some(_)) = notes.iter().next() {}
            }
            Err(e) => {
                client = None;
                warn!(error = %describe_error(&e), "reading the replicas' inbox failed; trying again");
                std::thread::sleep(wait);
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Forgets the handed-over rows that are gone (their commit happened), then reads the rows
/// not handed over yet, oldest first, as many as the in-flight bound allows.
fn read_once(
    client: &mut Client,
    in_flight: &mut BTreeSet<i64>,
) -> Result<Vec<InboxRow>, postgres::Error> {
    if !in_flight.is_empty() {
        let ids: Vec<i64> = in_flight.iter().copied().collect();
        let present: BTreeSet<i64> = client
            .query("SELECT id FROM aloft_inbox WHERE id = ANY($1)", &[&ids])?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        in_flight.retain(|id| present.contains(id));
    }
    let mut out = Vec::new();
    // Operators first (a few, through their own index), then everything in id order.
    for (sql, limit) in [
        (
            "SELECT id, kind, topic, payload FROM aloft_inbox \
             WHERE kind = 2 AND NOT (id = ANY($1)) ORDER BY id LIMIT $2",
            OPERATOR_ROWS_PER_READ,
        ),
        (
            "SELECT id, kind, topic, payload FROM aloft_inbox WHERE NOT (id = ANY($1)) \
             ORDER BY id LIMIT $2",
            ROWS_PER_READ,
        ),
    ] {
        let room = IN_FLIGHT.saturating_sub(in_flight.len()) as i64;
        if room == 0 {
            break;
        }
        let ids: Vec<i64> = in_flight.iter().copied().collect();
        let rows = client.query(sql, &[&ids, &room.min(limit)])?;
        read_rows(rows, in_flight, &mut out)?;
    }
    Ok(out)
}

/// Rows as [`InboxRow`]s, noted as handed over.
fn read_rows(
    rows: Vec<postgres::Row>,
    in_flight: &mut BTreeSet<i64>,
    out: &mut Vec<InboxRow>,
) -> Result<(), postgres::Error> {
    for r in rows {
        let row = InboxRow {
            id: r.try_get(0)?,
            kind: r.try_get(1)?,
            topic: r.try_get(2)?,
            payload: Bytes::from(r.try_get::<_, Vec<u8>>(3)?),
        };
        in_flight.insert(row.id);
        out.push(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pg_cluster::TempCluster;
    use crate::store::{Store, StoreLocation};

    /// A throwaway PostgreSQL cluster holding a store of the current schema, and its URL.
    async fn inbox_database() -> (TempCluster, String) {
        let cluster = tokio::task::spawn_blocking(TempCluster::start)
            .await
            .unwrap()
            .unwrap();
        let url = cluster.create_database("inbox").unwrap();
        let at = StoreLocation::Postgres(url.clone());
        let key = aloft_vault::MasterKey::generate().unwrap();
        tokio::task::spawn_blocking(move || Store::create_at(&at, key).map(drop))
            .await
            .unwrap()
            .unwrap();
        (cluster, url)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_already_waiting_is_written_once_and_operators_are_read_first() {
        let (cluster, url) = inbox_database().await;
        let metrics = Metrics::new(None, None);
        let writer = InboxWriter::start(&url, "r1".into(), metrics.clone()).unwrap();
        let status = "aloft/v1/d/dev-1/status".to_owned();
        let report = Bytes::from_static(br#"{"seq":1}"#);
        // The same report twice (sent again, or reaching two replicas), then another.
        for payload in [report.clone(), report, Bytes::from_static(br#"{"seq":2}"#)] {
            assert!(writer.message(status.clone(), payload).await);
        }
        assert!(
            writer
                .message("aloft/v1/admin/ops/campaign_pause".into(), Bytes::new())
                .await
        );
        let count = || cluster.psql("inbox", "SELECT count(*)::text FROM aloft_inbox");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count().unwrap() != "3" {
            assert!(std::time::Instant::now() < deadline, "{:?}", count());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The operator's request was written last and is read first.
        let (tx, mut rx) = mpsc::channel(16);
        let _reader = InboxReader::start(&url, tx, metrics).unwrap();
        let mut kinds = Vec::new();
        for _ in 0..3 {
            match rx.recv().await {
                Some(Inbound::Inbox(row)) => kinds.push(row.kind),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(kinds, vec![KIND_OPERATOR, KIND_MESSAGE, KIND_MESSAGE]);
        tokio::task::spawn_blocking(move || drop(cluster))
            .await
            .unwrap();
    }

    /// Schema 6: a replica does not wait for another's uncommitted copy of a message (with a
    /// unique index it did, and two replicas' batches deadlocked), and a copy another replica
    /// committed is not written again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_neither_waits_for_nor_repeats_another_replicas_copy() {
        let (cluster, url) = inbox_database().await;
        let status = "aloft/v1/d/dev-1/status";
        // Another replica's insert of the report, held uncommitted.
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let (inserted_tx, inserted_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let url = url.clone();
            std::thread::spawn(move || {
                let (config, _) = config(&url, "test").unwrap();
                let mut c = config.connect(NoTls).unwrap();
                let mut tx = c.transaction().unwrap();
                tx.execute(
                    "INSERT INTO aloft_inbox (kind, replica, topic, payload) \
                     VALUES (0, 'r2', $1, $2)",
                    &[&status, &&b"{\"seq\":1}"[..]],
                )
                .unwrap();
                inserted_tx.send(()).unwrap();
                let _ = held_rx.recv();
                tx.commit().unwrap();
            })
        };
        tokio::task::spawn_blocking(move || inserted_rx.recv().unwrap())
            .await
            .unwrap();
        let metrics = Metrics::new(None, None);
        let writer = InboxWriter::start(&url, "r1".into(), metrics.clone()).unwrap();
        assert!(
            writer
                .message(status.into(), Bytes::from_static(br#"{"seq":1}"#))
                .await
        );
        let count = |filter: &str| {
            cluster.psql(
                "inbox",
                &format!("SELECT count(*)::text FROM aloft_inbox {filter}"),
            )
        };
        let wait_for = |filter: &str, n: &str| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while count(filter).unwrap() != n {
                assert!(std::time::Instant::now() < deadline, "{:?}", count(filter));
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        // Committed while the other copy is still uncommitted: this writer did not wait.
        wait_for("", "1");
        held_tx.send(()).unwrap();
        holder.join().unwrap();
        wait_for("", "2");
        // Both copies are committed now: the same report again is not written.
        assert!(
            writer
                .message(status.into(), Bytes::from_static(br#"{"seq":1}"#))
                .await
        );
        assert!(
            writer
                .message(status.into(), Bytes::from_static(br#"{"seq":2}"#))
                .await
        );
        // The second report is written after the first was looked at.
        wait_for("WHERE payload = '{\"seq\":2}'", "1");
        assert_eq!(count("").unwrap(), "3");
        tokio::task::spawn_blocking(move || drop(cluster))
            .await
            .unwrap();
    }
}
