//! The device's update logic as a sans-I/O state machine: [`UpdateAgent::handle`] takes the time,
//! one input (a connection change, a payload from one of the device's topics, or a timer tick)
//! and the slot storage, changes the [`DeviceRecord`] and returns what to publish. It owns no
//! socket and no clock, so tests drive it with real crypto and in-memory flash, and the caller
//! persists the record (see [`UpdateAgent::take_persist`]) before publishing the outputs.
//!
//! Everything from the network is untrusted: undecodable payloads are counted and dropped, and a
//! refused job is reported and forgotten, so no input can panic or wedge the agent.
//!
//! A new agent is a device that just powered on: [`UpdateAgent::new`] first does what the
//! bootloader does ([`SlotTable::power_on`](crate::slots::SlotTable::power_on)). An image that
//! booted but never confirmed boots again, up to [`AgentConfig::boot_limit`] boots, and is
//! verified afresh; past the limit it is abandoned and the campaign ends `rolled_back` /
//! `boot_failed`. One installed but not yet booted boots now and is verified. After the reset into a new image
//! the health check may take its time ([`HealthStatus::Pending`]); if the image has not confirmed
//! within [`AgentConfig::confirm_deadline_ms`] it is abandoned the same way. The deadline is
//! judged against when the check reached its verdict ([`HealthCheck::decided_at`]), never against
//! the server: nothing between the reset and the confirm waits for the network. Once a campaign's
//! image is confirmed, the agent publishes [`Heartbeat`]s with the application's health.
//!
//! Trust starts from the root pinned at provisioning ([`AgentConfig::root`]); jobs may carry newer
//! roots, and the newest one accepted is kept in the record, so release keys can rotate and be
//! revoked without touching the device (PROTOCOL.md §9.2).

mod checks;
mod deferral;
mod delta;
#[cfg(test)]
mod delta_tests;
mod download;
mod install;
mod origin;
#[cfg(test)]
mod precondition_tests;
pub mod preconditions;
#[cfg(test)]
mod proptests;
pub mod shared;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod trust_tests;

use std::sync::Arc;

use aloft_proto::chunkframe::{self, ChunkErrorCode, ChunkFrame};
use aloft_proto::crypto::{ContentKey, DeviceEncryptionKey};
use aloft_proto::manifest::Manifest;
use aloft_proto::messages::{
    self, AckOutcome, ChunkRequest, Heartbeat, Job, StatusAck, StatusReport, Withdrawal, Withdrawn,
};
use aloft_proto::trust::{SignedRoot, TrustError, TrustedRoot};
use aloft_proto::{CampaignId, DeviceId, DeviceState, Reason};
use tracing::{debug, info, warn};

use crate::slots::{Flash, PowerOn, SlotState};
use crate::store::{CampaignProgress, ChunkBitmap, DeltaProgress, DeviceRecord, FinishedCampaign};
use checks::{clip, peek_refusal, unwrap_key, verify_job, verify_signature, walk_roots, Refusal};
pub use delta::RebuildStats;
use download::{ChunkOutcome, Session};
pub use origin::{OriginFailure, OriginFetch};
pub use preconditions::{Conditions, Environment, Unconstrained};

/// How the agent behaves; everything but the identity has a sensible default.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device: DeviceId,
    /// Manifests for any other model are refused.
    pub hardware_model: String,
    /// The root of trust pinned at provisioning: it names the release keys (and how many must
    /// sign) until a job's chain of newer roots replaces it; the newest accepted lives in the
    /// record. Shared: a simulator's agents were provisioned with one and the same.
    pub root: Arc<SignedRoot>,
    /// `root` already verified by whoever provisions many agents with the same one (the
    /// simulator pins it once for the whole fleet: at 10,000 devices, verifying it again at
    /// every power-on cost 0.8 s of CPU in the connect storm). `None`, as on a real device:
    /// verified at every power-on.
    pub pinned: Option<Arc<TrustedRoot>>,
    /// Where agents that share a process keep one copy of each signed manifest (the simulator's
    /// fleet shares one); `None`: the agent keeps its own.
    pub manifests: Option<Arc<shared::SharedManifests>>,
    /// Whether the device's clock can be trusted (default true). Without one, the device's time
    /// is the latest signed time it has seen (`DeviceRecord::time_floor`), so expiries still
    /// hold against anything older than the newest metadata it accepted.
    pub trusted_clock: bool,
    /// Chunks requested but not yet received, at most.
    pub window: u32,
    /// A requested chunk not received within this is requested again; doubles per expiry.
    pub chunk_timeout_ms: u64,
    pub max_chunk_timeout_ms: u64,
    /// An unacknowledged report is published again after this.
    pub report_timeout_ms: u64,
    /// Failures of one chunk after which the campaign fails with `chunk_verification_failed`.
    pub max_chunk_retries: u32,
    /// How long to wait after a `not_downloading` error frame before asking again.
    pub not_downloading_pause_ms: u64,
    /// A new image that has not confirmed (its health check still pending) this long after the
    /// reset into it is abandoned: the device boots back into the old slot and reports
    /// `rolled_back` / `boot_failed`, as a bootloader watchdog would.
    pub confirm_deadline_ms: u64,
    /// Boots an unconfirmed image gets before the bootloader falls back (U-Boot's `bootlimit`):
    /// a power loss before the confirm costs one. 1 is esp-idf's behaviour.
    pub boot_limit: u8,
    /// How often a device running a confirmed image from a campaign publishes a heartbeat while
    /// connected; 0 turns heartbeats off.
    pub heartbeat_ms: u64,
    /// How long the reset into a new image takes after the `rebooting` report is queued. 0 resets
    /// within the same step; a simulator sets more so that a power loss can strike in between.
    pub reboot_delay_ms: u64,
    /// (1.5) Whether the device fetches chunks from a job's HTTPS origin (its shell has an
    /// origin client and trust anchors for it). Off: a job's origin is ignored.
    pub origin_fetch: bool,
    /// Origin fetches in flight at once, at most.
    pub origin_window: u32,
    /// Origin failures in a row (fetch failed, or bytes that do not match the manifest) after
    /// which the download gives the origin up and asks the orchestrator for everything.
    pub origin_max_failures: u32,
    /// A fetch the shell has not answered within this counts as failed (the shell's own time
    /// limit should answer first).
    pub origin_timeout_ms: u64,
    /// (1.5) While the manifest's preconditions do not hold (and while a download they gate is
    /// running), the device asks its [`Environment`] again this often.
    pub precondition_recheck_ms: u64,
}

