//! The engine: the single task that owns campaign and device state. Its decisions are made by a
//! pure core (`core`: events and the time in, effects out, no I/O); this module is the thin shell
//! around it that owns the store, the clock, the publisher, the front and the signer.
//!
//! Design: one task, batched. Events are taken in batches (up to [`BATCH_MAX`]) and handed to
//! the core one by one; chunk service and hand-overs to the signer happen at once. At the end of
//! a batch the core moves the rollouts it touched, then the shell applies the batch's writes,
//! flushes them once (group commit) and only then lets out its acknowledgements, jobs, replies
//! and answers. A crash therefore loses only unacknowledged work, which devices resend.
//!
//! A member's job is made once: its content keys are wrapped (HPKE, on the blocking pool, never
//! on the engine task, while the batch's writes are made) and the result (`MemberJob`) is
//! written in the same commit as the batch, so the job leaves only once the keys it carries are
//! durable. Every later publication of the job (a restart's recovery, a reconnected broker
//! link) is rebuilt from that stored part, byte for byte, on the blocking pool too.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use aloft_broker::{DeliverError, DirectRoutes, FrontContext};
use aloft_certs::revocation::{write_file_atomically, VerifiedCrl};
use aloft_certs::PkiError;
use aloft_proto::chunkframe::{self, ChunkErrorCode};
use aloft_proto::crypto;
use aloft_proto::messages;
use aloft_proto::trust::SignedRoot;
use aloft_proto::{topics, ArtifactId, CampaignId, DeviceId, OperatorId};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::core::{
    CaState, Core, CoreConfig, Effects, Event, JobOrder, Loaded, Out, Session, Write,
};
use self::jobs::{build_jobs, Built};
use crate::admin::auth::AdminAuth;
use crate::admin::wire::{AdminError, AdminReply};
use crate::metrics::Metrics;
use crate::mqtt::{LinkClosed, Publisher};
use crate::store::{Store, StoreError};

pub mod core;
pub(crate) mod frames;
mod jobs;

pub use self::core::pacing::DEFAULT_SLOTS as DEFAULT_DOWNLOAD_SLOTS;
pub use self::core::{RENEWAL_INTERVAL_MS, SUCCESS_WITHOUT_DOWNLOAD};
pub use crate::inbound::{Inbound, InboxRow, SeenDevice};

/// Most events handled per group commit.
pub const BATCH_MAX: usize = 256;

/// How often rollouts are moved forward when no event arrives (timeouts, soaks, schedules).
pub const TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// First and longest wait between flushes while the store is unreachable.
const STORE_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const STORE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// What the engine needs besides its store.
#[derive(Clone)]
pub struct EngineConfig {
    /// The newest root of trust: its release role must sign every upload (threshold, no
    /// revoked key), and its chain travels in every job.
    pub trust: crate::trust::TrustState,
    /// Where accepted roots are written (`trust_update`); `None` keeps them in memory only.
    pub trust_dir: Option<PathBuf>,
    /// The fleet CA, for verifying certificates submitted for registration.
    pub ca_pem: String,
    /// The front's direct routes: chunk responses go to devices this way, past the broker
    /// (see `aloft_broker::front::direct`). Without it they are published through the broker.
    pub direct: Option<Arc<DirectRoutes>>,
    /// The front, whose CRL `crl_update` replaces at run time. Without it a CRL cannot be
    /// applied and `crl_update` is refused.
    pub front: Option<Arc<FrontContext>>,
    /// Without a front: each operator's role by name (`external_broker_operator_roles`).
    pub operator_roles: std::collections::HashMap<OperatorId, aloft_certs::OperatorRole>,
    /// The CRL in force at start-up (from `crl.pem`, already verified against the fleet CA).
    pub crl: Option<VerifiedCrl>,
    /// Where the CRL in force is kept (`<data-dir>/crl.pem`); `crl_update` replaces it.
    pub crl_path: Option<PathBuf>,
    /// Signs renewals with `<data-dir>/pki/ca.key`, on a thread of its own; without it every
    /// renewal answers `ca_offline`.
    pub signer: Option<crate::signer::Signer>,
    /// Devices sent chunks at once over the whole fleet; the others are told `busy`.
    pub download_slots: usize,
    /// With an external broker: the CRL file it reads, rewritten with each new CRL, and how to
    /// tell it to reload.
    pub broker_crl: Option<BrokerCrl>,
    /// Checks operators' signed requests; with an external broker it is told each new CRL
    /// here (behind the front it shares the front's verifier, which the front updates).
    pub admin_auth: Option<Arc<crate::admin::auth::Authenticator>>,
    /// (Replicas) Also write each accepted root and applied CRL to the store, for the other
    /// replicas (`replica::security`).
    pub share_security: bool,
}

