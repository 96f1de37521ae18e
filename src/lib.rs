//! The lab: everything a demo or an end-to-end test needs around a real orchestrator — a data
//! directory with a fleet CA, an operator profile, a trusted release key, releases built and
//! signed like an operator would, and the orchestrator itself, in-process or as a child process
//! that can be killed with SIGKILL.

pub mod bench;
pub mod origin;
pub mod scenario;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aloft_certs::{FleetCa, Validity};
use aloft_device::{DeviceIdentity, FleetConfig};
use aloft_orchestrator::admin::client::AdminClient;
use aloft_orchestrator::admin::wire::{AdminBody, CampaignSummary};
use aloft_orchestrator::config::{FileConfig, ServeConfig};
use aloft_orchestrator::ops;
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::Target;
use aloft_proto::manifest::ReleaseSigningKey;
use aloft_proto::release::ReleaseMeta;
use aloft_proto::trust::SignedRoot;
use aloft_proto::{ArtifactId, CampaignId, OperatorId, SecurityVersion};
use aloft_vault::{Protection, RecoveryKey, Unlock};
use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The hardware model every simulated device reports unless told otherwise.
pub const HARDWARE_MODEL: &str = "sim-v1";

/// A directory holding one orchestrator's data, its operator, and its root of trust: one root
/// key and one release key (threshold 1 each), root version 1 pinned by devices.
pub struct Lab {
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub profile_dir: PathBuf,
    pub ca: FleetCa,
    pub release_key: ReleaseSigningKey,
    pub root_key: ReleaseSigningKey,
    /// Root metadata version 1: installed in the orchestrator, pinned on devices.
    pub pinned_root: SignedRoot,
    /// Opens every sealed file of the lab (data directory, release key file). A recovery key
    /// rather than a passphrase: unwrapping it needs no Argon2id, so tests stay fast.
    pub recovery_key: RecoveryKey,
    /// A file holding `recovery_key`, passed to a child orchestrator as `--unlock-file`.
    pub unlock_file: PathBuf,
}

impl Lab {
    /// Creates the fleet CA and server certificate, an operator `ops`, and a release key the
    /// orchestrator trusts.
    pub fn create(root: &Path) -> Result<Lab> {
        aloft_certs::tls::install_crypto_provider();
        let data_dir = root.join("orchestrator");
        let recovery_key = RecoveryKey::generate()?;
        let protection = Protection::recovery_key(recovery_key.clone());
        let ca = ops::init(
            &data_dir,
            "Aloft Lab CA",
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
            &protection,
        )?;
        let profile_dir = root.join("operator");
        // The lab's operator does everything a test asks of it: registrations, CRLs and
        // roots (security-admin) as well as campaigns.
        ops::issue_operator_profile(
            &ca,
            &OperatorId::new("ops")?,
            aloft_certs::OperatorRole::SecurityAdmin,
            &profile_dir,
            30,
        )?;
        let unlock_file = root.join("unlock");
        aloft_vault::write_atomic(&unlock_file, recovery_key.to_hex().as_bytes(), 0o600, false)?;
        // The release key goes to its sealed file and back, as `release keygen` and `release
        // build` do.
        let key_file = root.join("release.key");
        ops::write_signing_key(&key_file, &ReleaseSigningKey::generate()?, &protection)?;
        let release_key =
            ops::read_signing_key(&key_file, &Unlock::RecoveryKey(recovery_key.clone()))?;
        let root_key = ReleaseSigningKey::generate()?;
        let pinned_root = Lab::make_root(None, &[&root_key], &[&release_key], &[], &[&root_key])?;
        ops::install_roots(&data_dir, vec![pinned_root.clone()])?;
        Ok(Lab {
            root: root.to_owned(),
            data_dir,
            profile_dir,
            ca,
            release_key,
            root_key,
            pinned_root,
            recovery_key,
            unlock_file,
        })
    }

    /// What opens the lab's sealed files.
    pub fn unlock(&self) -> Unlock {
        Unlock::RecoveryKey(self.recovery_key.clone())
    }

