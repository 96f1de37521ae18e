//! The engine's pure core: every decision about campaigns, devices, releases, revocation and
//! renewals, sans I/O. It takes the time and one event at a time (`Core::on_event`,
//! `Core::on_tick`, `Core::settle`) and returns [`Effects`]: the durable writes the event
//! caused, and the output that may leave the process only once those writes are flushed (acks,
//! jobs, withdrawals, admin replies, renewal answers), apart from chunk service, which carries
//! no state and may leave at once. It owns all the state it decides on, loaded once at
//! start-up ([`Loaded`]): live campaigns with every member's progress and stored job, the
//! device registry, release metadata, the CRL in force and the revoked set, the renewal gate,
//! the reply cache.
//!
//! The only way out is the effects. The three operator actions that must reach a file or the
//! front before they can answer (`crl_update`, the `crl.pem` check of `device_register`,
//! `trust_update`) are suspended: the core asks (`Out::ApplyCrl`, `Out::ReadCrl`,
//! `Out::StoreRoots`), the shell does it at once and hands the outcome back as an event
//! (`Event::CrlApplied`, `Event::CrlRead`, `Event::RootsStored`), and the core answers then.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use aloft_certs::revocation::VerifiedCrl;
use aloft_proto::chunkframe::{self, ChunkErrorCode};
use aloft_proto::crypto::{self, ContentKey};
use aloft_proto::manifest::{Manifest, SignedManifest};
use aloft_proto::messages::{
    self, AckError, AckOutcome, ChunkRequest, StatusAck, StatusReport, PROTOCOL_VERSION,
};
use aloft_proto::trust::SignedRoot;
use aloft_proto::{topics, ArtifactId, CampaignId, DeviceId, DeviceState, OperatorId, Reason};
use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::fleet::state::{self, Decision, Progress};
use crate::inbound::{SeenDevice, Signed};
use crate::metrics::Metrics;
use crate::model::CampaignStatus;
use crate::rollout::{Action, Known, Plan, Rollout};
use crate::signer::SignRequest;
use crate::store::{AuditEvent, CampaignRecord, DeviceRecord, MemberJob, ReleaseRecord};

mod admin;
mod campaigns;
pub(crate) mod pacing;
mod pki;
mod renewal;
mod rollouts;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use renewal::{RenewalGate, RENEWAL_INTERVAL_MS};

/// The audit action of a `succeeded` report from a member never sent a chunk (§10).
pub const SUCCESS_WITHOUT_DOWNLOAD: &str = "success_without_download";

/// One event for the core. Device and operator publishes arrive as they were received; a
/// renewal request comes with what the shell read about it from the front and the signer.
#[derive(Debug)]
pub enum Event {
    Status {
        device: DeviceId,
        payload: Bytes,
    },
    ChunkRequest {
        device: DeviceId,
        payload: Bytes,
    },
    Health {
        device: DeviceId,
        payload: Bytes,
    },
    Admin {
        operator: OperatorId,
        /// Who sent it: a signed request's certificate, or (unsigned, before 1.5) the role of
        /// the certificate the operator's front session holds; no role known (a certificate
        /// from before roles, a session already gone, no front) counts as a viewer.
        auth: crate::admin::auth::AdminAuth,
        payload: Bytes,
    },
    Csr {
        device: DeviceId,
        payload: Bytes,
        /// The certificate of the session the request came through.
        session: Session,
        /// Whether the online CA could sign now.
        ca: CaState,
    },
    DeviceSeen(SeenDevice),
    /// (Replicas) Another replica began serving chunks to a member: what `note_served`
    /// records when this core serves them itself. Committed before the first chunk left.
    Served {
        campaign: CampaignId,
        device: DeviceId,
    },
    /// The broker link came back after a failure: an external broker may have lost retained
    /// jobs (a restart), so every member in flight gets its job again.
    LinkRestored,
    Signed(Signed),
    /// The signer's queue refused a request the core handed over (`Out::Sign`).
    SignerBusy(DeviceId),
    /// What became of `Out::ApplyCrl`: the sessions the front ended, or why nothing changed.
    CrlApplied {
        pending: Pending,
        crl: Box<VerifiedCrl>,
        result: Result<Vec<String>, String>,
    },
    /// `crl.pem` as read for `Out::ReadCrl` (`None`: there is no such file).
    CrlRead {
        pending: Pending,
        certs: Vec<String>,
        groups: Vec<String>,
        on_disk: Result<Option<VerifiedCrl>, String>,
    },
    /// What became of `Out::StoreRoots`.
    RootsStored {
        pending: Pending,
        next: Box<crate::trust::TrustState>,
        accepted: usize,
        result: Result<(), String>,
    },
}

/// What the front says about the session a renewal request came through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// No front (tests with an external broker): the registry's serial stands in.
    NoFront,
    /// No live certificate-authenticated session for the device.
    Absent,
    /// The session's certificate serial, big-endian.
    Serial(Vec<u8>),
}

/// Whether renewals can be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaState {
    /// This orchestrator has no signer.
    NoSigner,
    /// The signer runs but `ca.key` is not on the orchestrator.
    KeyAbsent,
    Ready,
}

