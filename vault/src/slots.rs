//! Key slots: the wrapped copies of one master key, one per way to unlock it (a passphrase
//! through Argon2id, or a recovery key used directly as the wrapping key).
//!
//! Encoding (big-endian): `count: u8`, then per slot `kind: u8` (1 = passphrase,
//! 2 = recovery key); a passphrase slot continues with `m_kib: u32, t: u32, p: u32,
//! salt: [u8; 16]`; every slot ends with `nonce: [u8; 12]` and the wrapped key
//! (`[u8; 32]` + 16-byte tag). Each wrap's associated data is a label, the caller's context
//! (the fixed part of its header) and the slot's own kind and parameters: changing any of them
//! makes the slot fail to open.

use zeroize::Zeroizing;

use crate::keys::{
    aead_open, aead_seal, KdfParams, MasterKey, Protection, Unlock, NONCE_LEN, TAG_LEN,
};
use crate::{random_bytes, VaultError};

const SLOT_LABEL: &[u8] = b"aloft-vault-slot-v1\0";
const KIND_PASSPHRASE: u8 = 1;
const KIND_RECOVERY: u8 = 2;
const SALT_LEN: usize = 16;
const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Passphrase {
        kdf: KdfParams,
        salt: [u8; SALT_LEN],
    },
    Recovery,
}

impl Kind {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Kind::Passphrase { kdf, salt } => {
                out.push(KIND_PASSPHRASE);
                out.extend_from_slice(&kdf.m_kib.to_be_bytes());
                out.extend_from_slice(&kdf.t.to_be_bytes());
                out.extend_from_slice(&kdf.p.to_be_bytes());
                out.extend_from_slice(salt);
            }
            Kind::Recovery => out.push(KIND_RECOVERY),
        }
    }
}

#[derive(Debug, Clone)]
struct Slot {
    kind: Kind,
    /// `nonce ‖ wrapped master key ‖ tag`.
    wrapped: Vec<u8>,
}

/// The wrapped copies of a master key.
#[derive(Debug, Clone)]
pub struct KeySlots {
    slots: Vec<Slot>,
}

fn slot_aad(context: &[u8], kind: &Kind) -> Vec<u8> {
    let mut aad = Vec::with_capacity(SLOT_LABEL.len() + context.len() + 32);
    aad.extend_from_slice(SLOT_LABEL);
    aad.extend_from_slice(context);
    kind.encode(&mut aad);
    aad
}

impl KeySlots {
    /// Wraps `master` once per way `protection` allows, binding each wrap to `context`.
    pub fn wrap(
        master: &MasterKey,
        protection: &Protection,
        context: &[u8],
    ) -> Result<Self, VaultError> {
        let mut slots = Vec::new();
        if let Some(p) = &protection.passphrase {
            let mut salt = [0u8; SALT_LEN];
            random_bytes(&mut salt)?;
            let kind = Kind::Passphrase {
                kdf: protection.kdf,
                salt,
            };
            let kek = protection.kdf.derive(p, &salt)?;
            let wrapped = aead_seal(&kek, &slot_aad(context, &kind), master.as_bytes())?;
            slots.push(Slot { kind, wrapped });
        }
        if let Some(k) = &protection.recovery_key {
            let kind = Kind::Recovery;
            let wrapped = aead_seal(k.as_bytes(), &slot_aad(context, &kind), master.as_bytes())?;
            slots.push(Slot { kind, wrapped });
        }
        if slots.is_empty() {
            return Err(VaultError::NoProtection);
        }
        Ok(Self { slots })
    }

    /// Unwraps the master key with `unlock`. A wrong secret and an altered slot look the same
    /// (an AEAD failure), so both are reported as a wrong passphrase or recovery key.
    pub fn unwrap(&self, unlock: &Unlock, context: &[u8]) -> Result<MasterKey, VaultError> {
        let opened = match unlock {
            Unlock::Passphrase(p) => {
                let slot = self
                    .slots
                    .iter()
                    .find(|s| matches!(s.kind, Kind::Passphrase { .. }))
                    .ok_or(VaultError::NoSlot("passphrase", "recovery key"))?;
                let Kind::Passphrase { kdf, salt } = &slot.kind else {
                    return Err(VaultError::Malformed("slot kind"));
                };
                kdf.check()?;
                let kek = kdf.derive(p, salt)?;
                aead_open(&kek, &slot_aad(context, &slot.kind), &slot.wrapped)
            }
            Unlock::RecoveryKey(k) => {
                let slot = self
                    .slots
                    .iter()
                    .find(|s| s.kind == Kind::Recovery)
                    .ok_or(VaultError::NoSlot("recovery key", "passphrase"))?;
                aead_open(k.as_bytes(), &slot_aad(context, &slot.kind), &slot.wrapped)
            }
        };
        let opened = opened.ok_or(VaultError::WrongSecret)?;
        let bytes: [u8; 32] = opened
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::Malformed("wrapped key length"))?;
        Ok(MasterKey::from_bytes(Zeroizing::new(bytes)))
    }

    /// Appends the encoding described in the module docs.
    pub fn encode(&self, out: &mut Vec<u8>) {
        // `wrap` makes at most two slots.
        out.push(self.slots.len() as u8);
        for s in &self.slots {
            s.kind.encode(out);
            out.extend_from_slice(&s.wrapped);
        }
    }

    /// Decodes slots from the front of `input`; returns them and the bytes consumed. Refuses
    /// weak or absurd Argon2id parameters here, before anyone derives a key.
    pub fn decode(input: &[u8]) -> Result<(Self, usize), VaultError> {
        let mut r = Reader { input, pos: 0 };
        let count = r.u8()?;
        if count == 0 || count > 2 {
            return Err(VaultError::Malformed("slot count"));
        }
        let mut slots = Vec::with_capacity(count.into());
        for _ in 0..count {
            let kind = match r.u8()? {
                KIND_PASSPHRASE => {
                    let kdf = KdfParams {
                        m_kib: r.u32()?,
                        t: r.u32()?,
                        p: r.u32()?,
                    };
                    kdf.check()?;
                    let salt = r
                        .take(SALT_LEN)?
                        .try_into()
                        .map_err(|_| VaultError::Malformed("salt"))?;
                    Kind::Passphrase { kdf, salt }
                }
                KIND_RECOVERY => Kind::Recovery,
                _ => return Err(VaultError::Malformed("unknown slot kind")),
            };
            if slots
                .iter()
                .any(|s: &Slot| std::mem::discriminant(&s.kind) == std::mem::discriminant(&kind))
            {
                return Err(VaultError::Malformed("two slots of one kind"));
            }
            let wrapped = r.take(WRAPPED_LEN)?.to_vec();
            slots.push(Slot { kind, wrapped });
        }
        Ok((Self { slots }, r.pos))
    }

    /// The Argon2id parameters of the passphrase slot, if there is one.
    pub fn kdf_params(&self) -> Option<KdfParams> {
        self.slots.iter().find_map(|s| match s.kind {
            Kind::Passphrase { kdf, .. } => Some(kdf),
            Kind::Recovery => None,
        })
    }

    pub fn has_recovery_key(&self) -> bool {
        self.slots.iter().any(|s| s.kind == Kind::Recovery)
    }
}

/// A bounds-checked cursor: every read of file-controlled bytes goes through it.
pub(crate) struct Reader<'a> {
    pub(crate) input: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], VaultError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(VaultError::Malformed("length"))?;
        let s = self
            .input
            .get(self.pos..end)
            .ok_or(VaultError::Malformed("the header is cut short"))?;
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, VaultError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, VaultError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}
