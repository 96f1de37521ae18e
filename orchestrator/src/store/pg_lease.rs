//! The leader lease in PostgreSQL (`aloft_lease`, schema 3): its statements, on a connection
//! of their own (never the store's, so a long commit cannot hold a renewal up), and the
//! [`Fence`] every commit of the store checks the lease's token against.
//!
//! Acquire-or-renew is ONE statement on the database's clock (`now()`): the lease is granted
//! if this holder has it already or it has expired, until `now() + ttl`, and its token goes up
//! only when the holder changes. Every statement is bounded (connect timeout, statement and
//! lock timeouts, TCP user timeout) well inside a third of the ttl, so a hung network cannot
//! keep the lease thread waiting past the lease; the lease core never extends its belief
//! while it waits anyway (`lease`). This module decides nothing: `lease::holder` does.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use postgres::{Client, NoTls};

use super::pg::{describe_error, describe_url, parse_url};
use super::StoreError;

/// What the database said to an acquire-or-renew (the lease core's `Answer`, which this
/// module does not know: the store depends on no decision core).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The lease is this holder's, with this token.
    Granted(i64),
    /// Another holder's lease is live.
    Refused { holder: String, token: i64 },
    /// No answer (unreachable, timed out): the statement may or may not have run.
    Failed(String),
}

/// The fence of one store handle: unfenced (tools that hold the store alone: `init`, a
/// restore), the token of this process's lease, or lost.
#[derive(Debug, Default)]
pub struct Fence(AtomicI64);

/// `Fence`'s states besides a token (tokens are 1 and up: the first grant raises 0).
const UNFENCED: i64 = 0;
const LOST: i64 = i64::MIN;

/// What a commit must do about the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FenceCheck {
    /// Commit without reading the lease.
    Off,
    /// Commit only if the lease's token is still this one.
    Token(i64),
    /// Commit nothing: the lease was lost (this token was seen).
    Lost,
}

impl Fence {
    /// From now on, every commit checks that the lease's token is still `token`.
    pub fn hold(&self, token: i64) {
        let _ = self
            .0
            .compare_exchange(UNFENCED, token, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The lease is lost: no commit goes through any more, for good.
    pub fn lose(&self) {
        self.0.store(LOST, Ordering::Release);
    }

    pub(crate) fn check(&self) -> FenceCheck {
        match self.0.load(Ordering::Acquire) {
            UNFENCED => FenceCheck::Off,
            LOST => FenceCheck::Lost,
            t => FenceCheck::Token(t),
        }
    }
}

/// The lease's statements for one holder.
pub struct PgLease {
    config: postgres::Config,
    label: String,
    holder: String,
    ttl: Duration,
    client: Option<Client>,
}

impl PgLease {
    /// For `holder` (unique per process: the replica id and this run's own mark), on the
    /// store's database at `url`, granting `ttl` at a time. Connects on first use.
    pub fn new(url: &str, holder: String, ttl: Duration) -> Result<Self, StoreError> {
        let mut config = parse_url(url)?;
        let bound = Self::bound(ttl);
        config.connect_timeout(bound);
        config.tcp_user_timeout(bound);
        // Keepalive periods are whole seconds to the kernel (0 is refused); the TCP user
        // timeout above is what bounds a send that gets no acknowledgement.
        let probe = Duration::from_secs(bound.as_secs().max(1));
        config.keepalives(true);
        config.keepalives_idle(probe);
        config.keepalives_interval(Duration::from_secs(1));
        if config.get_application_name().is_none() {
            config.application_name("aloft-lease");
        }
        let label = describe_url(&config);
        Ok(PgLease {
            config,
            label,
            holder,
            ttl,
            client: None,
        })
    }

    /// How long one connect or statement may take: a sixth of the ttl, so a connect and a
    /// statement together end within a third of it, before the renewal after next is due.
    fn bound(ttl: Duration) -> Duration {
        (ttl / 6).max(Duration::from_millis(10))
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    fn client(&mut self) -> Result<&mut Client, postgres::Error> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        let client = match self.client.take() {
            Some(c) => c,
            None => {
                let mut client = self.config.connect(NoTls)?;
                let ms = Self::bound(self.ttl).as_millis();
                client.batch_execute(&format!(
                    "SET statement_timeout = {ms}; SET lock_timeout = {ms}; \
                     SET idle_in_transaction_session_timeout = {ms}"
                ))?;
                client
            }
        };
        Ok(self.client.insert(client))
    }

    /// Acquire-or-renew, in one statement. Any failure is `Failed` (the statement may or may
    /// not have run), and the next attempt connects again.
    pub fn acquire(&mut self) -> Acquired {
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let holder = self.holder.clone();
        let result = self.client().and_then(|client| {
            client.query_opt(
                "WITH granted AS ( \
                     UPDATE aloft_lease SET \
                         token = CASE WHEN holder = $1 THEN token ELSE token + 1 END, \
                         holder = $1, \
                         expires_at = now() + $2::bigint * interval '1 millisecond' \
                     WHERE id = 1 AND (holder = $1 OR expires_at <= now()) \
                     RETURNING token) \
                 SELECT token, NULL::text FROM granted \
                 UNION ALL \
                 SELECT token, holder FROM aloft_lease \
                 WHERE id = 1 AND NOT EXISTS (SELECT 1 FROM granted)",
                &[&holder, &ttl_ms],
            )
        });
        match result {
            Ok(Some(row)) => {
                let token = row.try_get::<_, i64>(0);
                let other = row.try_get::<_, Option<String>>(1);
                match (token, other) {
                    (Ok(t), Ok(None)) => Acquired::Granted(t),
                    (Ok(t), Ok(Some(holder))) => Acquired::Refused { holder, token: t },
                    (Err(e), _) | (_, Err(e)) => Acquired::Failed(describe_error(&e)),
                }
            }
            Ok(None) => Acquired::Failed("the lease row is missing (schema 3 creates it)".into()),
            Err(e) => {
                self.client = None;
                Acquired::Failed(describe_error(&e))
            }
        }
    }

    /// Ends this holder's lease at once (clean shutdown), so another may take it without
    /// waiting for the ttl. Does nothing if the lease is no longer this holder's.
    pub fn release(&mut self, token: i64) -> Result<(), StoreError> {
        let holder = self.holder.clone();
        let label = self.label.clone();
        self.client()
            .and_then(|client| {
                client.execute(
                    "UPDATE aloft_lease SET expires_at = now() \
                     WHERE id = 1 AND holder = $1 AND token = $2",
                    &[&holder, &token],
                )
            })
            .map(|_| ())
            .map_err(|e| StoreError::Database {
                db: label,
                error: describe_error(&e),
            })
    }
}
