//! Aloft's sealed keystore: every secret Aloft keeps at rest (signing keys, the orchestrator's
//! TLS and CA keys, the key that seals release content keys in its store, backups) is encrypted
//! under a random 256-bit master key, and that master key is wrapped by an Argon2id-derived key
//! (a passphrase) and/or by a 64-hex-digit recovery key.
//!
//! - `keys`: [`MasterKey`], [`RecoveryKey`], [`Passphrase`], [`KdfParams`], [`Protection`]
//!   (how a new file is locked) and [`Unlock`] (what opens one).
//! - `slots`: [`KeySlots`], the wrapped copies of a master key, one per way to unlock it.
//! - `file`: the sealed file format ([`seal_file`], [`open_file`]) and atomic 0600 writes.
//! - `unlock`: where a binary gets its [`Unlock`]: `--unlock-file`, `ALOFT_UNLOCK`, a prompt.
//! - `stream`: the STREAM construction (segmented AEAD) that backups are written with.
//!
//! Only this crate and `aloft-proto` touch symmetric crypto; the orchestrator calls these
//! functions and never handles a wrapping key itself.
#![forbid(unsafe_code)]

mod error;
mod file;
mod keys;
mod slots;
pub mod stream;
mod unlock;

pub use error::VaultError;
pub use file::{open_file, open_sealed, seal, seal_file, write_atomic, SEALED_MAGIC};
pub use keys::{KdfParams, MasterKey, Passphrase, Protection, RecoveryKey, Unlock};
pub use slots::KeySlots;
pub use unlock::{new_passphrase, obtain, UNLOCK_ENV};

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), VaultError> {
    getrandom::fill(buf).map_err(|_| VaultError::Randomness)
}

#[cfg(test)]
mod tests;
