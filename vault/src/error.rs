//! `VaultError`: why sealing, unsealing or obtaining an unlock secret failed.

use std::path::PathBuf;

use crate::keys::KdfParams;

/// Why a vault operation failed. Messages are for an operator: they say what to do.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    // Not a `source`: the message already carries the cause, and an error chain would print
    // it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("not an aloft sealed file (it may hold a key in clear from an older version)")]
    NotSealed,
    #[error("unsupported sealed format version {0}")]
    UnsupportedVersion(u8),
    #[error("malformed sealed data: {0}")]
    Malformed(&'static str),
    #[error(
        "refusing Argon2id parameters weaker than m={} KiB, t={}, p={} (this file has m={} KiB, t={}, p={})",
        KdfParams::MIN.m_kib, KdfParams::MIN.t, KdfParams::MIN.p, .0.m_kib, .0.t, .0.p
    )]
    WeakKdf(KdfParams),
    #[error("Argon2id parameters out of range (m={} KiB, t={}, p={})", .0.m_kib, .0.t, .0.p)]
    KdfOutOfRange(KdfParams),
    #[error("Argon2id: {0}")]
    Kdf(String),
    #[error("header checksum mismatch: the file is damaged or was altered")]
    HeaderDamaged,
    #[error("wrong passphrase or recovery key")]
    WrongSecret,
    #[error("this file cannot be unlocked with a {0}; use its {1}")]
    NoSlot(&'static str, &'static str),
    #[error("authentication failed: the sealed data was altered or damaged")]
    Tampered,
    #[error("the stream ends before its last segment: the file was truncated")]
    Truncated,
    #[error(
        "segment {0} failed authentication: the file was truncated, altered, reordered or damaged"
    )]
    SegmentAuth(u64),
    #[error("the stream is too long for one key")]
    StreamTooLong,
    #[error("operating system randomness unavailable")]
    Randomness,
    #[error("nothing to unlock with: pass --unlock-file PATH (a file holding the passphrase or the 64-hex-digit recovery key), set {}, or run on a terminal to be prompted", crate::UNLOCK_ENV)]
    NoUnlock,
    #[error("a passphrase must have at least {0} characters")]
    ShortPassphrase(usize),
    #[error("the passphrases do not match")]
    PassphraseMismatch,
    #[error("{0} holds a recovery key; a new file needs a passphrase (or choose recovery-key-only protection)")]
    RecoveryKeyGiven(String),
    #[error("reading from the terminal: {0}")]
    Prompt(std::io::Error),
    #[error("a file must be protected by a passphrase, a recovery key, or both")]
    NoProtection,
}

impl VaultError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        VaultError::Io {
            path: path.to_owned(),
            error: source,
        }
    }
}