/// A durable write, as the store makes it.
#[derive(Debug, Clone)]
pub enum Write {
    Progress {
        campaign: CampaignId,
        device: DeviceId,
        progress: Progress,
    },
    Device(DeviceRecord),
    Campaign(CampaignRecord),
    Release(ReleaseRecord),
    Chunk {
        artifact: ArtifactId,
        index: u32,
        sealed: Vec<u8>,
    },
    Audit {
        event: AuditEvent,
        at_ms: u64,
    },
}

/// What a campaign's jobs share; each job adds the content key wrapped for one device.
#[derive(Clone)]
pub struct JobTemplate {
    pub campaign: CampaignId,
    pub artifact: ArtifactId,
    pub signed: SignedManifest,
    pub key: ContentKey,
    /// (1.5) The campaign's download origin, if it names one.
    pub origin: Option<String>,
    /// (1.5) Delta releases stored for this image, each offered beside it (PROTOCOL.md §5.10).
    pub deltas: Vec<DeltaTemplate>,
}

/// (1.5) One delta release a campaign offers: its manifest, signed, and its content key.
#[derive(Clone)]
pub struct DeltaTemplate {
    pub artifact: ArtifactId,
    pub signed: SignedManifest,
    pub key: ContentKey,
    pub chunk_count: u32,
}

/// (1.5) How a member got its image: which artifact its chunk requests named. A member that
/// asked for the delta and then for the full image fell back (another base, or a failed
/// rebuild, decided on the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeliveryPath {
    Full,
    Delta,
    DeltaThenFull,
}

impl DeliveryPath {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryPath::Full => "full",
            DeliveryPath::Delta => "delta",
            DeliveryPath::DeltaThenFull => "delta_then_full",
        }
    }
}

/// One member's job, to be published retained once the batch has committed. Made once: the
/// first order of a member (`stored` is `None`) has the shell wrap its keys (HPKE, off the
/// engine task) and commit them as its `MemberJob` before the job leaves, then hand it back
/// (`Core::job_made`); every later order carries that `MemberJob`, and the job is rebuilt from
/// it byte for byte.
#[derive(Clone)]
pub struct JobOrder {
    pub device: DeviceId,
    /// The device's X25519 public key from its certificate.
    pub x25519_public: [u8; 32],
    /// The campaign's part of the job. For a stored job, its delta offers are the ones it was
    /// made with.
    pub template: Arc<JobTemplate>,
    /// The chain of roots the job carries: the stored job's, or the newest.
    pub roots: Arc<Vec<SignedRoot>>,
    /// The version of the newest root in `roots`, stored with a new job.
    pub root_version: u64,
    /// When a new job is issued.
    pub issued_at_ms: u64,
    /// The member's job as it was made and stored; `None`: make it now.
    pub stored: Option<Arc<MemberJob>>,
}

impl JobOrder {
    /// Whose job this is: its campaign and device.
    pub fn member(&self) -> (CampaignId, DeviceId) {
        (self.template.campaign.clone(), self.device.clone())
    }
}

impl std::fmt::Debug for JobOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobOrder")
            .field("device", &self.device)
            .field("campaign", &self.template.campaign)
            .finish_non_exhaustive()
    }
}

/// Output of the core.
#[derive(Debug)]
pub enum Out {
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// An answer to a device's status report.
    Ack {
        device: DeviceId,
        ack: StatusAck,
    },
    Job(JobOrder),
    /// A chunk frame made in full by the core (an error frame).
    ChunkFrame {
        device: DeviceId,
        frame: Vec<u8>,
    },
    /// Serve these chunks of a release, one frame per index in order, stopping at the first
    /// one out of range or missing (PROTOCOL.md §10.7); the shell reads them from the store.
    ServeChunks {
        device: DeviceId,
        artifact: ArtifactId,
        count: u32,
        indices: Vec<u32>,
    },
    /// `audit_list`: read from the store and answered by the shell (audit entries are not kept
    /// in memory).
    AuditReply {
        operator: OperatorId,
        id: String,
        since: u64,
        limit: usize,
    },
    /// Hand a checked renewal to the signer.
    Sign(SignRequest),
    /// `crl_update`: store `crl` as `crl.pem` and enforce it at the front (on failure leave the
    /// file as it was, `previous`), then hand back `Event::CrlApplied`.
    ApplyCrl {
        crl: Box<VerifiedCrl>,
        previous: Option<Box<VerifiedCrl>>,
        pending: Pending,
    },
    /// `device_register`: read and verify `crl.pem` (someone may have replaced it by hand),
    /// then hand back `Event::CrlRead` with `certs` and `groups`.
    ReadCrl {
        certs: Vec<String>,
        groups: Vec<String>,
        pending: Pending,
    },
    /// `trust_update`: write each of `roots` to the trust directory (`root-<N>.json`), then hand
    /// back `Event::RootsStored` with `next` and `accepted`.
    StoreRoots {
        roots: Vec<SignedRoot>,
        next: Box<crate::trust::TrustState>,
        accepted: usize,
        pending: Pending,
    },
}

