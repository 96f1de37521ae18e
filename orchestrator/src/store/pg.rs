//! The PostgreSQL engine (`aloft serve --store postgres://...`): one table per tree with its
//! key parts as explicit columns (`kv::Tree::layout`), text in the "C" collation so rows sort
//! exactly as sled's byte keys do, values as `bytea` (the same bytes sled holds).
//!
//! Design: rust-postgres's blocking client panics when it runs on a tokio runtime thread, and
//! the engine calls the store from one. So a store's connection lives on a thread of its own
//! ([`Pg`] is a handle to it): callers send it what needs the server over a channel and block on
//! the reply, whatever thread they are on. Writes are buffered in the handle (`Overlay`, behind
//! a mutex, in the caller's thread) and reads merge them over the table, so a process sees its
//! own writes at once, as with sled. `flush` sends the buffer as ONE transaction, a few
//! statements per table (`unnest` arrays, `ON CONFLICT DO UPDATE`), and returns only once
//! PostgreSQL has committed it: the group commit. A failed flush (the connection lost, the
//! server down) returns the error and keeps the buffer, so nothing is acknowledged that was not
//! committed and a later flush, on a new connection, may commit it.
//!
//! Who may hold the store ([`Sharing`]): one process alone (an exclusive session advisory lock
//! on the database, as sled's file lock for a directory, and the holder generation), or
//! `aloft serve` replicas side by side (a shared lock, which keeps offline tools such as
//! `aloft backup` off while any replica runs; the leader lease's fence guards every commit
//! instead of the generation). A replica's reading connection never writes and keeps no cache
//! of committed rows, which other processes change. Replicas hand what they receive to the
//! leader through `aloft_inbox` (`replica::inbox`); the leader deletes each row it applied in
//! the commit that applies it ([`Pg::consume_inbox`]).
//! The schema is versioned (`MIGRATIONS`, applied in order in one transaction at open); a
//! database whose schema is newer than this binary knows is refused.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Statement};

use super::kv::{Entry, Part, Scan, Tree};
use super::pg_lease::{Fence, FenceCheck};
use super::StoreError;

/// The schema's versions, in order: (version, name, SQL). Never edit one that has shipped;
/// add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "initial", include_str!("pg/0001_initial.sql")),
    (2, "holder", include_str!("pg/0002_holder.sql")),
    (3, "lease", include_str!("pg/0003_lease.sql")),
    (4, "jobs", include_str!("pg/0004_jobs.sql")),
    (5, "inbox", include_str!("pg/0005_inbox.sql")),
    (6, "inbox_lookup", include_str!("pg/0006_inbox_lookup.sql")),
];

/// The newest schema version this binary knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The session advisory lock that keeps a second process off the store ("aloft" ‖ 1).
const STORE_LOCK: i64 = 0x616c_6f66_7400_0001;

/// Taken for the length of a migration's transaction: replicas starting together migrate one
/// after the other ("aloft" ‖ 2).
const MIGRATE_LOCK: i64 = 0x616c_6f66_7400_0002;

/// How a process shares the store with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Alone: an exclusive lock, and the holder generation checked at every reconnection
    /// (offline tools; `aloft serve` on the embedded broker).
    Exclusive,
    /// One `aloft serve` replica among several: a shared lock and no generation. Only the
    /// holder of the leader lease writes, and its fence refuses a commit once the lease moved.
    Replica,
    /// A replica's reads (chunk service): a shared lock, no writes, no cache of committed rows.
    Reader,
}

/// How long opening waits for the store's lock before it says the store is in use.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Used when the URL sets no `connect_timeout`: an unreachable server is an error, not a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The table and key columns of each tree.
fn table(tree: Tree) -> (&'static str, &'static [&'static str]) {
    match tree {
        Tree::Meta => ("aloft_meta", &["name"]),
        Tree::Devices => ("aloft_devices", &["id"]),
        Tree::Releases => ("aloft_releases", &["artifact"]),
        Tree::Chunks => ("aloft_chunks", &["artifact", "idx"]),
        Tree::Campaigns => ("aloft_campaigns", &["id"]),
        Tree::Progress => ("aloft_progress", &["campaign", "device"]),
        Tree::History => ("aloft_history", &["device", "n"]),
        Tree::Audit => ("aloft_audit", &["seq"]),
        Tree::Jobs => ("aloft_jobs", &["campaign", "device"]),
    }
}

/// One key part as a column value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    Text(String),
    Int(i64),
}

impl Val {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Val::Text(s) => s,
            Val::Int(i) => i,
        }
    }
}

fn sql_type(p: Part) -> &'static str {
    match p {
        Part::Text => "text",
        Part::U32 | Part::U64 => "int8",
    }
}