impl AgentConfig {
    pub fn new(
        device: DeviceId,
        hardware_model: impl Into<String>,
        root: impl Into<Arc<SignedRoot>>,
    ) -> Self {
        AgentConfig {
            device,
            hardware_model: hardware_model.into(),
            root: root.into(),
            pinned: None,
            manifests: None,
            trusted_clock: true,
            window: 8,
            chunk_timeout_ms: 3_000,
            max_chunk_timeout_ms: 30_000,
            report_timeout_ms: 5_000,
            max_chunk_retries: 8,
            not_downloading_pause_ms: 1_000,
            confirm_deadline_ms: 60_000,
            boot_limit: 3,
            heartbeat_ms: 10_000,
            reboot_delay_ms: 0,
            origin_fetch: false,
            origin_window: 4,
            origin_max_failures: 4,
            origin_timeout_ms: 60_000,
            precondition_recheck_ms: 60_000,
        }
    }
}

/// The verdict of a health check on a freshly booted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    /// Confirm the image.
    Healthy,
    /// Roll back: `rolled_back` / `health_check_failed`.
    Unhealthy,
    /// Not decided yet; asked again at the next input (a timer tick at the latest). An image
    /// that stays pending past the confirm deadline is rolled back as `boot_failed`.
    Pending,
}

/// How the application is doing while it runs a confirmed image (sent in heartbeats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppHealth {
    pub healthy: bool,
    /// What is wrong, for humans; clipped to the protocol's limit when sent.
    pub detail: Option<String>,
}

impl AppHealth {
    pub fn healthy() -> Self {
        AppHealth {
            healthy: true,
            detail: None,
        }
    }
}

/// The device's health sources: the check that decides whether a freshly booted image is
/// confirmed, and the application's health reported in heartbeats afterwards.
pub trait HealthCheck: Send {
    /// Checks the image of `campaign` (firmware `version`) that has just booted and is not yet
    /// confirmed. Called at `now_ms` on every step in `verifying` until it is not `Pending`.
    fn check(&mut self, now_ms: u64, campaign: &CampaignId, version: &str) -> HealthStatus;

    /// When the verdict that [`check`](Self::check) just returned at `now_ms` was reached. The
    /// confirm deadline is judged against this time, as a watchdog judges the device's own
    /// work: a verdict reached in time confirms (or rolls back as unhealthy) even if the agent
    /// only got to ask for it later. A check running on the device answers when it is asked, so
    /// the default is `now_ms`; a simulated check that keeps its own time (a simulator runs
    /// thousands of agents on a few cores and cannot step each one on time) says when it
    /// finished.
    fn decided_at(&self, now_ms: u64) -> u64 {
        now_ms
    }

    /// When a check that [`check`](Self::check) last found `Pending` will have its verdict, if
    /// it knows: the agent is then stepped at that moment instead of at the shell's next tick.
    /// `None` (the default): the check is asked again at every step, as before.
    fn ready_at(&self) -> Option<u64> {
        None
    }

    /// The application's health at `now_ms`, for a heartbeat. Healthy unless overridden.
    fn app_health(&mut self, _now_ms: u64) -> AppHealth {
        AppHealth::healthy()
    }
}

/// A health check that always passes at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysHealthy;

impl HealthCheck for AlwaysHealthy {
    fn check(&mut self, _: u64, _: &CampaignId, _: &str) -> HealthStatus {
        HealthStatus::Healthy
    }
}

/// One thing that happened to the device.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// The MQTT session is up and the device's subtree subscribed.
    Connected,
    Disconnected,
    /// A payload on the device's `job` topic: a job, or no job (empty, or a withdrawal).
    Job(&'a [u8]),
    /// A payload on the device's `chunk/resp` topic.
    ChunkFrame(&'a [u8]),
    /// A payload on the device's `ack` topic.
    Ack(&'a [u8]),
    /// Time passed; timers are checked.
    Tick,
    /// (1.5) What a fetch of chunk `index` of `artifact` from the job's origin brought: the
    /// body (unchecked; at most the chunk's length) or why there is none.
    Origin {
        artifact: &'a aloft_proto::ArtifactId,
        index: u32,
        body: Result<&'a [u8], OriginFailure>,
    },
}

/// Where an output goes: the device's own topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutTopic {
    /// `status`, QoS 1.
    Status,
    /// `chunk/req`, QoS 1.
    ChunkRequest,
    /// `health`, QoS 0: a lost heartbeat is superseded by the next one.
    Health,
}

impl OutTopic {
    /// Whether a publish here may be lost (QoS 0) rather than delivered at least once (QoS 1).
    pub fn is_best_effort(self) -> bool {
        self == OutTopic::Health
    }
}

/// What the caller must do after [`UpdateAgent::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Publish `payload` on the device's `topic`, at the QoS the topic calls for (see
    /// [`OutTopic`]).
    Publish { topic: OutTopic, payload: Vec<u8> },
}