/// What one event (or a settle) produced.
#[derive(Debug, Default)]
pub struct Effects {
    /// Durable writes, in order.
    pub writes: Vec<Write>,
    /// Some write must be durable before `after_commit` leaves (a write without it, such as a
    /// device's last-seen time, may reach the disk with the store's background flush).
    pub flush: bool,
    /// Done at once, before the batch commits: chunk service (it carries no state), hand-overs
    /// to the signer, and the file and front work of a suspended operator action.
    pub now: Vec<Out>,
    /// Leaves only after `writes` are flushed, in order.
    pub after_commit: Vec<Out>,
}

impl Effects {
    /// Appends `other` after what is here.
    pub fn extend(&mut self, other: Effects) {
        self.writes.extend(other.writes);
        self.flush |= other.flush;
        self.now.extend(other.now);
        self.after_commit.extend(other.after_commit);
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.now.is_empty() && self.after_commit.is_empty()
    }
}

/// An operator request suspended while the shell reaches a file or the front for it.
#[derive(Debug, Clone)]
pub struct Pending {
    operator: OperatorId,
    id: String,
    /// The audit entry the answer completes (action, subject).
    audit: Option<(&'static str, String)>,
}

/// Everything the core starts from, read from the store by the shell.
#[derive(Default)]
pub struct Loaded {
    pub devices: Vec<DeviceRecord>,
    pub releases: Vec<ReleaseRecord>,
    pub campaigns: Vec<(CampaignRecord, Vec<(DeviceId, Progress)>)>,
    /// Each unfinished campaign's stored jobs (`MemberJob`), by member.
    pub jobs: HashMap<CampaignId, Vec<(DeviceId, MemberJob)>>,
    /// Chunks stored so far of each release still uploading.
    pub uploads: HashMap<ArtifactId, HashSet<u32>>,
}

/// What the core needs besides its state.
pub struct CoreConfig {
    /// The newest root of trust: its release role must sign every upload (threshold, no
    /// revoked key), and its chain travels in every job.
    pub trust: crate::trust::TrustState,
    /// The fleet CA, for verifying certificates submitted for registration.
    pub ca_pem: String,
    /// The CRL in force at start-up.
    pub crl: Option<VerifiedCrl>,
    /// Random bytes from the shell: campaign ids are derived from them, the time and a counter.
    pub seed: [u8; 16],
    /// Devices sent chunks at once over the whole fleet (see `pacing`); at least 1.
    pub download_slots: usize,
    /// Whether a device's record follows a renewed certificate when it is issued: beside an
    /// external broker, which is the only time the orchestrator sees it. With the front the
    /// record follows the certificate a device presents at its next handshake instead.
    pub record_follows_issuance: bool,
}

/// A campaign with its release material and every member's progress, in memory.
struct LiveCampaign {
    record: CampaignRecord,
    manifest: Manifest,
    job: Arc<JobTemplate>,
    progress: HashMap<DeviceId, Progress>,
    /// Each member's job as it was made and stored: republished from here, never made again.
    jobs: HashMap<DeviceId, Arc<MemberJob>>,
    /// Members per state, kept with `progress` (see `set`): every applied report refreshes the
    /// campaign's gauges, which must not cost a pass over the whole fleet.
    counts: BTreeMap<DeviceState, u32>,
    /// Who is notified when; it sees every change of `progress`.
    rollout: Rollout,
    /// (1.5) Which path each member that asked for chunks took. In memory only: a restart
    /// forgets it (the campaign's outcome does not depend on it).
    paths: HashMap<DeviceId, DeliveryPath>,
}

impl LiveCampaign {
    fn new(
        record: CampaignRecord,
        release: &ReleaseRecord,
        key: ContentKey,
        progress: HashMap<DeviceId, Progress>,
        deltas: Vec<DeltaTemplate>,
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
        let job = Arc::new(JobTemplate {
            campaign: record.id.clone(),
            artifact: record.artifact.clone(),
            signed: release.signed.clone(),
            key,
            origin: record.origin.clone(),
            deltas,
        });
        LiveCampaign {
            record,
            manifest: release.manifest.clone(),
            job,
            progress,
            jobs: HashMap::new(),
            counts,
            rollout,
            paths: HashMap::new(),
        }
    }

    /// The chunk count of `artifact` if this campaign serves it: its image or one of its deltas.
    fn serves(&self, artifact: &ArtifactId) -> Option<(u32, bool)> {
        if &self.record.artifact == artifact {
            return Some((self.manifest.chunk_count, false));
        }
        self.job
            .deltas
            .iter()
            .find(|d| &d.artifact == artifact)
            .map(|d| (d.chunk_count, true))
    }

    /// Notes which artifact a member asked for; returns the path if it changed.
    fn note_path(&mut self, device: &DeviceId, delta: bool) -> Option<DeliveryPath> {
        let old = self.paths.get(device).copied();
        let new = match (old, delta) {
            (None, false) => DeliveryPath::Full,
            (None | Some(DeliveryPath::Delta), true) => DeliveryPath::Delta,
            (Some(DeliveryPath::Delta | DeliveryPath::DeltaThenFull), false) => {
                DeliveryPath::DeltaThenFull
            }
            (Some(p), _) => p,
        };
        if old == Some(new) {
            return None;
        }
        self.paths.insert(device.clone(), new);
        Some(new)
    }

