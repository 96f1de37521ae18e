//! The orchestrator's configuration: each subsystem's `Config` composed here, read from a TOML
//! file (optional) and overridden by command-line flags, validated once at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aloft_broker::{BrokerConfig, FrontConfig};
use aloft_certs::OperatorRole;
use aloft_proto::OperatorId;
use aloft_vault::Unlock;
use serde::{Deserialize, Serialize};

/// The commented default configuration, printed by `aloft generate-config`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../aloft.example.toml");

/// File names inside the data directory.
pub mod layout {
    /// The fleet CA and the orchestrator's TLS server certificate.
    pub const PKI_DIR: &str = "pki";
    pub const SERVER_CERT: &str = "server.crt";
    pub const SERVER_KEY: &str = "server.key";
    /// Optional CRL (PEM) the front enforces.
    pub const CRL: &str = "crl.pem";
    /// Accepted root metadata, `root-<version>.json` (see `crate::trust`).
    pub const TRUST_DIR: &str = "trust";
    /// The sled database.
    pub const STORE_DIR: &str = "store";
    /// The orchestrator's client certificate for an external broker (role `orchestrator`) and
    /// its sealed key, written by `aloft broker-config`.
    pub const ORCHESTRATOR_CERT: &str = "orchestrator.crt";
    pub const ORCHESTRATOR_KEY: &str = "orchestrator.key";
    /// Sealed file holding the orchestrator's master key, which seals content keys in the store.
    pub const KEYSTORE: &str = "keystore";
    /// The number of the last backup taken of this data directory (decimal).
    pub const BACKUP_SEQ: &str = "backup-seq";
}

/// What `aloft serve` reads from its config file. Every key has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Device- and operator-facing mTLS listener.
    pub listen: SocketAddr,
    /// Prometheus endpoint; empty string disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// INSECURE plain-TCP MQTT listener for local debugging; off unless set.
    pub insecure_plain_listen: Option<SocketAddr>,
    pub front: FrontConfig,
    pub broker: BrokerFile,
    pub downloads: DownloadsFile,
    /// An external MQTT 5 broker, `mqtts://host:port`: the orchestrator becomes its client
    /// (certificate `pki/orchestrator.crt`) and starts neither the front nor the embedded
    /// broker. Named apart from `[broker]`, which configures the embedded one.
    pub external_broker: Option<String>,
    /// With an external broker: the CRL file the broker reads, rewritten by `crl_update`, and
    /// the file holding the broker's process id, sent SIGHUP to reload it (Mosquitto reloads
    /// its TLS settings, the CRL included, on SIGHUP).
    pub external_broker_crl: Option<PathBuf>,
    pub external_broker_pid_file: Option<PathBuf>,
    /// The read-only web console (off unless `listen` is set).
    pub console: crate::console::ConsoleFile,
    /// With an external broker: each operator's role, by name (`viewer`, `operator`,
    /// `security-admin`). The front reads the role from the operator's certificate; beside an
    /// external broker the orchestrator never sees that certificate, only the name the broker
    /// vouches for (the ACL lets an operator publish only on `admin/<its CN>/...`). An operator
    /// missing here is a viewer.
    pub external_broker_operator_roles: std::collections::BTreeMap<String, String>,
    /// Where the store lives: `sled` (the data directory's `store/`, the default) or a
    /// PostgreSQL database, `postgres://user@host:port/database`.
    pub store: Option<String>,
    /// The leader lease, on a PostgreSQL store (`lease`).
    pub lease: LeaseFile,
}

/// The leader lease (PostgreSQL only; a sled store is held by one process, which leads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseFile {
    /// This replica's name in the lease (`aloft_lease.holder`, with a mark of the run);
    /// default `hostname-pid`.
    pub replica_id: Option<String>,
    /// How long a grant lasts; renewed at a third of it. A replica that dies is replaced this
    /// long after its last renewal at most.
    pub ttl_secs: u64,
}

/// The default lease ttl.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 15;

impl Default for LeaseFile {
    fn default() -> Self {
        Self {
            replica_id: None,
            ttl_secs: DEFAULT_LEASE_TTL_SECS,
        }
    }
}

/// Where the external broker listens, from `mqtts://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalBroker {
    pub host: String,
    pub port: u16,
}

