//! Shared set-up for the end-to-end tests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aloft_device::{DeviceIdentity, Fleet, FleetConfig};
use aloft_e2e::{create_rollout, wait_registered, Lab, ReleaseSpec};
use aloft_e2e::{finished, wait_campaign};
use aloft_orchestrator::admin::client::AdminClient;
use aloft_orchestrator::rollout::policy::{Growth, Size, Waves};
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::Target;
use aloft_orchestrator::Running;
use aloft_proto::crypto::{self, ContentKey};
use aloft_proto::manifest::SignedManifest;
use aloft_proto::messages::{self, Job, PROTOCOL_VERSION};
use aloft_proto::trust::SignedRoot;
use aloft_proto::{CampaignId, DeviceId, DeviceState, Reason};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tempfile::TempDir;

/// Generous bound for anything that should take seconds; hit only when something is broken.
pub const LIMIT: Duration = Duration::from_secs(120);

/// What devices and operators connect to: one test body runs against each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// The default: the orchestrator's own mTLS front and embedded broker.
    Embedded,
    /// Mosquitto 2 with the configuration `aloft broker-config mosquitto` generates; the
    /// orchestrator is its client and devices are registered by the operator.
    Mosquitto,
}

/// An orchestrator in this process, an operator, and an enrolled (not yet running) fleet.
pub struct Env {
    /// Kept for its lifetime: the directory is removed when the test ends.
    _tmp: TempDir,
    pub lab: Lab,
    pub running: Running,
    pub admin: AdminClient,
    pub devices: Vec<DeviceIdentity>,
    // No test reads it since the merges of issue 13 (clippy's dead_code); kept for tests that
    // branch on the broker.
    #[allow(dead_code)]
    pub broker: Broker,
    /// The external broker, when there is one (killed when the test ends).
    pub mosquitto: Option<aloft_e2e::bench::mosquitto::Mosquitto>,
}

impl Env {
    pub async fn new(devices: usize) -> Env {
        Env::with(Broker::Embedded, devices).await
    }

    /// An [`Env`] on `broker`. With Mosquitto the enrolled devices are registered from their
    /// certificates, since the orchestrator never sees their handshakes.
    pub async fn with(broker: Broker, devices: usize) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let lab = Lab::create(tmp.path()).unwrap();
        let (running, mosquitto) = match broker {
            Broker::Embedded => (lab.start().await.unwrap(), None),
            Broker::Mosquitto => {
                let m = lab.start_mosquitto().await.unwrap();
                let cfg = lab.serve_config_external(m.addr);
                (aloft_orchestrator::start(cfg).await.unwrap(), Some(m))
            }
        };
        let admin = lab.operator(running.device_addr).await.unwrap();
        let devices = lab.enroll_fleet("dev", devices).unwrap();
        if broker == Broker::Mosquitto {
            lab.register(&admin, &devices).await.unwrap();
        }
        Env {
            _tmp: tmp,
            lab,
            running,
            admin,
            devices,
            broker,
            mosquitto,
        }
    }

    pub fn fleet_config(&self) -> FleetConfig {
        self.lab.fleet_config(self.running.device_addr)
    }

    /// Builds and uploads a release, and rolls it out to every registered device.
    pub async fn roll_out(&self, spec: &ReleaseSpec, policy: RolloutPolicy) -> CampaignId {
        let artifact = self.lab.upload(&self.admin, spec).await.unwrap();
        create_rollout(&self.admin, artifact, Target::All, policy)
            .await
            .unwrap()
    }

    /// Starts the whole fleet and waits until the orchestrator registered every device; beside
    /// Mosquitto (where every device is registered from the start) until every device is
    /// connected to the broker.
    pub async fn start_fleet(&self, cfg: &FleetConfig) -> Fleet {
        let fleet = Fleet::start(cfg, self.devices.clone()).unwrap();
        wait_registered(&self.admin, self.devices.len(), LIMIT)
            .await
            .unwrap();
        if self.broker == Broker::Mosquitto {
            assert!(fleet.wait_all(LIMIT, |v| v.connected).await);
        }
        fleet
    }
}