    /// Members per delivery path.
    fn path_counts(&self) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for p in self.paths.values() {
            *m.entry(p.as_str().to_owned()).or_insert(0) += 1;
        }
        m
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

/// The engine's state and decisions. See the module documentation.
pub struct Core {
    /// Campaign summaries published for the console after each batch (see `crate::board`).
    board: Arc<crate::board::Board>,
    trust: crate::trust::TrustState,
    /// The job chain of `trust`, shared by every job.
    roots: Arc<Vec<SignedRoot>>,
    ca_pem: String,
    /// See [`CoreConfig::record_follows_issuance`].
    record_follows_issuance: bool,
    metrics: Arc<Metrics>,
    campaigns: HashMap<CampaignId, LiveCampaign>,
    /// Every registered device, by id (ordered as the store lists them).
    devices: BTreeMap<DeviceId, DeviceRecord>,
    /// Every release's metadata and content key; chunks stay in the store.
    releases: BTreeMap<ArtifactId, ReleaseRecord>,
    /// Chunks received so far of releases being uploaded.
    uploads: HashMap<ArtifactId, HashSet<u32>>,
    admin_replies: admin::ReplyCache,
    /// Campaign summaries asked for in this batch, answered at its settle: a summary built
    /// mid-batch could show every member finished and the campaign still `Active`, a state no
    /// commit ever held (the rollout moves to `Finished` at the settle).
    summaries_due: Vec<(Pending, admin::SummaryRead)>,
    /// Campaigns changed since the last settle: their rollouts move before the batch commits.
    touched: HashSet<CampaignId>,
    /// The timer went off since the last settle: the next one looks for timeouts too.
    timer_due: bool,
    /// The CRL in force; only a verified CRL with a higher number replaces it.
    crl: Option<VerifiedCrl>,
    /// Registered devices whose current certificate the CRL in force revokes (or whose record
    /// cannot say which certificate they hold): no job, no chunk.
    revoked_devices: HashSet<DeviceId>,
    /// Who may renew a certificate now (one per device per hour, operators' early leaves).
    renewals: RenewalGate,
    /// Withdrawals published again for a member that asked for chunks of a withdrawn job since
    /// this process started: at most one each, however often it asks.
    rewithdrawn: HashSet<(DeviceId, CampaignId)>,
    /// Members whose "served" write is in the batch not yet settled: their chunk requests wait
    /// for the commit too, not only the first.
    served_unflushed: HashSet<(CampaignId, DeviceId)>,
    /// Which devices are sent chunks now; the others are told to wait (`busy`).
    slots: pacing::DownloadSlots,
    /// When each member in flight was notified (this process only), for the time-to-succeed
    /// histogram; an entry leaves when the member finishes.
    notified_at: HashMap<(CampaignId, DeviceId), u64>,
    /// The highest chunk index + 1 sent to each device downloading now: a request below it is
    /// a re-send. An entry leaves when the device stops downloading.
    chunk_high: HashMap<DeviceId, u32>,
    seed: [u8; 16],
    /// Campaign ids made so far.
    ids: u64,
    /// The time of the event being handled.
    now: u64,
    /// The effects of the event being handled.
    fx: Effects,
}

impl Core {
    pub fn new(cfg: CoreConfig, metrics: Arc<Metrics>, loaded: Loaded) -> Self {
        let roots = Arc::new(cfg.trust.job_chain().to_vec());
        let mut core = Core {
            board: Arc::default(),
            trust: cfg.trust,
            roots,
            ca_pem: cfg.ca_pem,
            record_follows_issuance: cfg.record_follows_issuance,
            metrics,
            campaigns: HashMap::new(),
            devices: loaded
                .devices
                .into_iter()
                .map(|d| (d.id.clone(), d))
                .collect(),
            releases: loaded
                .releases
                .into_iter()
                .map(|r| (r.artifact.clone(), r))
                .collect(),
            uploads: loaded.uploads,
            admin_replies: admin::ReplyCache::default(),
            summaries_due: Vec::new(),
            touched: HashSet::new(),
            timer_due: false,
            crl: cfg.crl,
            revoked_devices: HashSet::new(),
            renewals: RenewalGate::default(),
            rewithdrawn: HashSet::new(),
            served_unflushed: HashSet::new(),
            slots: pacing::DownloadSlots::new(cfg.download_slots, pacing::IDLE_MS),
            notified_at: HashMap::new(),
            chunk_high: HashMap::new(),
            seed: cfg.seed,
            ids: 0,
            now: 0,
            fx: Effects::default(),
        };
        for d in core.devices.values() {
            core.metrics.device_certificate(None, d.cert_not_after);
        }
        let mut jobs = loaded.jobs;
        for (record, progress) in loaded.campaigns {
            if let Some(mut live) = core.load_campaign(record, progress) {
                live.jobs = jobs
                    .remove(&live.record.id)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(d, j)| (d, Arc::new(j)))
                    .collect();
                core.campaigns.insert(live.record.id.clone(), live);
            }
        }
        core
    }