    /// Root metadata following `from` (or version 1), with these root and release keys
    /// (threshold 1 each), revoking `revoke`, signed by `signers`.
    pub fn make_root(
        from: Option<&SignedRoot>,
        root_keys: &[&ReleaseSigningKey],
        release_keys: &[&ReleaseSigningKey],
        revoke: &[String],
        signers: &[&ReleaseSigningKey],
    ) -> Result<SignedRoot> {
        let hex = |ks: &[&ReleaseSigningKey]| -> Vec<String> {
            ks.iter().map(|k| k.public().to_hex()).collect()
        };
        let prev = from.map(|s| s.peek_unverified()).transpose()?;
        let root = aloft_orchestrator::cli::new_root(
            prev.as_ref(),
            &hex(root_keys),
            None,
            &hex(release_keys),
            None,
            revoke,
            30,
            now_secs(),
        )?;
        let mut signed = SignedRoot::new(&root);
        for k in signers {
            signed.sign(k)?;
        }
        Ok(signed)
    }

    /// The orchestrator's configuration with every listener on a port chosen at run time.
    pub fn serve_config(&self) -> ServeConfig {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        ServeConfig {
            data_dir: self.data_dir.clone(),
            file: FileConfig {
                listen: any,
                metrics_listen: Some(any),
                ..FileConfig::default()
            },
            unlock: self.unlock(),
        }
    }

    /// A viewer token for the console of this lab's orchestrator, as `aloft console token`
    /// mints it from the data directory, valid for `ttl_secs`.
    pub fn console_token(&self, ttl_secs: u64) -> Result<String> {
        let master = ops::open_keystore(&self.data_dir, &self.unlock())?;
        aloft_orchestrator::console::TokenKey::derive(&master)
            .mint(now_secs(), ttl_secs)
            .map_err(|e| anyhow::anyhow!("randomness: {e}"))
    }

    /// Starts the orchestrator in this process.
    pub async fn start(&self) -> Result<aloft_orchestrator::Running> {
        Ok(aloft_orchestrator::start(self.serve_config()).await?)
    }

    /// Generates a Mosquitto configuration with `aloft broker-config mosquitto`'s code (a free
    /// loopback port, operator `ops`, retained jobs persisted) in `root/mosquitto` and starts
    /// Mosquitto with it.
    pub async fn start_mosquitto(&self) -> Result<bench::mosquitto::Mosquitto> {
        let dir = self.mosquitto_dir();
        let listen = SocketAddr::from(([127, 0, 0, 1], bench::mosquitto::Mosquitto::free_port()?));
        let opts = aloft_orchestrator::broker_config::MosquittoOptions {
            listen,
            hostnames: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            // The lab's operator is a security-admin (its certificate says so too).
            operators: vec![(
                OperatorId::new("ops")?,
                aloft_certs::OperatorRole::SecurityAdmin,
            )],
            persistence_dir: Some(dir.join("db")),
            // The lab's files are private to whoever runs it; Mosquitto stays that user.
            run_as_user: Some(std::env::var("USER").unwrap_or_else(|_| "root".to_owned())),
        };
        std::fs::create_dir_all(dir.join("db"))?;
        let ca = ops::load_ca(&self.data_dir.join("pki"), &self.unlock())?;
        let conf =
            aloft_orchestrator::broker_config::write_mosquitto(&self.data_dir, &ca, &dir, &opts)?;
        bench::mosquitto::Mosquitto::launch(&conf, &dir, listen).await
    }

    /// Starts Mosquitto again on the same configuration and port (after a kill).
    pub async fn restart_mosquitto(&self, addr: SocketAddr) -> Result<bench::mosquitto::Mosquitto> {
        let dir = self.mosquitto_dir();
        let conf = dir.join(aloft_orchestrator::broker_config::files::CONF);
        bench::mosquitto::Mosquitto::launch(&conf, &dir, addr).await
    }