/// Splits a key into its parts; `complete: false` accepts a prefix of whole parts (a text part
/// that is not the last must end with its NUL).
fn split_key(layout: &[Part], key: &[u8], complete: bool) -> Option<Vec<Val>> {
    let mut vals = Vec::with_capacity(layout.len());
    let mut rest = key;
    for (i, part) in layout.iter().enumerate() {
        if rest.is_empty() && !complete {
            break;
        }
        let last = i + 1 == layout.len();
        match part {
            Part::Text => {
                let (text, after) = if last {
                    (rest, &rest[rest.len()..])
                } else {
                    let nul = rest.iter().position(|b| *b == 0)?;
                    (&rest[..nul], &rest[nul + 1..])
                };
                if text.contains(&0) {
                    return None;
                }
                vals.push(Val::Text(std::str::from_utf8(text).ok()?.to_owned()));
                rest = after;
            }
            Part::U32 => {
                let b: [u8; 4] = rest.get(..4)?.try_into().ok()?;
                vals.push(Val::Int(i64::from(u32::from_be_bytes(b))));
                rest = &rest[4..];
            }
            Part::U64 => {
                let b: [u8; 8] = rest.get(..8)?.try_into().ok()?;
                vals.push(Val::Int(i64::try_from(u64::from_be_bytes(b)).ok()?));
                rest = &rest[8..];
            }
        }
    }
    rest.is_empty().then_some(vals)
}

/// The key bytes of a row's key columns; `None` for a value no key of ours holds (a NUL in
/// a text part, a number out of its part's range), which only a foreign write can leave.
fn join_key(layout: &[Part], row: &postgres::Row) -> Result<Option<Vec<u8>>, postgres::Error> {
    let mut key = Vec::new();
    for (i, part) in layout.iter().enumerate() {
        match part {
            Part::Text => {
                let text = row.try_get::<_, &str>(i)?;
                if text.contains('\0') {
                    return Ok(None);
                }
                key.extend_from_slice(text.as_bytes());
                if i + 1 < layout.len() {
                    key.push(0);
                }
            }
            Part::U32 => match u32::try_from(row.try_get::<_, i64>(i)?) {
                Ok(n) => key.extend_from_slice(&n.to_be_bytes()),
                Err(_) => return Ok(None),
            },
            Part::U64 => match u64::try_from(row.try_get::<_, i64>(i)?) {
                Ok(n) => key.extend_from_slice(&n.to_be_bytes()),
                Err(_) => return Ok(None),
            },
        }
    }
    Ok(Some(key))
}

/// Rows at most per statement of a flush, and bytes of values at most: a large flush (a
/// restore) becomes several statements of one transaction, each well inside PostgreSQL's
/// 1 GiB message limit.
const ROWS_PER_STATEMENT: usize = 4096;
const BYTES_PER_STATEMENT: usize = 64 * 1024 * 1024;

fn bad_key(tree: Tree, key: &[u8]) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source: serde::de::Error::custom(format!(
            "not a key of the {} table (parts {:?})",
            tree.name(),
            tree.layout()
        )),
    }
}