/// The CRL file an external broker reads (its `crlfile`), and the file holding its process
/// id: after the file is replaced the broker is sent SIGHUP (Mosquitto 2 then reloads its
/// listeners' TLS settings, the CRL included, for new connections).
#[derive(Debug, Clone)]
pub struct BrokerCrl {
    pub path: PathBuf,
    pub pid_file: Option<PathBuf>,
}

/// Why the engine stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Link(#[from] LinkClosed),
}

/// Makes one of the core's writes.
fn apply(store: &Store, w: &Write) -> Result<(), StoreError> {
    match w {
        Write::Progress {
            campaign,
            device,
            progress,
        } => store.put_progress(campaign, device, progress),
        Write::Device(d) => store.put_device(d),
        Write::Campaign(c) => store.put_campaign(c),
        Write::Release(r) => store.put_release(r),
        Write::Chunk {
            artifact,
            index,
            sealed,
        } => store.put_chunk(artifact, *index, sealed),
        Write::Audit { event, at_ms } => store.append_audit(event.clone(), *at_ms).map(|_| ()),
    }
}

/// The engine waiting for its store: when it began, and the next wait.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    wait: std::time::Duration,
}

impl Outage {
    /// A store operation failed and may succeed later: say so once, then wait a little longer
    /// each time.
    async fn wait(&mut self, metrics: &Metrics, error: &StoreError) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            self.wait = STORE_RETRY_MIN;
            metrics.store(false);
            warn!(%error, "the store cannot be reached: nothing is acknowledged until it commits again");
        } else {
            debug!(%error, "the store is still unreachable");
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(STORE_RETRY_MAX);
    }

    /// The operation went through.
    fn over(self, metrics: &Metrics) {
        if let Some(since) = self.since {
            metrics.store(true);
            info!(
                waited_secs = since.elapsed().as_secs(),
                "the store is reachable again; acknowledging resumes"
            );
        }
    }
}

pub struct Engine {
    store: Store,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    board: Arc<crate::board::Board>,
}

pub(crate) use crate::clock::now_ms;

impl Engine {
    pub fn new(store: Store, cfg: EngineConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            cfg,
            metrics,
            board: Arc::default(),
        }
    }

    /// The campaign summaries this engine publishes after each batch, for the console.
    pub fn board(&self) -> Arc<crate::board::Board> {
        self.board.clone()
    }

    /// (Replicas) What this replica found in force when it became the leader
    /// (`replica::security::sync`), in place of what it read at start.
    pub fn with_security(
        mut self,
        trust: crate::trust::TrustState,
        crl: Option<VerifiedCrl>,
    ) -> Self {
        self.cfg.trust = trust;
        self.cfg.crl = crl;
        self
    }

    /// Runs until `rx` closes. Returns an error only for failures that make continuing unsafe
    /// (the store cannot read or write, the broker link is gone).
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<Inbound>,
        publisher: Publisher,
    ) -> Result<(), EngineError> {
        let mut shell = Shell::start(self)?;
        let fx = shell.core.recover(now_ms());
        shell.absorb(fx);
        shell.commit(&publisher).await?;
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let more = shell.core.has_more();
            tokio::select! {
                // The timer first (it is ready twice a second: a stream of events never starves
                // the timeouts), then events, then the next slice of a large wave: between
                // slices the engine answers whatever arrived.
                biased;
                _ = ticker.tick() => {
                    let fx = shell.core.on_tick(now_ms());
                    shell.absorb(fx);
                }
                ev = rx.recv() => {
                    let Some(first) = ev else { break };
                    shell.handle(first)?;
                    for _ in 1..BATCH_MAX {
                        match rx.try_recv() {
                            Ok(ev) => shell.handle(ev)?,
                            Err(_) => break,
                        }
                    }
                }
                () = std::future::ready(()), if more => {}
            }
            shell.commit(&publisher).await?;
        }
        Ok(())
    }
}