    /// The shell made a member's job (`JobOrder::stored` was `None`) and wrote it to the
    /// batch being committed: every later order for the member carries it.
    pub fn job_made(&mut self, campaign: &CampaignId, device: &DeviceId, job: Arc<MemberJob>) {
        if let Some(live) = self.campaigns.get_mut(campaign) {
            live.jobs.insert(device.clone(), job);
        }
    }

    /// After start-up: re-judges every device against the CRL (it may have changed while the
    /// engine was down), then notifies members still idle and republishes the jobs of members
    /// in flight (the embedded broker keeps no retained messages across restarts).
    /// Publishes campaign summaries on `board` from now on (see `crate::board`).
    pub fn with_board(mut self, board: Arc<crate::board::Board>) -> Self {
        self.board = board;
        self
    }

    pub fn recover(&mut self, now: u64) -> Effects {
        self.now = now;
        self.refresh_revoked();
        let ids: Vec<CampaignId> = self.campaigns.keys().cloned().collect();
        for id in ids {
            if let Some(live) = self.campaigns.get_mut(&id) {
                live.rollout.recovered(now);
            }
            self.republish_jobs(&id);
            self.refresh_gauges(&id);
            self.touched.insert(id);
        }
        info!(campaigns = self.campaigns.len(), "engine recovered");
        self.settle(now)
    }

    /// Handles one event.
    pub fn on_event(&mut self, now: u64, ev: Event) -> Effects {
        self.now = now;
        match ev {
            Event::Status { device, payload } => self.on_status(device, &payload),
            Event::ChunkRequest { device, payload } => self.on_chunk_request(device, &payload),
            Event::Health { device, payload } => self.on_health(device, &payload),
            Event::Admin {
                operator,
                auth,
                payload,
            } => self.on_admin(operator, auth, &payload),
            Event::Csr {
                device,
                payload,
                session,
                ca,
            } => self.on_csr(device, &payload, session, ca),
            Event::DeviceSeen(seen) => self.on_device_seen(seen),
            Event::Served { campaign, device } => {
                let now = self.now;
                if let Some(live) = self.campaigns.get_mut(&campaign) {
                    if live.progress.contains_key(&device) {
                        // Being served is a sign of life, as a chunk request here is.
                        live.rollout.touch(&device, now);
                    }
                }
                self.note_served(&campaign, &device);
            }
            Event::LinkRestored => {
                let ids: Vec<CampaignId> = self.campaigns.keys().cloned().collect();
                for id in ids {
                    self.republish_jobs(&id);
                }
            }
            Event::Signed(signed) => self.on_signed(signed),
            Event::SignerBusy(device) => self.on_signer_busy(device),
            Event::CrlApplied {
                pending,
                crl,
                result,
            } => {
                let answer = self.crl_applied(&pending, *crl, result);
                self.finish_admin(pending, answer);
            }
            Event::CrlRead {
                pending,
                certs,
                groups,
                on_disk,
            } => {
                let answer = self.register_with(&certs, &groups, on_disk);
                self.finish_admin(pending, answer);
            }
            Event::RootsStored {
                pending,
                next,
                accepted,
                result,
            } => {
                let answer = self.roots_stored(&pending, *next, accepted, result);
                self.finish_admin(pending, answer);
            }
        }
        std::mem::take(&mut self.fx)
    }

    /// The timer: every rollout not settled moves at the next `settle` (timeouts, soaks,
    /// schedules), even if no event touched it.
    pub fn on_tick(&mut self, now: u64) -> Effects {
        self.now = now;
        self.timer_due = true;
        self.touched.extend(
            self.campaigns
                .iter()
                .filter(|(_, c)| !c.rollout.settled())
                .map(|(id, _)| id.clone()),
        );
        std::mem::take(&mut self.fx)
    }

    /// A rollout has more to do now (the rest of a wave being notified in slices): the shell
    /// settles again at once instead of waiting for an event or the timer.
    pub fn has_more(&self) -> bool {
        !self.touched.is_empty()
    }

    /// Moves the rollouts touched since the last settle and ends the batch: the shell calls it
    /// once per batch, then makes every write of the batch durable before any of its held
    /// output leaves.
    pub fn settle(&mut self, now: u64) -> Effects {
        self.now = now;
        self.served_unflushed.clear();
        let timers = std::mem::take(&mut self.timer_due);
        let mut touched: Vec<CampaignId> = std::mem::take(&mut self.touched).into_iter().collect();
        touched.sort();
        for id in touched {
            self.tick_rollout(&id, now, timers);
        }
        for (pending, read) in std::mem::take(&mut self.summaries_due) {
            let answer = self.summarize(read);
            self.finish_admin(pending, answer);
        }
        std::mem::take(&mut self.fx)
    }

    /// A durable write that must be flushed before this batch's output leaves.
    fn write(&mut self, w: Write) {
        self.fx.flush = true;
        self.fx.writes.push(w);
    }

    fn put_progress(&mut self, campaign: &CampaignId, device: &DeviceId, p: &Progress) {
        self.write(Write::Progress {
            campaign: campaign.clone(),
            device: device.clone(),
            progress: p.clone(),
        });
    }