/// PostgreSQL's own words for an error: the server's message (with its detail) when there is
/// one, else the client's (connection refused, closed, timed out).
pub(crate) fn describe_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!(" ({d})"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

/// Where a database is, for messages: hosts, ports, database and user, never the password.
pub fn describe_url(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "postgres://{}@{}:{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        ports.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// Parses a `postgres://` URL (or a `key=value` connection string).
pub fn parse_url(url: &str) -> Result<postgres::Config, StoreError> {
    url.parse::<postgres::Config>()
        .map_err(|e| StoreError::BadLocation(format!("not a PostgreSQL URL: {e}")))
}

/// A request to the connection's thread: only what needs the server.
enum Request {
    /// One committed row.
    Get {
        tree: Tree,
        cols: Vec<Val>,
        reply: mpsc::SyncSender<Result<Option<Vec<u8>>, StoreError>>,
    },
    /// The committed rows of a range, at most `want`.
    Rows {
        tree: Tree,
        scan: Scan,
        want: usize,
        reply: mpsc::SyncSender<Result<Vec<Entry>, StoreError>>,
    },
    /// One transaction of these statements, deleting these inbox rows.
    Commit {
        batches: Vec<Batch>,
        inbox_done: Vec<i64>,
        reply: mpsc::SyncSender<Result<(), StoreError>>,
    },
}

/// One tree's share of a commit.
struct Batch {
    tree: Tree,
    /// Empty the table first.
    cleared: bool,
    upserts: Vec<Columns>,
    removes: Vec<Columns>,
}

/// A handle to a store's PostgreSQL connection thread. Clones share it; dropping the last one
/// closes the connection (and so releases the store's lock) before it returns.
#[derive(Clone)]
pub(crate) struct Pg {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    /// The database, for messages.
    label: String,
    /// Writes since the last commit and what is known of committed rows, used by callers on
    /// their own threads: a write, or a read the overlay answers, costs no hop to the
    /// connection's thread. A flush holds it until its commit returns.
    overlay: Mutex<Overlay>,
    /// How many connections the connection's thread has made: what [`Committed`] knows is
    /// dropped when it changes (the lock, and so the right to trust it, was lost meanwhile).
    connections: Arc<AtomicU64>,
    /// The leader lease's token every commit checks, once `aloft serve` holds the lease.
    fence: Arc<Fence>,
    sharing: Sharing,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; joining waits until its client (and so
        // the advisory lock) is gone, so the store can be opened again at once.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes not yet committed, and the committed rows every transition reads.
#[derive(Default)]
struct Overlay {
    /// Writes since the last successful flush, per tree: `None` removes the key.
    pending: [BTreeMap<Vec<u8>, Option<Vec<u8>>>; Tree::ALL.len()],
    /// Trees cleared since the last successful flush (their table is emptied first).
    cleared: [bool; Tree::ALL.len()],
    /// Inbox rows applied since the last successful flush, deleted in its transaction.
    inbox_done: Vec<i64>,
    committed: Committed,
    /// The connection count `committed` belongs to.
    connection: u64,
    /// Bumped by every commit and every reconnection: a row read from the server is kept in
    /// `committed` only if no commit came between the read's start and its end.
    epoch: u64,
}

impl Overlay {
    fn is_empty(&self) -> bool {
        self.pending.iter().all(BTreeMap::is_empty)
            && !self.cleared.contains(&true)
            && self.inbox_done.is_empty()
    }
}

impl Pg {
    /// Connects, takes the store's lock as `sharing` says and brings the schema up to
    /// [`SCHEMA_VERSION`].
    pub(crate) fn open(url: &str, sharing: Sharing) -> Result<Self, StoreError> {
        let mut config = parse_url(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("aloft");
        }
        let label = describe_url(&config);
        let connections = Arc::new(AtomicU64::new(0));
        let fence = Arc::new(Fence::default());
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let mut worker = Worker {
            config,
            label: label.clone(),
            client: None,
            statements: HashMap::new(),
            connections: connections.clone(),
            generation: None,
            fence: fence.clone(),
            sharing,
        };
        let thread = std::thread::Builder::new()
            .name("aloft-store-pg".into())
            .spawn(move || {
                let opened = worker
                    .client()
                    .map(|_| ())
                    .and_then(|()| worker.migrate())
                    .and_then(|()| worker.claim());
                let ok = opened.is_ok();
                let _ = ready_tx.send(opened);
                if ok {
                    worker.run(rx);
                }
            })
            .map_err(|e| StoreError::Database {
                db: label.clone(),
                error: format!("cannot start the store's thread: {e}"),
            })?;
        let inner = Inner {
            tx: Some(tx),
            thread: Some(thread),
            label: label.clone(),
            overlay: Mutex::default(),
            connections,
            fence,
            sharing,
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Pg {
                inner: Arc::new(inner),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Database {
                db: label,
                error: "the store's thread stopped".into(),
            }),
        }
    }

    /// The database, for messages (no password).
    pub(crate) fn label(&self) -> &str {
        &self.inner.label
    }

    /// The fence every commit of this store checks (see `pg_lease`).
    pub(crate) fn fence(&self) -> Arc<Fence> {
        self.inner.fence.clone()
    }

    /// The overlay, with what it knows of committed rows dropped if the connection changed.
    fn overlay(&self) -> MutexGuard<'_, Overlay> {
        // A panic while it was held cannot leave it half-written in a way a read could trip
        // on (each change is one map operation), so a poisoned lock is taken as it is.
        let mut o = self
            .inner
            .overlay
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let connections = self.inner.connections.load(Ordering::Acquire);
        if o.connection != connections {
            o.committed.clear();
            o.connection = connections;
            o.epoch += 1;
        }
        o
    }

    fn stopped(&self) -> StoreError {
        StoreError::Database {
            db: self.inner.label.clone(),
            error: "the store's connection thread has stopped".into(),
        }
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(mpsc::SyncSender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        let (reply, rx) = mpsc::sync_channel(1);
        let tx = self.inner.tx.as_ref().ok_or_else(|| self.stopped())?;
        tx.send(make(reply)).map_err(|_| self.stopped())?;
        rx.recv().map_err(|_| self.stopped())?
    }

    pub(crate) fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let cols = split_key(tree.layout(), key, true).ok_or_else(|| bad_key(tree, key))?;
        let epoch = {
            let o = self.overlay();
            if let Some(v) = o.pending[tree.index()].get(key) {
                return Ok(v.clone());
            }
            if o.cleared[tree.index()] {
                return Ok(None);
            }
            if tree == Tree::Progress && self.caches() {
                if let Some(v) = o.committed.progress.get(key) {
                    return Ok(v.clone());
                }
            }
            o.epoch
        };
        let found = self.ask(|reply| Request::Get { tree, cols, reply })?;
        if tree == Tree::Progress && self.caches() {
            let mut o = self.overlay();
            if o.epoch == epoch {
                o.committed.note_progress(key.to_vec(), found.clone());
            }
        }
        Ok(found)
    }

    /// Whether committed rows may be remembered: not by a reader, whose rows others write.
    fn caches(&self) -> bool {
        self.inner.sharing != Sharing::Reader
    }

    fn read_only(&self) -> StoreError {
        StoreError::Database {
            db: self.inner.label.clone(),
            error: "a replica's reading connection does not write".into(),
        }
    }

    /// Notes that inbox row `id` was applied: the next flush deletes it in the transaction
    /// that makes what it caused durable, so each row takes effect exactly once.
    pub(crate) fn consume_inbox(&self, id: i64) -> Result<(), StoreError> {
        if !self.caches() {
            return Err(self.read_only());
        }
        self.overlay().inbox_done.push(id);
        Ok(())
    }

    /// Buffers a write (`None`: a removal) until the next flush. The key is checked here, so
    /// a bad one fails its caller, not a later flush.
    pub(crate) fn write(
        &self,
        tree: Tree,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        if !self.caches() {
            return Err(self.read_only());
        }
        if split_key(tree.layout(), &key, true).is_none() {
            return Err(bad_key(tree, &key));
        }
        self.overlay().pending[tree.index()].insert(key, value);
        Ok(())
    }

    pub(crate) fn clear(&self, tree: Tree) -> Result<(), StoreError> {
        if !self.caches() {
            return Err(self.read_only());
        }
        let mut o = self.overlay();
        o.pending[tree.index()].clear();
        o.cleared[tree.index()] = true;
        Ok(())
    }

    fn rows(&self, tree: Tree, scan: &Scan, want: usize) -> Result<Vec<Entry>, StoreError> {
        let scan = scan.clone();
        self.ask(|reply| Request::Rows {
            tree,
            scan,
            want,
            reply,
        })
    }

    pub(crate) fn scan(&self, tree: Tree, scan: &Scan) -> Result<Vec<Entry>, StoreError> {
        let newest_key_only = tree == Tree::History
            && scan.rev
            && scan.limit == 1
            && !scan.values
            && scan.from == Bound::Unbounded
            && !scan.prefix.is_empty();
        let (pending, cleared, known_newest, epoch) = {
            let o = self.overlay();
            let pending: Vec<(Vec<u8>, Option<Vec<u8>>)> = o.pending[tree.index()]
                .range(scan.bounds())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let known = if newest_key_only {
                o.committed.newest_history.get(&scan.prefix).cloned()
            } else {
                None
            };
            (pending, o.cleared[tree.index()], known, o.epoch)
        };
        let mut rows: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        if newest_key_only && !cleared {
            // A transition's look-up of the device's newest history key.
            let newest = match known_newest {
                Some(n) => n,
                None => {
                    let n = self.rows(tree, scan, 1)?.pop().map(|(k, _)| k);
                    let mut o = self.overlay();
                    if o.epoch == epoch {
                        o.committed
                            .note_newest_history(scan.prefix.clone(), n.clone());
                    }
                    n
                }
            };
            let removed = |k: &Vec<u8>| pending.iter().any(|(p, v)| p == k && v.is_none());
            match newest {
                // Removed but not yet committed: the next newest is needed, from the table.
                Some(k) if removed(&k) => rows.extend(self.rows(tree, scan, 1 + pending.len())?),
                Some(k) => {
                    rows.insert(k, Vec::new());
                }
                None => {}
            }
        } else if !cleared && scan.limit > 0 {
            // Pending writes may replace or remove as many rows as they number.
            let want = scan.limit.saturating_add(pending.len());
            let found = self.rows(tree, scan, want)?;
            if tree == Tree::Progress && scan.values && scan.limit == usize::MAX {
                let mut o = self.overlay();
                if o.epoch == epoch {
                    for (k, v) in &found {
                        o.committed.note_progress(k.clone(), Some(v.clone()));
                    }
                }
            }
            rows.extend(found);
        }
        for (k, v) in pending {
            match v {
                Some(v) => {
                    let v = if scan.values { v } else { Vec::new() };
                    rows.insert(k, v);
                }
                None => {
                    rows.remove(&k);
                }
            }
        }
        let rows = rows.into_iter();
        Ok(if scan.rev {
            rows.rev().take(scan.limit).collect()
        } else {
            rows.take(scan.limit).collect()
        })
    }

    /// Commits every pending write in one transaction; on success the buffer is empty, on an
    /// error it is kept whole for the next flush.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        // Held until the commit returns: no write or read slips between the commit and the
        // buffer's clearing (the connection's thread never takes it).
        let mut o = self.overlay();
        if o.is_empty() {
            return Ok(());
        }
        let mut batches = Vec::new();
        for tree in Tree::ALL {
            let pending = &o.pending[tree.index()];
            let cleared = o.cleared[tree.index()];
            if pending.is_empty() && !cleared {
                continue;
            }
            let layout = tree.layout();
            let mut upserts = vec![Columns::new(layout)];
            let mut removes = vec![Columns::new(layout)];
            for (k, v) in pending {
                let vals = split_key(layout, k, true).ok_or_else(|| bad_key(tree, k))?;
                let (group, value) = match v {
                    Some(v) => (&mut upserts, Some(v.clone())),
                    None => (&mut removes, None),
                };
                if group.last().is_some_and(Columns::full) {
                    group.push(Columns::new(layout));
                }
                if let Some(columns) = group.last_mut() {
                    columns.push(vals, value);
                }
            }
            batches.push(Batch {
                tree,
                cleared,
                upserts,
                removes,
            });
        }
        let inbox_done = o.inbox_done.clone();
        self.ask(|reply| Request::Commit {
            batches,
            inbox_done,
            reply,
        })?;
        let o = &mut *o;
        o.inbox_done.clear();
        if o.cleared[Tree::Progress.index()] || o.cleared[Tree::History.index()] {
            o.committed.clear();
        }
        for (k, v) in std::mem::take(&mut o.pending[Tree::Progress.index()]) {
            o.committed.note_progress(k, v);
        }
        for (k, v) in &o.pending[Tree::History.index()] {
            o.committed.history_written(k, v.is_some());
        }
        for p in &mut o.pending {
            p.clear();
        }
        o.cleared = [false; Tree::ALL.len()];
        o.epoch += 1;
        Ok(())
    }
}

/// The connection thread's state.
struct Worker {
    config: postgres::Config,
    label: String,
    /// `None` until connected, and again after the connection was lost.
    client: Option<Client>,
    /// Prepared statements of the current connection, by SQL.
    statements: HashMap<String, Statement>,
    /// Bumped at each new connection (see [`Inner::connections`]).
    connections: Arc<AtomicU64>,
    /// The holder generation this process set when it last took the store's lock
    /// (`aloft_store_holder`); `None` until the schema has it.
    generation: Option<i64>,
    /// The leader lease's token commits must still find (shared with the handle).
    fence: Arc<Fence>,
    sharing: Sharing,
}

/// Bumps the store's holder generation (`aloft_store_holder`) on a connection that holds the
/// store's lock, and returns it.
fn bump_generation(client: &mut Client) -> Result<i64, postgres::Error> {
    client
        .query_one(
            "UPDATE aloft_store_holder SET generation = generation + 1 WHERE id = 1 \
             RETURNING generation",
            &[],
        )?
        .try_get(0)
}

/// Most rows [`Committed`] keeps per map before it starts again empty.
const COMMITTED_CAP: usize = 1 << 18;

/// What this process knows of the committed rows that every transition reads
/// (`Store::put_progress` reads the record it replaces and the device's newest history key),
/// so that a transition costs no round trip. Sound because this process holds the store's
/// lock, so nobody else writes; emptied when a connection is made again (the lock was lost
/// meanwhile), and when a map reaches [`COMMITTED_CAP`].
#[derive(Default)]
struct Committed {
    /// Progress rows by key (`None`: known to be absent).
    progress: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Per device (the history key's prefix: the id and its NUL), its newest history key.
    newest_history: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Committed {
    fn clear(&mut self) {
        self.progress.clear();
        self.newest_history.clear();
    }

    fn note_progress(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        if self.progress.len() >= COMMITTED_CAP && !self.progress.contains_key(&key) {
            self.progress.clear();
        }
        self.progress.insert(key, value);
    }

    fn note_newest_history(&mut self, prefix: Vec<u8>, newest: Option<Vec<u8>>) {
        if self.newest_history.len() >= COMMITTED_CAP {
            self.newest_history.clear();
        }
        self.newest_history.insert(prefix, newest);
    }

    /// A history write has committed: the newest key of its device moves up, or is no longer
    /// known if it was removed.
    fn history_written(&mut self, key: &[u8], inserted: bool) {
        let Some(nul) = key.iter().position(|b| *b == 0) else {
            return;
        };
        let Some(newest) = self.newest_history.get_mut(&key[..=nul]) else {
            return;
        };
        if inserted {
            if newest.as_deref().is_none_or(|n| key > n) {
                *newest = Some(key.to_vec());
            }
        } else if newest.as_deref() == Some(key) {
            self.newest_history.remove(&key[..=nul]);
        }
    }
}

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(r) = rx.recv() {
            match r {
                Request::Get { tree, cols, reply } => {
                    let _ = reply.send(self.get(tree, &cols));
                }
                Request::Rows {
                    tree,
                    scan,
                    want,
                    reply,
                } => {
                    let _ = reply.send(self.db_rows(tree, &scan, want));
                }
                Request::Commit {
                    batches,
                    inbox_done,
                    reply,
                } => {
                    let _ = reply.send(self.commit(&batches, &inbox_done));
                }
            }
        }
    }

    fn db_error(&self, e: &postgres::Error) -> StoreError {
        StoreError::Database {
            db: self.label.clone(),
            error: describe_error(e),
        }
    }

    /// The connection, made (again) if there is none or it was lost; a new one takes the
    /// store's lock first.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            self.statements.clear();
            let mut client = self.config.connect(NoTls).map_err(|e| self.db_error(&e))?;
            // Waits a moment for the lock: a process that was just killed holds it until its
            // server backend has noticed the closed socket. The lock is the session's, and
            // outlives the transaction that bounds the wait.
            let locked = client.transaction().and_then(|mut tx| {
                tx.batch_execute(&format!(
                    "SET LOCAL lock_timeout = '{}ms'",
                    LOCK_WAIT.as_millis()
                ))?;
                let lock = match self.sharing {
                    Sharing::Exclusive => "SELECT pg_advisory_lock($1)",
                    Sharing::Replica | Sharing::Reader => "SELECT pg_advisory_lock_shared($1)",
                };
                tx.execute(lock, &[&STORE_LOCK])?;
                tx.commit()
            });
            match locked {
                Ok(()) => {}
                Err(e) if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                    return Err(StoreError::DatabaseInUse(self.label.clone()));
                }
                Err(e) => return Err(self.db_error(&e)),
            }
            if let Some(mine) = self.generation {
                // The lock was lost with the connection: anyone may have held the store
                // meanwhile. Only if nobody did may this process go on from what it knows.
                // On any return here the new connection drops, giving the lock back.
                let now = bump_generation(&mut client).map_err(|e| self.db_error(&e))?;
                if now != mine + 1 {
                    return Err(StoreError::DatabaseTakenOver {
                        db: self.label.clone(),
                        mine,
                        now,
                    });
                }
                self.generation = Some(now);
            }
            self.client = Some(client);
            self.connections.fetch_add(1, Ordering::Release);
        }
        self.client.as_mut().ok_or_else(|| StoreError::Database {
            db: self.label.clone(),
            error: "not connected".into(),
        })
    }

    /// Runs `f` on the connection; any error drops it, so the next request connects again.
    fn with_client<T>(
        &mut self,
        f: impl FnOnce(&mut Client, &mut HashMap<String, Statement>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        self.client()?;
        let (Some(client), statements) = (self.client.as_mut(), &mut self.statements) else {
            return Err(StoreError::Database {
                db: self.label.clone(),
                error: "not connected".into(),
            });
        };
        let result = f(client, statements);
        if result.is_err() {
            // Whatever failed (a lost server may first answer with a FATAL error on a client
            // that does not yet know it is closed), the next request starts on a new
            // connection rather than on one in an unknown state; reconnecting re-takes the
            // lock. Nothing pending is lost: the buffer is cleared only by a commit.
            self.client = None;
        }
        result.map_err(|e| self.db_error(&e))
    }

    /// At open, once the schema is current: this process becomes the store's holder (alone;
    /// replicas share it under the lease).
    fn claim(&mut self) -> Result<(), StoreError> {
        if self.sharing != Sharing::Exclusive {
            return Ok(());
        }
        self.generation = Some(self.with_client(|client, _| bump_generation(client))?);
        Ok(())
    }

    /// Applies the migrations this database lacks, in order, in one transaction.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let label = self.label.clone();
        let found = self.with_client(|client, _| {
            let mut tx = client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS aloft_schema_migrations (
                     version integer PRIMARY KEY,
                     name text NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now())",
            )?;
            let found: i32 = tx
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM aloft_schema_migrations",
                    &[],
                )?
                .try_get(0)?;
            if found > SCHEMA_VERSION {
                return Ok(found);
            }
            for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
                tx.batch_execute(sql)?;
                tx.execute(
                    "INSERT INTO aloft_schema_migrations (version, name) VALUES ($1, $2)",
                    &[version, name],
                )?;
            }
            tx.commit()?;
            Ok(found)
        })?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                db: label,
                found,
                known: SCHEMA_VERSION,
            });
        }
        Ok(())
    }

    fn get(&mut self, tree: Tree, cols: &[Val]) -> Result<Option<Vec<u8>>, StoreError> {
        let (name, columns) = table(tree);
        let filter: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = ${}", i + 1))
            .collect();
        let sql = format!("SELECT v FROM {name} WHERE {}", filter.join(" AND "));
        let params: Vec<&(dyn ToSql + Sync)> = cols.iter().map(Val::sql).collect();
        self.with_client(|client, statements| {
            let stmt = prepared(client, statements, &sql)?;
            match client.query_opt(&stmt, &params)? {
                Some(row) => Ok(Some(row.try_get::<_, Vec<u8>>(0)?)),
                None => Ok(None),
            }
        })
    }

    /// The committed rows of `scan`'s range, at most `want` (pending writes aside).
    fn db_rows(&mut self, tree: Tree, scan: &Scan, want: usize) -> Result<Vec<Entry>, StoreError> {
        let layout = tree.layout();
        let (name, columns) = table(tree);
        let prefix =
            split_key(layout, &scan.prefix, false).ok_or_else(|| bad_key(tree, &scan.prefix))?;
        let mut params: Vec<Val> = Vec::new();
        let mut filter: Vec<String> = Vec::new();
        for (c, v) in columns.iter().zip(prefix) {
            params.push(v);
            filter.push(format!("{c} = ${}", params.len()));
        }
        let from = match &scan.from {
            Bound::Included(k) => Some((k, ">=")),
            Bound::Excluded(k) => Some((k, ">")),
            Bound::Unbounded => None,
        };
        if let Some((k, op)) = from {
            let vals = split_key(layout, k, true).ok_or_else(|| bad_key(tree, k))?;
            let mut places = Vec::new();
            for v in vals {
                params.push(v);
                places.push(format!("${}", params.len()));
            }
            filter.push(format!(
                "({}) {op} ({})",
                columns.join(", "),
                places.join(", ")
            ));
        }
        let order: Vec<String> = columns
            .iter()
            .map(|c| format!("{c}{}", if scan.rev { " DESC" } else { "" }))
            .collect();
        let mut sql = format!(
            "SELECT {}, {} FROM {name}",
            columns.join(", "),
            if scan.values { "v" } else { "''::bytea" }
        );
        if !filter.is_empty() {
            sql.push_str(&format!(" WHERE {}", filter.join(" AND ")));
        }
        sql.push_str(&format!(" ORDER BY {}", order.join(", ")));
        // A parameter, not a literal: one prepared statement per shape, whatever the limit.
        if let Ok(n) = i64::try_from(want) {
            params.push(Val::Int(n));
            sql.push_str(&format!(" LIMIT ${}", params.len()));
        }
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(Val::sql).collect();
        let found = self.with_client(|client, statements| {
            let stmt = prepared(client, statements, &sql)?;
            let mut out = Vec::new();
            for row in client.query(&stmt, &params)? {
                let key = join_key(layout, &row)?;
                let v: Vec<u8> = row.try_get(columns.len())?;
                out.push((key, v));
            }
            Ok(out)
        })?;
        found
            .into_iter()
            .map(|(k, v)| match k {
                Some(k) => Ok((k, v)),
                None => Err(StoreError::Corrupt {
                    key: format!("a row of {name}"),
                    source: serde::de::Error::custom("key columns no key of this store can hold"),
                }),
            })
            .collect()
    }

    /// Runs one commit's statements in one transaction. Once the process holds the leader
    /// lease, the transaction first reads the lease's token FOR SHARE (a takeover's update
    /// waits until this commit ends, and a commit after a takeover sees the new token) and
    /// commits nothing if it is not this process's.
    fn commit(&mut self, batches: &[Batch], inbox_done: &[i64]) -> Result<(), StoreError> {
        let mine = match self.fence.check() {
            FenceCheck::Off => None,
            FenceCheck::Token(t) => Some(t),
            FenceCheck::Lost => {
                return Err(StoreError::LeaseLost {
                    db: self.label.clone(),
                    mine: None,
                    now: None,
                })
            }
        };
        let fenced = self.with_client(|client, statements| {
            let mut tx = client.transaction()?;
            if let Some(mine) = mine {
                let now: i64 = tx
                    .query_one(
                        "SELECT token FROM aloft_lease WHERE id = 1 FOR SHARE",
                        &[],
                    )?
                    .try_get(0)?;
                if now != mine {
                    // Dropping the transaction rolls it back.
                    return Ok(Some(now));
                }
            }
            for Batch {
                tree,
                cleared,
                upserts,
                removes,
            } in batches
            {
                let (name, columns) = table(*tree);
                let layout = tree.layout();
                let types: Vec<String> = layout
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!("${}::{}[]", i + 1, sql_type(*p)))
                    .collect();
                if *cleared {
                    tx.execute(&format!("DELETE FROM {name}"), &[])?;
                }
                for remove in removes.iter().filter(|r| !r.is_empty() && !*cleared) {
                    let sql = format!(
                        "DELETE FROM {name} WHERE ({}) IN (SELECT * FROM unnest({}))",
                        columns.join(", "),
                        types.join(", ")
                    );
                    let stmt = prepared(&mut tx, statements, &sql)?;
                    tx.execute(&stmt, &remove.params())?;
                }
                for upsert in upserts.iter().filter(|u| !u.is_empty()) {
                    let sql = format!(
                        "INSERT INTO {name} ({cols}, v) SELECT * FROM unnest({types}, ${n}::bytea[]) \
                         ON CONFLICT ({cols}) DO UPDATE SET v = EXCLUDED.v",
                        cols = columns.join(", "),
                        types = types.join(", "),
                        n = layout.len() + 1,
                    );
                    let stmt = prepared(&mut tx, statements, &sql)?;
                    tx.execute(&stmt, &upsert.params())?;
                }
            }
            if !inbox_done.is_empty() {
                let stmt = prepared(
                    &mut tx,
                    statements,
                    "DELETE FROM aloft_inbox WHERE id = ANY($1)",
                )?;
                tx.execute(&stmt, &[&inbox_done])?;
            }
            tx.commit()?;
            Ok(None)
        })?;
        match (fenced, mine) {
            (Some(now), Some(mine)) => {
                self.fence.lose();
                Err(StoreError::LeaseLost {
                    db: self.label.clone(),
                    mine: Some(mine),
                    now: Some(now),
                })
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The server drops a closed connection's locks only once its backend notices the
        // close; unlocking first makes the store free the moment the handle's drop returns.
        if let Some(client) = self.client.as_mut() {
            let _ = client.execute("SELECT pg_advisory_unlock_all()", &[]);
        }
    }
}

