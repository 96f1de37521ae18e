//! The `aloft` command line: `serve` for the orchestrator, and the operator's commands (PKI,
//! release build/sign/upload, devices, campaigns). Release signing happens here, on the
//! operator's machine, with a key the server never holds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aloft_certs::{OperatorRole, Validity};
use aloft_proto::manifest::{ReleaseSigningKey, DEFAULT_CHUNK_BYTES};
use aloft_proto::release::ReleaseMeta;
use aloft_proto::{ArtifactId, CampaignId, OperatorId, SecurityVersion};
use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::admin::client::AdminClient;
use crate::admin::wire::{AdminBody, CampaignSummary, DryRun};
use crate::config::{FileConfig, ServeConfig, DEFAULT_CONFIG_TOML};
use crate::ops::{
    build_bundle, cosign_bundle, issue_operator_profile, load_ca, read_signing_key, upload_bundle,
    write_new, write_signing_key,
};
use crate::store::Target;

mod backup;
pub(crate) mod human;
pub mod pki;
mod precondition;
mod rollout;
mod status;
mod tables;
#[cfg(test)]
mod tests;
mod trust;
mod unlock;
mod watch;
pub use backup::BackupCommand;
pub use precondition::PreconditionArgs;
pub use rollout::{describe, describe_policy, parse_duration, PolicyArgs};
use rollout::{describe_dry_run, device_ids, parse_label, unix_now};
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
        /// The fleet CA certificate's common name.
        #[arg(long, default_value = "Aloft Fleet CA")]
        ca_name: String,
        /// A DNS name or IP address devices and operators use to reach the orchestrator; repeat
        /// for several. The server certificate carries these in addition to `localhost` and
        /// `127.0.0.1`, which it always carries so that commands on the server itself work.
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        lock: NewLockArgs,
    },
    /// Run the orchestrator (embedded broker, mTLS front, engine, metrics), or beside an
    /// external broker (`--broker`).
    Serve(ServeArgs),
    /// Generate an external broker's configuration from the fleet's PKI.
    #[command(subcommand)]
    BrokerConfig(BrokerConfigCommand),
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
    /// The read-only web console (`aloft serve --console-listen`).
    #[command(subcommand)]
    Console(ConsoleCommand),
    /// Which replica leads and how each is, from each one's `/health` and `/metrics` (exit
    /// code 1 unless every replica is healthy and exactly one leads).
    Status {
        /// A replica's metrics listener (`aloft serve --metrics-listen`), host:port; repeat
        /// for each replica.
        #[arg(long = "metrics", required = true, value_name = "ADDR")]
        metrics: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConsoleCommand {
    /// Mint a short-lived viewer token for the console, from the data directory (it needs the
    /// data directory's unlock secret, as `serve` does). The token opens the console read-only
    /// and nothing else. Prints the token, or with `--url` the link to open.
    Token {
        /// The data directory of the orchestrator whose console the token opens.
        #[arg(long, env = "ALOFT_DATA_DIR")]
        data_dir: PathBuf,
        /// How long the token lives: `90s`, `30m`, `2h` (at most 24h).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The console's address, `https://host:port`: print `<url>/login?token=…` instead of
        /// the bare token.
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum BrokerConfigCommand {
    /// Mosquitto 2: mosquitto.conf (TLS 1.3, client certificate required, CN as user name, the
    /// fleet CA and CRL), the ACL, the broker's server certificate, and aloft-external.toml.
    Mosquitto {
        /// The data directory `aloft init` made (its fleet CA signs the broker's certificate).
        #[arg(long, env = "ALOFT_DATA_DIR")]
        data_dir: PathBuf,
        /// The directory to write; Mosquitto reads it (`mosquitto -c DIR/mosquitto.conf`).
        #[arg(long)]
        out: PathBuf,
        /// The broker's TLS listener.
        #[arg(long, default_value = "0.0.0.0:8883")]
        listen: SocketAddr,
        /// A name clients reach the broker by (its certificate carries each); repeat for several.
        #[arg(long = "hostname", required = true)]
        hostnames: Vec<String>,
        /// An operator allowed to send admin requests, `NAME=ROLE` (viewer, operator,
        /// security-admin; a bare `NAME` is a viewer); repeat for several.
        #[arg(long = "operator")]
        operators: Vec<String>,
        /// Keep retained jobs across a broker restart in this directory.
        #[arg(long)]
        persistence_dir: Option<PathBuf>,
        /// The user Mosquitto runs as after starting as root [Mosquitto's default: mosquitto].
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// EMQX 5: an emqx.conf fragment (TLS 1.3 listener with peer verification, CN as user name
    /// and client id, file authorization) and acl.conf, from the same topic table, with the
    /// TLS material and aloft-external.toml.
    Emqx(OtherBrokerArgs),
    /// VerneMQ: vernemq.conf lines (TLS listener, CN as user name, vmq_acl) and vmq.acl.
    Vernemq(OtherBrokerArgs),
    /// HiveMQ 4: config.xml (TLS 1.3 listener, client certificate required) and the File RBAC
    /// extension's credentials.xml.
    Hivemq(OtherBrokerArgs),
    /// RMQTT (rmqttd 0.24): rmqtt.toml (a TLS listener on `--listen` that requires a client
    /// certificate from the fleet CA, CN as user name) and plugins/ (rmqtt-acl rules from the
    /// same topic table, retained messages on disk, shared subscriptions). deploy/rmqtt makes
    /// a cluster of it.
    Rmqtt(OtherBrokerArgs),
    /// AWS IoT Core: policy documents (device, orchestrator, one per operator) with policy
    /// variables (`${iot:Connection.Thing.ThingName}`).
    AwsIot {
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
        /// `arn:aws:iot:REGION:ACCOUNT`.
        #[arg(long)]
        arn: String,
        /// An operator allowed to send admin requests; repeat for several.
        #[arg(long = "operator")]
        operators: Vec<String>,
    },
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
    /// The read-only web console, HTTPS [default: the file's `console.listen`, else off]; port
    /// 0 picks a free port. Open it with an operator certificate or `aloft console token`.
    #[arg(long)]
    pub console_listen: Option<SocketAddr>,
    /// Devices sent chunks at once over the whole fleet; the others are told to wait (`busy`)
    /// [default: the file's `downloads.slots`, else 256].
    #[arg(long)]
    pub download_slots: Option<usize>,
    /// Run beside an external MQTT 5 broker, `mqtts://host:port`, as its client (certificate
    /// `pki/orchestrator.crt`) instead of the front and the embedded broker.
    #[arg(long)]
    pub broker: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// On a PostgreSQL store: this replica's name in the leader lease [default: the file's
    /// `lease.replica_id`, else hostname-pid].
    #[arg(long)]
    pub replica_id: Option<String>,
    /// On a PostgreSQL store: how long a grant of the leader lease lasts, renewed at a third
    /// of it [default: the file's `lease.ttl_secs`, else 15].
    #[arg(long)]
    pub lease_ttl_secs: Option<u64>,
    #[command(flatten)]
    pub unlock: UnlockArgs,
}

/// `--store`: where the store lives.
#[derive(Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// Where the store lives: `sled`, the data directory's `store/` (the default), or a
    /// PostgreSQL database, `postgres://user[:password]@host[:port]/database`. Prefer
    /// ALOFT_STORE for a URL with a password: the process list shows flags.
    #[arg(
        long = "store",
        env = "ALOFT_STORE",
        value_name = "sled|postgres://...",
        hide_env_values = true
    )]
    pub store: Option<String>,
}

impl StoreArgs {
    /// The store of `data_dir` these arguments name.
    pub fn location(&self, data_dir: &Path) -> Result<crate::store::StoreLocation> {
        Ok(crate::store::StoreLocation::from_flag(
            self.store.as_deref(),
            data_dir,
        )?)
    }
}

/// `aloft broker-config emqx|vernemq|hivemq|rmqtt`.
#[derive(Args, Debug)]
pub struct OtherBrokerArgs {
    /// The data directory `aloft init` made (its fleet CA signs the broker's certificate).
    #[arg(long, env = "ALOFT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the broker will read these files (they name each other by this path).
    #[arg(long)]
    pub broker_dir: String,
    /// The broker's TLS listener.
    #[arg(long, default_value = "0.0.0.0:8883")]
    pub listen: SocketAddr,
    /// A name clients reach the broker by (its certificate carries each); repeat for several.
    #[arg(long = "hostname", required = true)]
    pub hostnames: Vec<String>,
    /// An operator allowed to send admin requests, `NAME=ROLE` (a bare `NAME` is a viewer);
    /// repeat for several.
    #[arg(long = "operator")]
    pub operators: Vec<String>,
    #[command(flatten)]
    pub unlock: UnlockArgs,
}

/// `--operator NAME[=ROLE]` values.
fn operator_roles(operators: &[String]) -> Result<Vec<(OperatorId, OperatorRole)>> {
    operators
        .iter()
        .map(|o| -> Result<(OperatorId, OperatorRole)> {
            let (name, role) = o.split_once('=').unwrap_or((o, "viewer"));
            Ok((OperatorId::new(name)?, role.parse()?))
        })
        .collect()
}

/// `aloft broker-config emqx|vernemq|hivemq|rmqtt`: the TLS material and the broker's files.
fn broker_config_other(
    broker: crate::broker_config::OtherBroker,
    a: OtherBrokerArgs,
) -> Result<()> {
    let ca = crate::ops::load_ca(
        &a.data_dir.join(crate::config::layout::PKI_DIR),
        &a.unlock.obtain("the fleet CA key")?,
    )?;
    let opts = crate::broker_config::MosquittoOptions {
        listen: a.listen,
        hostnames: a.hostnames,
        operators: operator_roles(&a.operators)?,
        persistence_dir: None,
        run_as_user: None,
    };
    let files =
        crate::broker_config::write_other(broker, &a.data_dir, &ca, &a.out, &a.broker_dir, &opts)?;
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
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
        /// The CA directory (`<data-dir>/pki`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The device's certificate signing request (PEM).
        #[arg(long)]
        csr: PathBuf,
        /// The certificate file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Validity of the certificate, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Issue certificates for every `*.csr` in a directory (written beside them as `*.crt`).
    IssueDevices {
        /// The CA directory (`<data-dir>/pki`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The directory holding the `*.csr` files.
        #[arg(long)]
        csr_dir: PathBuf,
        /// Validity of the certificates, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Issue an operator certificate and write an operator profile directory.
    IssueOperator {
        /// The CA directory (`<data-dir>/pki`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The operator's name, as the audit log records it.
        #[arg(long)]
        name: String,
        /// The profile directory to write (ca.crt, operator.crt, operator.key).
        #[arg(long)]
        out_dir: PathBuf,
        /// What the certificate lets its holder do: viewer (read only), operator (also
        /// releases, campaigns, labels) or security-admin (also CRLs, roots, registrations,
        /// early renewals). No default: choose the least that does the job.
        #[arg(long, value_parser = parse_operator_role)]
        role: OperatorRole,
        /// Validity of the certificate, in days.
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
        /// The key file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        lock: NewLockArgs,
    },
    /// Cut an image into chunks, seal them, and sign the manifest.
    Build {
        /// The firmware image to release.
        #[arg(long)]
        image: PathBuf,
        /// The release's version, as devices report it (`2.0.0`).
        #[arg(long)]
        version: String,
        /// Anti-rollback counter: devices refuse a release below the one they run.
        #[arg(long)]
        security_version: u64,
        /// The hardware model the image is for; devices of another model refuse it.
        #[arg(long)]
        hardware_model: String,
        /// Release signing key file (from `release keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The bundle directory to write (manifest, sealed chunks, content key).
        #[arg(long)]
        out_dir: PathBuf,
        /// Defaults to `fw-<version>`.
        #[arg(long)]
        artifact: Option<String>,
        /// Bytes per chunk devices download.
        #[arg(long, default_value_t = DEFAULT_CHUNK_BYTES)]
        chunk_bytes: u32,
        /// Days until devices refuse the manifest as expired.
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
        preconditions: PreconditionArgs,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Add another release key's signature to a built bundle (when the root's release role needs
    /// more than one: each approver signs in turn).
    Sign {
        /// The bundle directory (from `release build`).
        #[arg(long)]
        bundle: PathBuf,
        /// Release signing key file (from `release keygen`).
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
        /// The new bundle directory to write.
        #[arg(long)]
        out_dir: PathBuf,
        /// Defaults to `fw-<version>`; must differ from the old release's.
        #[arg(long)]
        artifact: Option<String>,
        /// Days until devices refuse the new manifest as expired.
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
        /// Default: the signing time in Unix milliseconds; must be above the old release's.
        #[arg(long)]
        sequence: Option<u64>,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// (protocol 1.5) Write a built release's sealed chunks and signed manifest as static files
    /// (`<artifact>/chunks/<index>`, `<artifact>/manifest.json`) for any HTTPS server, CDN or
    /// bucket to serve as a campaign's `--origin`. Nothing secret is written (no content key).
    Export {
        /// The release's bundle directory (from `release build`).
        #[arg(long)]
        bundle: PathBuf,
        /// The directory to write into (the origin's document root).
        #[arg(long)]
        out: PathBuf,
    },
    /// Upload a built release; the orchestrator verifies its signature before accepting it.
    Upload {
        /// The bundle directory (from `release build`).
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the uploaded releases: version, security version, hardware, size, whether every
    /// chunk arrived, who uploaded it and when.
    List {
        /// Print the orchestrator's reply as JSON, for scripts.
        #[arg(long)]
        json: bool,
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
        /// A device certificate (PEM); repeatable.
        #[arg(long = "cert", required = true)]
        certs: Vec<PathBuf>,
        /// A group to put the devices in; repeatable.
        #[arg(long = "group")]
        groups: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the registered devices (devices register themselves when they first connect): a
    /// table of each device's state in its latest campaign, the firmware version it runs, its
    /// labels, when it was last seen and its latest campaign.
    List {
        /// Only devices carrying this label (`key=value`); repeat to require several.
        #[arg(long)]
        label: Vec<String>,
        /// Only devices in this group.
        #[arg(long)]
        group: Option<String>,
        /// Only devices in this state in their latest campaign (`failed`, `succeeded`, ...;
        /// `none` for devices no campaign targeted).
        #[arg(long)]
        state: Option<String>,
        /// Only devices whose latest campaign is this one.
        #[arg(long)]
        campaign: Option<String>,
        /// Only devices running this firmware version.
        #[arg(long)]
        version: Option<String>,
        /// Print the orchestrator's reply as JSON, for scripts (filters do not apply).
        #[arg(long, conflicts_with_all = ["label", "group", "state", "campaign", "version"])]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Let one device renew its certificate once, now, although it is not yet due or renewed
    /// within the hour (forgotten if the orchestrator restarts first).
    RenewAllow {
        /// The device id.
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
        /// The release to roll out (its artifact id, `fw-<version>` by default).
        #[arg(long)]
        artifact: String,
        /// Target every registered device.
        #[arg(long, conflicts_with_all = ["group", "devices", "label"])]
        all: bool,
        /// Target the devices of this group.
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
        /// Print the policy understood and who would get the release in which wave; touch
        /// nothing.
        #[arg(long)]
        dry_run: bool,
        /// (protocol 1.5) An HTTPS origin serving the release's export (`release export`):
        /// devices fetch chunks there and fall back to the orchestrator. Only for a fleet of
        /// 1.5 devices: a 1.4 device refuses a job that names an origin.
        #[arg(long)]
        origin: Option<String>,
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
        /// Print the policy understood and who would get the release in which wave; touch
        /// nothing (the campaign is not aborted either).
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Status, policy, waves and counts per state, and why it waits; `--watch` follows it.
    Status {
        /// The campaign id (`campaign create` prints it).
        campaign: String,
        /// Also list every member: its wave, state and failure reason.
        #[arg(long)]
        devices: bool,
        /// Follow the campaign until it can change no more (finished, aborted or expired; a
        /// pause does not end the watch): each wave's bar and counts per state, failures as
        /// they come, and why nothing is moving. Exits non-zero unless every device succeeded.
        #[arg(long)]
        watch: bool,
        /// Print the raw JSON summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List every campaign: its release, status, devices succeeded and failed, waves opened,
    /// and when it was created.
    List {
        /// Only campaigns in this status (`active`, `paused`, `aborted`, `expired`, `finished`).
        #[arg(long)]
        status: Option<String>,
        /// Print the orchestrator's reply as JSON, for scripts.
        #[arg(long, conflicts_with = "status")]
        json: bool,
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
    print!("{}", describe_dry_run(&plan));
    Ok(())
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            data_dir,
            ca_name,
            hostnames,
            store,
            lock,
        } => {
            let at = store.location(&data_dir)?;
            crate::ops::init_preflight(&data_dir, &at)?;
            lock.seal_with(
                "the data directory",
                "this data directory's CA key, server key and keystore",
                |p| crate::ops::init_at(&data_dir, &at, &ca_name, &hostnames, p).map(|_| ()),
            )
        }
        Command::Serve(args) => serve(args).await,
        Command::BrokerConfig(BrokerConfigCommand::Mosquitto {
            data_dir,
            out,
            listen,
            hostnames,
            operators,
            persistence_dir,
            user,
            unlock,
        }) => {
            let ca = crate::ops::load_ca(
                &data_dir.join(crate::config::layout::PKI_DIR),
                &unlock.obtain("the fleet CA key")?,
            )?;
            let operators = operator_roles(&operators)?;
            let opts = crate::broker_config::MosquittoOptions {
                listen,
                hostnames,
                operators,
                persistence_dir,
                run_as_user: user,
            };
            let conf = crate::broker_config::write_mosquitto(&data_dir, &ca, &out, &opts)?;
            println!(
                "wrote {} (start: mosquitto -c {}); aloft serve's lines are in {}",
                out.display(),
                conf.display(),
                out.join(crate::broker_config::files::ALOFT_TOML).display()
            );
            Ok(())
        }
        Command::BrokerConfig(BrokerConfigCommand::AwsIot {
            out,
            arn,
            operators,
        }) => {
            let names: Vec<OperatorId> = operator_roles(&operators)?
                .into_iter()
                .map(|(op, _)| op)
                .collect();
            for f in crate::broker_config::write_aws_iot(&out, &arn, &names)? {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        Command::BrokerConfig(BrokerConfigCommand::Emqx(a)) => {
            broker_config_other(crate::broker_config::OtherBroker::Emqx, a)
        }
        Command::BrokerConfig(BrokerConfigCommand::Vernemq(a)) => {
            broker_config_other(crate::broker_config::OtherBroker::Vernemq, a)
        }
        Command::BrokerConfig(BrokerConfigCommand::Hivemq(a)) => {
            broker_config_other(crate::broker_config::OtherBroker::Hivemq, a)
        }
        Command::BrokerConfig(BrokerConfigCommand::Rmqtt(a)) => {
            broker_config_other(crate::broker_config::OtherBroker::Rmqtt, a)
        }
        Command::GenerateConfig => {
            print!("{DEFAULT_CONFIG_TOML}");
            Ok(())
        }
        Command::Pki(c) => pki(c).await,
        Command::Trust(c) => trust::run(c).await,
        Command::Status { metrics, json } => {
            let s = status::ask(&metrics).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::table(&s));
            }
            if s.ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "not every replica is healthy with exactly one leader"
                ))
            }
        }
        Command::Audit { since, limit, conn } => {
            call_and_print(&conn, AdminBody::AuditList { since, limit }).await
        }
        Command::Release(c) => release(c).await,
        Command::Device(c) => device(c).await,
        Command::Campaign(c) => campaign(*c).await,
        Command::Backup(c) => backup::run(c),
        Command::Console(ConsoleCommand::Token {
            data_dir,
            ttl,
            url,
            unlock,
        }) => {
            use anyhow::Context as _;
            let ttl = rollout::parse_duration(&ttl)?;
            if ttl == 0 || ttl > crate::console::MAX_TTL_SECS {
                bail!(
                    "--ttl must be between 1s and {}h: a console token is short-lived",
                    crate::console::MAX_TTL_SECS / 3600
                );
            }
            let unlock = unlock.obtain("the data directory")?;
            let master = crate::ops::open_keystore(&data_dir, &unlock)
                .with_context(|| format!("opening the keystore of {}", data_dir.display()))?;
            let token = crate::console::TokenKey::derive(&master)
                .mint(crate::cli::human::now_ms() / 1000, ttl)
                .map_err(|e| anyhow::anyhow!("no randomness for the token: {e}"))?;
            match url {
                Some(u) => println!("{}/login?token={token}", u.trim_end_matches('/')),
                None => println!("{token}"),
            }
            Ok(())
        }
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
    if let Some(c) = args.console_listen {
        file.console.listen = Some(c);
    }
    if let Some(s) = args.download_slots {
        file.downloads.slots = s;
    }
    if let Some(b) = args.broker {
        file.external_broker = Some(b);
    }
    if let Some(s) = args.store.store {
        file.store = Some(s);
    }
    if let Some(r) = args.replica_id {
        file.lease.replica_id = Some(r);
    }
    if let Some(t) = args.lease_ttl_secs {
        file.lease.ttl_secs = t;
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
        "aloft listening device={} metrics={} console={}",
        running.device_addr,
        running
            .metrics_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
        running
            .console_addr
            .map(|a| format!("https://{a}"))
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
            role,
            days,
            unlock,
        } => {
            let ca = load_ca(&ca_dir, &unlock.obtain("the fleet CA key")?)?;
            issue_operator_profile(&ca, &OperatorId::new(name)?, role, &out_dir, days)?;
            println!("operator profile ({role}) written to {}", out_dir.display());
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
            preconditions,
            unlock,
        } => {
            let preconditions = preconditions.to_manifest()?;
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
                preconditions,
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
        ReleaseCommand::Export { bundle, out } => {
            let e = crate::ops::export::export_bundle(&bundle, &out)?;
            println!(
                "exported {} ({} chunks, {} bytes) under {}",
                e.artifact,
                e.chunks,
                e.bytes,
                out.display()
            );
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
        ReleaseCommand::List { json, conn } => {
            let client = AdminClient::connect(&conn.profile, &conn.server).await?;
            let v: Value = client.call(AdminBody::ReleaseList {}).await?;
            client.disconnect().await;
            if json {
                print_json(&v)?;
            } else {
                let rows: Vec<tables::ReleaseRow> = serde_json::from_value(v)?;
                print_text(&tables::releases(&rows, human::now_ms()))?;
            }
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
        DeviceCommand::List {
            label,
            group,
            state,
            campaign,
            version,
            json,
            conn,
        } => {
            let filter = tables::DeviceFilter {
                labels: label
                    .iter()
                    .map(|l| parse_label(l))
                    .collect::<Result<_>>()?,
                group,
                state,
                campaign,
                version,
            };
            let client = AdminClient::connect(&conn.profile, &conn.server).await?;
            let v = all_devices(&client).await?;
            client.disconnect().await;
            if json {
                print_json(&v)?;
            } else {
                let rows: Vec<tables::DeviceRow> = serde_json::from_value(v)?;
                print_text(&tables::devices(&rows, &filter, human::now_ms()))?;
            }
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
            origin,
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
                origin,
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
            client.disconnect().await;
            if json {
                print_json(&s)?;
            } else {
                print_text(&describe(&s, human::now_ms()))?;
            }
            if watch {
                if let Err(why) = watch::outcome(&s) {
                    bail!("{why}");
                }
            }
        }
        CampaignCommand::List { status, json, conn } => {
            let client = AdminClient::connect(&conn.profile, &conn.server).await?;
            let v: Value = client.call(AdminBody::CampaignList {}).await?;
            client.disconnect().await;
            if json {
                print_json(&v)?;
            } else {
                let all: Vec<CampaignSummary> = serde_json::from_value(v)?;
                print_text(&tables::campaigns(&all, status.as_deref(), human::now_ms()))?;
            }
        }
    }
    Ok(())
}

/// Follows a campaign on stderr until it can change no more (a pause does not end it): on a
/// terminal the frame is redrawn in place each poll, elsewhere (a pipe, a log) it is printed
/// again only when it changed. Failures are printed as they arrive, above the frame. The final
/// summary goes to stdout afterwards, and the exit status says whether the campaign succeeded.
async fn watch_campaign(client: &AdminClient, campaign: &CampaignId) -> Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    let tty = std::io::stderr().is_terminal();
    let mut last: Option<CampaignSummary> = None;
    let mut last_waiting: Option<watch::Waiting> = None;
    let mut drawn_lines = 0usize;
    loop {
        let s: CampaignSummary = client
            .call(AdminBody::CampaignStatus {
                campaign: campaign.clone(),
                devices: false,
            })
            .await?;
        let now = human::now_ms();
        let news = watch::new_failures(last.as_ref(), &s);
        let waiting = watch::waiting(&s, now);
        let changed = last.as_ref() != Some(&s) || waiting != last_waiting;
        let mut err = std::io::stderr().lock();
        if tty {
            // Up to the first line of the last frame, and clear from there.
            if drawn_lines > 0 {
                let _ = write!(err, "\x1b[{drawn_lines}A\x1b[J");
            }
            for line in &news {
                let _ = writeln!(err, "{line}");
            }
            let text = watch::frame(&s, now);
            drawn_lines = text.lines().count();
            let _ = write!(err, "{text}");
        } else {
            for line in &news {
                let _ = writeln!(err, "{line}");
            }
            if changed {
                let _ = write!(err, "{}", watch::frame(&s, now));
            }
        }
        let _ = err.flush();
        drop(err);
        if watch::is_over(&s) {
            return Ok(());
        }
        last = Some(s);
        last_waiting = waiting;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

/// Every registered device, a page at a time (1.5), so that a fleet of any size fits the reply
/// limit; from an orchestrator before 1.5, which refuses the page fields, in one reply.
async fn all_devices(client: &AdminClient) -> Result<Value> {
    use crate::admin::client::ClientError;
    const PAGE: u32 = 1000;
    let mut all: Vec<Value> = Vec::new();
    let mut after: Option<aloft_proto::DeviceId> = None;
    loop {
        let page: Result<Vec<Value>, _> = client
            .call(AdminBody::DeviceList {
                after: after.clone(),
                limit: Some(PAGE),
            })
            .await;
        let page = match page {
            Err(ClientError::Refused(e)) if e.code == "malformed" && after.is_none() => {
                return Ok(client
                    .call(AdminBody::DeviceList {
                        after: None,
                        limit: None,
                    })
                    .await?)
            }
            other => other?,
        };
        let full = page.len() == PAGE as usize;
        after = match page.last().and_then(|d| d["id"].as_str()) {
            Some(id) => Some(aloft_proto::DeviceId::new(id)?),
            None => None,
        };
        all.extend(page);
        if !full || after.is_none() {
            return Ok(Value::Array(all));
        }
    }
}

/// Text on stdout, where `aloft ... | head` closing the pipe early is not an error.
fn print_text(text: &str) -> Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `--role`: one of the operator roles' names.
fn parse_operator_role(s: &str) -> Result<OperatorRole, String> {
    s.parse().map_err(|e: aloft_certs::PkiError| e.to_string())
}