/// How urgently the record must be saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Persist {
    #[default]
    Clean,
    /// Only download progress changed: losing it costs re-downloading some chunks.
    Soon,
    /// A state, report or outbox changed: save before publishing the outputs.
    Now,
}

/// Longest wait a `busy` frame can impose (its hint is the orchestrator's to set; a device
/// does not let a bad value stop its download for long).
const MAX_BUSY_WAIT_MS: u32 = 10_000;

/// Counters for observability.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Chunks verified, decrypted and written.
    pub chunks_received: u64,
    /// Chunks that failed their digest or authentication.
    pub chunks_rejected: u64,
    /// Payloads that did not decode, on any topic.
    pub bad_payloads: u64,
    /// Reports the orchestrator rejected.
    pub reports_rejected: u64,
    /// Chunk requests that timed out and were asked again.
    pub chunk_requests_expired: u64,
    /// Chunk frames that arrived for chunks already written (answers to repeated requests).
    pub chunks_duplicate: u64,
    /// Jobs of the campaign in progress that arrived again with another wrapped key: the
    /// orchestrator made a second, different job for one campaign (it must never; replicas
    /// and restarts republish the stored one byte for byte).
    pub jobs_differing: u64,
    /// Heartbeats published.
    pub heartbeats_sent: u64,
    /// `busy` frames: the orchestrator asked this device to wait before asking again.
    pub busy_frames: u64,
    /// (1.5) Chunks fetched from an origin, verified and written.
    pub origin_chunks: u64,
    /// Origin bodies refused: wrong length or digest (wrong bytes, truncated, another
    /// release's chunk). The chunk then comes from the orchestrator.
    pub origin_refused: u64,
    /// Origin fetches that brought no body: connection or TLS failure, an HTTP error status, a
    /// redirect, an oversize body, a timeout.
    pub origin_failed: u64,
    /// Downloads that gave their origin up after too many failures in a row.
    pub origin_abandoned: u64,
    /// (1.5) Images rebuilt from a delta and matching their signed target.
    pub delta_rebuilds: u64,
    /// (1.5) Deltas abandoned for the full image (a bad patch, a failed rebuild, or a power
    /// loss that interrupted one).
    pub delta_fallbacks: u64,
    /// (1.5) `deferred` reports queued: a precondition stopped a download or an install.
    pub deferrals: u64,
}

impl AgentStats {
    /// The sum of two sets of counters (e.g. over a device's successive power-ons).
    pub fn plus(self, o: AgentStats) -> AgentStats {
        AgentStats {
            chunks_received: self.chunks_received + o.chunks_received,
            chunks_rejected: self.chunks_rejected + o.chunks_rejected,
            bad_payloads: self.bad_payloads + o.bad_payloads,
            reports_rejected: self.reports_rejected + o.reports_rejected,
            chunk_requests_expired: self.chunk_requests_expired + o.chunk_requests_expired,
            chunks_duplicate: self.chunks_duplicate + o.chunks_duplicate,
            jobs_differing: self.jobs_differing + o.jobs_differing,
            heartbeats_sent: self.heartbeats_sent + o.heartbeats_sent,
            busy_frames: self.busy_frames + o.busy_frames,
            origin_chunks: self.origin_chunks + o.origin_chunks,
            origin_refused: self.origin_refused + o.origin_refused,
            origin_failed: self.origin_failed + o.origin_failed,
            origin_abandoned: self.origin_abandoned + o.origin_abandoned,
            delta_rebuilds: self.delta_rebuilds + o.delta_rebuilds,
            delta_fallbacks: self.delta_fallbacks + o.delta_fallbacks,
            deferrals: self.deferrals + o.deferrals,
        }
    }
}

/// The update state machine of one device.
pub struct UpdateAgent {
    cfg: AgentConfig,
    key: DeviceEncryptionKey,
    health: Box<dyn HealthCheck>,
    record: DeviceRecord,
    /// The root jobs are checked against, as restored at power-on and walked forward since
    /// (mirrored in `record.trusted_root`); an error if neither the pinned root nor the stored
    /// one verifies, in which case every job is refused. Shared with the simulator's other
    /// agents until a job walks it forward.
    trust: Result<Arc<TrustedRoot>, TrustError>,
    connected: bool,
    /// When the outbox head was last published in this connection.
    head_sent_at: Option<u64>,
    /// The in-memory half of `record.current`, rebuilt lazily after a restart.
    session: Option<Session>,
    /// A job for another campaign that arrived while the current one was past the point of no
    /// return; handled when the current one finishes (the retained job is not redelivered).
    held_job: Option<Vec<u8>>,
    stats: AgentStats,
    persist: Persist,
    /// The last report the orchestrator accepted (applied or duplicate) in this process's life:
    /// what it has promised to remember.
    last_acked: Option<(CampaignId, DeviceState)>,
    /// When the reset into the installed image happens (`rebooting`, not yet reset).
    reboot_at: Option<u64>,
    /// When the new image entered `verifying`: the confirm deadline runs from here. In memory
    /// only, since a reset in `verifying` abandons the image anyway.
    verifying_since: Option<u64>,
    /// When the last heartbeat went out in this connection.
    last_heartbeat: Option<u64>,
    /// (1.5) Origin fetches decided and not yet taken by the shell.
    origin_orders: Vec<OriginFetch>,
    /// (1.5) Where the device's conditions come from (battery, use, local time, storage, link).
    env: Box<dyn Environment>,
    /// (1.5) When the preconditions are due to be checked again; `None`: at the next step. In
    /// memory only: after a restart the device checks at once.
    precondition_check_at: Option<u64>,
}