/// A statement prepared once per connection.
fn prepared(
    client: &mut impl GenericClient,
    statements: &mut HashMap<String, Statement>,
    sql: &str,
) -> Result<Statement, postgres::Error> {
    if let Some(s) = statements.get(sql) {
        return Ok(s.clone());
    }
    let s = client.prepare(sql)?;
    statements.insert(sql.to_owned(), s.clone());
    Ok(s)
}

/// Rows as column arrays, for `unnest`.
struct Columns {
    text: Vec<Vec<String>>,
    ints: Vec<Vec<i64>>,
    /// Which array each key part goes to: (is text, index in `text` or `ints`).
    slots: Vec<(bool, usize)>,
    values: Vec<Vec<u8>>,
    len: usize,
    /// Bytes of `values`.
    bytes: usize,
}

impl Columns {
    fn new(layout: &[Part]) -> Self {
        let mut slots = Vec::new();
        let (mut t, mut i) = (0, 0);
        for p in layout {
            if *p == Part::Text {
                slots.push((true, t));
                t += 1;
            } else {
                slots.push((false, i));
                i += 1;
            }
        }
        Columns {
            text: vec![Vec::new(); t],
            ints: vec![Vec::new(); i],
            slots,
            values: Vec::new(),
            len: 0,
            bytes: 0,
        }
    }