    /// Stores a device record and keeps the registry in step.
    fn put_device(&mut self, d: DeviceRecord, flush: bool) {
        let before = self.devices.insert(d.id.clone(), d.clone());
        self.metrics
            .device_certificate(before.map(|b| b.cert_not_after), d.cert_not_after);
        self.fx.flush |= flush;
        self.fx.writes.push(Write::Device(d));
    }

    /// Stores a release record and keeps the in-memory copy in step.
    fn put_release(&mut self, r: ReleaseRecord) {
        self.releases.insert(r.artifact.clone(), r.clone());
        self.write(Write::Release(r));
    }

    fn audit(&mut self, event: AuditEvent) {
        let at_ms = self.now;
        self.write(Write::Audit { event, at_ms });
    }

    fn send(&mut self, topic: String, payload: Vec<u8>, retain: bool) {
        self.fx.after_commit.push(Out::Publish {
            topic,
            payload,
            retain,
        });
    }

    /// (1.5) Every complete delta release stored for `full`'s image that still verifies under
    /// the newest root, at most the protocol's number per job (newest uploads first).
    fn deltas_for(&self, full: &Manifest) -> Vec<DeltaTemplate> {
        let mut found: Vec<&ReleaseRecord> = self
            .releases
            .values()
            .filter(|r| r.complete && r.manifest.is_delta_for(full))
            .filter(|r| self.trust.trusted.verify_manifest(&r.signed).is_ok())
            .collect();
        found.sort_by_key(|r| std::cmp::Reverse(r.uploaded_ms));
        found
            .into_iter()
            .filter_map(|r| {
                Some(DeltaTemplate {
                    artifact: r.artifact.clone(),
                    signed: r.signed.clone(),
                    key: parse_key_hex(&r.content_key_hex)?,
                    chunk_count: r.manifest.chunk_count,
                })
            })
            .take(aloft_proto::messages::MAX_DELTAS_PER_JOB)
            .collect()
    }

    fn load_campaign(
        &self,
        record: CampaignRecord,
        progress: Vec<(DeviceId, Progress)>,
    ) -> Option<LiveCampaign> {
        let Some(release) = self.releases.get(&record.artifact) else {
            warn!(campaign = %record.id, artifact = %record.artifact, "campaign's release is missing; skipped");
            return None;
        };
        let Some(key) = parse_key_hex(&release.content_key_hex) else {
            warn!(artifact = %record.artifact, "stored content key is malformed; campaign skipped");
            return None;
        };
        let deltas = self.deltas_for(&release.manifest);
        Some(LiveCampaign::new(
            record,
            release,
            key,
            progress.into_iter().collect(),
            deltas,
        ))
    }

