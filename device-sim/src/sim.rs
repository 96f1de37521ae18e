//! The simulator: thousands of device agents in one process, each its own tokio task with its own
//! key, certificate, mTLS connection, A/B slot file and record. Observability is a shared view
//! per device (updated after every agent step) and fleet-wide counters; faults (corrupted chunks
//! in transit, failing health checks) are injected from a seeded RNG so a run can be repeated.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_proto::manifest::ReleasePublicKey;
use aloft_proto::{CampaignId, DeviceId, DeviceState, Reason, SecurityVersion};
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::identity::{DeviceIdentity, STATE_DIR};
use crate::slots::FileFlash;
use crate::store::{DeviceRecord, DeviceStore, JsonFileStore};
use crate::transport::{self, Device, Hooks, TransportConfig};
use crate::update::{AgentConfig, AgentStats, HealthCheck, UpdateAgent};

/// Faults to inject, all off by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub seed: u64,
    /// Each chunk frame is corrupted in transit (one byte of its sealed data flipped) with this
    /// probability; the agent must notice, re-request and still succeed.
    pub corrupt_chunk_probability: f64,
    /// Each health check after an update fails with this probability (the device rolls back).
    pub health_check_failure_probability: f64,
}

/// How the fleet runs.
#[derive(Clone)]
pub struct FleetConfig {
    /// `host:port` of the orchestrator's device listener.
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
    /// Release keys the devices were provisioned to trust.
    pub release_keys: Vec<ReleasePublicKey>,
    pub hardware_model: String,
    /// What a device with no saved record runs.
    pub initial_version: String,
    pub initial_security_version: SecurityVersion,
    /// Where records and slot files live (`{dir}/state`).
    pub dir: PathBuf,
    /// Largest image a slot holds.
    pub slot_capacity: u64,
    /// Chunk requests in flight per device.
    pub window: u32,
    /// Devices handshaking at once.
    pub connect_concurrency: usize,
    pub faults: Faults,
}

impl FleetConfig {
    pub fn new(host: impl Into<String>, port: u16, ca_pem: String, dir: PathBuf) -> Self {
        FleetConfig {
            host: host.into(),
            port,
            ca_pem,
            release_keys: Vec::new(),
            hardware_model: "sim-v1".into(),
            initial_version: "1.0.0".into(),
            initial_security_version: SecurityVersion(1),
            dir,
            slot_capacity: 64 * 1024 * 1024,
            window: 8,
            connect_concurrency: 64,
            faults: Faults::default(),
        }
    }
}

/// What one device looks like from outside, refreshed after every step.
#[derive(Debug, Clone, Default)]
pub struct DeviceView {
    pub connected: bool,
    pub running_version: String,
    pub floor: u64,
    /// The campaign in progress and its phase.
    pub current: Option<(CampaignId, DeviceState)>,
    /// The newest finished campaign: its final state and reason, and whether it was acknowledged.
    pub last_finished: Option<(CampaignId, DeviceState, Option<Reason>, bool)>,
    pub stats: AgentStats,
    /// The last report the orchestrator accepted, since the simulator started.
    pub last_acked: Option<(CampaignId, DeviceState)>,
    /// Reports not yet acknowledged.
    pub outbox: usize,
}

/// Counters of the whole fleet.
#[derive(Debug, Default)]
pub struct FleetCounters {
    pub sessions_up: AtomicU64,
    pub sessions_down: AtomicU64,
    pub chunks_corrupted: AtomicU64,
    pub publishes_dropped: AtomicU64,
    pub store_failures: AtomicU64,
}

struct SimHooks {
    view: Arc<Mutex<DeviceView>>,
    counters: Arc<FleetCounters>,
    rng: StdRng,
    corrupt: f64,
}