    fn push(&mut self, vals: Vec<Val>, value: Option<Vec<u8>>) {
        for (v, (_, slot)) in vals.into_iter().zip(self.slots.clone()) {
            match v {
                Val::Text(s) => self.text[slot].push(s),
                Val::Int(n) => self.ints[slot].push(n),
            }
        }
        if let Some(v) = value {
            self.bytes += v.len();
            self.values.push(v);
        }
        self.len += 1;
    }

    /// Whether one more row belongs in the next statement.
    fn full(&self) -> bool {
        self.len >= ROWS_PER_STATEMENT || self.bytes >= BYTES_PER_STATEMENT
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key arrays in key order, then the values if any.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut out: Vec<&(dyn ToSql + Sync)> = self
            .slots
            .iter()
            .map(|(text, slot)| -> &(dyn ToSql + Sync) {
                if *text {
                    &self.text[*slot]
                } else {
                    &self.ints[*slot]
                }
            })
            .collect();
        if !self.values.is_empty() {
            out.push(&self.values);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_their_columns_and_back() {
        let layout = Tree::Progress.layout();
        assert_eq!(
            split_key(layout, b"c-1\0dev-1", true),
            Some(vec![Val::Text("c-1".into()), Val::Text("dev-1".into())])
        );
        assert_eq!(
            split_key(layout, b"c-1\0", false),
            Some(vec![Val::Text("c-1".into())])
        );
        assert_eq!(split_key(layout, b"c-1", false), None);
        assert_eq!(split_key(layout, b"", false), Some(vec![]));
        let mut chunk = b"fw\0".to_vec();
        chunk.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            split_key(Tree::Chunks.layout(), &chunk, true),
            Some(vec![Val::Text("fw".into()), Val::Int(7)])
        );
        assert_eq!(
            split_key(Tree::Audit.layout(), &u64::MAX.to_be_bytes(), true),
            None
        );
        assert_eq!(split_key(Tree::Audit.layout(), b"short", true), None);
    }

    #[test]
    fn a_url_is_described_without_its_password() {
        let c = parse_url("postgres://aloft:s3cret@db.example:5433/fleet").unwrap();
        let d = describe_url(&c);
        assert_eq!(d, "postgres://aloft@db.example:5433/fleet");
        assert!(!d.contains("s3cret"));
        // A Unix socket directory, percent-encoded, as deploy/aloft.toml shows it.
        let c = parse_url("postgres://aloft@%2Fvar%2Frun%2Fpostgresql/aloft").unwrap();
        assert_eq!(
            describe_url(&c),
            "postgres://aloft@/var/run/postgresql:5432/aloft"
        );
    }
}