    pub fn mosquitto_dir(&self) -> PathBuf {
        self.root.join("mosquitto")
    }

    /// The orchestrator's configuration beside the external broker at `broker` (started by
    /// [`Lab::start_mosquitto`]): its CRL file and pid file from the generated directory.
    pub fn serve_config_external(&self, broker: SocketAddr) -> ServeConfig {
        let mut cfg = self.serve_config();
        let dir = self.mosquitto_dir();
        cfg.file.external_broker = Some(format!("mqtts://127.0.0.1:{}", broker.port()));
        cfg.file.external_broker_crl =
            Some(dir.join(aloft_orchestrator::broker_config::files::CRL));
        cfg.file.external_broker_pid_file =
            Some(dir.join(aloft_orchestrator::broker_config::files::PID));
        // No `external_broker_operator_roles`: the lab's operators sign their requests, and
        // the role comes from the certificate that signed (PROTOCOL.md §11.1a).
        cfg
    }

    /// Registers devices from their certificates (`device_register`), as an operator must when
    /// the orchestrator runs beside an external broker and never sees a device's handshake.
    pub async fn register(&self, admin: &AdminClient, devices: &[DeviceIdentity]) -> Result<()> {
        for part in devices.chunks(500) {
            let _: Value = admin
                .call(AdminBody::DeviceRegister {
                    certs: part.iter().map(|d| d.cert_pem.clone()).collect(),
                    groups: Vec::new(),
                })
                .await?;
        }
        Ok(())
    }

    /// Starts the orchestrator as a child process of `exe` (a binary whose first argument
    /// `orchestrator` runs `aloft serve`), listening on `listen`.
    pub fn spawn(&self, exe: &Path, listen: SocketAddr) -> Result<OrchestratorProcess> {
        spawn_orchestrator(exe, &self.data_dir, &self.unlock_file, listen)
    }

    /// Starts the orchestrator as a child process of `exe` beside the external broker at
    /// `broker` (started by [`Lab::start_mosquitto`]), with the lines `aloft broker-config`
    /// wrote for it (`aloft-external.toml`: the CRL file and the broker's pid file).
    pub fn spawn_external(&self, exe: &Path, broker: SocketAddr) -> Result<OrchestratorProcess> {
        let toml = self
            .mosquitto_dir()
            .join(aloft_orchestrator::broker_config::files::ALOFT_TOML);
        let url = format!("mqtts://127.0.0.1:{}", broker.port());
        spawn_orchestrator_with(
            exe,
            &self.data_dir,
            &self.unlock_file,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &[
                "--config".as_ref(),
                toml.as_os_str(),
                "--broker".as_ref(),
                url.as_ref(),
            ],
        )
    }

    /// Moves this lab's store into the PostgreSQL database at `url` the documented way: a
    /// backup of the data directory, restored with the database as its store (the sled store
    /// goes aside).
    pub fn move_store_to_postgres(&self, url: &str) -> Result<()> {
        let at = aloft_orchestrator::store::StoreLocation::Postgres(url.to_owned());
        let out = self.root.join("move.aloftbak");
        let rk = RecoveryKey::generate()?;
        aloft_orchestrator::backup::create(
            &self.data_dir,
            &out,
            &Protection::recovery_key(rk.clone()),
        )?;
        let restored = aloft_orchestrator::backup::restore_at(
            &out,
            &self.data_dir,
            &at,
            &Unlock::RecoveryKey(rk),
        )?;
        if restored.records == 0 {
            bail!("the backup restored into {url} held no records");
        }
        std::fs::remove_file(&out)?;
        Ok(())
    }

    /// `aloft serve` replica `id` (issue 12) as a child process of `exe`: its store the
    /// PostgreSQL database at `url`, beside the external broker at `broker` (started by
    /// [`Lab::start_mosquitto`], with the lines `aloft broker-config` wrote for it), its lease
    /// `ttl_secs` long. Its log is `orchestrator-<id>.log` beside the data directory.
    pub fn spawn_replica(
        &self,
        exe: &Path,
        broker: SocketAddr,
        url: &str,
        id: &str,
        ttl_secs: u32,
    ) -> Result<OrchestratorProcess> {
        self.spawn_replica_in(&self.data_dir, exe, broker, url, id, ttl_secs)
    }

