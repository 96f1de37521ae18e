//! The `aloft` command line: `serve` for the orchestrator, and the operator's commands (PKI,
//! release build/sign/upload, devices, campaigns). Release signing happens here, on the
//! operator's machine, with a key the server never holds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aloft_certs::Validity;
use aloft_proto::manifest::{ReleaseSigningKey, DEFAULT_CHUNK_BYTES};
use aloft_proto::release::ReleaseMeta;
use aloft_proto::{ArtifactId, CampaignId, DeviceState, OperatorId, SecurityVersion};
use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::admin::client::AdminClient;
use crate::admin::wire::{AdminBody, CampaignSummary, DryRun};
use crate::config::{FileConfig, ServeConfig, DEFAULT_CONFIG_TOML};
use crate::ops::{
    build_bundle, cosign_bundle, init, issue_operator_profile, load_ca, read_signing_key,
    upload_bundle, write_new, write_signing_key,
};
use crate::store::Target;

mod backup;
pub mod pki;
mod rollout;
#[cfg(test)]
mod tests;
mod trust;
mod unlock;
pub use backup::BackupCommand;
pub use rollout::{describe, describe_policy, parse_duration, PolicyArgs};
use rollout::{device_ids, parse_label, print_dry_run, unix_now};
pub use trust::{new_root, TrustCommand};
pub use unlock::{NewLockArgs, UnlockArgs};

#[derive(Parser, Debug)]
#[command(
    name = "aloft",
    version,
    about = "Aloft: OTA update orchestrator for IoT fleets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a data directory: fleet CA and the orchestrator's TLS server certificate.
    Init {
        /// The data directory to create; its `pki/`, `keystore` and `store/` must not exist yet.
        #[arg(long, env = "ALOFT_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, default_value = "Aloft Fleet CA")]
        ca_name: String,
        /// A DNS name or IP address devices and operators use to reach the orchestrator; repeat
        /// for several. The server certificate carries these in addition to `localhost` and
        /// `127.0.0.1`, which it always carries so that commands on the server itself work.
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
        #[command(flatten)]
        lock: NewLockArgs,
    },
    /// Run the orchestrator (embedded broker, mTLS front, engine, metrics).
    Serve(ServeArgs),
    /// Print the commented default configuration.
    GenerateConfig,
    /// Certificates: devices (from CSRs), operators; revocation and CRLs.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// The root of trust: root and release keys, root metadata, rotation and revocation.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Build, sign and upload releases.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Register and list devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// The audit log: who did what, and what the orchestrator decided itself (hash-chained).
    Audit {
        /// The first entry to show, by sequence number [default: 1].
        #[arg(long)]
        since: Option<u64>,
        /// At most this many entries [default: 100, at most 1000].
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Create campaigns and follow them.
    #[command(subcommand)]
    Campaign(Box<CampaignCommand>),
    /// End-to-end encrypted backups of a data directory, and restores.
    #[command(subcommand)]
    Backup(BackupCommand),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The data directory `aloft init` made.
    #[arg(long, env = "ALOFT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// A TOML configuration file (`aloft generate-config` prints a commented one).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// mTLS listener for devices and operators [default: the file's, else 127.0.0.1:8883];
    /// port 0 picks a free port.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Prometheus endpoint, `GET /metrics` [default: the file's, else 127.0.0.1:9464]; port 0
    /// picks a free port.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// INSECURE plain-TCP listener for local debugging (loopback only).
    #[arg(long)]
    pub insecure_plain_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub unlock: UnlockArgs,
}

/// How an operator command reaches the orchestrator.
// A flattened struct's doc comment would become the `about` of every subcommand that has none of
// its own (`device list` once described itself with the line above): `about = None` keeps it
// out of `--help`.
#[derive(Args, Debug, Clone)]
#[command(about = None, long_about = None)]
pub struct Conn {
    /// Operator profile directory (ca.crt, operator.crt, operator.key).
    #[arg(long, env = "ALOFT_PROFILE")]
    pub profile: PathBuf,
    /// The orchestrator's mTLS listener, `host:port`; the host must be a name its server
    /// certificate carries (`localhost` and `127.0.0.1` always are).
    #[arg(long, env = "ALOFT_SERVER", default_value = "127.0.0.1:8883")]
    pub server: String,
}

