//! Test fixtures for the agent: a root of trust pinned at provisioning and newer roots signed by
//! any keys, real releases built with the proto crate (signed or cosigned by any keys), jobs
//! wrapped for the device (with or without a chain of roots), and a rig that feeds inputs, records outputs, keeps what the device saved (so a power
//! loss can be played) and plays the orchestrator's part.

use std::collections::{BTreeMap, VecDeque};

use aloft_proto::chunkframe;
use aloft_proto::crypto::{self, ContentKey, DeviceEncryptionKey};
use aloft_proto::manifest::{Manifest, ReleaseSigningKey, SignedManifest};
use aloft_proto::messages::{self, AckOutcome, ChunkRequest, Job, StatusAck, StatusReport};
use aloft_proto::release::{build_release, ReleaseMeta};
use aloft_proto::trust::{Role, Root, SignedRoot, ROOT_FORMAT};
use aloft_proto::{ArtifactId, CampaignId, DeviceId, DeviceState, SecurityVersion};

use super::*;
use crate::slots::MemoryFlash;
use crate::store::DeviceRecord;

/// Unix milliseconds the rig's clock starts at.
pub const T0: u64 = 1_700_000_000_000;
pub const HW: &str = "sim-v1";
/// Unix seconds the fixtures' roots are issued at (a day before the rig's clock starts, with the
/// releases) and expire at (a year after it starts).
pub const ROOT_ISSUED_AT: u64 = T0 / 1000 - 86_400;
pub const ROOT_EXPIRES_AT: u64 = T0 / 1000 + 365 * 86_400;

pub fn key() -> ReleaseSigningKey {
    ReleaseSigningKey::generate().unwrap()
}

/// Root metadata `version` whose root role is `root_keys` (1 of n) and whose release role is
/// `release` (`release_threshold` of n); tests change the fields they care about.
pub fn root_meta(
    version: u64,
    root_keys: &[&ReleaseSigningKey],
    release: &[&ReleaseSigningKey],
    release_threshold: u32,
) -> Root {
    let mut keys = BTreeMap::new();
    for k in root_keys.iter().chain(release) {
        keys.insert(k.public().key_id(), k.public().to_hex());
    }
    let ids = |ks: &[&ReleaseSigningKey]| ks.iter().map(|k| k.public().key_id()).collect();
    Root {
        v: ROOT_FORMAT,
        version,
        issued_at: ROOT_ISSUED_AT,
        expires_at: ROOT_EXPIRES_AT,
        keys,
        root: Role {
            keyids: ids(root_keys),
            threshold: 1,
        },
        release: Role {
            keyids: ids(release),
            threshold: release_threshold,
        },
        revoked: Vec::new(),
    }
}

/// `root` signed by each of `by`.
pub fn signed_root(root: &Root, by: &[&ReleaseSigningKey]) -> SignedRoot {
    let mut s = SignedRoot::new(root);
    for k in by {
        s.sign(k).unwrap();
    }
    s
}

pub struct TestRelease {
    pub manifest: Manifest,
    pub signed: SignedManifest,
    pub content_key: ContentKey,
    pub sealed: Vec<Vec<u8>>,
    pub image: Vec<u8>,
}

impl TestRelease {
    pub fn frame(&self, i: u32) -> Vec<u8> {
        chunkframe::encode_data(
            &self.manifest.artifact,
            i,
            self.manifest.chunk_count,
            &self.sealed[i as usize],
        )
    }

    /// The frame of chunk `i` with one byte of its sealed data flipped.
    pub fn tampered_frame(&self, i: u32) -> Vec<u8> {
        let mut f = self.frame(i);
        if let Some(last) = f.last_mut() {
            *last ^= 0x5a;
        }
        f
    }
}