    /// [`Lab::spawn_replica`] on another data directory: a copy of this lab's, as a replica on
    /// another host has.
    pub fn spawn_replica_in(
        &self,
        data_dir: &Path,
        exe: &Path,
        broker: SocketAddr,
        url: &str,
        id: &str,
        ttl_secs: u32,
    ) -> Result<OrchestratorProcess> {
        let toml = self
            .mosquitto_dir()
            .join(aloft_orchestrator::broker_config::files::ALOFT_TOML);
        let broker_url = format!("mqtts://127.0.0.1:{}", broker.port());
        let ttl = ttl_secs.to_string();
        spawn_orchestrator_with(
            exe,
            data_dir,
            &self.unlock_file,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &[
                "--config".as_ref(),
                toml.as_os_str(),
                "--broker".as_ref(),
                broker_url.as_ref(),
                "--store".as_ref(),
                url.as_ref(),
                "--lease-ttl-secs".as_ref(),
                ttl.as_ref(),
                "--replica-id".as_ref(),
                id.as_ref(),
            ],
        )
    }

    /// Enrolls `count` simulated devices (keys and CSRs made device-side, certificates issued by
    /// this lab's CA, on every core) under `root/fleet`, and returns them.
    pub fn enroll_fleet(&self, prefix: &str, count: usize) -> Result<Vec<DeviceIdentity>> {
        aloft_device::identity::enroll_issued(
            &self.fleet_dir(),
            prefix,
            count,
            &self.ca,
            Validity::days(30),
        )
    }

    pub fn fleet_dir(&self) -> PathBuf {
        self.root.join("fleet")
    }

    /// Settings for a fleet of this lab against the orchestrator at `addr`.
    pub fn fleet_config(&self, addr: SocketAddr) -> FleetConfig {
        let mut cfg = FleetConfig::new(
            addr.ip().to_string(),
            addr.port(),
            self.ca.cert_pem().to_owned(),
            self.fleet_dir(),
        );
        cfg.root = Some(self.pinned_root.clone());
        cfg.hardware_model = HARDWARE_MODEL.to_owned();
        cfg
    }

    /// An operator connection to the orchestrator at `addr`.
    pub async fn operator(&self, addr: SocketAddr) -> Result<AdminClient> {
        Ok(AdminClient::connect(&self.profile_dir, &addr.to_string()).await?)
    }

    /// Builds and signs a release of a pseudo-random image of `image_bytes` bytes.
    pub fn build_release(&self, spec: &ReleaseSpec) -> Result<PathBuf> {
        self.build_release_signed(spec, &[&self.release_key])
    }

    /// Builds a release signed by each of `keys` in turn (threshold signing).
    pub fn build_release_signed(
        &self,
        spec: &ReleaseSpec,
        keys: &[&ReleaseSigningKey],
    ) -> Result<PathBuf> {
        let Some((first, others)) = keys.split_first() else {
            bail!("a release needs at least one signature");
        };
        let dir = self.root.join("releases").join(&spec.version);
        std::fs::create_dir_all(&dir)?;
        let image = dir.join("image.bin");
        std::fs::write(&image, pseudo_random_image(spec.image_bytes, spec.seed))?;
        let now = now_secs();
        let meta = ReleaseMeta {
            artifact: ArtifactId::new(format!("fw-{}", spec.version))?,
            version: spec.version.clone(),
            security_version: SecurityVersion(spec.security_version),
            hardware_model: spec.hardware_model.clone(),
            chunk_size: spec.chunk_bytes,
            created_at: now,
            expires_at: now + 86_400,
            sequence: Some(next_sequence()),
            preconditions: spec.preconditions.clone(),
        };
        let bundle = dir.join("bundle");
        ops::build_bundle(&image, &meta, first, &bundle)?;
        for k in others {
            ops::cosign_bundle(&bundle, k)?;
        }
        Ok(bundle)
    }