#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Issue a device certificate from the device's CSR.
    IssueDevice {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Issue certificates for every `*.csr` in a directory (written beside them as `*.crt`).
    IssueDevices {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        csr_dir: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Issue an operator certificate and write an operator profile directory.
    IssueOperator {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Record a certificate as revoked in the CA directory (sign a CRL afterwards).
    Revoke(pki::RevokeArgs),
    /// Sign a CRL of every revocation so far, numbered one above the last.
    Crl(pki::CrlArgs),
    /// Send a signed CRL to the orchestrator, which enforces it at once (no restart).
    CrlPush(pki::CrlPushArgs),
}

#[derive(Subcommand, Debug)]
pub enum ReleaseCommand {
    /// Generate a release signing key (sealed, file mode 0600). Prints its public key alone on
    /// stdout; the key file's recovery key goes to stderr, once.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        lock: NewLockArgs,
    },
    /// Cut an image into chunks, seal them, and sign the manifest.
    Build {
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        version: String,
        #[arg(long)]
        security_version: u64,
        #[arg(long)]
        hardware_model: String,
        /// Release signing key file (from `release keygen`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
        /// Defaults to `fw-<version>`.
        #[arg(long)]
        artifact: Option<String>,
        #[arg(long, default_value_t = DEFAULT_CHUNK_BYTES)]
        chunk_bytes: u32,
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
        /// The manifest's sequence number; devices refuse one not above what they installed
        /// last. Default: the build time in Unix milliseconds.
        #[arg(long)]
        sequence: Option<u64>,
        /// (1.5) Also build a delta from this base image to `--image`, as a bundle of its own
        /// in `<out-dir>/delta-from-<base-version>` (`release upload` sends it too). Devices
        /// running the base download the delta; others the full image.
        #[arg(long, requires = "base_version")]
        base: Option<PathBuf>,
        /// The firmware version of `--base`.
        #[arg(long, requires = "base")]
        base_version: Option<String>,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Add another release key's signature to a built bundle (when the root's release role needs
    /// more than one: each approver signs in turn).
    Sign {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Sign an old release's image again as a new release: a new artifact id and version, a
    /// fresh manifest sequence (devices refuse a sequence not above the one they installed, so
    /// an old manifest cannot be rolled back to) and a fresh content key. The image is taken
    /// from the old bundle, each chunk checked against its manifest before it is decrypted.
    Resign {
        /// The old release's bundle directory (from `release build`).
        #[arg(long)]
        bundle: PathBuf,
        /// The new release's version, e.g. `1.9.1-r2`.
        #[arg(long)]
        version: String,
        /// Defaults to the old release's; never below it.
        #[arg(long)]
        security_version: Option<u64>,
        /// Release signing key file (from `release keygen`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
        /// Defaults to `fw-<version>`; must differ from the old release's.
        #[arg(long)]
        artifact: Option<String>,
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
        /// Default: the signing time in Unix milliseconds; must be above the old release's.
        #[arg(long)]
        sequence: Option<u64>,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Upload a built release; the orchestrator verifies its signature before accepting it.
    Upload {
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the uploaded releases.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Set or remove labels (`key=value`) on devices, for targeting.
    Label {
        /// Comma-separated device ids.
        #[arg(long, value_delimiter = ',', required = true)]
        devices: Vec<String>,
        /// `key=value`; repeatable.
        #[arg(long = "set")]
        set: Vec<String>,
        /// A key to remove; repeatable.
        #[arg(long = "remove")]
        remove: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Register devices from their certificates.
    Register {
        #[arg(long = "cert", required = true)]
        certs: Vec<PathBuf>,
        #[arg(long = "group")]
        groups: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the registered devices (devices register themselves when they first connect).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Let one device renew its certificate once, now, although it is not yet due or renewed
    /// within the hour (forgotten if the orchestrator restarts first).
    RenewAllow {
        #[arg(long)]
        device: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand, Debug)]
pub enum CampaignCommand {
    /// Create a campaign: the release goes to the targeted devices, wave by wave as the policy
    /// says. Membership is fixed now.
    Create {
        #[arg(long)]
        artifact: String,
        #[arg(long, conflicts_with_all = ["group", "devices", "label"])]
        all: bool,
        #[arg(long, conflicts_with_all = ["devices", "label"])]
        group: Option<String>,
        /// Comma-separated device ids.
        #[arg(long, value_delimiter = ',', conflicts_with = "label")]
        devices: Vec<String>,
        /// Devices carrying this label (`key=value`); repeat to require several.
        #[arg(long)]
        label: Vec<String>,
        /// Comma-separated device ids added to the target.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// Comma-separated device ids removed from the target.
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Print who would get the release in which wave; touch nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop notifying devices; those in flight finish.
    Pause {
        /// The campaign id (`campaign create` prints it).
        campaign: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Continue a paused campaign (overrides the pause threshold for the waves open now).
    Resume {
        /// The campaign id (`campaign create` prints it).
        campaign: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop for good: devices not started get nothing, downloads in flight are withdrawn.
    Abort {
        /// The campaign id (`campaign create` prints it).
        campaign: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Return the devices that took a campaign's release to another release (aborting the
    /// campaign first if it still runs).
    Rollback {
        /// The campaign id (`campaign create` prints it).
        campaign: String,
        /// The release to return to; its security version must not be below the campaign's.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Status, policy, waves and counts per state; `--watch` follows until the campaign stops.
    Status {
        /// The campaign id (`campaign create` prints it).
        campaign: String,
        #[arg(long)]
        devices: bool,
        #[arg(long)]
        watch: bool,
        /// Print the raw JSON summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List every campaign with its status.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

async fn create_or_dry_run(conn: &Conn, body: AdminBody, dry_run: bool) -> Result<()> {
    if !dry_run {
        return call_and_print(conn, body).await;
    }
    let client = AdminClient::connect(&conn.profile, &conn.server).await?;
    let plan: DryRun = client.call(body).await?;
    print_dry_run(&plan);
    Ok(())
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            data_dir,
            ca_name,
            hostnames,
            lock,
        } => lock.seal_with(
            "the data directory",
            "this data directory's CA key, server key and keystore",
            |p| init(&data_dir, &ca_name, &hostnames, p).map(|_| ()),
        ),
        Command::Serve(args) => serve(args).await,
        Command::GenerateConfig => {
            print!("{DEFAULT_CONFIG_TOML}");
            Ok(())
        }
        Command::Pki(c) => pki(c).await,
        Command::Trust(c) => trust::run(c).await,
        Command::Audit { since, limit, conn } => {
            call_and_print(&conn, AdminBody::AuditList { since, limit }).await
        }
        Command::Release(c) => release(c).await,
        Command::Device(c) => device(c).await,
        Command::Campaign(c) => campaign(*c).await,
        Command::Backup(c) => backup::run(c),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    if let Some(l) = args.listen {
        file.listen = l;
    }
    if let Some(m) = args.metrics_listen {
        file.metrics_listen = Some(m);
    }
    if let Some(p) = args.insecure_plain_listen {
        file.insecure_plain_listen = Some(p);
    }
    let unlock = args.unlock.obtain("the data directory")?;
    let cfg = ServeConfig {
        data_dir: args.data_dir,
        file,
        unlock,
    };
    let mut running = crate::start(cfg).await?;
    // One machine-readable line, so scripts and tests can find a port chosen at run time.
    println!(
        "aloft listening device={} metrics={}",
        running.device_addr,
        running
            .metrics_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    tokio::select! {
        r = running.wait() => r?,
        () = shutdown_signal() => {
            running.shutdown().await?;
        }
    }
    Ok(())
}

/// SIGINT or SIGTERM (what systemd and container runtimes send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn pki(c: PkiCommand) -> Result<()> {
    match c {
        PkiCommand::Revoke(args) => pki::revoke(args)?,
        PkiCommand::Crl(args) => pki::crl(args)?,
        PkiCommand::CrlPush(args) => pki::crl_push(args).await?,
        PkiCommand::IssueDevice {
            ca_dir,
            csr,
            out,
            days,
            unlock,
        } => {
            let ca = load_ca(&ca_dir, &unlock.obtain("the fleet CA key")?)?;
            let csr = std::fs::read_to_string(&csr)?;
            let cert = ca.issue_device(&csr, Validity::days(days))?;
            // In the issuance ledger before it leaves: revoking the device reaches it.
            aloft_certs::ledger::record_certs(&ca_dir, &[&cert])?;
            write_new(&out, cert.as_bytes(), false)?;
            println!("issued {}", out.display());
        }
        PkiCommand::IssueDevices {
            ca_dir,
            csr_dir,
            days,
            unlock,
        } => {
            let ca = load_ca(&ca_dir, &unlock.obtain("the fleet CA key")?)?;
            let mut paths: Vec<PathBuf> = std::fs::read_dir(&csr_dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "csr"))
                .collect();
            paths.sort();
            let csrs = paths
                .iter()
                .map(std::fs::read_to_string)
                .collect::<std::io::Result<Vec<_>>>()?;
            let mut failed = 0;
            let results = ca.issue_devices(&csrs, Validity::days(days));
            // In the issuance ledger before they leave: revoking a device reaches them.
            let issued: Vec<&str> = results.iter().flatten().map(String::as_str).collect();
            aloft_certs::ledger::record_certs(&ca_dir, &issued)?;
            for (p, r) in paths.iter().zip(results) {
                match r {
                    Ok(cert) => write_new(&p.with_extension("crt"), cert.as_bytes(), false)?,
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}: {e}", p.display());
                    }
                }
            }
            println!(
                "issued {} certificates, {failed} refused",
                paths.len() - failed
            );
            if failed > 0 {
                bail!("{failed} CSRs were refused");
            }
        }
        PkiCommand::IssueOperator {
            ca_dir,
            name,
            out_dir,
            days,
            unlock,
        } => {
            let ca = load_ca(&ca_dir, &unlock.obtain("the fleet CA key")?)?;
            issue_operator_profile(&ca, &OperatorId::new(name)?, &out_dir, days)?;
            println!("operator profile written to {}", out_dir.display());
        }
    }
    Ok(())
}

/// One admin call whose reply is printed as JSON.
async fn call_and_print(conn: &Conn, body: AdminBody) -> Result<()> {
    let client = AdminClient::connect(&conn.profile, &conn.server).await?;
    let v: Value = client.call(body).await?;
    print_json(&v)?;
    client.disconnect().await;
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    use std::io::Write as _;
    let text = serde_json::to_string_pretty(v)?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        // `aloft ... | head` closing the pipe early is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

async fn release(c: ReleaseCommand) -> Result<()> {
    match c {
        ReleaseCommand::Keygen { out, lock } => {
            if out.symlink_metadata().is_ok() {
                bail!("{} already exists", out.display());
            }
            let key = ReleaseSigningKey::generate()?;
            lock.seal_with("the release key", &format!("{}", out.display()), |p| {
                write_signing_key(&out, &key, p)
            })?;
            let public = key.public();
            // Only the public key on stdout, so that `$(aloft release keygen ...)` is the key
            // to name in a root; the recovery key went to stderr.
            println!("{}", public.to_hex());
            eprintln!(
                "release signing key {} written to {}; keep it offline. Name it in the root's release role: `aloft trust root-new ... --release-key {}`",
                public.key_id(),
                out.display(),
                public.to_hex()
            );
        }
        ReleaseCommand::Build {
            image,
            version,
            security_version,
            hardware_model,
            key,
            out_dir,
            artifact,
            chunk_bytes,
            expires_days,
            sequence,
            base,
            base_version,
            unlock,
        } => {
            let key = read_signing_key(&key, &unlock.obtain("the release key")?)?;
            let now = crate::engine::now_ms() / 1000;
            let meta = ReleaseMeta {
                artifact: ArtifactId::new(artifact.unwrap_or_else(|| format!("fw-{version}")))?,
                version,
                security_version: SecurityVersion(security_version),
                hardware_model,
                chunk_size: chunk_bytes,
                created_at: now,
                expires_at: now + expires_days * 86_400,
                sequence: Some(sequence.unwrap_or_else(crate::engine::now_ms)),
            };
            let a = build_bundle(&image, &meta, &key, &out_dir)?;
            println!("built and signed {a} into {}", out_dir.display());
            if let (Some(base), Some(base_version)) = (base, base_version) {
                let d = crate::ops::build_delta_bundle(
                    &base,
                    &base_version,
                    &image,
                    &meta,
                    &key,
                    &out_dir,
                )?;
                let full = std::fs::metadata(&image)?.len().max(1);
                println!(
                    "built and signed the delta {} from {base_version} into {} ({} bytes, {:.1}% of the image)",
                    d.artifact,
                    crate::ops::delta_bundle_dir(&out_dir, &base_version).display(),
                    d.image_size,
                    100.0 * d.image_size as f64 / full as f64
                );
            }
        }
        ReleaseCommand::Resign {
            bundle,
            version,
            security_version,
            key,
            out_dir,
            artifact,
            expires_days,
            sequence,
            unlock,
        } => {
            let key = read_signing_key(&key, &unlock.obtain("the release key")?)?;
            let now = crate::engine::now_ms() / 1000;
            let new = crate::ops::Resign {
                artifact: ArtifactId::new(artifact.unwrap_or_else(|| format!("fw-{version}")))?,
                version,
                security_version: security_version.map(SecurityVersion),
                created_at: now,
                expires_at: now + expires_days * 86_400,
                sequence: sequence.unwrap_or_else(crate::engine::now_ms),
            };
            let (old, m) = crate::ops::resign_bundle(&bundle, &new, &key, &out_dir)?;
            println!(
                "re-signed the image of {old} as {} (version {}, security version {}, sequence {}) into {}",
                m.artifact,
                m.version,
                m.security_version.0,
                m.sequence.unwrap_or(0),
                out_dir.display()
            );
        }
        ReleaseCommand::Sign {
            bundle,
            key,
            unlock,
        } => {
            let n = cosign_bundle(
                &bundle,
                &read_signing_key(&key, &unlock.obtain("the release key")?)?,
            )?;
            println!("{} now carries {n} signature(s)", bundle.display());
        }
        ReleaseCommand::Upload { bundle, conn } => {
            let client = AdminClient::connect(&conn.profile, &conn.server).await?;
            let a = upload_bundle(&client, &bundle, true).await?;
            println!("uploaded {a}; the orchestrator verified its signature");
            for delta in crate::ops::delta_bundles(&bundle) {
                let d = upload_bundle(&client, &delta, true).await?;
                println!("uploaded the delta {d}; campaigns of {a} offer it");
            }
            client.disconnect().await;
        }
        ReleaseCommand::List { conn } => {
            call_and_print(&conn, AdminBody::ReleaseList {}).await?;
        }
    }
    Ok(())
}

async fn device(c: DeviceCommand) -> Result<()> {
    match c {
        DeviceCommand::Register {
            certs,
            groups,
            conn,
        } => {
            let pems = certs
                .iter()
                .map(std::fs::read_to_string)
                .collect::<std::io::Result<Vec<_>>>()?;
            call_and_print(
                &conn,
                AdminBody::DeviceRegister {
                    certs: pems,
                    groups,
                },
            )
            .await?;
        }
        DeviceCommand::List { conn } => {
            call_and_print(&conn, AdminBody::DeviceList {}).await?;
        }
        DeviceCommand::RenewAllow { device, conn } => {
            let device = aloft_proto::DeviceId::new(device)?;
            call_and_print(&conn, AdminBody::DeviceRenewAllow { device }).await?;
        }
        DeviceCommand::Label {
            devices,
            set,
            remove,
            conn,
        } => {
            let body = AdminBody::DeviceLabel {
                devices: device_ids(devices)?,
                set: set.iter().map(|l| parse_label(l)).collect::<Result<_>>()?,
                remove,
            };
            call_and_print(&conn, body).await?;
        }
    }
    Ok(())
}

async fn campaign(c: CampaignCommand) -> Result<()> {
    match c {
        CampaignCommand::Create {
            artifact,
            all,
            group,
            devices,
            label,
            include,
            exclude,
            policy,
            dry_run,
            conn,
        } => {
            let target = if all {
                Target::All
            } else if let Some(g) = group {
                Target::Group(g)
            } else if !devices.is_empty() {
                Target::Devices(device_ids(devices)?)
            } else if !label.is_empty() {
                Target::Labels(
                    label
                        .iter()
                        .map(|l| parse_label(l))
                        .collect::<Result<_>>()?,
                )
            } else if !include.is_empty() {
                Target::Devices(Vec::new())
            } else {
                bail!("choose a target: --all, --group G, --label k=v or --devices a,b");
            };
            let body = AdminBody::CampaignCreate {
                artifact: ArtifactId::new(artifact)?,
                target,
                include: device_ids(include)?,
                exclude: device_ids(exclude)?,
                policy: policy.to_policy(unix_now())?,
                dry_run,
            };
            create_or_dry_run(&conn, body, dry_run).await?;
        }
        CampaignCommand::Pause { campaign, conn } => {
            let campaign = CampaignId::new(campaign)?;
            call_and_print(&conn, AdminBody::CampaignPause { campaign }).await?;
        }
        CampaignCommand::Resume { campaign, conn } => {
            let campaign = CampaignId::new(campaign)?;
            call_and_print(&conn, AdminBody::CampaignResume { campaign }).await?;
        }
        CampaignCommand::Abort { campaign, conn } => {
            let campaign = CampaignId::new(campaign)?;
            call_and_print(&conn, AdminBody::CampaignAbort { campaign }).await?;
        }
        CampaignCommand::Rollback {
            campaign,
            to,
            policy,
            dry_run,
            conn,
        } => {
            let body = AdminBody::CampaignRollback {
                campaign: CampaignId::new(campaign)?,
                to: ArtifactId::new(to)?,
                policy: policy.to_policy(unix_now())?,
                dry_run,
            };
            create_or_dry_run(&conn, body, dry_run).await?;
        }
        CampaignCommand::Status {
            campaign,
            devices,
            watch,
            json,
            conn,
        } => {
            let client = AdminClient::connect(&conn.profile, &conn.server).await?;
            let campaign = CampaignId::new(campaign)?;
            if watch {
                watch_campaign(&client, &campaign).await?;
            }
            let s: CampaignSummary = client
                .call(AdminBody::CampaignStatus { campaign, devices })
                .await?;
            if json {
                print_json(&s)?;
            } else {
                print!("{}", describe(&s));
            }
        }
        CampaignCommand::List { conn } => {
            call_and_print(&conn, AdminBody::CampaignList {}).await?;
        }
    }
    Ok(())
}

/// Shows a progress bar of terminal devices until the campaign finishes.
async fn watch_campaign(client: &AdminClient, campaign: &CampaignId) -> Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let s: CampaignSummary = client
            .call(AdminBody::CampaignStatus {
                campaign: campaign.clone(),
                devices: false,
            })
            .await?;
        let done = s.terminal();
        bar.set_length(u64::from(s.total));
        bar.set_position(u64::from(done));
        bar.set_message(format!(
            "succeeded={} failed={} rolled_back={}",
            s.count(DeviceState::Succeeded),
            s.count(DeviceState::Failed),
            s.count(DeviceState::RolledBack)
        ));
        if s.status != crate::store::CampaignStatus::Active {
            bar.finish_with_message(format!(
                "{} {}",
                s.status,
                s.reason.as_deref().unwrap_or("")
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
