//! The simulator: thousands of device agents in one process, each its own tokio task with its own
//! key, certificate, mTLS connection, A/B slot file and record. Observability is a shared view
//! per device (updated after every agent step) and fleet-wide counters.
//!
//! Faults ([`Faults`]) are injected per device from an RNG seeded with the fleet seed and the
//! device's index, so a run can be repeated: chunks corrupted in transit, failing or hanging
//! health checks, flaky and slow links, devices offline at the start, power losses at a chosen
//! phase of an update, and applications that turn unhealthy after confirming. A power loss, like
//! [`Fleet::power_cycle`], drops the device's agent with whatever it had not saved, keeps it off
//! for a moment, then starts a new agent from the record on disk (the bootloader decides which
//! slot runs). [`Fleet::set_online`] takes a link down and brings it back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_proto::crypto::DeviceEncryptionKey;
use aloft_proto::trust::{SignedRoot, TrustedRoot};
use aloft_proto::{CampaignId, DeviceId, DeviceState, Reason, SecurityVersion};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::fleet_files::FleetFiles;
use crate::identity::{DeviceIdentity, STATE_DIR};
use crate::renewal::{RenewalConfig, Renewer};
use crate::slots::SlotState;
use crate::store::DeviceRecord;
use crate::transport::{self, Control, Device, Hooks, Intervention, RunEnd, TransportConfig};
use crate::update::shared::SharedManifests;
use crate::update::{AgentConfig, AgentStats, AppHealth, HealthCheck, HealthStatus, UpdateAgent};

mod conditions;
mod faults;
pub use conditions::{ConditionModel, SimEnvironment};
pub use faults::Faults;
use faults::{chance, some_of, HealthState, LazyRng, PowerLossAt, SimHealth, SimHooks};

/// How the fleet runs.
#[derive(Clone)]
pub struct FleetConfig {
    /// `host:port` of the orchestrator's device listener.
    pub host: String,
    pub port: u16,
    /// Further listeners of the same broker (the other nodes of a cluster), `(host, port)`:
    /// devices are spread over `host:port` and these in turn ([`FleetConfig::server_for`]).
    pub more_servers: Vec<(String, u16)>,
    pub ca_pem: String,
    /// The root of trust the devices were provisioned with (it names the release keys they
    /// accept). Required: [`Fleet::start`] refuses a fleet without one.
    pub root: Option<SignedRoot>,
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
    /// How often a device running a confirmed campaign image sends a heartbeat (default 2 s, so
    /// soak windows in tests can be short; a real device's default is 10 s).
    pub heartbeat_ms: u64,
    /// How long a new image may take to confirm after the reset into it before the device falls
    /// back (`boot_failed`). Default 5 s; a real device's default is 60 s.
    pub confirm_deadline_ms: u64,
    /// How long the reset into a new image takes (default 200 ms): long enough that a power loss
    /// can strike between the `rebooting` report and the reset.
    pub reboot_ms: u64,
    /// How long a new image's health check runs before its verdict (default 200 ms), so a device
    /// spends a moment in `verifying`, where a power loss makes it fall back.
    pub health_check_ms: u64,
    /// When devices renew their certificates (and how long they wait to ask again).
    pub renewal: RenewalConfig,
    /// (1.5) Trust anchors (PEM) for download origins' TLS: with them, devices fetch chunks from
    /// a job's origin and fall back to chunk requests; without, they ignore a job's origin.
    pub origin_ca_pem: Option<String>,
    /// Longest time one origin fetch may take (default 20 s).
    pub origin_fetch_timeout: Duration,
    /// Origin failures in a row after which a download gives its origin up (default 4).
    pub origin_max_failures: u32,
    /// (1.5) The devices' battery, use, local time, storage and link, for manifests that carry
    /// preconditions (seeded per device).
    pub conditions: ConditionModel,
    /// (1.5) How often a deferred device checks its preconditions again (default 1 s; a real
    /// device's default is 60 s).
    pub precondition_recheck_ms: u64,
}