/// The demo binary, which runs `aloft serve` as a child process (role `orchestrator`).
pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_aloft-demo"))
}

/// An orchestrator in a child process (so SIGKILL can stop it, and a data directory can be
/// backed up and restored under it), an operator, and a running, registered fleet.
pub struct Spawned {
    /// Kept for its lifetime: the directory is removed when the test ends.
    pub tmp: TempDir,
    pub lab: Lab,
    pub orch: aloft_e2e::OrchestratorProcess,
    pub admin: AdminClient,
    pub fleet: Fleet,
    /// The external broker, when there is one (killed when the test ends).
    pub mosquitto: Option<aloft_e2e::bench::mosquitto::Mosquitto>,
}

/// Starts a [`Spawned`] with `devices` devices on the embedded broker; `tune` adjusts the
/// fleet's settings first.
pub async fn spawned(devices: usize, tune: impl FnOnce(&mut FleetConfig)) -> Spawned {
    spawned_on(Broker::Embedded, devices, tune).await
}

/// Starts a [`Spawned`] on `broker`. With Mosquitto the devices are registered from their
/// certificates, and "registered" is not "connected": it waits until every device is connected.
pub async fn spawned_on(
    broker: Broker,
    devices: usize,
    tune: impl FnOnce(&mut FleetConfig),
) -> Spawned {
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::create(tmp.path()).unwrap();
    let mosquitto = match broker {
        Broker::Embedded => None,
        Broker::Mosquitto => Some(lab.start_mosquitto().await.unwrap()),
    };
    let orch = start_child(&lab, mosquitto.as_ref(), "127.0.0.1:0".parse().unwrap());
    let identities = lab.enroll_fleet("dev", devices).unwrap();
    let admin = lab.operator(orch.device_addr).await.unwrap();
    if broker == Broker::Mosquitto {
        lab.register(&admin, &identities).await.unwrap();
    }
    let mut cfg = lab.fleet_config(orch.device_addr);
    tune(&mut cfg);
    let fleet = Fleet::start(&cfg, identities).unwrap();
    wait_registered(&admin, devices, LIMIT).await.unwrap();
    if broker == Broker::Mosquitto {
        assert!(fleet.wait_all(LIMIT, |v| v.connected).await);
    }
    Spawned {
        tmp,
        lab,
        orch,
        admin,
        fleet,
        mosquitto,
    }
}

/// The orchestrator as a child process: with the front on `listen`, or beside `mosquitto`
/// (also how a test starts it again on the same data directory after a kill).
pub fn start_child(
    lab: &Lab,
    mosquitto: Option<&aloft_e2e::bench::mosquitto::Mosquitto>,
    listen: std::net::SocketAddr,
) -> aloft_e2e::OrchestratorProcess {
    match mosquitto {
        None => lab.spawn(exe(), listen).unwrap(),
        Some(m) => lab.spawn_external(exe(), m.addr).unwrap(),
    }
}

/// Connects an MQTT client as `device` (its real certificate) and waits for the CONNACK.
pub async fn device_client(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    device: &DeviceIdentity,
) -> (AsyncClient, EventLoop) {
    let tls = aloft_certs::tls::client_config(ca_pem, &device.cert_pem, &device.key_pem).unwrap();
    let mut opts = MqttOptions::new(device.id.as_str(), addr.ip().to_string(), addr.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )))
    .set_outgoing_inflight_upper_limit(16)
    .set_max_packet_size(Some(1024 * 1024));
    connected(opts).await
}

async fn connected(opts: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut el) = AsyncClient::new(opts, 64);
    tokio::time::timeout(LIMIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("connect failed: {e}"),
            }
        }
    })
    .await
    .unwrap();
    (client, el)
}