impl Hooks for SimHooks {
    fn observe(&mut self, agent: &UpdateAgent, connected: bool) {
        let record = agent.record();
        let mut v = match self.view.lock() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        };
        v.connected = connected;
        v.running_version = record.running_version().to_owned();
        v.floor = record.floor.0;
        v.current = agent.current().map(|(c, s)| (c.clone(), s));
        v.last_finished = record
            .finished
            .back()
            .map(|f| (f.campaign.clone(), f.state, f.reason, f.acked));
        v.stats = agent.stats();
        v.last_acked = agent.last_acked().cloned();
        v.outbox = record.outbox.len();
    }

    fn inbound_chunk(&mut self, frame: &mut Vec<u8>) {
        let is_data = frame.get(4) == Some(&0);
        if is_data && self.corrupt > 0.0 && self.rng.gen_bool(self.corrupt.min(1.0)) {
            // The last byte of a data frame is sealed data (the GCM tag).
            if let Some(b) = frame.last_mut() {
                *b ^= 0x5a;
                self.counters
                    .chunks_corrupted
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn connection(&mut self, up: bool) {
        let c = if up {
            &self.counters.sessions_up
        } else {
            &self.counters.sessions_down
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn dropped_publish(&mut self) {
        self.counters
            .publishes_dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    fn store_failed(&mut self, _error: &str) {
        self.counters.store_failures.fetch_add(1, Ordering::Relaxed);
    }
}

struct RandomHealth {
    rng: StdRng,
    failure_probability: f64,
}

impl HealthCheck for RandomHealth {
    fn check(&mut self, _: &CampaignId, _: &str) -> bool {
        !(self.failure_probability > 0.0 && self.rng.gen_bool(self.failure_probability.min(1.0)))
    }
}

/// A running fleet.
pub struct Fleet {
    views: BTreeMap<DeviceId, Arc<Mutex<DeviceView>>>,
    pub counters: Arc<FleetCounters>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts one task per device. Must be called inside a tokio runtime.
    pub fn start(cfg: &FleetConfig, devices: Vec<DeviceIdentity>) -> Result<Fleet> {
        aloft_certs::tls::install_crypto_provider();
        let state_dir = cfg.dir.join(STATE_DIR);
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let gate = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
        let counters = Arc::new(FleetCounters::default());
        let (stop, stop_rx) = watch::channel(false);
        let mut views = BTreeMap::new();
        let mut tasks = Vec::with_capacity(devices.len());
        for (n, ident) in devices.into_iter().enumerate() {
            let tls = aloft_certs::tls::client_config(&cfg.ca_pem, &ident.cert_pem, &ident.key_pem)
                .with_context(|| format!("TLS settings of {}", ident.id))?;
            let mut tcfg = TransportConfig::new(cfg.host.clone(), cfg.port, Arc::new(tls));
            tcfg.connect_gate = Some(gate.clone());
            let mut store = JsonFileStore::new(state_dir.join(format!("{}.json", ident.id)), false);
            let record = store
                .load()
                .with_context(|| format!("record of {}", ident.id))?
                .unwrap_or_else(|| {
                    DeviceRecord::factory(&cfg.initial_version, cfg.initial_security_version)
                });
            let flash = FileFlash::open(
                &state_dir.join(format!("{}.slots", ident.id)),
                cfg.slot_capacity,
            )
            .with_context(|| format!("slots of {}", ident.id))?;
            let seed = cfg.faults.seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let health = RandomHealth {
                rng: StdRng::seed_from_u64(seed),
                failure_probability: cfg.faults.health_check_failure_probability,
            };
            let mut acfg = AgentConfig::new(
                ident.id.clone(),
                cfg.hardware_model.clone(),
                cfg.release_keys.clone(),
            );
            acfg.window = cfg.window;
            let agent = UpdateAgent::new(acfg, ident.encryption_key, record, Box::new(health));
            let view = Arc::new(Mutex::new(DeviceView::default()));
            let mut hooks = SimHooks {
                view: view.clone(),
                counters: counters.clone(),
                rng: StdRng::seed_from_u64(seed.rotate_left(17)),
                corrupt: cfg.faults.corrupt_chunk_probability,
            };
            hooks.observe(&agent, false);
            views.insert(ident.id.clone(), view);
            let device = Device {
                agent,
                flash: Box::new(flash),
                store: Box::new(store),
            };
            let stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                transport::run(device, tcfg, &mut hooks, stop).await;
            }));
        }
        Ok(Fleet {
            views,
            counters,
            stop,
            tasks,
        })
    }

    pub fn len(&self) -> usize {
        self.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &DeviceId> {
        self.views.keys()
    }

    /// A snapshot of one device.
    pub fn view(&self, id: &DeviceId) -> Option<DeviceView> {
        self.views.get(id).map(|v| match v.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        })
    }

    /// Snapshots of every device.
    pub fn views(&self) -> Vec<(DeviceId, DeviceView)> {
        self.views
            .keys()
            .filter_map(|id| Some((id.clone(), self.view(id)?)))
            .collect()
    }

    /// How many devices satisfy `pred` right now.
    pub fn count(&self, pred: impl Fn(&DeviceView) -> bool) -> usize {
        self.views().iter().filter(|(_, v)| pred(v)).count()
    }

    /// Waits until every device satisfies `pred`, checking every 50 ms, for at most `limit`.
    pub async fn wait_all(&self, limit: Duration, pred: impl Fn(&DeviceView) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.views().iter().all(|(_, v)| pred(v)) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until one device satisfies `pred`.
    pub async fn wait_one(
        &self,
        id: &DeviceId,
        limit: Duration,
        pred: impl Fn(&DeviceView) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.view(id).is_some_and(|v| pred(&v)) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every device (each saves its record) and waits for them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