impl UpdateAgent {
    /// A device powering on with `record` as last saved: the bootloader's choice of slot is
    /// applied first (see the module doc), so the record may change (check
    /// [`take_persist`](Self::take_persist) before the first input).
    pub fn new(
        cfg: AgentConfig,
        key: DeviceEncryptionKey,
        mut record: DeviceRecord,
        health: Box<dyn HealthCheck>,
    ) -> Self {
        if let (Some(pool), Some(cur)) = (&cfg.manifests, &mut record.current) {
            share_manifests(pool, &mut cur.job);
        }
        let trust = initial_trust(&cfg, &record);
        if let Err(e) = &trust {
            warn!(device = %cfg.device, error = %e, "no root of trust verifies; every job will be refused");
        }
        let mut agent = UpdateAgent {
            cfg,
            key,
            health,
            record,
            trust,
            connected: false,
            head_sent_at: None,
            session: None,
            held_job: None,
            stats: AgentStats::default(),
            persist: Persist::Clean,
            last_acked: None,
            reboot_at: None,
            verifying_since: None,
            last_heartbeat: None,
            origin_orders: Vec::new(),
            env: Box::new(Unconstrained),
            precondition_check_at: None,
        };
        agent.power_on();
        agent
    }

    /// (1.5) Takes the device's conditions from `env` instead of [`Unconstrained`].
    pub fn with_environment(mut self, env: Box<dyn Environment>) -> Self {
        self.env = env;
        self
    }

    pub fn device(&self) -> &DeviceId {
        &self.cfg.device
    }

    pub fn record(&self) -> &DeviceRecord {
        &self.record
    }

    /// The root of trust jobs are checked against now, if one verifies.
    pub fn trusted_root(&self) -> Option<&TrustedRoot> {
        self.trust.as_deref().ok()
    }

    /// The campaign and state of the last report the orchestrator accepted since start-up.
    pub fn last_acked(&self) -> Option<&(CampaignId, DeviceState)> {
        self.last_acked.as_ref()
    }