/// Publishes at QoS 1 and drives the event loop until the broker acknowledged it (or the
/// connection closed, which is also an answer for refused input).
pub async fn publish_and_settle(
    client: &AsyncClient,
    el: &mut EventLoop,
    topic: String,
    payload: Vec<u8>,
    retain: bool,
) {
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

/// Runs a valid campaign to every device and asserts it succeeds everywhere.
pub async fn valid_update_succeeds(env: &Env, fleet: &aloft_device::Fleet, version: &str, sv: u64) {
    let campaign = env
        .lab
        .release_to_all(&env.admin, &ReleaseSpec::new(version, sv, 64 * 1024))
        .await
        .unwrap();
    let s = wait_campaign(&env.admin, &campaign, LIMIT, finished)
        .await
        .unwrap();
    assert_eq!(s.count(DeviceState::Succeeded), s.total, "{:?}", s.counts);
    assert!(
        fleet
            .wait_all(LIMIT, |v| v.running_version == version)
            .await
    );
}

pub fn read_bundle(dir: &std::path::Path) -> (SignedManifest, ContentKey) {
    let signed: SignedManifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let key_hex = std::fs::read_to_string(dir.join("content-key")).unwrap();
    let key: [u8; 32] = hex::decode(key_hex.trim()).unwrap().try_into().unwrap();
    (signed, ContentKey::from_bytes(key))
}

/// Plays a compromised server: publishes a retained job for `device` on the front's device
/// road, with `manifest`, the content key wrapped for the device, and `roots`.
pub async fn forge_job(
    env: &Env,
    device: &DeviceId,
    campaign: &str,
    manifest: &SignedManifest,
    key: &ContentKey,
    roots: Vec<SignedRoot>,
) {
    let identity = env.devices.iter().find(|d| &d.id == device).unwrap();
    let public = identity.encryption_key.public_bytes().unwrap();
    let artifact = manifest.peek_unverified().unwrap().artifact;
    let job = Job {
        v: PROTOCOL_VERSION,
        campaign: CampaignId::new(campaign).unwrap(),
        manifest: manifest.clone(),
        wrapped_key: crypto::wrap_content_key(&public, device, &artifact, key).unwrap(),
        issued_at: aloft_e2e::now_secs(),
        roots,
        origin: None,
        deltas: Vec::new(),
    };
    // The front's device road is where the orchestrator's jobs leave from.
    env.running
        .devices
        .as_ref()
        .expect("a compromised server's device road exists only with the front")
        .publish(
            device,
            aloft_broker::DeviceBound::Job,
            messages::encode(&job).into(),
            true,
        )
        .unwrap();
}

/// Waits until `device` refused the job of `campaign` with `reason`.
pub async fn refused(fleet: &Fleet, device: &DeviceId, campaign: &str, reason: Reason) -> bool {
    fleet
        .wait_one(device, LIMIT, |v| {
            matches!(&v.last_finished, Some((c, DeviceState::Failed, Some(r), _))
                if c.as_str() == campaign && *r == reason)
        })
        .await
}

/// A canary, then cumulative percentages.
pub fn waves(canary: Size, growth: &[f64]) -> Waves {
    Waves {
        canary: Some(canary),
        growth: Growth::Percent(growth.to_vec()),
    }
}

pub fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

/// Connects an MQTT client with the operator profile in `profile_dir`.
pub async fn operator_client(
    addr: std::net::SocketAddr,
    profile_dir: &Path,
) -> (AsyncClient, EventLoop) {
    let read = |f: &str| std::fs::read_to_string(profile_dir.join(f)).unwrap();
    let tls = aloft_certs::tls::client_config(
        &read("ca.crt"),
        &read("operator.crt"),
        &read("operator.key"),
    )
    .unwrap();
    let der = aloft_certs::tls::parse_cert(&read("operator.crt")).unwrap();
    let name = aloft_certs::parse_identity(&der).unwrap().id;
    let mut opts = MqttOptions::new(name, addr.ip().to_string(), addr.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )))
    .set_outgoing_inflight_upper_limit(16)
    .set_max_packet_size(Some(2 * 1024 * 1024));
    connected(opts).await
}

/// Sends DISCONNECT and drives the event loop until the connection is gone, so the front has
/// released the identity before the test connects it again.
pub async fn close(client: AsyncClient, mut el: EventLoop) {
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while el.poll().await.is_ok() {}
    })
    .await;
}

/// The status line of a plain HTTP GET of `path` (the orchestrator's `/health`, `/metrics`).
pub async fn http_status(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines().next().unwrap_or_default().to_owned()
}
