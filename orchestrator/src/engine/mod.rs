//! The engine: the single task that owns campaign and device state. It applies device reports
//! through the pure state machine ([`crate::fleet::state`]), serves chunks, answers admin
//! requests, and makes every change durable before anything about it leaves the process.
//!
//! Revocation (`pki`): the engine keeps the CRL in force, knows which registered devices hold a
//! revoked certificate, and gives them no job and no chunk; it also renews device certificates.
//!
//! Design: one task, batched. Events are taken in batches (up to [`BATCH_MAX`]); all writes of a
//! batch are flushed once (group commit) and only then are its acknowledgements, jobs and replies
//! published. A crash therefore loses only unacknowledged work, which devices resend.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use aloft_broker::{DeliverError, DirectRoutes, FrontContext};
use aloft_certs::revocation::VerifiedCrl;
use aloft_proto::chunkframe::{self, ChunkErrorCode};
use aloft_proto::crypto::{self, ContentKey};
use aloft_proto::manifest::{Manifest, SignedManifest};
use aloft_proto::messages::{
    self, AckError, AckOutcome, ChunkRequest, Job, StatusAck, StatusReport, PROTOCOL_VERSION,
};
use aloft_proto::{topics, ArtifactId, CampaignId, DeviceId, DeviceState, OperatorId, Reason};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::fleet::state::{self, Decision, Progress};
pub use crate::inbound::{Inbound, SeenDevice};
use crate::metrics::Metrics;
use crate::mqtt::{LinkClosed, Publisher};
use crate::rollout::{Action, Known, Plan, Rollout};
use crate::store::{CampaignRecord, DeviceRecord, Store, StoreError};

mod admin;
mod campaigns;
mod pki;
mod renewal;
mod rollouts;

pub use renewal::RENEWAL_INTERVAL_MS;

/// Most events handled per group commit.
pub const BATCH_MAX: usize = 256;

/// The audit action of a `succeeded` report from a member never sent a chunk (§10).
pub const SUCCESS_WITHOUT_DOWNLOAD: &str = "success_without_download";

/// How often rollouts are moved forward when no event arrives (timeouts, soaks, schedules).
pub const TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// What the engine needs besides its store.
#[derive(Clone)]
pub struct EngineConfig {
    /// The newest root of trust: its release role must sign every upload (threshold, no
    /// revoked key), and its chain travels in every job.
    pub trust: crate::trust::TrustState,
    /// Where accepted roots are written (`trust_update`); `None` keeps them in memory only.
    pub trust_dir: Option<std::path::PathBuf>,
    /// The fleet CA, for verifying certificates submitted for registration.
    pub ca_pem: String,
    /// The front's direct routes: chunk responses go to devices this way, past the broker
    /// (see `aloft_broker::front::direct`). Without it they are published through the broker.
    pub direct: Option<Arc<DirectRoutes>>,
    /// The front, whose CRL `crl_update` replaces at run time. Without it a CRL cannot be
    /// applied and `crl_update` is refused.
    pub front: Option<Arc<FrontContext>>,
    /// The CRL in force at start-up (from `crl.pem`, already verified against the fleet CA).
    pub crl: Option<VerifiedCrl>,
    /// Where the CRL in force is kept (`<data-dir>/crl.pem`); `crl_update` replaces it.
    pub crl_path: Option<std::path::PathBuf>,
    /// Signs renewals with `<data-dir>/pki/ca.key`, on a thread of its own; without it every
    /// renewal answers `ca_offline`.
    pub signer: Option<crate::signer::Signer>,
}

/// Why the engine stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Link(#[from] LinkClosed),
}

/// A campaign with its release material and every member's progress, in memory.
struct LiveCampaign {
    record: CampaignRecord,
    manifest: Manifest,
    signed: SignedManifest,
    key: ContentKey,
    progress: HashMap<DeviceId, Progress>,
    /// Members per state, kept with `progress` (see `set`): every applied report refreshes the
    /// campaign's gauges, which must not cost a pass over the whole fleet.
    counts: BTreeMap<DeviceState, u32>,
    /// Who is notified when; it sees every change of `progress`.
    rollout: Rollout,
}