pub struct ReleaseSpec<'a> {
    pub artifact: &'a str,
    pub version: &'a str,
    pub security_version: u64,
    pub hardware_model: &'a str,
    pub size: usize,
    pub expires_at: u64,
    pub sequence: Option<u64>,
    /// (1.5) Signed into the manifest.
    pub preconditions: Option<aloft_proto::precondition::Preconditions>,
}

impl Default for ReleaseSpec<'_> {
    fn default() -> Self {
        ReleaseSpec {
            artifact: "fw-2",
            version: "2.0.0",
            security_version: 2,
            hardware_model: HW,
            size: 5000,
            expires_at: T0 / 1000 + 86_400,
            sequence: None,
            preconditions: None,
        }
    }
}

/// A release signed by every key of `keys` (the first signs, the others cosign).
pub fn release_cosigned(keys: &[&ReleaseSigningKey], spec: &ReleaseSpec<'_>) -> TestRelease {
    let mut rel = release(keys[0], spec);
    for k in &keys[1..] {
        rel.signed.cosign(k).unwrap();
    }
    rel
}

pub fn release(key: &ReleaseSigningKey, spec: &ReleaseSpec<'_>) -> TestRelease {
    let image: Vec<u8> = (0..spec.size).map(|i| (i * 31 + spec.size) as u8).collect();
    let meta = ReleaseMeta {
        artifact: ArtifactId::new(spec.artifact).unwrap(),
        version: spec.version.into(),
        security_version: SecurityVersion(spec.security_version),
        hardware_model: spec.hardware_model.into(),
        chunk_size: 1024,
        created_at: T0 / 1000 - 86_400,
        expires_at: spec.expires_at,
        sequence: spec.sequence,
        preconditions: spec.preconditions.clone(),
    };
    let mut sealed = Vec::new();
    let built = build_release(
        &mut image.as_slice(),
        spec.size as u64,
        &meta,
        key,
        |_, c| {
            sealed.push(c);
            Ok(())
        },
    )
    .unwrap();
    TestRelease {
        manifest: built.manifest,
        signed: built.signed,
        content_key: built.content_key,
        sealed,
        image,
    }
}

pub struct Fixture {
    /// The release key of the pinned root (its release role, 1 of 1).
    pub signing: ReleaseSigningKey,
    /// The root key of the pinned root (its root role, 1 of 1).
    pub root_key: ReleaseSigningKey,
    /// Root version 1, pinned at provisioning.
    pub root: SignedRoot,
    pub device: DeviceId,
    pub device_key: DeviceEncryptionKey,
}

impl Fixture {
    pub fn new() -> Self {
        let (signing, root_key) = (key(), key());
        let root = signed_root(&root_meta(1, &[&root_key], &[&signing], 1), &[&root_key]);
        Fixture {
            signing,
            root_key,
            root,
            device: DeviceId::new("dev-00001").unwrap(),
            device_key: DeviceEncryptionKey::generate().unwrap(),
        }
    }

    pub fn release(&self, spec: &ReleaseSpec<'_>) -> TestRelease {
        release(&self.signing, spec)
    }

    /// A job for `campaign` with the content key wrapped for `device` under `public`.
    pub fn job_wrapped(
        &self,
        campaign: &str,
        rel: &TestRelease,
        device: &DeviceId,
        public: &[u8; 32],
    ) -> Vec<u8> {
        self.job_full(campaign, rel, device, public, &[])
    }

    fn job_full(
        &self,
        campaign: &str,
        rel: &TestRelease,
        device: &DeviceId,
        public: &[u8; 32],
        roots: &[SignedRoot],
    ) -> Vec<u8> {
        let wrapped =
            crypto::wrap_content_key(public, device, &rel.manifest.artifact, &rel.content_key)
                .unwrap();
        messages::encode(&Job {
            v: messages::PROTOCOL_VERSION,
            campaign: CampaignId::new(campaign).unwrap(),
            manifest: rel.signed.clone(),
            wrapped_key: wrapped,
            issued_at: T0 / 1000,
            roots: roots.to_vec(),
            origin: None,
            deltas: Vec::new(),
        })
    }