/// The engine task's state: the core, and what it must not touch.
struct Shell {
    store: Store,
    metrics: Arc<Metrics>,
    direct: Option<Arc<DirectRoutes>>,
    front: Option<Arc<FrontContext>>,
    /// Without a front: operators' roles by name, from the configuration.
    operator_roles: std::collections::HashMap<OperatorId, aloft_certs::OperatorRole>,
    signer: Option<crate::signer::Signer>,
    /// `crl.pem`, the trust directory and the front's CRL, for the operator actions the core
    /// suspends until they are done.
    files: Files,
    core: Core,
    /// The batch so far: writes to make and output held for the commit.
    batch: Effects,
    /// Encoded chunk frames, shared by every device served the same chunk.
    frames: frames::FrameCache,
    /// The shell wrote to the store beside the core's writes (rows of the replicas' inbox
    /// applied, security state shared with replicas): the batch must commit even if the core
    /// wrote nothing.
    must_flush: bool,
    /// (Replicas) Roots accepted and CRLs applied are also written to the store for the other
    /// replicas (`replica::security`).
    share_security: bool,
}

impl Shell {
    /// Loads everything the core keeps in memory and builds it.
    fn start(engine: Engine) -> Result<Self, StoreError> {
        let Engine {
            store,
            cfg,
            metrics,
            board,
        } = engine;
        let loaded = load(&store)?;
        let mut seed = [0u8; 16];
        if crypto::random_bytes(&mut seed).is_err() {
            // Without OS randomness campaign ids fall back to the clock alone, which is still
            // unique enough for one orchestrator creating campaigns one at a time.
            seed[..8].copy_from_slice(&now_ms().to_be_bytes());
        }
        let files = Files {
            front: cfg.front.clone(),
            broker_crl: cfg.broker_crl,
            admin_auth: cfg.admin_auth,
            crl_path: cfg.crl_path,
            trust_dir: cfg.trust_dir,
            ca_pem: cfg.ca_pem.clone(),
        };
        let core = Core::new(
            CoreConfig {
                trust: cfg.trust,
                ca_pem: cfg.ca_pem,
                crl: cfg.crl,
                seed,
                download_slots: cfg.download_slots,
                record_follows_issuance: cfg.front.is_none(),
            },
            metrics.clone(),
            loaded,
        )
        .with_board(board);
        Ok(Shell {
            store,
            metrics,
            direct: cfg.direct,
            front: cfg.front,
            operator_roles: cfg.operator_roles,
            signer: cfg.signer,
            files,
            core,
            batch: Effects::default(),
            frames: frames::FrameCache::default(),
            must_flush: false,
            share_security: cfg.share_security,
        })
    }

    fn handle(&mut self, ev: Inbound) -> Result<(), StoreError> {
        let event = match ev {
            Inbound::Status { device, payload } => Event::Status { device, payload },
            Inbound::ChunkRequest { device, payload } => Event::ChunkRequest { device, payload },
            Inbound::Health { device, payload } => Event::Health { device, payload },
            Inbound::Admin {
                operator,
                payload,
                auth,
            } => Event::Admin {
                auth: match auth {
                    AdminAuth::Session(_) => AdminAuth::Session(self.operator_role(&operator)),
                    signed => signed,
                },
                operator,
                payload,
            },
            Inbound::Csr { device, payload } => Event::Csr {
                session: self.session(&device),
                ca: self.ca_state(),
                device,
                payload,
            },
            Inbound::DeviceSeen(seen) => Event::DeviceSeen(seen),
            Inbound::Signed(signed) => Event::Signed(signed),
            Inbound::LinkRestored => Event::LinkRestored,
            Inbound::Inbox(row) => return self.apply_inbox(row),
            Inbound::Received { topic, .. } => {
                warn!(%topic, "a replica's received message reached the engine directly; dropped");
                return Ok(());
            }
        };
        let fx = self.core.on_event(now_ms(), event);
        self.absorb(fx);
        Ok(())
    }

