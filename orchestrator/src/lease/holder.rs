//! The lease's I/O shell in `aloft serve` on PostgreSQL: the thread `aloft-lease`, which asks
//! the database (`store::pg_lease`) whenever the core says so and tells it the answers, sets the
//! store's fence to the token of the first grant, and, if the lease is lost, fences the store
//! for good and says so to `server`, which stops. sled needs none of this: one process holds a
//! sled store, and it always leads.
//!
//! Whether this process leads is read from the core at the moment it is asked (`leading`),
//! never cached by the thread: a thread stuck in a statement cannot make a belief outlive its
//! lease.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{Answer, Lease, LeaseTimes, Lost, Next, Token};
use crate::store::pg_lease::{Acquired, Fence, PgLease};

/// What `server` waits on: the first grant, or the loss.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The token of the first grant (the store is fenced with it from then on).
    pub token: Option<Token>,
    /// Why the lease was lost; the store commits nothing more.
    pub lost: Option<String>,
}

/// The first grant's token, once the database granted it, or why it never will be (read
/// from a [`LeaseHolder::status`]).
pub async fn granted(mut rx: watch::Receiver<Status>) -> Result<Token, String> {
    let status = rx
        .wait_for(|s| s.token.is_some() || s.lost.is_some())
        .await
        .map(|s| s.clone())
        .map_err(|_| "the lease thread stopped".to_owned())?;
    match (status.lost, status.token) {
        (Some(lost), _) => Err(lost),
        (None, Some(token)) => Ok(token),
        (None, None) => Err("the lease thread stopped".into()),
    }
}

/// The lease thread's handle. Dropping it stops the thread, which releases the lease.
pub struct LeaseHolder {
    shared: Arc<Shared>,
    status: watch::Receiver<Status>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    holder: String,
}

struct Shared {
    lease: Mutex<Lease>,
    /// The origin of the core's clock.
    epoch: Instant,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lease(&self) -> MutexGuard<'_, Lease> {
        // Each change to the core is one call; a panic cannot leave it half-made.
        self.lease.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// This run's holder name: the replica id and a random mark of this process's own, so that a
/// restarted process (or a second one given the same id by mistake) is another holder, whose
/// grant raises the token.
pub fn holder_name(replica: &str) -> String {
    let mut mark = [0u8; 4];
    if aloft_proto::crypto::random_bytes(&mut mark).is_err() {
        // Without OS randomness the start time still tells runs apart.
        mark = (crate::clock::now_ms() as u32).to_be_bytes();
    }
    format!("{replica}#{}", hex::encode(mark))
}

/// The default replica id: `hostname-pid`.
pub fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "aloft".into());
    format!("{host}-{}", std::process::id())
}

impl LeaseHolder {
    /// Starts the thread; its first attempt is at once.
    pub fn start(pg: PgLease, times: LeaseTimes, fence: Arc<Fence>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            lease: Mutex::new(Lease::new(times, 0)),
            epoch: Instant::now(),
        });
        let (status_tx, status) = watch::channel(Status::default());
        let (stop, stop_rx) = mpsc::channel();
        let holder = pg.holder().to_owned();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("aloft-lease".into())
                .spawn(move || run(&shared, pg, &fence, &status_tx, &stop_rx))?
        };
        Ok(LeaseHolder {
            shared,
            status,
            stop: Some(stop),
            thread: Some(thread),
            holder,
        })
    }

    /// This run's holder name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The token, if this process leads now.
    pub fn leading(&self) -> Option<Token> {
        let now = self.shared.now();
        self.shared.lease().leader(now)
    }

    /// A reader of [`LeaseHolder::leading`] for `/metrics`: (leads now, the token it holds).
    pub fn view(&self) -> impl Fn() -> (bool, Option<i64>) + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || {
            let now = shared.now();
            let lease = shared.lease();
            (lease.leader(now).is_some(), lease.token().map(|Token(t)| t))
        }
    }

    /// The first grant's token, once the database granted it, or why it never will be.
    pub async fn granted(&self) -> Result<Token, String> {
        granted(self.status.clone()).await
    }

    /// Why the lease was lost, once it is (never, while it is held).
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Stops the thread, which releases the lease if it holds it, and waits for it (bounded by
    /// the lease statement's timeouts). Blocking: call off the async runtime's threads.
    pub fn stop(mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        // Tells the thread to release and end, without waiting for it here.
        drop(self.stop.take());
    }
}

fn run(
    shared: &Shared,
    mut pg: PgLease,
    fence: &Fence,
    status: &watch::Sender<Status>,
    stop: &mpsc::Receiver<()>,
) {
    let mut was_leading = false;
    let mut led_before = false;
    let mut told_waiting = false;
    let mut told_failing = false;
    loop {
        let now = shared.now();
        let next = shared.lease().poll(now);
        match next {
            Next::Send => {
                let answer = match pg.acquire() {
                    Acquired::Granted(t) => Answer::Granted(Token(t)),
                    Acquired::Refused { holder, token } => Answer::Refused {
                        holder,
                        token: Token(token),
                    },
                    Acquired::Failed(why) => {
                        if was_leading {
                            warn!(db = %pg.label(), error = %why, "renewing the leader lease failed; retrying");
                        } else if !told_failing {
                            // Said once: a process waiting at start would otherwise be silent.
                            warn!(db = %pg.label(), error = %why, "asking for the leader lease failed; retrying");
                            told_failing = true;
                        }
                        Answer::Failed
                    }
                };
                let at = shared.now();
                let mut lease = shared.lease();
                let first = lease.token().is_none();
                if let (Answer::Refused { holder, token }, true, false) =
                    (&answer, first, told_waiting)
                {
                    info!(%holder, %token, "waiting for the leader lease: another holder has it");
                    told_waiting = true;
                }
                lease.answered(at, answer);
                if let (true, Some(token)) = (first, lease.token()) {
                    // Before anyone is told: the engine's first commit is fenced.
                    fence.hold(token.0);
                    info!(holder = %pg.holder(), %token, "holding the leader lease");
                    status.send_modify(|s| s.token = Some(token));
                }
            }
            Next::Sleep(until) => {
                let wait = Duration::from_millis(until.saturating_sub(now).max(1));
                match stop.recv_timeout(wait) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            Next::Lost(lost) => {
                fence.lose();
                let why = lost_message(&lost);
                error!(holder = %pg.holder(), "{why}");
                status.send_modify(|s| s.lost = Some(why));
                return;
            }
        }
        let leading = shared.lease().leader(shared.now()).is_some();
        if was_leading && !leading && shared.lease().lost().is_none() {
            warn!("this process no longer leads: its lease ran out before a renewal was granted");
        } else if !was_leading && leading && led_before {
            info!("this process leads again: nobody held the lease meanwhile");
        }
        led_before |= leading;
        was_leading = leading;
    }
    let token = shared.lease().token();
    if let Some(Token(t)) = token {
        match pg.release(t) {
            Ok(()) => info!(token = t, "leader lease released"),
            Err(e) => {
                warn!(error = %e, "releasing the leader lease failed; it runs out on its own")
            }
        }
    }
}

fn lost_message(lost: &Lost) -> String {
    format!("the leader lease is lost: {lost}; this process commits nothing more and stops")
}