    pub fn stats(&self) -> AgentStats {
        self.stats
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The earliest moment at which only the passing of time changes what a step does: the
    /// reset into an installed image, the health check's verdict or the confirm deadline, the
    /// end of a `busy` pause. A shell that steps the agent at a coarse tick (the simulator's is
    /// half a second) steps it then as well, so a device resets, confirms and asks again when
    /// a real one would rather than up to a tick later (a 1,000-device campaign's last second
    /// was ticks waited out, docs/BENCHMARKS.md). `None`: nothing before the next tick. Other
    /// timers (request timeouts, heartbeats, saves) keep the tick's pace.
    pub fn next_wake(&self) -> Option<u64> {
        let (_, phase) = self.current()?;
        match phase {
            DeviceState::Rebooting => self.reboot_at,
            DeviceState::Verifying => {
                let deadline = self
                    .verifying_since
                    .map(|s| s.saturating_add(self.cfg.confirm_deadline_ms));
                [self.health.ready_at(), deadline]
                    .into_iter()
                    .flatten()
                    .min()
            }
            DeviceState::Downloading => self
                .session
                .as_ref()
                .map(|s| s.paused_until)
                .filter(|&t| t > 0),
            _ => None,
        }
    }

    /// The campaign in progress and its phase.
    pub fn current(&self) -> Option<(&CampaignId, DeviceState)> {
        self.record.current.as_ref().map(|c| (&c.campaign, c.phase))
    }

    /// How urgently the record must be saved since the last call; resets it.
    pub fn take_persist(&mut self) -> Persist {
        std::mem::take(&mut self.persist)
    }

    fn dirty(&mut self, p: Persist) {
        self.persist = self.persist.max(p);
    }

    /// Handles one input at `now_ms` (Unix milliseconds) and returns what to publish.
    pub fn handle(&mut self, now_ms: u64, input: Input<'_>, flash: &mut dyn Flash) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Connected => {
                self.connected = true;
                self.head_sent_at = None;
                self.last_heartbeat = None;
                if let Some(s) = &mut self.session {
                    s.forget_outstanding();
                }
            }
            Input::Disconnected => self.connected = false,
            Input::Job(payload) => self.on_job(now_ms, payload, flash),
            Input::ChunkFrame(payload) => self.on_frame(now_ms, payload, flash),
            Input::Ack(payload) => self.on_ack(payload),
            Input::Tick => {}
            Input::Origin {
                artifact,
                index,
                body,
            } => self.on_origin(now_ms, artifact, index, body, flash),
        }
        self.drive(now_ms, flash, &mut out);
        out
    }

    /// Moves everything forward that can move: resumes a campaign, runs the phases after the
    /// download, handles a deferred job, publishes the outbox head and requests chunks.
    fn drive(&mut self, now: u64, flash: &mut dyn Flash, out: &mut Vec<Output>) {
        // Each pass either finishes a campaign or reaches a phase that waits for input; a
        // deferred job can start at most one more campaign, so three passes always suffice.
        for _ in 0..3 {
            self.ensure_session(flash);
            self.advance(now, flash);
            if self.record.current.is_some() {
                break;
            }
            match self.held_job.take() {
                Some(job) => self.on_job(now, &job, flash),
                None => break,
            }
        }
        if !self.connected {
            return;
        }
        self.publish_head(now, out);
        self.request_origin(now);
        self.request_chunks(now, out);
        self.publish_heartbeat(now, out);
    }

    fn publish_head(&mut self, now: u64, out: &mut Vec<Output>) {
        let Some(head) = self.record.outbox.front() else {
            return;
        };
        let due = self
            .head_sent_at
            .is_none_or(|t| now.saturating_sub(t) >= self.cfg.report_timeout_ms);
        if !due {
            return;
        }
        out.push(Output::Publish {
            topic: OutTopic::Status,
            payload: messages::encode(head),
        });
        self.head_sent_at = Some(now);
        let is_downloading_report = head.state == DeviceState::Downloading
            && self
                .record
                .current
                .as_ref()
                .is_some_and(|c| c.campaign == head.campaign);
        if let (true, Some(s)) = (is_downloading_report, &mut self.session) {
            s.requests_enabled = true;
        }
    }

    fn request_chunks(&mut self, now: u64, out: &mut Vec<Output>) {
        let (Some(cur), Some(s)) = (&self.record.current, &mut self.session) else {
            return;
        };
        if cur.phase != DeviceState::Downloading
            || !s.requests_enabled
            || now < s.paused_until
            || cur.deferred.is_some()
        {
            return;
        }
        self.stats.chunk_requests_expired += s.expire(now, self.cfg.max_chunk_timeout_ms);
        for ranges in s.next_requests(now, &cur.written, self.cfg.window) {
            let req = ChunkRequest {
                v: messages::PROTOCOL_VERSION,
                campaign: cur.campaign.clone(),
                artifact: s.artifact().clone(),
                ranges,
            };
            out.push(Output::Publish {
                topic: OutTopic::ChunkRequest,
                payload: messages::encode(&req),
            });
        }
    }

    /// Rebuilds the in-memory session of a campaign loaded from the record.
    fn ensure_session(&mut self, flash: &mut dyn Flash) {
        let Some(cur) = &self.record.current else {
            self.session = None;
            return;
        };
        if self.session.is_some() {
            return;
        }
        let downloading = cur.phase == DeviceState::Downloading;
        // The stored job is checked again against the root the record trusts now: a record
        // edited at rest must not smuggle in a job no release key signed.
        let checked = match &self.trust {
            Ok(trust) => verify_signature(self.cfg.manifests.as_deref(), trust, &cur.job.manifest),
            Err(e) => Err(Refusal::new(Reason::UntrustedRoot, e)),
        };
        let manifest = match checked {
            Ok(m) => m,
            Err(r) => return self.fail(r.reason, Some(r.detail)),
        };
        let key = if downloading {
            match unwrap_key(&self.key, &self.cfg.device, &cur.job, &manifest) {
                Ok(k) => Some(k),
                Err(r) => return self.fail(r.reason, Some(r.detail)),
            }
        } else {
            None
        };
        // A delta in progress resumes with the delta's manifest and key; one that no longer
        // checks out (or whose key does not unwrap) gives way to the full image.
        let resumed = match (&self.trust, cur.delta, downloading) {
            (Ok(trust), Some(d), true) => cur.job.deltas.get(d.offer).and_then(|o| {
                let m = verify_signature(self.cfg.manifests.as_deref(), trust, &o.manifest).ok()?;
                let k = aloft_proto::crypto::unwrap_content_key(
                    &self.key,
                    &self.cfg.device,
                    &m.artifact,
                    &o.wrapped_key,
                )
                .ok()?;
                m.is_delta_for(&manifest).then_some((m, k))
            }),
            _ => None,
        };
        let full_image = manifest.image_size;
        let preconditions = manifest.preconditions.clone();
        let (manifest, key) = match resumed {
            Some((m, k)) => (m, Some(k)),
            None => {
                if let Some(cur) = &mut self.record.current {
                    if cur.delta.take().is_some() {
                        warn!(device = %self.cfg.device, "stored delta no longer checks out; downloading the full image");
                        cur.written = ChunkBitmap::new(manifest.chunk_count);
                        self.stats.delta_fallbacks += 1;
                    }
                }
                (manifest, key)
            }
        };
        let cur = match &self.record.current {
            Some(c) => c,
            None => return,
        };
        let mut session = self.new_session(manifest, key);
        session.preconditions = preconditions;
        session.origin = self.origin_plan(&cur.job);
        // If the downloading report is no longer queued, it was published (and acknowledged).
        session.requests_enabled = !self
            .record
            .outbox
            .iter()
            .any(|r| r.campaign == cur.campaign && r.state == DeviceState::Downloading);
        let count = session.manifest.chunk_count;
        if let Some(cur) = &mut self.record.current {
            if !cur.written.is_consistent() || cur.written.len() != count {
                warn!(device = %self.cfg.device, "stored chunk bitmap is inconsistent; downloading again");
                cur.written = ChunkBitmap::new(count);
                let slot = self.record.slots.update_slot();
                if let Err(e) = flash.begin_update(slot, full_image) {
                    return self.fail(Reason::InstallFailed, Some(e.to_string()));
                }
            }
        }
        self.session = Some(session);
    }

    fn fail(&mut self, reason: Reason, detail: Option<String>) {
        self.finish(DeviceState::Failed, Some(reason), detail.map(clip));
    }

    /// Sets the current campaign's phase and queues its report.
    fn enter(&mut self, state: DeviceState) {
        if let Some(cur) = &mut self.record.current {
            cur.phase = state;
        }
        self.report(state, None, None);
    }

    /// Queues a report for the current campaign with its next seq.
    fn report(
        &mut self,
        state: DeviceState,
        reason: Option<Reason>,
        detail: Option<String>,
    ) -> Option<StatusReport> {
        let running_version = Some(self.record.running_version().to_owned());
        let cur = self.record.current.as_mut()?;
        let report = StatusReport {
            v: messages::PROTOCOL_VERSION,
            campaign: cur.campaign.clone(),
            seq: cur.next_seq,
            state,
            reason,
            detail,
            running_version,
        };
        cur.next_seq += 1;
        self.record.outbox.push_back(report.clone());
        self.dirty(Persist::Now);
        debug!(device = %self.cfg.device, campaign = %report.campaign, seq = report.seq, state = %state, "report queued");
        Some(report)
    }

    /// Closes the current campaign with a terminal report; the content key goes with the session.
    fn finish(&mut self, state: DeviceState, reason: Option<Reason>, detail: Option<String>) {
        let Some(report) = self.report(state, reason, detail) else {
            return;
        };
        self.session = None;
        self.reboot_at = None;
        self.verifying_since = None;
        self.precondition_check_at = None;
        if let Some(cur) = self.record.current.take() {
            self.record.push_finished(FinishedCampaign {
                campaign: cur.campaign,
                state,
                reason,
                final_report: report,
                acked: false,
            });
        }
    }

    /// Refuses a job of a campaign the device is not running: `failed` with seq 1.
    fn refuse(&mut self, campaign: CampaignId, refusal: Refusal) {
        warn!(device = %self.cfg.device, %campaign, reason = %refusal.reason, detail = %refusal.detail, "job refused");
        let report = StatusReport {
            v: messages::PROTOCOL_VERSION,
            campaign: campaign.clone(),
            seq: 1,
            state: DeviceState::Failed,
            reason: Some(refusal.reason),
            detail: Some(refusal.detail),
            running_version: Some(self.record.running_version().to_owned()),
        };
        self.record.outbox.push_back(report.clone());
        self.record.push_finished(FinishedCampaign {
            campaign,
            state: DeviceState::Failed,
            reason: Some(refusal.reason),
            final_report: report,
            acked: false,
        });
        self.dirty(Persist::Now);
    }

    fn on_job(&mut self, now: u64, payload: &[u8], flash: &mut dyn Flash) {
        if payload.is_empty() {
            return self.on_job_withdrawn(None);
        }
        if let Ok(w) = messages::decode::<Withdrawal>(payload) {
            return self.on_job_withdrawn(Some(w.withdrawn));
        }
        let mut job: Job = match messages::decode(payload) {
            Ok(j) => j,
            Err(e) => {
                self.stats.bad_payloads += 1;
                warn!(device = %self.cfg.device, error = %e, "undecodable job");
                // A job whose campaign can still be read is refused, so the orchestrator learns
                // why; one without a readable campaign cannot be answered at all.
                if let Some((campaign, refusal)) = peek_refusal(payload, &e) {
                    if self.is_new_campaign(&campaign) {
                        self.refuse(campaign, refusal);
                    }
                }
                return;
            }
        };
        if let Some(pool) = &self.cfg.manifests {
            share_manifests(pool, &mut job);
        }
        let campaign = job.campaign.clone();
        if let Some(f) = self.record.finished(&campaign) {
            if !f.acked && self.record.outbox.front() == Some(&f.final_report) {
                // A redelivered job of a finished campaign whose result is unacknowledged:
                // publish the result again now rather than at the next timeout.
                self.head_sent_at = None;
            }
            return;
        }
        let current = self
            .record
            .current
            .as_ref()
            .map(|c| (c.campaign.clone(), c.phase));
        if let Some((cur, phase)) = &current {
            if cur == &campaign {
                let accepted = self.record.current.as_ref().map(|c| &c.job.wrapped_key);
                if accepted.is_some_and(|k| *k != job.wrapped_key) {
                    self.stats.jobs_differing += 1;
                    warn!(device = %self.cfg.device, %campaign, "a second, different job for the campaign in progress");
                }
                return; // A redelivery: the campaign simply continues.
            }
            if *phase >= DeviceState::Installing {
                info!(device = %self.cfg.device, %campaign, current = %cur, "job held until the current campaign finishes");
                self.held_job = Some(payload.to_vec());
                return;
            }
        }
        let walked = match &self.trust {
            Ok(trust) => walk_roots(trust, &job),
            Err(e) => Err(Refusal::new(
                Reason::UntrustedRoot,
                format!("no trusted root: {e}"),
            )),
        };
        match walked {
            Ok(Some(newer)) => self.accept_root(newer),
            Ok(None) => {}
            Err(r) => return self.refuse(campaign, r),
        }
        let verified = match &self.trust {
            Ok(trust) => verify_job(&self.cfg, trust, &self.record, now, &job, flash.capacity()),
            Err(e) => Err(Refusal::new(Reason::UntrustedRoot, e)),
        };
        let manifest = match verified {
            Ok(m) => m,
            Err(r) => return self.refuse(campaign, r),
        };
        let key = match unwrap_key(&self.key, &self.cfg.device, &job, &manifest) {
            Ok(k) => k,
            Err(r) => return self.refuse(campaign, r),
        };
        // The manifest is signed time: once it is accepted the device's time never falls back
        // behind it.
        self.record.time_floor = self.record.time_floor.max(manifest.created_at);
        let chosen = match &self.trust {
            Ok(trust) => delta::choose(
                self.cfg.manifests.as_deref(),
                trust,
                &job,
                &manifest,
                self.record.slots.running_meta().image_sha256.as_deref(),
                &self.key,
                &self.cfg.device,
            ),
            Err(_) => None,
        };
        if let Some((cur, _)) = current {
            info!(device = %self.cfg.device, %campaign, replaced = %cur, "new job replaces the current download");
            self.finish(
                DeviceState::Failed,
                Some(Reason::Cancelled),
                Some(format!("replaced by campaign {campaign}")),
            );
        }
        self.start(now, job, manifest, key, chosen, flash);
    }

    /// Keeps a root that a job's chain walked forward to. It is saved even if that job is then
    /// refused: a valid newer root (new keys, revocations) is knowledge worth keeping.
    fn accept_root(&mut self, newer: TrustedRoot) {
        info!(device = %self.cfg.device, version = newer.version(), "root of trust rotated");
        self.record.time_floor = self.record.time_floor.max(newer.root().issued_at);
        self.record.trusted_root = Some(newer.clone());
        self.trust = Ok(Arc::new(newer));
        self.dirty(Persist::Now);
    }

    /// No job (an empty payload, or a `Withdrawal` naming the campaign and why): the job topic
    /// holds the device's whole job state, so whatever it is downloading was withdrawn, even a
    /// campaign other than the one named (a later job may have come and gone while the device
    /// was offline). The download is abandoned and the running slot untouched, as is an image
    /// downloaded and waiting for its preconditions; an install that has begun runs to its end,
    /// since stopping it halfway would gain nothing.
    fn on_job_withdrawn(&mut self, withdrawn: Option<Withdrawn>) {
        self.held_job = None;
        if self
            .current()
            .is_some_and(|(_, p)| matches!(p, DeviceState::Downloading | DeviceState::Downloaded))
        {
            let detail = match &withdrawn {
                Some(w) => format!("job withdrawn ({} of {})", w.reason, w.campaign),
                None => "job withdrawn".into(),
            };
            info!(device = %self.cfg.device, %detail, "download abandoned");
            self.finish(
                DeviceState::Failed,
                Some(Reason::Cancelled),
                Some(clip(detail)),
            );
        }
    }

    fn is_new_campaign(&self, campaign: &CampaignId) -> bool {
        self.record.finished(campaign).is_none()
            && self.current().is_none_or(|(c, _)| c != campaign)
    }

    /// Accepts a verified job: prepares the update slot and reports `downloading` (or
    /// `deferred`, when the manifest's preconditions gate the download and do not hold).
    fn start(
        &mut self,
        now: u64,
        job: Job,
        manifest: Manifest,
        key: ContentKey,
        chosen: Option<delta::Chosen>,
        flash: &mut dyn Flash,
    ) {
        let campaign = job.campaign.clone();
        info!(device = %self.cfg.device, %campaign, artifact = %manifest.artifact, version = %manifest.version, delta = chosen.is_some(), "job accepted");
        self.record.slots.invalidate_update_slot();
        let image_size = manifest.image_size;
        let preconditions = manifest.preconditions.clone();
        // With a delta, the download is the patch's: its manifest and key drive the session.
        let (delta, manifest, key) = match chosen {
            Some(c) => (
                Some(DeltaProgress {
                    offer: c.offer,
                    rebuilding: false,
                }),
                c.manifest,
                c.key,
            ),
            None => (None, manifest, key),
        };
        self.record.current = Some(CampaignProgress {
            campaign,
            job,
            phase: DeviceState::Downloading,
            next_seq: 1,
            written: ChunkBitmap::new(manifest.chunk_count),
            delta,
            deferred: None,
        });
        let slot = self.record.slots.update_slot();
        let prepared = flash.begin_update(slot, image_size);
        // The first chunk may be a while away (the orchestrator paces the fleet).
        flash.release();
        if let Err(e) = prepared {
            return self.fail(Reason::InstallFailed, Some(e.to_string()));
        }
        let mut session = self.new_session(manifest, Some(key));
        session.preconditions = preconditions;
        session.origin = self
            .record
            .current
            .as_ref()
            .and_then(|c| self.origin_plan(&c.job));
        self.session = Some(session);
        self.precondition_check_at = None;
        match self.download_verdict(now) {
            Some(Err(unmet)) => self.defer(unmet),
            _ => {
                self.report(DeviceState::Downloading, None, None);
            }
        }
    }

    fn on_frame(&mut self, now: u64, payload: &[u8], flash: &mut dyn Flash) {
        let frame = match chunkframe::decode(payload) {
            Ok(f) => f,
            Err(e) => {
                self.stats.bad_payloads += 1;
                debug!(device = %self.cfg.device, error = %e, "undecodable chunk frame");
                return;
            }
        };
        let downloading = self
            .current()
            .is_some_and(|(_, p)| p == DeviceState::Downloading);
        let (true, Some(session), Some(cur)) =
            (downloading, &mut self.session, &mut self.record.current)
        else {
            return;
        };
        match frame {
            ChunkFrame::Error {
                artifact,
                index,
                code,
                retry_after_ms,
            } => {
                if &artifact != session.artifact() {
                    return;
                }
                if code == ChunkErrorCode::Busy {
                    // Waits between half and all of the hint again on top of it, so the
                    // devices told at once do not all come back at once.
                    let hint = u64::from(retry_after_ms.clamp(1, MAX_BUSY_WAIT_MS));
                    let wait = hint + rand::random::<u64>() % hint;
                    self.stats.busy_frames += 1;
                    session.on_busy(index, now + wait);
                } else if code == ChunkErrorCode::NotDownloading {
                    // The orchestrator may not have applied our `downloading` report yet.
                    session.paused_until = now + self.cfg.not_downloading_pause_ms;
                    session.forget_outstanding();
                } else {
                    warn!(device = %self.cfg.device, %artifact, index, code = code.as_str(), "chunk error frame");
                }
            }
            ChunkFrame::Data {
                artifact,
                index,
                count,
                sealed,
            } => {
                let slot = self.record.slots.update_slot();
                let outcome = session.accept(
                    now,
                    &artifact,
                    index,
                    count,
                    sealed,
                    &mut cur.written,
                    slot,
                    flash,
                    self.cfg.max_chunk_retries,
                );
                match outcome {
                    ChunkOutcome::Written => {
                        self.stats.chunks_received += 1;
                        session.reset_timeout(
                            self.cfg.chunk_timeout_ms,
                            self.cfg.max_chunk_timeout_ms,
                        );
                        self.dirty(Persist::Soon);
                    }
                    ChunkOutcome::Duplicate => self.stats.chunks_duplicate += 1,
                    ChunkOutcome::Ignored => {}
                    ChunkOutcome::Rejected { exhausted } => {
                        self.stats.chunks_rejected += 1;
                        debug!(device = %self.cfg.device, index, "chunk failed verification");
                        if exhausted {
                            let detail = format!(
                                "chunk {index} failed {} times",
                                self.cfg.max_chunk_retries
                            );
                            self.finish(
                                DeviceState::Failed,
                                Some(Reason::ChunkVerificationFailed),
                                Some(detail),
                            );
                        }
                    }
                    ChunkOutcome::WriteFailed(e) => {
                        self.fail(Reason::InstallFailed, Some(e.to_string()));
                    }
                }
            }
        }
    }

    fn on_ack(&mut self, payload: &[u8]) {
        let ack: StatusAck = match messages::decode(payload) {
            Ok(a) => a,
            Err(e) => {
                self.stats.bad_payloads += 1;
                debug!(device = %self.cfg.device, error = %e, "undecodable ack");
                return;
            }
        };
        let matches_head = self
            .record
            .outbox
            .front()
            .is_some_and(|h| h.campaign == ack.campaign && h.seq == ack.seq);
        if !matches_head {
            return; // A duplicate or stale acknowledgement.
        }
        let acked = self.record.outbox.pop_front();
        let downloading_acked = acked.as_ref().is_some_and(|r| {
            r.state == DeviceState::Downloading
                && self.current().is_some_and(|(c, _)| c == &r.campaign)
        });
        if let (true, Some(s)) = (downloading_acked, &mut self.session) {
            // Acknowledged means published: after a restart the ack of the report sent before it
            // may arrive before the report is sent again.
            s.requests_enabled = true;
        }
        if ack.outcome != AckOutcome::Rejected {
            self.last_acked = acked.map(|r| (r.campaign, r.state));
        }
        if ack.outcome == AckOutcome::Rejected {
            self.stats.reports_rejected += 1;
            warn!(device = %self.cfg.device, campaign = %ack.campaign, seq = ack.seq, error = ?ack.error, state = %ack.state, "report rejected");
        }
        if let Some(f) = self.record.finished_mut(&ack.campaign) {
            if f.final_report.seq == ack.seq {
                f.acked = true;
            }
        }
        self.head_sent_at = None;
        // An ack only lets the device forget a report it sent. Lost in a crash, the report is
        // sent again and answered `duplicate` (PROTOCOL.md §9.5), so it is saved with the next
        // save rather than at once, except a rejection: a rejected report must never be sent
        // again. Saved at once, acks caused 60% of a campaign's record saves (a 1,000-device
        // campaign saved records 8,253 times with them, 3,330 without), and saves were a sixth
        // of the simulator's CPU while the jobs went out.
        self.dirty(if ack.outcome == AckOutcome::Rejected {
            Persist::Now
        } else {
            Persist::Soon
        });
    }
}