    /// (Replicas, the leader) Applies a row of the replicas' inbox: the row is deleted in the
    /// batch's commit, with what it caused, so it takes effect once.
    fn apply_inbox(&mut self, row: InboxRow) -> Result<(), StoreError> {
        self.store.consume_inbox(row.id)?;
        self.must_flush = true;
        match row.kind {
            crate::replica::inbox::KIND_SERVED => {
                let campaign = std::str::from_utf8(&row.payload)
                    .ok()
                    .and_then(|c| CampaignId::new(c).ok());
                match (campaign, DeviceId::new(row.topic)) {
                    (Some(campaign), Ok(device)) => {
                        let fx = self
                            .core
                            .on_event(now_ms(), Event::Served { campaign, device });
                        self.absorb(fx);
                    }
                    _ => warn!(id = row.id, "malformed served note in the inbox; skipped"),
                }
                Ok(())
            }
            crate::replica::inbox::KIND_MESSAGE | crate::replica::inbox::KIND_OPERATOR => {
                let Some(auth) = self.files.admin_auth.clone() else {
                    warn!(
                        id = row.id,
                        "inbox row without an admin authenticator; skipped"
                    );
                    return Ok(());
                };
                match crate::mqtt::route(&row.topic, row.payload, &auth) {
                    // Chunk requests are served by the replica that received them.
                    Some(Inbound::ChunkRequest { .. }) | None => {
                        self.metrics.rejected("inbox", "unexpected_topic");
                        Ok(())
                    }
                    Some(ev) => self.handle(ev),
                }
            }
            kind => {
                warn!(id = row.id, kind, "inbox row of an unknown kind; skipped");
                Ok(())
            }
        }
    }

    /// The role of the certificate the operator's live session holds, as the front knows it:
    /// the request came through that session (the front relays an operator's publishes only
    /// while it is connected). `None` (a viewer) once the session is gone. Without a front, the
    /// role the configuration gives the name the external broker vouched for (its ACL lets an
    /// operator publish only under its own CN), or `None`.
    fn operator_role(&self, operator: &OperatorId) -> Option<aloft_certs::OperatorRole> {
        let Some(front) = self.front.as_ref() else {
            return self.operator_roles.get(operator).copied();
        };
        let peer = aloft_broker::Peer::Operator(operator.clone());
        front.registry.operator_role(&peer).flatten()
    }

    /// The certificate of the device's live session, as the front knows it.
    fn session(&self, device: &DeviceId) -> Session {
        match &self.front {
            Some(front) => {
                let peer = aloft_broker::Peer::Device(device.clone());
                match front.registry.cert_serial(&peer) {
                    Some(serial) => Session::Serial(serial),
                    None => Session::Absent,
                }
            }
            None => Session::NoFront,
        }
    }

    fn ca_state(&self) -> CaState {
        match &self.signer {
            None => CaState::NoSigner,
            Some(s) if !s.key_present() => CaState::KeyAbsent,
            Some(_) => CaState::Ready,
        }
    }

    /// Carries out what may happen at once and keeps the rest for the commit.
    fn absorb(&mut self, fx: Effects) {
        let Effects {
            writes,
            flush,
            now,
            after_commit,
        } = fx;
        self.batch.writes.extend(writes);
        self.batch.flush |= flush;
        self.batch.after_commit.extend(after_commit);
        for out in now {
            match out {
                Out::ChunkFrame { device, frame } => self.send_chunk(&device, frame),
                Out::ServeChunks {
                    device,
                    artifact,
                    count,
                    indices,
                } => self.serve_chunks(&device, &artifact, count, &indices),
                Out::Sign(req) => {
                    let Some(signer) = &self.signer else {
                        continue;
                    };
                    if let Err(req) = signer.submit(req) {
                        let fx = self.core.on_event(now_ms(), Event::SignerBusy(req.device));
                        self.absorb(fx);
                    }
                }
                Out::ApplyCrl {
                    crl,
                    previous,
                    pending,
                } => {
                    let result = self.files.apply_crl(&crl, previous.as_deref());
                    if result.is_ok() && self.share_security {
                        self.share(|store| {
                            crate::replica::security::share_crl(store, &crl_pem(crl.der.as_ref()))
                        });
                    }
                    let event = Event::CrlApplied {
                        pending,
                        crl,
                        result,
                    };
                    let fx = self.core.on_event(now_ms(), event);
                    self.absorb(fx);
                }
                Out::ReadCrl {
                    certs,
                    groups,
                    pending,
                } => {
                    let on_disk = self.files.crl_on_disk();
                    let event = Event::CrlRead {
                        pending,
                        certs,
                        groups,
                        on_disk,
                    };
                    let fx = self.core.on_event(now_ms(), event);
                    self.absorb(fx);
                }
                Out::StoreRoots {
                    roots,
                    next,
                    accepted,
                    pending,
                } => {
                    let result = self.files.store_roots(&roots);
                    if result.is_ok() && self.share_security {
                        self.share(|store| crate::replica::security::share_roots(store, &roots));
                    }
                    let event = Event::RootsStored {
                        pending,
                        next,
                        accepted,
                        result,
                    };
                    let fx = self.core.on_event(now_ms(), event);
                    self.absorb(fx);
                }
                other => self.batch.after_commit.push(other),
            }
        }
    }

