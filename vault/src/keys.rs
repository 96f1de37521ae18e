//! The secrets themselves: master keys, recovery keys, passphrases, the Argon2id parameters, and
//! the two sides of a lock — [`Protection`] (how a new file is locked) and [`Unlock`] (what
//! opens it). Every secret zeroizes its memory on drop and prints as `..` in `Debug`.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use zeroize::Zeroizing;

use crate::{random_bytes, VaultError};

/// Bytes of an AES-GCM nonce.
pub(crate) const NONCE_LEN: usize = 12;
/// Bytes an AES-GCM tag adds.
pub(crate) const TAG_LEN: usize = 16;

/// Argon2id cost parameters, stored in every passphrase slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes over memory.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// RFC 9106 §4, second recommended option (64 MiB, 3 passes, 4 lanes): the floor below
    /// which a file is refused, and what new files use.
    pub const MIN: KdfParams = KdfParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 4,
    };

    /// Refuses parameters below [`KdfParams::MIN`], and absurd ones (a file chooses them, so an
    /// attacker could ask for terabytes of memory).
    pub fn check(&self) -> Result<(), VaultError> {
        if self.m_kib < Self::MIN.m_kib || self.t < Self::MIN.t || self.p < Self::MIN.p {
            return Err(VaultError::WeakKdf(*self));
        }
        if self.m_kib > 4 * 1024 * 1024 || self.t > 64 || self.p > 64 {
            return Err(VaultError::KdfOutOfRange(*self));
        }
        Ok(())
    }

    /// Derives a 256-bit wrapping key from `passphrase` and `salt`.
    pub(crate) fn derive(
        &self,
        passphrase: &Passphrase,
        salt: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let params = argon2::Params::new(self.m_kib, self.t, self.p, Some(32))
            .map_err(|e| VaultError::Kdf(e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase.as_bytes(), salt, out.as_mut())
            .map_err(|e| VaultError::Kdf(e.to_string()))?;
        Ok(out)
    }
}

/// A random 256-bit key that encrypts a file's body (or, for the orchestrator, its store's
/// content keys). It never touches the disk except wrapped.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    pub fn generate() -> Result<Self, VaultError> {
        let mut k = Zeroizing::new([0u8; 32]);
        random_bytes(k.as_mut())?;
        Ok(Self(k))
    }

    pub fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        Self(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key itself, for a caller that seals it into a keystore file.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.0.clone()
    }

    /// Seals `plaintext` under this key with a random nonce: `nonce ‖ ciphertext ‖ tag`.
    /// `aad` names what the blob is (e.g. the record it belongs to), so it cannot be moved.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        aead_seal(self.as_bytes(), aad, plaintext)
    }

    /// Opens a blob from [`MasterKey::seal`] sealed with the same `aad`.
    pub fn open(&self, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        aead_open(self.as_bytes(), aad, blob).ok_or(VaultError::Tampered)
    }
}

/// AES-256-GCM with a random 96-bit nonce: `nonce ‖ ciphertext ‖ tag`. Random nonces are safe
/// here: each key seals far fewer than 2^32 messages.
pub(crate) fn aead_seal(
    key: &[u8; 32],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, VaultError> {
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce)?;
    let ct = Aes256Gcm::new(&(*key).into())
        .encrypt(
            &nonce.into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| VaultError::Malformed("plaintext too long"))?;
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens [`aead_seal`]'s output; `None` if it fails authentication.
pub(crate) fn aead_open(key: &[u8; 32], aad: &[u8], blob: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if blob.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, ct) = blob.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    Aes256Gcm::new(&(*key).into())
        .decrypt(&nonce.into(), Payload { msg: ct, aad })
        .ok()
        .map(Zeroizing::new)
}

/// A recovery key: 256 random bits, shown to the user once as 64 hex digits. Unwrapping with it
/// needs no KDF: it is already a uniformly random AES-256 key.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryKey(..)")
    }
}

impl RecoveryKey {
    pub fn generate() -> Result<Self, VaultError> {
        let mut k = Zeroizing::new([0u8; 32]);
        random_bytes(k.as_mut())?;
        Ok(Self(k))
    }

    /// Parses exactly 64 hex digits (surrounding whitespace ignored); `None` otherwise.
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut k = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(t, k.as_mut()).ok()?;
        Some(Self(k))
    }

    /// The 64 hex digits to show the user once.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_ref()))
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// A passphrase, as typed (no trimming beyond a final line break read from a file).
#[derive(Clone, PartialEq, Eq)]
pub struct Passphrase(Zeroizing<String>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

impl Passphrase {
    /// Shortest passphrase accepted for a new file.
    pub const MIN_CHARS: usize = 8;

    pub fn new(text: impl Into<String>) -> Self {
        Self(Zeroizing::new(text.into()))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Refuses passphrases too short for a new file.
    pub fn check_new(&self) -> Result<(), VaultError> {
        if self.0.chars().count() < Self::MIN_CHARS {
            return Err(VaultError::ShortPassphrase(Self::MIN_CHARS));
        }
        Ok(())
    }
}

/// What opens a sealed file: its passphrase or its recovery key.
#[derive(Debug, Clone)]
pub enum Unlock {
    Passphrase(Passphrase),
    RecoveryKey(RecoveryKey),
}

impl Unlock {
    /// Reads what a user gave (a file's or a variable's content): exactly 64 hex digits is a
    /// recovery key, anything else a passphrase. One final line break is not part of it.
    pub fn parse(text: &str) -> Result<Unlock, VaultError> {
        if let Some(k) = RecoveryKey::parse(text) {
            return Ok(Unlock::RecoveryKey(k));
        }
        let t = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        if t.is_empty() {
            return Err(VaultError::ShortPassphrase(1));
        }
        Ok(Unlock::Passphrase(Passphrase::new(t)))
    }

    /// Reads a file holding a passphrase or a recovery key.
    pub fn from_file(path: &std::path::Path) -> Result<Unlock, VaultError> {
        let text =
            Zeroizing::new(std::fs::read_to_string(path).map_err(|e| VaultError::io(path, e))?);
        Self::parse(&text)
    }
}

/// How a new sealed file is locked: a passphrase (Argon2id), a recovery key, or both. Either
/// one alone opens it.
#[derive(Debug, Clone)]
pub struct Protection {
    pub(crate) passphrase: Option<Passphrase>,
    pub(crate) recovery_key: Option<RecoveryKey>,
    /// Only tests lower it, to build the weak files that reading must refuse.
    pub(crate) kdf: KdfParams,
}

impl Protection {
    /// Locked by a recovery key alone.
    pub fn recovery_key(key: RecoveryKey) -> Self {
        Self {
            passphrase: None,
            recovery_key: Some(key),
            kdf: KdfParams::MIN,
        }
    }

    /// Locked by a passphrase alone.
    pub fn passphrase(passphrase: Passphrase) -> Self {
        Self {
            passphrase: Some(passphrase),
            recovery_key: None,
            kdf: KdfParams::MIN,
        }
    }

    /// Also locked by `key`.
    pub fn and_recovery_key(mut self, key: RecoveryKey) -> Self {
        self.recovery_key = Some(key);
        self
    }

    pub fn has_passphrase(&self) -> bool {
        self.passphrase.is_some()
    }
}

impl From<&Unlock> for Protection {
    /// A new file that opens with the same secret as an existing one.
    fn from(u: &Unlock) -> Self {
        match u {
            Unlock::Passphrase(p) => Protection::passphrase(p.clone()),
            Unlock::RecoveryKey(k) => Protection::recovery_key(k.clone()),
        }
    }
}