impl UpdateAgent {
    /// A download of `manifest`, with the chunk digests the process shares if it does.
    fn new_session(&self, manifest: Manifest, key: Option<ContentKey>) -> Session {
        Session::new(
            manifest,
            key,
            self.cfg.chunk_timeout_ms,
            self.cfg.manifests.as_deref(),
        )
    }
}

/// Points the job's manifests (its own and its deltas') at the process's shared copies.
fn share_manifests(pool: &shared::SharedManifests, job: &mut Job) {
    pool.share(&mut job.manifest);
    for d in &mut job.deltas {
        pool.share(&mut d.manifest);
    }
}

/// The root a device trusts at power-on: the newer of the one its record keeps (its signatures
/// checked again) and the one pinned in its configuration, which a re-provisioned device may
/// have moved ahead. Revocations the record knows of stay revoked either way.
fn initial_trust(cfg: &AgentConfig, record: &DeviceRecord) -> Result<Arc<TrustedRoot>, TrustError> {
    let pinned = match &cfg.pinned {
        Some(p) => Ok(p.clone()),
        None => TrustedRoot::pin(SignedRoot::clone(&cfg.root)).map(Arc::new),
    };
    let stored = record.trusted_root.clone().map(TrustedRoot::restore);
    match (pinned, stored) {
        (pinned, None) => pinned,
        (Ok(p), Some(Ok(s))) if s.version() >= p.version() => Ok(Arc::new(s)),
        (Ok(mut p), Some(Ok(s))) => {
            for k in s.revoked {
                if !p.revoked.contains(&k) {
                    Arc::make_mut(&mut p).revoked.push(k);
                }
            }
            Ok(p)
        }
        (Err(_), Some(Ok(s))) => Ok(Arc::new(s)),
        (pinned, Some(Err(e))) => {
            warn!(device = %cfg.device, error = %e, "the stored root does not verify; using the pinned one");
            pinned
        }
    }
}