    /// (Replicas) Writes security state for the other replicas, committed with the batch
    /// (before the operator's answer). A failure is logged: the next leader's `sync` at its
    /// start writes what its files hold, and this leader's files hold it already.
    fn share(&mut self, write: impl FnOnce(&Store) -> Result<(), String>) {
        match write(&self.store) {
            Ok(()) => self.must_flush = true,
            Err(e) => warn!(error = %e, "sharing security state with the replicas failed"),
        }
    }

    /// Runs a store operation of the commit (a write, the flush); while the store's database is
    /// unreachable, waits and tries again, with the batch's output held (nothing acknowledged
    /// that is not committed) and no new event taken (devices' publishes wait in the front,
    /// unacknowledged). A write may need the database too: a transition reads the record it
    /// replaces. Errors that waiting cannot mend (another holder took the store meanwhile, a
    /// local disk's error) end the engine.
    async fn until_stored(
        &self,
        mut op: impl FnMut(&Store) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut outage = Outage::default();
        loop {
            match op(&self.store) {
                Ok(()) => {
                    outage.over(&self.metrics);
                    return Ok(());
                }
                Err(e) if e.is_transient() => outage.wait(&self.metrics, &e).await,
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the touched rollouts, makes the batch durable, then lets its output out.
    async fn commit(&mut self, publisher: &Publisher) -> Result<(), EngineError> {
        let fx = self.core.settle(now_ms());
        self.absorb(fx);
        let Effects {
            writes,
            flush,
            after_commit,
            ..
        } = std::mem::take(&mut self.batch);
        // One job per member, however many orders the batch holds for it (a notification and
        // a reconnected link's republication): two wrappings would be two different jobs.
        let mut jobs: Vec<JobOrder> = Vec::new();
        let mut job_of: HashMap<(CampaignId, DeviceId), usize> = HashMap::new();
        let mut slots: Vec<usize> = Vec::new();
        for o in &after_commit {
            if let Out::Job(j) = o {
                let slot = *job_of.entry(j.member()).or_insert_with(|| {
                    jobs.push(j.clone());
                    jobs.len() - 1
                });
                slots.push(slot);
            }
        }
        let mut uses = vec![0usize; jobs.len()];
        for &slot in &slots {
            uses[slot] += 1;
        }
        // Building starts before the batch's writes and runs beside them, off this task.
        let building = build_jobs(jobs);
        let commit_started = Instant::now();
        for w in writes {
            self.until_stored(|store| apply(store, &w)).await?;
        }
        let mut built: Vec<Option<Built>> = Vec::with_capacity(uses.len());
        for (task, len) in building {
            // A building task that panicked loses its jobs; the devices get them at the next
            // restart's republication, and a panic there is a bug to see in the log.
            match task.await {
                Ok(b) => built.extend(b.into_iter().map(Some)),
                Err(e) => {
                    warn!(error = %e, "building jobs failed");
                    built.extend(std::iter::repeat_with(|| None).take(len));
                }
            }
        }
        // The jobs made now are stored in this commit: none leaves before the keys it carries
        // are durable, and none is ever made again.
        let mut made_any = false;
        for b in built.iter().flatten().flatten() {
            if let Some(made) = &b.made {
                self.until_stored(|store| store.put_member_job(&b.campaign, &b.device, made))
                    .await?;
                self.core.job_made(&b.campaign, &b.device, made.clone());
                made_any = true;
            }
        }
        if flush || made_any || std::mem::take(&mut self.must_flush) {
            let t = Instant::now();
            self.until_stored(Store::flush).await?;
            self.metrics.store_flushed(t.elapsed().as_secs_f64());
            self.metrics
                .store_committed(commit_started.elapsed().as_secs_f64());
        }
        let mut slots = slots.into_iter();
        for out in after_commit {
            match out {
                Out::Publish {
                    topic,
                    payload,
                    retain,
                } => publisher.publish(topic, payload, retain).await?,
                Out::Ack { device, ack } => {
                    publisher
                        .publish(topics::ack(&device), messages::encode(&ack), false)
                        .await?
                }
                Out::Job(order) => {
                    let Some(slot) = slots.next() else { continue };
                    uses[slot] -= 1;
                    // The last order of a member takes its job; an earlier one copies it.
                    let job = if uses[slot] == 0 {
                        built[slot].take()
                    } else {
                        built[slot].clone()
                    };
                    match job {
                        Some(Ok(b)) => {
                            publisher
                                .publish(topics::job(&b.device), b.payload, true)
                                .await?
                        }
                        Some(Err(e)) => {
                            let device = &order.device;
                            warn!(%device, error = %e, "cannot wrap the content key for device")
                        }
                        None => {}
                    }
                }
                Out::ChunkFrame { device, frame } => {
                    self.send_chunk_now(&device, frame, publisher).await?
                }
                Out::ServeChunks {
                    device,
                    artifact,
                    count,
                    indices,
                } => {
                    self.serve_chunks(&device, &artifact, count, &indices);
                    for o in std::mem::take(&mut self.batch.after_commit) {
                        if let Out::Publish {
                            topic,
                            payload,
                            retain,
                        } = o
                        {
                            publisher.publish(topic, payload, retain).await?;
                        }
                    }
                }
                Out::AuditReply {
                    operator,
                    id,
                    since,
                    limit,
                } => {
                    // A store that cannot be read now gets the operator an error, not the
                    // engine stopped.
                    let read = self
                        .store
                        .audit(since, limit)
                        .and_then(|entries| Ok((entries, self.store.verify_audit()?)));
                    let reply = match read {
                        Ok((entries, verified)) => {
                            let chain = match verified {
                                Ok(n) => json!({"ok": true, "entries": n}),
                                Err(b) => json!({"ok": false, "broken": b.to_string()}),
                            };
                            AdminReply::ok(id, json!({"entries": entries, "chain": chain}))
                        }
                        Err(e) => {
                            warn!(error = %e, "reading the audit log failed");
                            AdminReply::err(
                                id,
                                AdminError::new("store", format!("reading the audit log: {e}")),
                            )
                        }
                    };
                    let topic = topics::operator_reply(&operator);
                    publisher
                        .publish(topic, messages::encode(&reply), false)
                        .await?;
                }
                // The core asks for these among what may happen at once; `absorb` did them.
                Out::Sign(_)
                | Out::ApplyCrl { .. }
                | Out::ReadCrl { .. }
                | Out::StoreRoots { .. } => {
                    warn!("a request to the signer or the files arrived with held output; dropped");
                }
            }
        }
        Ok(())
    }

    /// Chunk service: one frame per requested index, in order, read from the store
    /// (PROTOCOL.md §10.7). The core has decided the device may have them.
    fn serve_chunks(
        &mut self,
        device: &DeviceId,
        artifact: &ArtifactId,
        count: u32,
        indices: &[u32],
    ) {
        let started = Instant::now();
        self.serve_chunk_frames(device, artifact, count, indices);
        self.metrics
            .chunk_request_served(started.elapsed().as_secs_f64());
    }

    fn serve_chunk_frames(
        &mut self,
        device: &DeviceId,
        artifact: &ArtifactId,
        count: u32,
        indices: &[u32],
    ) {
        // One topic for the request's frames (formatting it per frame was 1.3% of the
        // orchestrator's CPU while 10,000 devices downloaded).
        let topic = topics::chunk_response(device);
        for &index in indices {
            if index >= count {
                let frame = chunkframe::encode_error(artifact, index, ChunkErrorCode::OutOfRange);
                self.send_chunk(device, frame);
                break;
            }
            let frame = match self.frames.get(&self.store, artifact, index, count) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    warn!(%artifact, index, "stored release is missing a chunk");
                    let frame =
                        chunkframe::encode_error(artifact, index, ChunkErrorCode::UnknownArtifact);
                    self.send_chunk(device, frame);
                    break;
                }
                Err(e) => {
                    // The device asks again; a store that cannot read fails the next write.
                    warn!(%artifact, index, error = %e, "reading a chunk failed");
                    break;
                }
            };
            let sealed = frame.len() - chunkframe::header_len(artifact);
            let Some(direct) = &self.direct else {
                self.metrics.chunk_served(sealed);
                self.send_chunk(device, frame.to_vec());
                continue;
            };
            match direct.deliver(device, &topic, frame) {
                Ok(()) => self.metrics.chunk_served(sealed),
                // The front's fleet budget (or this device's queue) is full: the device waits
                // instead of timing out, and asks again for this chunk and those after it.
                Err(DeliverError::Busy | DeliverError::QueueFull) => {
                    self.metrics.rejected("chunk_response", "busy");
                    let busy =
                        chunkframe::encode_busy(artifact, index, core::pacing::QUEUE_FULL_WAIT_MS);
                    let _ = direct.deliver_unmetered(device, &topic, Bytes::from(busy));
                    break;
                }
                Err(DeliverError::NotConnected) => {
                    self.metrics.rejected("chunk_response", "not_connected");
                    break;
                }
            }
        }
    }

    /// Sends a chunk frame: directly on the device's connection when the front offers it,
    /// else through the broker with the batch's output. Chunk frames carry no state, so they
    /// need not wait for the batch's commit.
    fn send_chunk(&mut self, device: &DeviceId, frame: Vec<u8>) {
        let topic = topics::chunk_response(device);
        match &self.direct {
            Some(direct) => {
                if let Err(e) = direct.deliver_unmetered(device, &topic, Bytes::from(frame)) {
                    let why = match e {
                        DeliverError::NotConnected => "not_connected",
                        DeliverError::QueueFull => "queue_full",
                        DeliverError::Busy => "busy",
                    };
                    self.metrics.rejected("chunk_response", why);
                    debug!(%device, error = %e, "chunk response dropped; the device will ask again");
                }
            }
            None => self.batch.after_commit.push(Out::Publish {
                topic,
                payload: frame,
                retain: false,
            }),
        }
    }

    /// `send_chunk` during the commit's output, when nothing more is batched.
    async fn send_chunk_now(
        &mut self,
        device: &DeviceId,
        frame: Vec<u8>,
        publisher: &Publisher,
    ) -> Result<(), LinkClosed> {
        self.send_chunk(device, frame);
        for o in std::mem::take(&mut self.batch.after_commit) {
            if let Out::Publish {
                topic,
                payload,
                retain,
            } = o
            {
                publisher.publish(topic, payload, retain).await?;
            }
        }
        Ok(())
    }
}

/// Everything the core keeps in memory, read from the store.
fn load(store: &Store) -> Result<Loaded, StoreError> {
    let devices = store.devices()?;
    let releases = store.releases()?;
    let mut uploads = HashMap::new();
    for r in releases.iter().filter(|r| !r.complete) {
        let mut received = HashSet::new();
        for i in 0..r.manifest.chunk_count {
            if store.chunk(&r.artifact, i)?.is_some() {
                received.insert(i);
            }
        }
        uploads.insert(r.artifact.clone(), received);
    }
    let mut campaigns = Vec::new();
    let mut jobs = HashMap::new();
    for record in store.campaigns()? {
        let progress = store.campaign_progress(&record.id)?;
        // A finished campaign's jobs are never published again.
        if !record.status.is_final() {
            jobs.insert(record.id.clone(), store.campaign_jobs(&record.id)?);
        }
        campaigns.push((record, progress));
    }
    Ok(Loaded {
        devices,
        releases,
        campaigns,
        jobs,
        uploads,
    })
}

/// The CRL file, the front and the trust directory, for the operator actions the core
/// suspends until they are done.
struct Files {
    front: Option<Arc<FrontContext>>,
    broker_crl: Option<BrokerCrl>,
    admin_auth: Option<Arc<crate::admin::auth::Authenticator>>,
    crl_path: Option<PathBuf>,
    trust_dir: Option<PathBuf>,
    ca_pem: String,
}

impl Files {
    /// Stores `crl` as `crl.pem`, then enforces it at the front (new handshakes, and live
    /// sessions of revoked certificates are ended); returns those sessions. Stored first, so a
    /// restart enforces what the front is about to enforce; on failure the file is as it was.
    fn apply_crl(
        &self,
        crl: &VerifiedCrl,
        previous: Option<&VerifiedCrl>,
    ) -> Result<Vec<String>, String> {
        if self.front.is_none() && self.broker_crl.is_none() {
            return Err("this orchestrator has no front or broker crl file to replace".into());
        }
        let previous = previous.map(|c| crl_pem(c.der.as_ref()));
        if let Some(path) = &self.crl_path {
            if let Err(e) = write_file_atomically(path, crl_pem(crl.der.as_ref()).as_bytes(), 0o600)
            {
                warn!(error = %e, "storing the new crl failed; the old one stays in force");
                return Err(e.to_string());
            }
        }
        let Some(front) = &self.front else {
            // An external broker: the engine already refuses the revoked devices (no job, no
            // chunk); the broker refuses their next handshake once it has reloaded the file.
            if let Some(broker) = &self.broker_crl {
                broker.replace(crl_pem(crl.der.as_ref()).as_bytes())?;
            }
            // Signed admin requests are checked against it from now on.
            if let Some(auth) = &self.admin_auth {
                if let Err(e) = auth.set_crls(vec![crl.der.clone()]) {
                    warn!(error = %e, "the admin request checker refused the new crl");
                    return Err(e.to_string());
                }
            }
            return Ok(Vec::new());
        };
        match front.apply_crl(crl) {
            Ok(dropped) => Ok(dropped.iter().map(ToString::to_string).collect()),
            Err(e) => {
                // Put the file back as it was, so disk and front agree on the old CRL.
                if let Some(path) = &self.crl_path {
                    let restored = match &previous {
                        Some(old) => write_file_atomically(path, old.as_bytes(), 0o600),
                        None => std::fs::remove_file(path).map_err(|source| PkiError::Write {
                            path: path.clone(),
                            source,
                        }),
                    };
                    if let Err(re) = restored {
                        warn!(error = %re, "restoring the previous crl.pem failed");
                    }
                }
                Err(e.to_string())
            }
        }
    }