    /// Builds, uploads, and creates a campaign for every registered device.
    pub async fn release_to_all(
        &self,
        admin: &AdminClient,
        spec: &ReleaseSpec,
    ) -> Result<CampaignId> {
        let artifact = self.upload(admin, spec).await?;
        create_campaign(admin, artifact, Target::All).await
    }

    /// Builds and uploads a release.
    pub async fn upload(&self, admin: &AdminClient, spec: &ReleaseSpec) -> Result<ArtifactId> {
        let bundle = self.build_release(spec)?;
        ops::upload_bundle(admin, &bundle, false).await
    }
}

/// Starts an orchestrator on `data_dir` (opened with the recovery key in `unlock_file`) as a child
/// process of `exe` (a binary whose first argument `orchestrator` runs `aloft serve`), listening
/// on `listen`; returns once it printed its addresses. Its log (warnings and errors, or what
/// `RUST_LOG` asks for) goes to `orchestrator.log` beside `data_dir`.
pub fn spawn_orchestrator(
    exe: &Path,
    data_dir: &Path,
    unlock_file: &Path,
    listen: SocketAddr,
) -> Result<OrchestratorProcess> {
    spawn_orchestrator_with(exe, data_dir, unlock_file, listen, &[])
}

/// [`spawn_orchestrator`] with more arguments for `aloft serve`.
pub fn spawn_orchestrator_with(
    exe: &Path,
    data_dir: &Path,
    unlock_file: &Path,
    listen: SocketAddr,
    extra: &[&std::ffi::OsStr],
) -> Result<OrchestratorProcess> {
    // Replicas on one data directory each get their own log.
    let replica = extra
        .windows(2)
        .find(|w| w[0] == "--replica-id")
        .map(|w| w[1].to_string_lossy().into_owned());
    let log_path = match replica {
        Some(id) => data_dir.with_file_name(format!("orchestrator-{id}.log")),
        None => data_dir.with_file_name("orchestrator.log"),
    };
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    // A profiler to run the orchestrator under (`ALOFT_ORCHESTRATOR_WRAP="heaptrack -o FILE"`,
    // docs/BENCHMARKS.md): the words of the variable, then the usual command line. The pid and
    // the RSS figures are then the profiler's.
    let wrap: Vec<String> = std::env::var("ALOFT_ORCHESTRATOR_WRAP")
        .map(|w| w.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut command = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut child = command
        .arg("orchestrator")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--metrics-listen")
        .arg("127.0.0.1:0")
        // The read-only console, on loopback (the demo prints its link).
        .arg("--console-listen")
        .arg("127.0.0.1:0")
        .arg("--unlock-file")
        .arg(unlock_file)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    // The addresses line is the first the orchestrator prints; a wrapping profiler may print
    // a few of its own before it.
    for _ in 0..8 {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.contains("device=") {
            break;
        }
    }
    let field = |name: &str| -> Option<SocketAddr> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    let (Some(device_addr), metrics_addr) = (field("device="), field("metrics=")) else {
        let _ = child.kill();
        bail!("orchestrator did not report its addresses: {line:?}");
    };
    let console_addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("console=https://"))
        .and_then(|v| v.parse().ok());
    Ok(OrchestratorProcess {
        child,
        device_addr,
        metrics_addr,
        console_addr,
    })
}

/// Release sequence numbers: the clock in milliseconds, strictly increasing within a process
/// (releases built in the same millisecond still get distinct numbers).
pub fn next_sequence() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let prev = LAST.fetch_max(now, Ordering::SeqCst);
    if prev >= now {
        LAST.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        now
    }
}