impl ExternalBroker {
    /// Parses `mqtts://host:port` (port 8883 if absent). Plain `mqtt://` is refused: the
    /// orchestrator authenticates with its certificate and checks the broker's.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Invalid(format!("external broker {url:?}: {why}"));
        let rest = url
            .strip_prefix("mqtts://")
            .ok_or_else(|| bad("must start with mqtts://"))?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return Err(bad("expected mqtts://host:port"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 literal in brackets, with or without a port.
            _ if rest.starts_with('[') && rest.ends_with(']') => (rest, 8883),
            Some((h, p)) => (h, p.parse().map_err(|_| bad("invalid port"))?),
            None => (rest, 8883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad("expected mqtts://host:port"));
        }
        Ok(ExternalBroker {
            host: host.to_owned(),
            port,
        })
    }
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            insecure_plain_listen: None,
            front: FrontConfig::default(),
            broker: BrokerFile::default(),
            downloads: DownloadsFile::default(),
            external_broker: None,
            external_broker_crl: None,
            external_broker_pid_file: None,
            console: crate::console::ConsoleFile::default(),
            external_broker_operator_roles: Default::default(),
            store: None,
            lease: LeaseFile::default(),
        }
    }
}

/// Fleet-wide pacing of chunk service (`engine::core::pacing`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadsFile {
    /// Devices sent chunks at once; the others are answered `busy` with a wait.
    pub slots: usize,
}

