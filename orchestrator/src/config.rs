//! The orchestrator's configuration: each subsystem's `Config` composed here, read from a TOML
//! file (optional) and overridden by command-line flags, validated once at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aloft_broker::{BrokerConfig, FrontConfig};
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