impl FleetConfig {
    pub fn new(host: impl Into<String>, port: u16, ca_pem: String, dir: PathBuf) -> Self {
        FleetConfig {
            host: host.into(),
            port,
            more_servers: Vec::new(),
            ca_pem,
            root: None,
            hardware_model: "sim-v1".into(),
            initial_version: "1.0.0".into(),
            initial_security_version: SecurityVersion(1),
            dir,
            slot_capacity: 64 * 1024 * 1024,
            window: 8,
            connect_concurrency: 64,
            faults: Faults::default(),
            heartbeat_ms: 2_000,
            confirm_deadline_ms: 5_000,
            reboot_ms: 200,
            health_check_ms: 200,
            renewal: RenewalConfig::default(),
            origin_ca_pem: None,
            origin_fetch_timeout: Duration::from_secs(20),
            origin_max_failures: 4,
            conditions: ConditionModel::default(),
            precondition_recheck_ms: 1_000,
        }
    }

    /// Where the `n`-th device given to [`Fleet::start`] connects: `host:port` and
    /// `more_servers` round-robin, so that each of `k` servers gets every `k`-th device.
    pub fn server_for(&self, n: usize) -> (&str, u16) {
        match n % (1 + self.more_servers.len()) {
            0 => (&self.host, self.port),
            i => {
                let (host, port) = &self.more_servers[i - 1];
                (host, *port)
            }
        }
    }
}

/// What one device looks like from outside, refreshed after every step.
#[derive(Debug, Clone, Default)]
pub struct DeviceView {
    pub connected: bool,
    /// False while the device is off after a power loss.
    pub powered: bool,
    pub running_version: String,
    /// The running slot holds a confirmed (Valid) image; false while a new image is on trial.
    pub running_slot_valid: bool,
    /// Some slot holds a Valid image to fall back to (must always hold).
    pub has_valid_slot: bool,
    pub floor: u64,
    /// The campaign in progress and its phase.
    pub current: Option<(CampaignId, DeviceState)>,
    /// The newest finished campaign: its final state and reason, and whether it was acknowledged.
    pub last_finished: Option<(CampaignId, DeviceState, Option<Reason>, bool)>,
    /// The agent's counters, summed over every power-on since the simulator started.
    pub stats: AgentStats,
    /// The last report the orchestrator accepted, since the simulator started.
    pub last_acked: Option<(CampaignId, DeviceState)>,
    /// Reports not yet acknowledged.
    pub outbox: usize,
    /// Chunk data frames that reached this device since the simulator started, over all its
    /// power-ons: every chunk fetched, including duplicates, corrupted ones and chunks fetched
    /// again because a power loss dropped unsaved progress. Summed over the fleet, minus the
    /// chunk count of every image downloaded, it counts chunks re-sent because of faults (and
    /// because of timeouts under load).
    pub chunks_fetched_total: u64,
    /// Power losses this device went through (injected faults and [`Fleet::power_cycle`]).
    pub power_cycles: u32,
}