impl Default for DownloadsFile {
    fn default() -> Self {
        Self {
            slots: crate::engine::DEFAULT_DOWNLOAD_SLOTS,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerFile {
    pub max_connections: usize,
    pub max_payload_bytes: usize,
}

impl Default for BrokerFile {
    fn default() -> Self {
        let d = BrokerConfig::default();
        Self {
            max_connections: d.max_connections,
            max_payload_bytes: d.max_payload_bytes,
        }
    }
}

impl From<&BrokerFile> for BrokerConfig {
    fn from(f: &BrokerFile) -> Self {
        BrokerConfig {
            max_connections: f.max_connections,
            max_payload_bytes: f.max_payload_bytes,
            ..BrokerConfig::default()
        }
    }
}

/// Everything `serve` needs, resolved.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub file: FileConfig,
    /// Opens the sealed server key and the keystore (passphrase or recovery key of the data
    /// directory, from `--unlock-file`, `ALOFT_UNLOCK` or a prompt).
    pub unlock: Unlock,
}

/// A configuration problem found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

impl ServeConfig {
    /// The store `serve` opens: `store` (file or `--store`), else the data directory's.
    pub fn store_location(&self) -> Result<crate::store::StoreLocation, ConfigError> {
        crate::store::StoreLocation::from_flag(self.file.store.as_deref(), &self.data_dir)
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.file
            .front
            .clone()
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        BrokerConfig::from(&self.file.broker)
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.file.downloads.slots == 0 {
            return Err(ConfigError::Invalid(
                "downloads.slots must be at least 1".into(),
            ));
        }
        self.operator_roles()?;
        self.store_location()?;
        if !(1..=3600).contains(&self.file.lease.ttl_secs) {
            return Err(ConfigError::Invalid(
                "lease.ttl_secs must be between 1 and 3600".into(),
            ));
        }
        if let Some(id) = &self.file.lease.replica_id {
            if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
                return Err(ConfigError::Invalid(
                    "lease.replica_id must be 1 to 200 printable characters".into(),
                ));
            }
        }
        if let Some(url) = &self.file.external_broker {
            ExternalBroker::parse(url)?;
            if self.file.insecure_plain_listen.is_some() {
                return Err(ConfigError::Invalid(
                    "insecure_plain_listen belongs to the front, which an external broker replaces"
                        .into(),
                ));
            }
        }
        if let Some(p) = self.file.insecure_plain_listen {
            if !p.ip().is_loopback() {
                return Err(ConfigError::Invalid(
                    "insecure_plain_listen must be a loopback address".into(),
                ));
            }
        }
        Ok(())
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join(layout::PKI_DIR)
    }

    /// `external_broker_operator_roles`, read: a name that is no operator id or a role this
    /// version does not know is an error (fail closed), never a silent viewer.
    pub fn operator_roles(
        &self,
    ) -> Result<std::collections::HashMap<OperatorId, OperatorRole>, ConfigError> {
        self.file
            .external_broker_operator_roles
            .iter()
            .map(|(name, role)| {
                let bad = |why: String| {
                    ConfigError::Invalid(format!("external_broker_operator_roles.{name}: {why}"))
                };
                let id = OperatorId::new(name.as_str()).map_err(|e| bad(e.to_string()))?;
                let role = role
                    .parse::<OperatorRole>()
                    .map_err(|e| bad(e.to_string()))?;
                Ok((id, role))
            })
            .collect()
    }

    /// The external broker, if one is configured (validated by [`ServeConfig::validate`]).
    pub fn external_broker(&self) -> Result<Option<ExternalBroker>, ConfigError> {
        self.file
            .external_broker
            .as_deref()
            .map(ExternalBroker::parse)
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_unlock() -> Unlock {
        Unlock::RecoveryKey(aloft_vault::RecoveryKey::generate().unwrap())
    }

    #[test]
    fn the_committed_example_config_parses_and_validates() {
        let file: FileConfig = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        let cfg = ServeConfig {
            data_dir: PathBuf::from("/nonexistent"),
            file,
            unlock: test_unlock(),
        };
        cfg.validate().unwrap();
    }

    #[test]
    fn the_console_is_off_unless_configured_and_the_shipped_files_say_so() {
        let example: FileConfig = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        let deploy: FileConfig = toml::from_str(include_str!("../../deploy/aloft.toml")).unwrap();
        for f in [&example, &deploy, &FileConfig::default()] {
            assert_eq!(f.console.listen, None);
            assert_eq!(f.console.max_connections, 64);
            assert_eq!(f.console.max_streams, 16);
        }
        let on: FileConfig = toml::from_str("[console]\nlisten = \"127.0.0.1:9443\"\n").unwrap();
        assert_eq!(on.console.listen, Some("127.0.0.1:9443".parse().unwrap()));
        assert!(toml::from_str::<FileConfig>("[console]\nwrite = true\n").is_err());
    }

    #[test]
    fn download_slots_are_read_from_the_file_and_zero_is_refused() {
        let file: FileConfig = toml::from_str("[downloads]\nslots = 512\n").unwrap();
        assert_eq!(file.downloads.slots, 512);
        let mut cfg = ServeConfig {
            data_dir: PathBuf::new(),
            file,
            unlock: test_unlock(),
        };
        cfg.validate().unwrap();
        cfg.file.downloads.slots = 0;
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn external_broker_urls_are_parsed_strictly() {
        let ok = |u: &str| ExternalBroker::parse(u).unwrap();
        assert_eq!(
            ok("mqtts://broker.example:8884"),
            ExternalBroker {
                host: "broker.example".into(),
                port: 8884
            }
        );
        assert_eq!(ok("mqtts://127.0.0.1").port, 8883);
        assert_eq!(ok("mqtts://[::1]:9000").host, "::1");
        for bad in [
            "mqtt://broker:1883",
            "broker:8883",
            "mqtts://",
            "mqtts://user@broker:8883",
            "mqtts://broker:port",
            "mqtts://broker:0",
            "mqtts://broker:8883/x",
        ] {
            assert!(ExternalBroker::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn operator_roles_beside_a_broker_are_read_strictly_and_an_unknown_role_is_refused() {
        let cfg = |text: &str| ServeConfig {
            data_dir: PathBuf::from("/nonexistent"),
            file: toml::from_str(text).unwrap(),
            unlock: test_unlock(),
        };
        let ok = cfg("external_broker_operator_roles = { \"ops\" = \"security-admin\", \"eve\" = \"viewer\" }");
        assert!(ok.validate().is_ok());
        let roles = ok.operator_roles().unwrap();
        assert_eq!(
            roles.get(&OperatorId::new("ops").unwrap()),
            Some(&OperatorRole::SecurityAdmin)
        );
        assert_eq!(roles.len(), 2);
        for bad in [
            "external_broker_operator_roles = { \"ops\" = \"admin\" }",
            "external_broker_operator_roles = { \"o/ps\" = \"viewer\" }",
        ] {
            assert!(cfg(bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_public_insecure_listener_is_refused() {
        let file = FileConfig {
            insecure_plain_listen: Some("0.0.0.0:1883".parse().unwrap()),
            ..FileConfig::default()
        };
        let cfg = ServeConfig {
            data_dir: PathBuf::new(),
            file,
            unlock: test_unlock(),
        };
        assert!(cfg.validate().is_err());
    }
}