    pub fn job(&self, campaign: &str, rel: &TestRelease) -> Vec<u8> {
        self.job_with_roots(campaign, rel, &[])
    }

    /// A job for this device that carries `roots`, the chain from the pinned root on.
    pub fn job_with_roots(
        &self,
        campaign: &str,
        rel: &TestRelease,
        roots: &[SignedRoot],
    ) -> Vec<u8> {
        let public = self.device_key.public_bytes().unwrap();
        self.job_full(campaign, rel, &self.device, &public, roots)
    }

    pub fn config(&self) -> AgentConfig {
        let mut cfg = AgentConfig::new(self.device.clone(), HW, self.root.clone());
        // The tests were written against a window of 16, independent of the default.
        cfg.window = 16;
        cfg
    }

    pub fn agent(&self, record: DeviceRecord, health: Box<dyn HealthCheck>) -> UpdateAgent {
        self.agent_with(self.config(), record, health)
    }

    pub fn agent_with(
        &self,
        cfg: AgentConfig,
        record: DeviceRecord,
        health: Box<dyn HealthCheck>,
    ) -> UpdateAgent {
        UpdateAgent::new(cfg, self.device_key.clone(), record, health)
    }

    pub fn rig(&self) -> Rig {
        self.rig_with(DeviceRecord::factory("1.0.0", SecurityVersion(1)), true)
    }

    pub fn rig_with(&self, record: DeviceRecord, healthy: bool) -> Rig {
        let health: Box<dyn HealthCheck> = Box::new(FixedHealth(healthy));
        Rig::new(self.agent(record, health))
    }

    /// A healthy factory-fresh device configured with `cfg`.
    pub fn rig_cfg(&self, cfg: AgentConfig) -> Rig {
        let record = DeviceRecord::factory("1.0.0", SecurityVersion(1));
        Rig::new(self.agent_with(cfg, record, Box::new(FixedHealth(true))))
    }
}

pub struct FixedHealth(pub bool);

impl HealthCheck for FixedHealth {
    fn check(&mut self, _: u64, _: &CampaignId, _: &str) -> HealthStatus {
        if self.0 {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        }
    }
}

/// The agent, its flash and clock, every output so far, the chunks it asked for, and the record
/// as last saved.
pub struct Rig {
    pub agent: UpdateAgent,
    pub flash: MemoryFlash,
    pub now: u64,
    pub published: Vec<Output>,
    pub requested: VecDeque<u32>,
    /// What the device's store holds: saved after every step that asks for `Persist::Now`, as
    /// the transport does; `Persist::Soon` progress only on [`Rig::save`].
    pub saved: DeviceRecord,
}

impl Rig {
    pub fn new(mut agent: UpdateAgent) -> Self {
        agent.take_persist();
        Rig {
            saved: agent.record().clone(),
            agent,
            flash: MemoryFlash::new(1 << 20),
            now: T0,
            published: Vec::new(),
            requested: VecDeque::new(),
        }
    }

    /// Saves delayed progress, as the transport does every few seconds.
    pub fn save(&mut self) {
        self.saved = self.agent.record().clone();
    }

    /// A power loss: the agent goes with everything it did not save, and `power_on` makes the
    /// new one from the saved record. The flash keeps what was written; requests in flight are
    /// forgotten, like the connection.
    pub fn power_cycle(&mut self, power_on: impl FnOnce(DeviceRecord) -> UpdateAgent) {
        self.agent = power_on(self.saved.clone());
        if self.agent.take_persist() == Persist::Now {
            self.save();
        }
        self.requested.clear();
    }

    pub fn step(&mut self, input: Input<'_>) -> Vec<Output> {
        let out = self.agent.handle(self.now, input, &mut self.flash);
        if self.agent.take_persist() == Persist::Now {
            self.save();
        }
        for o in &out {
            if let Some(req) = as_request(o) {
                self.requested.extend(req.indices());
            }
        }
        self.published.extend(out.iter().cloned());
        out
    }