/// Counters of the whole fleet. Fault counters count injected faults.
#[derive(Debug, Default)]
pub struct FleetCounters {
    pub sessions_up: AtomicU64,
    pub sessions_down: AtomicU64,
    pub chunks_corrupted: AtomicU64,
    pub publishes_dropped: AtomicU64,
    pub store_failures: AtomicU64,
    /// Links dropped mid-download by `link_drop_probability`.
    pub link_drops: AtomicU64,
    /// Power losses, injected by `power_loss_probability` or asked for with
    /// [`Fleet::power_cycle`].
    pub power_losses: AtomicU64,
    /// New images whose health check hung (`boot_hang_probability`).
    pub boot_hangs: AtomicU64,
    /// Health checks failed on purpose (`health_check_failure_probability`).
    pub health_check_failures: AtomicU64,
    /// Devices with a capped link (`slow_link_probability`).
    pub slow_devices: AtomicU64,
    /// Devices held offline at the start (`offline_probability`).
    pub offline_devices: AtomicU64,
    /// Devices whose application turned unhealthy after confirming
    /// (`unhealthy_after_confirm_probability`), counted when their first unhealthy heartbeat
    /// is due.
    pub unhealthy_devices: AtomicU64,
    /// (1.5) Devices whose conditions start constrained by the [`ConditionModel`] (a low
    /// battery, in use or metered), so a manifest's preconditions may defer them.
    pub constrained_devices: AtomicU64,
    /// Devices that took up a campaign other than the one they had (counted when a device's
    /// view first shows it): a cheap way to wait for every device's job, checked exactly once
    /// it is reached.
    pub jobs_started: AtomicU64,
    /// Campaigns whose final report the orchestrator acknowledged (counted when a device's view
    /// first shows it acknowledged): the orchestrator acknowledges only what it has recorded,
    /// so this reaching the fleet's size marks the moment every device's end is on its disk.
    pub finals_acked: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What a device task needs to start an agent again after a power loss.
struct Boot {
    acfg: AgentConfig,
    key: DeviceEncryptionKey,
    factory: (String, SecurityVersion),
    tcfg: TransportConfig,
    health: SimHealth,
    env: SimEnvironment,
    power_off_ms: u64,
}

impl Boot {
    fn agent(&self, record: DeviceRecord) -> UpdateAgent {
        self.health.power_on();
        UpdateAgent::new(
            self.acfg.clone(),
            self.key.clone(),
            record,
            Box::new(self.health.clone()),
        )
        .with_environment(Box::new(self.env))
    }
}

/// One device's life: runs until stopped, and after each power loss stays off for a moment,
/// then powers on from the record on disk. `boot` and `hooks` come boxed: an async fn keeps its
/// arguments for its whole life, in the task every device holds.
async fn live(
    boot: Box<Boot>,
    mut device: Device,
    mut hooks: Box<SimHooks>,
    stop: watch::Receiver<bool>,
    control: watch::Receiver<Control>,
) {
    let mut tcfg = boot.tcfg.clone();
    loop {
        let end = transport::run_controlled(
            device,
            tcfg.clone(),
            &mut *hooks,
            stop.clone(),
            control.clone(),
        )
        .await;
        let d = match end {
            RunEnd::Stopped(_) => return,
            RunEnd::PowerLost(d) => d,
        };
        bump(&hooks.counters.power_losses);
        hooks.powered_off(&d.agent);
        let Device {
            agent,
            flash,
            mut store,
        } = d;
        // The agent's memory is gone: only what the store saved survives.
        drop(agent);
        let off = some_of(hooks.fault_rng.get(), boot.power_off_ms);
        let mut stopping = stop.clone();
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            () = tokio::time::sleep(off) => {}
        }
        let record = match store.load() {
            Ok(Some(r)) => r,
            Ok(None) => DeviceRecord::factory(&boot.factory.0, boot.factory.1),
            Err(e) => {
                // A simulated device with an unreadable record starts from the factory state
                // rather than stopping the simulation.
                warn!(device = %boot.acfg.device, error = %e, "record unreadable after a power loss");
                hooks.store_failed(&e.to_string());
                DeviceRecord::factory(&boot.factory.0, boot.factory.1)
            }
        };
        device = Device {
            agent: Box::new(boot.agent(record)),
            flash,
            store,
        };
        // Only the first power-on of a device held offline starts offline.
        tcfg.offline_for = Duration::ZERO;
    }
}