    fn on_status(&mut self, device: DeviceId, payload: &[u8]) {
        let report: StatusReport = match messages::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.rejected("status", e.code());
                warn!(%device, error = %e, "status report refused");
                return;
            }
        };
        let now = self.now;
        self.note_running_version(&device, report.running_version.as_deref());
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
            return;
        };
        // Any decodable report of a member, even a duplicate, is a sign of life (the device
        // timeout measures silence).
        if let Some(live) = self.campaigns.get_mut(&campaign) {
            live.rollout.touch(&device, now);
        }
        let (outcome, state, error) = match state::apply_report(&current, &report, now) {
            Decision::Apply(next) => {
                self.put_progress(&campaign, &device, &next);
                self.metrics.report("applied");
                match next.reason {
                    Some(reason) if next.state == DeviceState::Deferred => {
                        // Not a failure: the device waits for its manifest's preconditions.
                        info!(%device, %campaign, %reason, "device deferred the update");
                    }
                    Some(reason) => {
                        self.metrics.failure(reason.as_str());
                        info!(%device, %campaign, state = %next.state, %reason, "device did not succeed");
                    }
                    None => {}
                }
                let s = next.state;
                if s != DeviceState::Downloading {
                    self.slots.release(&device, now);
                    self.chunk_high.remove(&device);
                }
                if s.is_terminal() {
                    let notified = self.notified_at.remove(&(campaign.clone(), device.clone()));
                    if let (DeviceState::Succeeded, Some(at)) = (s, notified) {
                        self.metrics
                            .update_took(now.saturating_sub(at) as f64 / 1000.0);
                    }
                }
                if let Some(live) = self.campaigns.get_mut(&campaign) {
                    live.set(&device, next);
                }
                if s == DeviceState::Succeeded {
                    // A member of a campaign with an origin may have fetched every chunk there.
                    let from_origin = self
                        .campaigns
                        .get(&campaign)
                        .is_some_and(|c| c.record.origin.is_some());
                    if !current.served && !from_origin {
                        self.flag_success_without_download(&device, &campaign);
                    }
                    self.raise_floor(&device, &campaign);
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
                    self.put_progress(&campaign, &device, &next);
                    if let Some(live) = self.campaigns.get_mut(&campaign) {
                        live.set(&device, next);
                    }
                }
                (AckOutcome::Rejected, current.state, Some(error))
            }
        };
        self.ack(&device, &report, outcome, state, error);
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
        self.fx.after_commit.push(Out::Ack {
            device: device.clone(),
            ack,
        });
    }

    /// Sends an error frame at once: chunk frames carry no state.
    fn chunk_error(
        &mut self,
        device: &DeviceId,
        artifact: &ArtifactId,
        index: u32,
        code: ChunkErrorCode,
    ) {
        let frame = chunkframe::encode_error(artifact, index, code);
        self.fx.now.push(Out::ChunkFrame {
            device: device.clone(),
            frame,
        });
    }

    fn on_chunk_request(&mut self, device: DeviceId, payload: &[u8]) {
        let req: ChunkRequest = match messages::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.rejected("chunk_request", e.code());
                warn!(%device, error = %e, "chunk request refused");
                return;
            }
        };
        let first = req.ranges[0][0];
        if self.revoked_devices.contains(&device) {
            self.metrics.rejected("chunk_request", "revoked");
            warn!(%device, "chunk request from a device whose certificate is revoked refused");
            self.chunk_error(
                &device,
                &req.artifact,
                first,
                ChunkErrorCode::NotDownloading,
            );
            return;
        }
        let now = self.now;
        let Some(live) = self.campaigns.get_mut(&req.campaign) else {
            self.metrics.rejected("chunk_request", "unknown_campaign");
            self.chunk_error(
                &device,
                &req.artifact,
                first,
                ChunkErrorCode::UnknownArtifact,
            );
            return;
        };
        let progress = live.progress.get(&device);
        let state = progress.map(|p| p.state);
        let withdrawn = progress.and_then(|p| withdrawn_reason(p, live.record.status));
        if state.is_some() {
            live.rollout.touch(&device, now);
        }
        let served = live.serves(&req.artifact);
        if served.is_none() || state.is_none() {
            self.metrics.rejected("chunk_request", "unknown_artifact");
            self.chunk_error(
                &device,
                &req.artifact,
                first,
                ChunkErrorCode::UnknownArtifact,
            );
            return;
        }
        // `Notified` too: the device's `downloading` report may still be in this very batch.
        let serving = matches!(
            state,
            Some(DeviceState::Notified | DeviceState::Downloading)
        );
        if !serving || withdrawn.is_some() {
            self.metrics.rejected("chunk_request", "not_downloading");
            self.chunk_error(
                &device,
                &req.artifact,
                first,
                ChunkErrorCode::NotDownloading,
            );
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
            return;
        }
        let Some((count, is_delta)) = served else {
            return;
        };
        let artifact = req.artifact.clone();
        if let Some(path) = live.note_path(&device, is_delta) {
            self.metrics.delivery_path(path.as_str());
        }
        if let Err(wait_ms) = self.slots.admit(&device, now) {
            self.metrics.rejected("chunk_request", "busy");
            let frame = chunkframe::encode_busy(&artifact, first, wait_ms);
            self.fx.now.push(Out::ChunkFrame { device, frame });
            return;
        }
        // Serving stops at the first index out of range: no need to list what follows it.
        let mut indices = Vec::new();
        for i in req.indices() {
            indices.push(i);
            if i >= count {
                break;
            }
        }
        let high = self.chunk_high.entry(device.clone()).or_insert(0);
        let resent = indices.iter().filter(|i| **i < *high).count();
        *high = indices.iter().map(|i| i + 1).fold(*high, u32::max);
        if resent > 0 {
            self.metrics.chunks_resent(resent as u64);
        }
        let serve = Out::ServeChunks {
            device: device.clone(),
            artifact,
            count,
            indices,
        };
        // A member's first request for a chunk of the image records that it was served, and is
        // answered after the batch's commit, once that record is durable.
        if first < count && !self.note_served(&req.campaign, &device) {
            self.fx.after_commit.push(serve);
        } else {
            self.fx.now.push(serve);
        }
    }

    /// Records that a member is being served chunks; returns whether that record is durable
    /// already (written in an earlier batch). One write per member, never one per chunk. The first time, the caller holds the request
    /// until the batch's commit: no chunk leaves before "served" is durable, so a device that
    /// downloaded before a crash or restart and reports `succeeded` after it is never flagged.
    fn note_served(&mut self, campaign: &CampaignId, device: &DeviceId) -> bool {
        let Some(p) = self
            .campaigns
            .get_mut(campaign)
            .and_then(|live| live.progress.get_mut(device))
        else {
            return true;
        };
        let key = (campaign.clone(), device.clone());
        if p.served {
            return !self.served_unflushed.contains(&key);
        }
        p.served = true;
        let p = p.clone();
        self.put_progress(campaign, device, &p);
        self.served_unflushed.insert(key);
        false
    }

    /// A member reported `succeeded` but was never handed a chunk of the image. Devices are
    /// trusted to report honestly (SECURITY.md), so the report is still applied (the device is
    /// the authority on what it runs), but an operator must be able to see it: a counter, a
    /// warning, and an audit entry, durable with the batch like the transition itself.
    fn flag_success_without_download(&mut self, device: &DeviceId, campaign: &CampaignId) {
        self.metrics.success_without_download();
        warn!(%device, %campaign, "device reported succeeded but was never sent a chunk of the image");
        self.audit(AuditEvent {
            actor: "orchestrator".into(),
            action: SUCCESS_WITHOUT_DOWNLOAD.into(),
            subject: format!("{campaign}/{device}"),
            outcome: "flagged".into(),
        });
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

    fn on_health(&mut self, device: DeviceId, payload: &[u8]) {
        let hb: messages::Heartbeat = match messages::decode(payload) {
            Ok(h) => h,
            Err(e) => {
                self.metrics.rejected("health", e.code());
                debug!(%device, error = %e, "heartbeat refused");
                return;
            }
        };
        self.metrics.heartbeat(hb.healthy);
        self.note_running_version(&device, Some(&hb.running_version));
        let Some(campaign) = hb.campaign else {
            return;
        };
        let now = self.now;
        let Some(live) = self.campaigns.get_mut(&campaign) else {
            return;
        };
        live.rollout.touch(&device, now);
        if !live.rollout.observe_health(&device, hb.healthy, now) {
            return;
        }
        let Some(mut p) = live.progress.get(&device).cloned() else {
            return;
        };
        warn!(%device, %campaign, detail = hb.detail.as_deref().unwrap_or(""), "device unhealthy during its wave's soak; counted as a failure");
        p.unhealthy = true;
        live.progress.insert(device.clone(), p.clone());
        self.put_progress(&campaign, &device, &p);
        self.touched.insert(campaign);
    }

    /// Remembers the firmware version a registered device says it runs, for `device_list`.
    /// Written only when it changes (a heartbeat every few seconds must not cost a write), and
    /// not flushed on its own: it is information, not a decision.
    fn note_running_version(&mut self, device: &DeviceId, version: Option<&str>) {
        let Some(version) = version else {
            return;
        };
        if let Some(d) = self.devices.get(device) {
            if d.running_version.as_deref() != Some(version) {
                let mut d = d.clone();
                d.running_version = Some(version.to_owned());
                self.put_device(d, false);
            }
        }
    }

    /// Records that `device` now runs `campaign`'s security version and manifest sequence: the
    /// device raised its own floor and installed sequence before reporting `succeeded`.
    /// Flushed with the batch, before the ack.
    fn raise_floor(&mut self, device: &DeviceId, campaign: &CampaignId) {
        let Some((version, sequence)) = self
            .campaigns
            .get(campaign)
            .map(|live| (live.manifest.security_version, live.manifest.sequence))
        else {
            return;
        };
        if let Some(mut d) = self.devices.get(device).cloned() {
            let raised = d.floor < Some(version) || d.installed_sequence < sequence;
            if raised {
                d.floor = d.floor.max(Some(version));
                d.installed_sequence = d.installed_sequence.max(sequence);
                self.put_device(d, true);
            }
        }
    }

    fn on_device_seen(&mut self, seen: SeenDevice) {
        let x25519 = hex::encode(seen.x25519_public);
        let serial = hex::encode(&seen.serial);
        let now = self.now;
        let mut flush = false;
        let mut d = match self.devices.get(&seen.id).cloned() {
            Some(mut d) => {
                d.last_seen_ms = now;
                if d.x25519_public != x25519 || d.cert_serial != serial {
                    info!(device = %seen.id, serial = %serial, "device presented a new certificate; registry updated");
                    d.x25519_public = x25519;
                    d.cert_serial = serial;
                    d.cert_not_before = seen.not_before;
                    d.cert_not_after = seen.not_after;
                    // The key that jobs are wrapped to changed: make it durable with the batch.
                    flush = true;
                }
                d
            }
            None => {
                info!(device = %seen.id, serial = %serial, "device registered from its certificate");
                flush = true;
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
                    running_version: None,
                }
            }
        };
        // The front checked this certificate against the CRL at the handshake, but a newer CRL
        // may have come in since.
        self.set_revoked(&mut d);
        // Last-seen alone is informational: sled's background flush is durable enough for it.
        self.put_device(d, flush);
    }

    /// A fresh campaign id: the time, and a digest of the shell's seed and a counter.
    fn new_campaign_id(&mut self) -> CampaignId {
        self.ids += 1;
        let mut input = self.seed.to_vec();
        input.extend_from_slice(&self.ids.to_be_bytes());
        let r = crypto::sha256(&input);
        let id = format!("c-{:x}-{}", self.now / 1000, hex::encode(&r[..6]));
        // The format above only produces valid ids; the fallback keeps this free of panics.
        CampaignId::new(id).unwrap_or_else(|_| CampaignId::new("c-0").expect("literal id is valid"))
    }
}

/// An admin operation's answer: its result, or why it was refused.
type AdminResult = Result<serde_json::Value, crate::admin::wire::AdminError>;

fn refuse(code: &str, message: impl Into<String>) -> AdminResult {
    Err(crate::admin::wire::AdminError::new(code, message))
}

/// Why a member's job was withdrawn, if it was: the orchestrator timed it out, cancelled it or
/// revoked its certificate, or its campaign was aborted while it was notified or downloading.
pub(crate) fn withdrawn_reason(p: &Progress, status: CampaignStatus) -> Option<Reason> {
    match (p.state, p.reason) {
        (
            DeviceState::Failed,
            Some(r @ (Reason::TimedOut | Reason::Cancelled | Reason::Revoked)),
        ) => Some(r),
        (DeviceState::Notified | DeviceState::Downloading, _)
            if status == CampaignStatus::Aborted =>
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