/// Waits until the orchestrator has registered at least `n` devices.
pub async fn wait_registered(admin: &AdminClient, n: usize, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let count: Value = admin.call(AdminBody::DeviceCount {}).await?;
        let registered = count["registered"].as_u64().unwrap_or(0) as usize;
        if registered >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {registered} of {n} devices registered within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a plain campaign (one wave, no limits) and returns its id.
pub async fn create_campaign(
    admin: &AdminClient,
    artifact: ArtifactId,
    target: Target,
) -> Result<CampaignId> {
    create_rollout(admin, artifact, target, RolloutPolicy::default()).await
}

/// Creates a campaign that follows `policy` and returns its id.
pub async fn create_rollout(
    admin: &AdminClient,
    artifact: ArtifactId,
    target: Target,
    policy: RolloutPolicy,
) -> Result<CampaignId> {
    let v: Value = admin
        .call(AdminBody::CampaignCreate {
            artifact,
            target,
            include: Vec::new(),
            exclude: Vec::new(),
            policy,
            dry_run: false,
            origin: None,
        })
        .await?;
    let id = v
        .get("campaign")
        .and_then(Value::as_str)
        .context("campaign id in reply")?;
    Ok(CampaignId::new(id)?)
}

/// Polls a campaign's status until `done` holds or `timeout` passes.
pub async fn wait_campaign(
    admin: &AdminClient,
    campaign: &CampaignId,
    timeout: Duration,
    done: impl Fn(&CampaignSummary) -> bool,
) -> Result<CampaignSummary> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let s = status(admin, campaign, false).await?;
        if done(&s) {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "campaign {campaign} not done within {timeout:?}: {:?}",
                s.counts
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn status(
    admin: &AdminClient,
    campaign: &CampaignId,
    devices: bool,
) -> Result<CampaignSummary> {
    Ok(admin
        .call(AdminBody::CampaignStatus {
            campaign: campaign.clone(),
            devices,
        })
        .await?)
}

/// Whether every device of the campaign reached a terminal state.
pub fn finished(s: &CampaignSummary) -> bool {
    s.terminal() == s.total
}

/// What release to build.
#[derive(Debug, Clone)]
pub struct ReleaseSpec {
    pub version: String,
    pub security_version: u64,
    pub hardware_model: String,
    pub image_bytes: usize,
    pub chunk_bytes: u32,
    pub seed: u64,
    /// (1.5) Device preconditions signed into the manifest.
    pub preconditions: Option<aloft_proto::precondition::Preconditions>,
}

impl ReleaseSpec {
    pub fn new(version: &str, security_version: u64, image_bytes: usize) -> Self {
        Self {
            version: version.to_owned(),
            security_version,
            hardware_model: HARDWARE_MODEL.to_owned(),
            image_bytes,
            chunk_bytes: aloft_proto::manifest::DEFAULT_CHUNK_BYTES,
            seed: security_version,
            preconditions: None,
        }
    }
}

/// A deterministic, incompressible-looking image (xorshift), so releases differ by seed.
pub fn pseudo_random_image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An orchestrator running as a child process.
pub struct OrchestratorProcess {
    pub child: Child,
    pub device_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// The read-only web console (HTTPS).
    pub console_addr: Option<SocketAddr>,
}

impl OrchestratorProcess {
    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Peak resident memory of the process so far, from /proc (Linux).
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        peak_rss_of(&format!("/proc/{}/status", self.child.id()))
    }
}

impl Drop for OrchestratorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmHWM` of a /proc status file, in bytes.
pub fn peak_rss_of(status_path: &str) -> Option<u64> {
    let s = std::fs::read_to_string(status_path).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Reads one counter from a Prometheus text endpoint.
pub async fn scrape(addr: SocketAddr, metric: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The working directory of a run: `dir` (created if missing) or, without one, a fresh
/// temporary directory named `prefix…`, removed when the returned guard drops.
pub fn work_dir(dir: Option<&Path>, prefix: &str) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            Ok((d.to_owned(), None))
        }
        None => {
            let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            Ok((tmp.path().to_owned(), Some(tmp)))
        }
    }
}