/// A running fleet.
pub struct Fleet {
    views: BTreeMap<DeviceId, Arc<Mutex<DeviceView>>>,
    renewers: BTreeMap<DeviceId, Arc<Renewer>>,
    controls: BTreeMap<DeviceId, watch::Sender<Control>>,
    pub counters: Arc<FleetCounters>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts one task per device. Must be called inside a tokio runtime.
    pub fn start(cfg: &FleetConfig, devices: Vec<DeviceIdentity>) -> Result<Fleet> {
        aloft_certs::tls::install_crypto_provider();
        cfg.faults.validate()?;
        cfg.conditions.validate()?;
        let started_ms = crate::transport::now_ms();
        let Some(root) = &cfg.root else {
            bail!("no root of trust: devices must be provisioned with one (FleetConfig::root, device-sim run --root FILE)");
        };
        // Checked once here rather than refusing every job later in every device; each agent
        // gets the verified result instead of verifying the same signatures again.
        let pinned =
            Arc::new(TrustedRoot::pin(root.clone()).context("the root of trust does not verify")?);
        let root = Arc::new(root.clone());
        let manifests = Arc::new(SharedManifests::default());
        let state_dir = cfg.dir.join(STATE_DIR);
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let files = FleetFiles::open(
            &state_dir,
            devices.iter().map(|d| d.id.as_str()),
            cfg.slot_capacity,
            false,
        )?;
        // Detached: the thread ends by itself once the devices have let go of the files.
        let _trim = files
            .trim_slots()
            .context("starting the slot files' trim thread")?;
        let gate = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
        let fleet_tls = transport::DeviceTls::new(&cfg.ca_pem).context("the fleet ca")?;
        // One origin client configuration (trust anchors) for the fleet; each device still has
        // its own fetcher, connections and limits.
        let origin = match &cfg.origin_ca_pem {
            Some(pem) => {
                let mut o =
                    crate::origin::OriginClientConfig::new(pem).context("origin trust anchors")?;
                o.timeout = cfg.origin_fetch_timeout;
                Some(o)
            }
            None => None,
        };
        let counters = Arc::new(FleetCounters::default());
        let faults = &cfg.faults;
        let (stop, stop_rx) = watch::channel(false);
        let mut views = BTreeMap::new();
        let mut controls = BTreeMap::new();
        let mut renewers = BTreeMap::new();
        let mut tasks = Vec::with_capacity(devices.len());
        for (n, ident) in devices.into_iter().enumerate() {
            // A renewed certificate replaces the file the device was loaded from, if it was.
            let cert_file = crate::identity::renewed_cert_path(&cfg.dir, &ident.id);
            let renewer = Renewer::with_fleet_tls(&ident, &fleet_tls, cert_file, cfg.renewal)
                .with_context(|| format!("TLS settings of {}", ident.id))?;
            renewers.insert(ident.id.clone(), renewer.clone());
            // The device connects with the renewer's current settings; these are the same ones,
            // not a second copy (each holds the parsed CA, certificate, key and session cache).
            let (host, port) = cfg.server_for(n);
            let mut tcfg = TransportConfig::new(host, port, renewer.tls());
            tcfg.connect_gate = Some(gate.clone());
            tcfg.renewal = Some(renewer);
            tcfg.origin = origin.clone();
            let mut store = files.store(ident.id.as_str())?;
            let record = store
                .load()
                .with_context(|| format!("record of {}", ident.id))?
                .unwrap_or_else(|| {
                    DeviceRecord::factory(&cfg.initial_version, cfg.initial_security_version)
                });
            let flash = files.flash(ident.id.as_str(), cfg.slot_capacity)?;

            // Each fault draws from its own stream, so turning one on leaves the others' draws
            // (and runs recorded before it existed) unchanged.
            let seed = faults.seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let stream_seed = |k: u64| seed.rotate_left(17 + 7 * k as u32) ^ k;
            let stream = |k: u64| StdRng::seed_from_u64(stream_seed(k));
            let mut plan = stream(1);
            let link_drops = if chance(&mut plan, faults.link_drop_probability) {
                plan.gen_range(1..=3)
            } else {
                0
            };
            let frames_until_drop = plan.gen_range(1..=8);
            let power_loss = chance(&mut plan, faults.power_loss_probability).then(|| {
                match plan.gen_range(0..3) {
                    0 => PowerLossAt::Downloading(plan.gen_range(0.2..0.8)),
                    1 => PowerLossAt::Installing,
                    _ => PowerLossAt::BeforeConfirm,
                }
            });
            let slow = chance(&mut plan, faults.slow_link_probability);
            let offline = chance(&mut plan, faults.offline_probability);
            // Drawn last, so the streams of the older faults stay as they were.
            let power_loss = power_loss.or_else(|| {
                chance(&mut plan, faults.power_loss_in_rebuild_probability)
                    .then_some(PowerLossAt::Rebuilding)
            });
            if slow {
                bump(&counters.slow_devices);
            }
            if offline {
                bump(&counters.offline_devices);
                tcfg.offline_for = Duration::from_millis(faults.offline_ms);
            }

            let health = SimHealth(Arc::new(Mutex::new(HealthState {
                fail_rng: LazyRng::new(seed),
                hang_rng: LazyRng::new(stream_seed(2)),
                app_rng: LazyRng::new(stream_seed(3)),
                failure_probability: faults.health_check_failure_probability,
                hang_probability: faults.boot_hang_probability,
                unhealthy_probability: faults.unhealthy_after_confirm_probability,
                unhealthy_after_ms: faults.unhealthy_after_ms,
                check_ms: cfg.health_check_ms,
                check: None,
                decided_at: 0,
                unhealthy_at: None,
                counted_unhealthy: false,
                counters: counters.clone(),
            })));
            let mut acfg =
                AgentConfig::new(ident.id.clone(), cfg.hardware_model.clone(), root.clone());
            acfg.pinned = Some(pinned.clone());
            acfg.manifests = Some(manifests.clone());
            acfg.window = cfg.window;
            acfg.heartbeat_ms = cfg.heartbeat_ms;
            acfg.confirm_deadline_ms = cfg.confirm_deadline_ms;
            acfg.reboot_delay_ms = cfg.reboot_ms;
            acfg.origin_fetch = origin.is_some();
            acfg.origin_max_failures = cfg.origin_max_failures;
            acfg.precondition_recheck_ms = cfg.precondition_recheck_ms;
            let env = cfg.conditions.device(n, started_ms);
            if env.constrained() {
                bump(&counters.constrained_devices);
            }
            let boot = Boot {
                acfg,
                key: ident.encryption_key,
                factory: (cfg.initial_version.clone(), cfg.initial_security_version),
                tcfg,
                health,
                env,
                power_off_ms: faults.power_off_ms,
            };
            let agent = boot.agent(record);
            let view = Arc::new(Mutex::new(DeviceView::default()));
            let mut hooks = SimHooks {
                view: view.clone(),
                counters: counters.clone(),
                rng: LazyRng::new(seed.rotate_left(17)),
                corrupt: faults.corrupt_chunk_probability,
                fault_rng: LazyRng::new(stream_seed(4)),
                link_drops_left: link_drops,
                frames_until_drop,
                power_loss,
                slow: slow.then(|| (faults.slow_link_bytes_per_sec, tokio::time::Instant::now())),
                chunks_fetched_total: 0,
                stats_before: AgentStats::default(),
            };
            hooks.observe(&agent, false);
            views.insert(ident.id.clone(), view);
            let (control, control_rx) = watch::channel(Control::default());
            controls.insert(ident.id.clone(), control);
            let device = Device {
                agent: Box::new(agent),
                flash,
                store,
            };
            let stop = stop_rx.clone();
            tasks.push(tokio::spawn(live(
                Box::new(boot),
                device,
                Box::new(hooks),
                stop,
                control_rx,
            )));
        }
        Ok(Fleet {
            views,
            renewers,
            controls,
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

    /// Takes `id`'s link down and keeps it down (`false`), or lets it reconnect at once
    /// (`true`). The device stays powered meanwhile and its timers run. False for an unknown
    /// device.
    pub fn set_online(&self, id: &DeviceId, online: bool) -> bool {
        let Some(c) = self.controls.get(id) else {
            return false;
        };
        c.send_modify(|c| c.online = online);
        true
    }

    /// Cuts `id`'s power now: its agent is dropped with whatever it had not saved, and after a
    /// short (seeded) time off the device powers on again from its record. A link taken down
    /// with [`set_online`](Self::set_online) stays down. False for an unknown device.
    pub fn power_cycle(&self, id: &DeviceId) -> bool {
        let Some(c) = self.controls.get(id) else {
            return false;
        };
        c.send_modify(|c| c.power_losses += 1);
        true
    }

    /// Makes `id` ask for a new certificate at its next chance (it reconnects with it once it
    /// has it), whether or not its certificate is due. False for an unknown device.
    pub fn force_renewal(&self, id: &DeviceId) -> bool {
        let Some(r) = self.renewers.get(id) else {
            return false;
        };
        r.force();
        true
    }

    /// The certificate renewal of `id`: its current certificate, serial and outcomes.
    pub fn renewer(&self, id: &DeviceId) -> Option<Arc<Renewer>> {
        self.renewers.get(id).cloned()
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
    /// Copies nothing: cheap enough to poll at 10,000 devices.
    pub fn count(&self, pred: impl Fn(&DeviceView) -> bool) -> usize {
        self.sum(|v| u64::from(pred(v))) as usize
    }

    /// The sum of `f` over every device right now. Copies nothing, like [`Fleet::count`].
    pub fn sum(&self, f: impl Fn(&DeviceView) -> u64) -> u64 {
        self.views
            .values()
            .map(|v| match v.lock() {
                Ok(v) => f(&v),
                Err(p) => f(&p.into_inner()),
            })
            .sum()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_read_from_a_toml_table_with_defaults_for_what_is_left_out() {
        #[derive(Deserialize)]
        struct Scenario {
            faults: Faults,
        }
        let s: Scenario = toml::from_str(
            "[faults]\nseed = 7\nlink_drop_probability = 0.25\npower_loss_probability = 1.0\n",
        )
        .unwrap();
        assert_eq!(s.faults.seed, 7);
        assert_eq!(s.faults.link_drop_probability, 0.25);
        assert_eq!(
            s.faults.slow_link_bytes_per_sec,
            Faults::default().slow_link_bytes_per_sec
        );
        assert!(s.faults.validate().is_ok());
        assert!(toml::from_str::<Scenario>("[faults]\nlink_drop_chance = 0.1\n").is_err());
    }

    #[test]
    fn devices_are_spread_over_every_server_in_turn() {
        let mut cfg = FleetConfig::new("a", 1, String::new(), PathBuf::new());
        assert_eq!(cfg.server_for(0), ("a", 1));
        assert_eq!(cfg.server_for(7), ("a", 1), "one server takes every device");
        cfg.more_servers = vec![("b".into(), 2), ("c".into(), 3)];
        let spread: Vec<(&str, u16)> = (0..7).map(|n| cfg.server_for(n)).collect();
        assert_eq!(
            spread,
            [
                ("a", 1),
                ("b", 2),
                ("c", 3),
                ("a", 1),
                ("b", 2),
                ("c", 3),
                ("a", 1)
            ]
        );
    }

    #[test]
    fn faults_outside_zero_to_one_are_refused() {
        for bad in [-0.1, 1.5, f64::NAN] {
            let f = Faults {
                boot_hang_probability: bad,
                ..Faults::default()
            };
            assert!(f.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_fault_that_is_off_draws_nothing() {
        let mut a = StdRng::seed_from_u64(3);
        let mut b = StdRng::seed_from_u64(3);
        assert!(!chance(&mut a, 0.0));
        assert!(chance(&mut a, 1.0));
        assert_eq!(a.gen::<u64>(), b.gen::<u64>());
    }

    #[test]
    fn a_stream_made_at_its_first_draw_draws_as_one_made_up_front() {
        let mut lazy = LazyRng::new(11);
        let mut eager = StdRng::seed_from_u64(11);
        assert!(!lazy.chance(0.0));
        for _ in 0..100 {
            assert_eq!(lazy.chance(0.5), chance(&mut eager, 0.5));
        }
        assert_eq!(lazy.get().gen::<u64>(), eager.gen::<u64>());
    }
}