impl LiveCampaign {
    fn new(
        record: CampaignRecord,
        manifest: Manifest,
        signed: SignedManifest,
        key: ContentKey,
        progress: HashMap<DeviceId, Progress>,
    ) -> Self {
        let mut counts = BTreeMap::new();
        for p in progress.values() {
            *counts.entry(p.state).or_insert(0) += 1;
        }
        let known: HashMap<DeviceId, Known> = progress
            .iter()
            .map(|(d, p)| {
                let k = Known {
                    state: p.state,
                    since_ms: p.updated_ms,
                    unhealthy: p.unhealthy,
                };
                (d.clone(), k)
            })
            .collect();
        let plan = Plan::new(&record.artifact, &record.devices, &record.policy);
        let rollout = Rollout::new(
            plan,
            record.policy.clone(),
            record.created_ms,
            record.status,
            record.rollout.clone(),
            &known,
        );
        LiveCampaign {
            record,
            manifest,
            signed,
            key,
            progress,
            counts,
            rollout,
        }
    }

    /// Records a member's new progress.
    fn set(&mut self, device: &DeviceId, next: Progress) {
        let to = next.state;
        self.rollout.observe(device, to, next.updated_ms);
        if let Some(old) = self.progress.insert(device.clone(), next) {
            if let Some(n) = self.counts.get_mut(&old.state) {
                *n = n.saturating_sub(1);
            }
        }
        *self.counts.entry(to).or_insert(0) += 1;
    }

    fn counts(&self) -> BTreeMap<DeviceState, u32> {
        self.counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| (*s, *n))
            .collect()
    }
}

struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

pub struct Engine {
    store: Store,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    campaigns: HashMap<CampaignId, LiveCampaign>,
    /// Chunks received so far of releases being uploaded.
    uploads: HashMap<ArtifactId, HashSet<u32>>,
    out: Vec<Outgoing>,
    dirty: bool,
    admin_replies: admin::ReplyCache,
    /// Campaigns changed in this batch: their rollouts move before the batch commits.
    touched: HashSet<CampaignId>,
    /// The CRL in force; only a verified CRL with a higher number replaces it.
    crl: Option<VerifiedCrl>,
    /// Registered devices whose current certificate the CRL in force revokes (or whose record
    /// cannot say which certificate they hold): no job, no chunk.
    revoked_devices: HashSet<DeviceId>,
    /// Who may renew a certificate now (one per device per hour, operators' early leaves).
    renewals: renewal::RenewalGate,
    /// Chunk requests of members served for the first time, answered once the batch's commit
    /// has made that durable (see `note_served`); at most one per event of the batch.
    held_requests: Vec<(DeviceId, ArtifactId, u32, ChunkRequest)>,
    /// Withdrawals published again for a member that asked for chunks of a withdrawn job since
    /// this process started: at most one each, however often it asks.
    rewithdrawn: HashSet<(DeviceId, CampaignId)>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Engine {
    pub fn new(store: Store, cfg: EngineConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            campaigns: HashMap::new(),
            uploads: HashMap::new(),
            out: Vec::new(),
            dirty: false,
            admin_replies: admin::ReplyCache::default(),
            touched: HashSet::new(),
            crl: cfg.crl.clone(),
            revoked_devices: HashSet::new(),
            renewals: renewal::RenewalGate::default(),
            held_requests: Vec::new(),
            rewithdrawn: HashSet::new(),
            cfg,
        }
    }