    /// The CRL in `crl.pem`, verified against the fleet CA, if the file exists. A file that
    /// exists but cannot be read or verified is an error.
    fn crl_on_disk(&self) -> Result<Option<VerifiedCrl>, String> {
        let Some(path) = &self.crl_path else {
            return Ok(None);
        };
        match std::fs::read_to_string(path) {
            Ok(pem) => VerifiedCrl::parse(&pem, &self.ca_pem)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes each accepted root to the trust directory (none: kept in memory only).
    fn store_roots(&self, roots: &[SignedRoot]) -> Result<(), String> {
        if let Some(dir) = &self.trust_dir {
            for r in roots {
                crate::trust::write_root(dir, r).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

impl BrokerCrl {
    /// Replaces the broker's CRL file (atomically: the broker never reads half a file) and
    /// signals the broker to reload it. The file is world-readable: the broker usually runs as
    /// its own user, and a CRL is public.
    fn replace(&self, pem: &[u8]) -> Result<(), String> {
        write_file_atomically(&self.path, pem, 0o644).map_err(|e| e.to_string())?;
        let Some(pid_file) = &self.pid_file else {
            return Ok(());
        };
        let pid = std::fs::read_to_string(pid_file)
            .map_err(|e| format!("{}: {e}", pid_file.display()))?;
        let pid: i32 = pid
            .trim()
            .parse()
            .map_err(|_| format!("{}: not a process id", pid_file.display()))?;
        if pid <= 1 {
            return Err(format!("{}: not a broker's process id", pid_file.display()));
        }
        send_hangup(pid).map_err(|e| format!("signalling the broker (pid {pid}): {e}"))
    }
}

/// Sends SIGHUP to `pid` (the `kill` utility: no unsafe code and no libc binding here).
fn send_hangup(pid: i32) -> std::io::Result<()> {
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "kill -HUP exited with {status}"
        )))
    }
}

/// The CRL as PEM, re-encoded from the verified DER so nothing else from the request reaches
/// the file.
fn crl_pem(der: &[u8]) -> String {
    let body = B64.encode(der);
    let mut pem = String::from("-----BEGIN X509 CRL-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END X509 CRL-----\n");
    pem
}