    pub fn connect(&mut self) -> Vec<Output> {
        self.step(Input::Connected)
    }

    pub fn advance(&mut self, ms: u64) -> Vec<Output> {
        self.now += ms;
        self.step(Input::Tick)
    }

    /// Every status report published so far, resends included, in order.
    pub fn reports(&self) -> Vec<StatusReport> {
        self.published.iter().filter_map(as_report).collect()
    }

    /// Distinct reports of `campaign` in seq order, as (seq, state).
    pub fn states_of(&self, campaign: &str) -> Vec<(u32, DeviceState)> {
        let mut v: Vec<(u32, DeviceState)> = self
            .reports()
            .into_iter()
            .filter(|r| r.campaign.as_str() == campaign)
            .map(|r| (r.seq, r.state))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn ack_head(&mut self, outcome: AckOutcome) -> Option<Vec<Output>> {
        let head = self.agent.record().outbox.front()?.clone();
        let ack = StatusAck {
            v: messages::PROTOCOL_VERSION,
            campaign: head.campaign,
            seq: head.seq,
            outcome,
            state: head.state,
            error: None,
        };
        Some(self.step(Input::Ack(&messages::encode(&ack))))
    }

    /// Plays the orchestrator until nothing moves: serves requested chunks of `rel` (the
    /// `tamper` ones tampered, each once per listed occurrence) and acknowledges every report.
    pub fn run(&mut self, rel: &TestRelease, tamper: &mut Vec<u32>) {
        for _ in 0..10_000 {
            if let Some(i) = self.requested.pop_front() {
                let frame = match tamper.iter().position(|&t| t == i) {
                    Some(p) => {
                        tamper.remove(p);
                        rel.tampered_frame(i)
                    }
                    None if i < rel.manifest.chunk_count => rel.frame(i),
                    None => continue,
                };
                self.step(Input::ChunkFrame(&frame));
            } else if self.ack_head(AckOutcome::Applied).is_none() {
                return;
            }
        }
        panic!("the agent never went quiet");
    }

    /// Like [`Rig::run`], and lets time pass (a second at a time) while a campaign waits on a
    /// timer: a pending health check, its confirm deadline, or a delayed reset.
    pub fn settle(&mut self, rel: &TestRelease) {
        for _ in 0..1_000 {
            self.run(rel, &mut vec![]);
            if self.agent.current().is_none() && self.agent.record().outbox.is_empty() {
                return;
            }
            self.advance(1_000);
        }
        panic!("the campaign never finished");
    }
}

pub fn as_heartbeat(o: &Output) -> Option<aloft_proto::messages::Heartbeat> {
    match o {
        Output::Publish {
            topic: OutTopic::Health,
            payload,
        } => Some(messages::decode(payload).expect("the agent publishes valid heartbeats")),
        _ => None,
    }
}

pub fn as_report(o: &Output) -> Option<StatusReport> {
    match o {
        Output::Publish {
            topic: OutTopic::Status,
            payload,
        } => Some(messages::decode(payload).expect("the agent publishes valid reports")),
        _ => None,
    }
}

pub fn as_request(o: &Output) -> Option<ChunkRequest> {
    match o {
        Output::Publish {
            topic: OutTopic::ChunkRequest,
            payload,
        } => Some(messages::decode(payload).expect("the agent publishes valid requests")),
        _ => None,
    }
}

/// What a device reports of the success path (the orchestrator makes `idle → notified`).
pub const HAPPY: &[DeviceState] = DeviceState::SUCCESS_PATH.split_at(2).1;

/// States numbered as their reports' `seq`.
pub fn numbered(states: &[DeviceState]) -> Vec<(u32, DeviceState)> {
    states
        .iter()
        .enumerate()
        .map(|(i, s)| (i as u32 + 1, *s))
        .collect()
}