    /// Runs until `rx` closes. Returns an error only for failures that make continuing unsafe
    /// (the store cannot write, the broker link is gone).
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Inbound>,
        publisher: Publisher,
    ) -> Result<(), EngineError> {
        self.recover()?;
        self.commit(&publisher).await?;
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(first) = ev else { break };
                    self.handle(first)?;
                    for _ in 1..BATCH_MAX {
                        match rx.try_recv() {
                            Ok(ev) => self.handle(ev)?,
                            Err(_) => break,
                        }
                    }
                }
                _ = ticker.tick() => {
                    self.touched.extend(self.campaigns.iter()
                        .filter(|(_, c)| !c.rollout.settled())
                        .map(|(id, _)| id.clone()));
                }
            }
            self.commit(&publisher).await?;
        }
        Ok(())
    }

    /// Moves the touched rollouts, makes the batch durable, then lets its output out.
    async fn commit(&mut self, publisher: &Publisher) -> Result<(), EngineError> {
        let now = now_ms();
        for id in std::mem::take(&mut self.touched) {
            self.tick_rollout(&id, now)?;
        }
        if self.dirty {
            let t = Instant::now();
            self.store.flush()?;
            self.metrics.store_flushed(t.elapsed().as_secs_f64());
            self.dirty = false;
        }
        for (device, artifact, count, req) in std::mem::take(&mut self.held_requests) {
            self.serve_chunks(&device, &artifact, count, &req)?;
        }
        for o in self.out.drain(..) {
            publisher.publish(o.topic, o.payload, o.retain).await?;
        }
        Ok(())
    }

    fn send(&mut self, topic: String, payload: Vec<u8>, retain: bool) {
        self.out.push(Outgoing {
            topic,
            payload,
            retain,
        });
    }

    fn handle(&mut self, ev: Inbound) -> Result<(), StoreError> {
        match ev {
            Inbound::Status { device, payload } => self.on_status(device, &payload),
            Inbound::ChunkRequest { device, payload } => self.on_chunk_request(device, &payload),
            Inbound::Health { device, payload } => self.on_health(device, &payload),
            Inbound::Admin { operator, payload } => self.on_admin(operator, &payload),
            Inbound::Csr { device, payload } => self.on_csr(device, &payload),
            Inbound::DeviceSeen(seen) => self.on_device_seen(seen),
            Inbound::Signed(signed) => self.on_signed(signed),
        }
    }

    /// Loads every campaign; notifies members still idle and republishes the jobs of members in
    /// flight (the embedded broker keeps no retained messages across restarts).
    fn recover(&mut self) -> Result<(), StoreError> {
        // Before any job is republished: the CRL may have changed while the engine was down.
        self.refresh_revoked()?;
        let now = now_ms();
        for record in self.store.campaigns()? {
            let Some(mut live) = self.load_campaign(record)? else {
                continue;
            };
            live.rollout.recovered(now);
            let id = live.record.id.clone();
            self.campaigns.insert(id.clone(), live);
            self.republish_jobs(&id)?;
            self.refresh_gauges(&id);
            self.touched.insert(id);
        }
        info!(campaigns = self.campaigns.len(), "engine recovered");
        Ok(())
    }

    fn load_campaign(&self, record: CampaignRecord) -> Result<Option<LiveCampaign>, StoreError> {
        let Some(release) = self.store.release(&record.artifact)? else {
            warn!(campaign = %record.id, artifact = %record.artifact, "campaign's release is missing; skipped");
            return Ok(None);
        };
        let Some(key) = parse_key_hex(&release.content_key_hex) else {
            warn!(artifact = %record.artifact, "stored content key is malformed; campaign skipped");
            return Ok(None);
        };
        let progress = self
            .store
            .campaign_progress(&record.id)?
            .into_iter()
            .collect();
        Ok(Some(LiveCampaign::new(
            record,
            release.manifest,
            release.signed,
            key,
            progress,
        )))
    }

    fn on_status(&mut self, device: DeviceId, payload: &[u8]) -> Result<(), StoreError> {
        let report: StatusReport = match messages::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.rejected("status", e.code());
                warn!(%device, error = %e, "status report refused");
                return Ok(());
            }
        };
        let now = now_ms();
        let campaign = report.campaign.clone();
        let current = self
            .campaigns
            .get(&campaign)
            .and_then(|c| c.progress.get(&device))
            .cloned();
        let Some(current) = current else {
            self.metrics.report("rejected");
            debug!(%device, %campaign, "report for a campaign the device is not in");
            self.ack(
                &device,
                &report,
                AckOutcome::Rejected,
                DeviceState::Idle,
                Some(AckError::NotTargeted),
            );
            return Ok(());
        };
        // Any decodable report of a member, even a duplicate, is a sign of life (the device
        // timeout measures silence).
        if let Some(live) = self.campaigns.get_mut(&campaign) {
            live.rollout.touch(&device, now);
        }
        let (outcome, state, error) = match state::apply_report(&current, &report, now) {
            Decision::Apply(next) => {
                self.store.put_progress(&campaign, &device, &next)?;
                self.dirty = true;
                self.metrics.report("applied");
                if let Some(reason) = next.reason {
                    self.metrics.failure(reason.as_str());
                    info!(%device, %campaign, state = %next.state, %reason, "device did not succeed");
                }
                let s = next.state;
                if let Some(live) = self.campaigns.get_mut(&campaign) {
                    live.set(&device, next);
                }
                if s == DeviceState::Succeeded {
                    if !current.served {
                        self.flag_success_without_download(&device, &campaign, now)?;
                    }
                    self.raise_floor(&device, &campaign)?;
                }
                self.refresh_gauges(&campaign);
                self.touched.insert(campaign.clone());
                (AckOutcome::Applied, s, None)
            }
            Decision::Duplicate => {
                self.metrics.report("duplicate");
                (AckOutcome::Duplicate, current.state, None)
            }
            Decision::Reject(next, error) => {
                self.metrics.report("rejected");
                if error == AckError::IllegalTransition {
                    self.metrics.illegal_transition();
                }
                warn!(%device, %campaign, from = %current.state, to = %report.state, seq = report.seq, ?error, "report rejected");
                if next != current {
                    self.store.put_progress(&campaign, &device, &next)?;
                    self.dirty = true;
                    if let Some(live) = self.campaigns.get_mut(&campaign) {
                        live.set(&device, next);
                    }
                }
                (AckOutcome::Rejected, current.state, Some(error))
            }
        };
        self.ack(&device, &report, outcome, state, error);
        Ok(())
    }

    fn ack(
        &mut self,
        device: &DeviceId,
        report: &StatusReport,
        outcome: AckOutcome,
        state: DeviceState,
        error: Option<AckError>,
    ) {
        let ack = StatusAck {
            v: PROTOCOL_VERSION,
            campaign: report.campaign.clone(),
            seq: report.seq,
            outcome,
            state,
            error,
        };
        self.send(topics::ack(device), messages::encode(&ack), false);
    }

    fn on_chunk_request(&mut self, device: DeviceId, payload: &[u8]) -> Result<(), StoreError> {
        let req: ChunkRequest = match messages::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.rejected("chunk_request", e.code());
                warn!(%device, error = %e, "chunk request refused");
                return Ok(());
            }
        };
        let topic = topics::chunk_response(&device);
        let first = req.ranges[0][0];
        if self.revoked_devices.contains(&device) {
            self.metrics.rejected("chunk_request", "revoked");
            warn!(%device, "chunk request from a device whose certificate is revoked refused");
            let frame =
                chunkframe::encode_error(&req.artifact, first, ChunkErrorCode::NotDownloading);
            self.send_chunk(&device, &topic, frame);
            return Ok(());
        }
        let Some(live) = self.campaigns.get_mut(&req.campaign) else {
            self.metrics.rejected("chunk_request", "unknown_campaign");
            let frame =
                chunkframe::encode_error(&req.artifact, first, ChunkErrorCode::UnknownArtifact);
            self.send_chunk(&device, &topic, frame);
            return Ok(());
        };
        let progress = live.progress.get(&device);
        let state = progress.map(|p| p.state);
        let withdrawn = progress.and_then(|p| withdrawn_reason(p, live.record.status));
        if state.is_some() {
            live.rollout.touch(&device, now_ms());
        }
        if live.record.artifact != req.artifact || state.is_none() {
            self.metrics.rejected("chunk_request", "unknown_artifact");
            let frame =
                chunkframe::encode_error(&req.artifact, first, ChunkErrorCode::UnknownArtifact);
            self.send_chunk(&device, &topic, frame);
            return Ok(());
        }
        // `Notified` too: the device's `downloading` report may still be in this very batch.
        let serving = matches!(
            state,
            Some(DeviceState::Notified | DeviceState::Downloading)
        );
        if !serving || withdrawn.is_some() {
            self.metrics.rejected("chunk_request", "not_downloading");
            let frame =
                chunkframe::encode_error(&req.artifact, first, ChunkErrorCode::NotDownloading);
            self.send_chunk(&device, &topic, frame);
            // A device still downloading a withdrawn job missed its withdrawal: the broker
            // lost the retained one in a restart. Tell it again, once per process (the broker
            // keeps it from then on, so a device repeating its request gets no second copy),
            // unless a newer job of another campaign is what its job topic holds now.
            if let Some(reason) = withdrawn {
                if !self
                    .rewithdrawn
                    .contains(&(device.clone(), req.campaign.clone()))
                    && !self.has_job_elsewhere(&device, &req.campaign)
                {
                    self.rewithdrawn
                        .insert((device.clone(), req.campaign.clone()));
                    self.metrics.rejected("chunk_request", "withdrawn");
                    self.withdraw_job(&device, &req.campaign, reason);
                }
            }
            return Ok(());
        }
        let count = live.manifest.chunk_count;
        let artifact = live.record.artifact.clone();
        // A member's first request for a chunk of the image records that it was served, and is
        // answered after the batch's commit, once that record is durable.
        if first < count && !self.note_served(&req.campaign, &device)? {
            self.held_requests.push((device, artifact, count, req));
            return Ok(());
        }
        self.serve_chunks(&device, &artifact, count, &req)
    }

    /// One frame per requested index, in order (PROTOCOL.md §10.7).
    fn serve_chunks(
        &mut self,
        device: &DeviceId,
        artifact: &ArtifactId,
        count: u32,
        req: &ChunkRequest,
    ) -> Result<(), StoreError> {
        let topic = topics::chunk_response(device);
        for index in req.indices() {
            if index >= count {
                let frame = chunkframe::encode_error(artifact, index, ChunkErrorCode::OutOfRange);
                self.send_chunk(device, &topic, frame);
                break;
            }
            let Some(sealed) = self.store.chunk(artifact, index)? else {
                warn!(%artifact, index, "stored release is missing a chunk");
                let frame =
                    chunkframe::encode_error(artifact, index, ChunkErrorCode::UnknownArtifact);
                self.send_chunk(device, &topic, frame);
                break;
            };
            self.metrics.chunk_served(sealed.len());
            let frame = chunkframe::encode_data(artifact, index, count, &sealed);
            self.send_chunk(device, &topic, frame);
        }
        Ok(())
    }

    /// Records that a member is being served chunks; returns whether it was already recorded.
    /// One write per member, never one per chunk. The first time, the caller holds the request
    /// until the batch's commit: no chunk leaves before "served" is durable, so a device that
    /// downloaded before a crash or restart and reports `succeeded` after it is never flagged.
    fn note_served(
        &mut self,
        campaign: &CampaignId,
        device: &DeviceId,
    ) -> Result<bool, StoreError> {
        let Some(p) = self
            .campaigns
            .get_mut(campaign)
            .and_then(|live| live.progress.get_mut(device))
        else {
            return Ok(true);
        };
        if p.served {
            return Ok(true);
        }
        p.served = true;
        self.store.put_progress(campaign, device, p)?;
        self.dirty = true;
        Ok(false)
    }

    /// A member reported `succeeded` but was never handed a chunk of the image. Devices are
    /// trusted to report honestly (SECURITY.md), so the report is still applied (the device is
    /// the authority on what it runs), but an operator must be able to see it: a counter, a
    /// warning, and an audit entry, durable with the batch like the transition itself.
    fn flag_success_without_download(
        &mut self,
        device: &DeviceId,
        campaign: &CampaignId,
        now: u64,
    ) -> Result<(), StoreError> {
        self.metrics.success_without_download();
        warn!(%device, %campaign, "device reported succeeded but was never sent a chunk of the image");
        let event = crate::store::AuditEvent {
            actor: "orchestrator".into(),
            action: SUCCESS_WITHOUT_DOWNLOAD.into(),
            subject: format!("{campaign}/{device}"),
            outcome: "flagged".into(),
        };
        self.store.append_audit(event, now)?;
        self.dirty = true;
        Ok(())
    }

    /// Sends a chunk frame: directly on the device's connection when the front offers it.
    /// Chunk frames carry no state, so they need not wait for the batch's commit.
    fn send_chunk(&mut self, device: &DeviceId, topic: &str, frame: Vec<u8>) {
        match &self.cfg.direct {
            Some(direct) => {
                if let Err(e) = direct.deliver(device, topic, &frame) {
                    let why = match e {
                        DeliverError::NotConnected => "not_connected",
                        DeliverError::QueueFull => "queue_full",
                    };
                    self.metrics.rejected("chunk_response", why);
                    debug!(%device, error = %e, "chunk response dropped; the device will ask again");
                }
            }
            None => self.send(topic.to_owned(), frame, false),
        }
    }

    /// Whether `device` is in flight in a running campaign other than `campaign`: its job
    /// topic then holds that campaign's job, which a withdrawal must not replace. O(campaigns).
    fn has_job_elsewhere(&self, device: &DeviceId, campaign: &CampaignId) -> bool {
        self.campaigns.iter().any(|(id, live)| {
            id != campaign
                && !live.record.status.is_final()
                && live
                    .progress
                    .get(device)
                    .is_some_and(|p| p.state != DeviceState::Idle && !p.state.is_terminal())
        })
    }

    fn on_health(&mut self, device: DeviceId, payload: &[u8]) -> Result<(), StoreError> {
        let hb: messages::Heartbeat = match messages::decode(payload) {
            Ok(h) => h,
            Err(e) => {
                self.metrics.rejected("health", e.code());
                debug!(%device, error = %e, "heartbeat refused");
                return Ok(());
            }
        };
        self.metrics.heartbeat(hb.healthy);
        let Some(campaign) = hb.campaign else {
            return Ok(());
        };
        let now = now_ms();
        let Some(live) = self.campaigns.get_mut(&campaign) else {
            return Ok(());
        };
        live.rollout.touch(&device, now);
        if !live.rollout.observe_health(&device, hb.healthy, now) {
            return Ok(());
        }
        let Some(mut p) = live.progress.get(&device).cloned() else {
            return Ok(());
        };
        warn!(%device, %campaign, detail = hb.detail.as_deref().unwrap_or(""), "device unhealthy during its wave's soak; counted as a failure");
        p.unhealthy = true;
        self.store.put_progress(&campaign, &device, &p)?;
        live.progress.insert(device, p);
        self.dirty = true;
        self.touched.insert(campaign);
        Ok(())
    }

    /// Records that `device` now runs `campaign`'s security version and manifest sequence: the
    /// device raised its own floor and installed sequence before reporting `succeeded`.
    /// Flushed with the batch, before the ack.
    fn raise_floor(&mut self, device: &DeviceId, campaign: &CampaignId) -> Result<(), StoreError> {
        let Some((version, sequence)) = self
            .campaigns
            .get(campaign)
            .map(|live| (live.manifest.security_version, live.manifest.sequence))
        else {
            return Ok(());
        };
        if let Some(mut d) = self.store.device(device)? {
            let raised = d.floor < Some(version) || d.installed_sequence < sequence;
            if raised {
                d.floor = d.floor.max(Some(version));
                d.installed_sequence = d.installed_sequence.max(sequence);
                self.store.put_device(&d)?;
            }
        }
        Ok(())
    }

    fn on_device_seen(&mut self, seen: SeenDevice) -> Result<(), StoreError> {
        let x25519 = hex::encode(seen.x25519_public);
        let serial = hex::encode(&seen.serial);
        let now = now_ms();
        let mut d = match self.store.device(&seen.id)? {
            Some(mut d) => {
                d.last_seen_ms = now;
                if d.x25519_public != x25519 || d.cert_serial != serial {
                    info!(device = %seen.id, serial = %serial, "device presented a new certificate; registry updated");
                    d.x25519_public = x25519;
                    d.cert_serial = serial;
                    d.cert_not_before = seen.not_before;
                    d.cert_not_after = seen.not_after;
                    // The key that jobs are wrapped to changed: make it durable with the batch.
                    self.dirty = true;
                }
                d
            }
            None => {
                info!(device = %seen.id, serial = %serial, "device registered from its certificate");
                self.dirty = true;
                DeviceRecord {
                    id: seen.id,
                    x25519_public: x25519,
                    cert_not_after: seen.not_after,
                    cert_not_before: seen.not_before,
                    cert_serial: serial,
                    revoked: false,
                    groups: Vec::new(),
                    labels: Default::default(),
                    registered_ms: now,
                    last_seen_ms: now,
                    floor: None,
                    installed_sequence: None,
                }
            }
        };
        // The front checked this certificate against the CRL at the handshake, but a newer CRL
        // may have come in since.
        self.set_revoked(&mut d);
        // Last-seen alone is informational: sled's background flush is durable enough for it.
        self.store.put_device(&d)?;
        Ok(())
    }
}

/// Why a member's job was withdrawn, if it was: the orchestrator timed it out, cancelled it or
/// revoked its certificate, or its campaign was aborted while it was notified or downloading.
fn withdrawn_reason(p: &Progress, status: crate::store::CampaignStatus) -> Option<Reason> {
    match (p.state, p.reason) {
        (
            DeviceState::Failed,
            Some(r @ (Reason::TimedOut | Reason::Cancelled | Reason::Revoked)),
        ) => Some(r),
        (DeviceState::Notified | DeviceState::Downloading, _)
            if status == crate::store::CampaignStatus::Aborted =>
        {
            Some(Reason::Cancelled)
        }
        _ => None,
    }
}

fn parse_key_hex(s: &str) -> Option<ContentKey> {
    let bytes: [u8; 32] = hex::decode(s).ok()?.try_into().ok()?;
    Some(ContentKey::from_bytes(bytes))
}

/// The job for one device: the signed manifest and the content key wrapped for it alone.
fn job_payload(
    live: &LiveCampaign,
    device: &DeviceRecord,
    roots: &[aloft_proto::trust::SignedRoot],
    now_ms: u64,
) -> Result<Vec<u8>, crypto::CryptoError> {
    let public: [u8; 32] = hex::decode(&device.x25519_public)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(crypto::CryptoError::MalformedPublicKey)?;
    let wrapped = crypto::wrap_content_key(&public, &device.id, &live.record.artifact, &live.key)?;
    let job = Job {
        v: PROTOCOL_VERSION,
        campaign: live.record.id.clone(),
        manifest: live.signed.clone(),
        wrapped_key: wrapped,
        issued_at: now_ms / 1000,
        roots: roots.to_vec(),
    };
    Ok(messages::encode(&job))
}
