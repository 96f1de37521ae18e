//! Envelope cryptography: per-chunk AES-256-GCM sealing under a release's content key, and HPKE
//! wrapping of that content key for one device (PROTOCOL.md §Cryptography).
//!
//! The constructions bind context so ciphertext can't be moved: a chunk's nonce and AAD carry the
//! artifact id, its index and the chunk count (no reorder, no truncation, no splicing across
//! releases); a wrapped key's HPKE `info` carries the device id and the artifact id (a key wrapped
//! for one device or release is useless for another).

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::agreement::{PrivateKey, X25519};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rustls::crypto::aws_lc_rs::hpke::DH_KEM_X25519_HKDF_SHA256_AES_256;
use rustls::crypto::hpke::{EncapsulatedSecret, Hpke, HpkePrivateKey, HpkePublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ids::{ArtifactId, DeviceId};

/// The HPKE suite that wraps content keys: base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
/// AES-256-GCM (RFC 9180). It is rustls' implementation over aws-lc, whose X25519 is the TLS
/// handshakes' own: a wrap takes half the time it took with the serial curve25519-dalek
/// arithmetic of the `hpke` crate used before (44 against 90 µs, `examples/key_wrap.rs`), and
/// at 10,000 devices a campaign's start was mostly this (docs/BENCHMARKS.md, S2). The bytes on
/// the wire are the same; the tests below check both directions against the `hpke` crate.
const WRAP_SUITE: &dyn Hpke = DH_KEM_X25519_HKDF_SHA256_AES_256;

/// Bytes an AES-GCM tag adds to every sealed chunk.
pub const TAG_LEN: usize = 16;

const CHUNK_AAD_LABEL: &[u8] = b"aloft-chunk-v1";
const WRAP_INFO_LABEL: &[u8] = b"aloft-key-wrap-v1";

/// Why a cryptographic operation failed. Deliberately coarse: an attacker learns nothing from
/// which check refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("chunk failed authentication")]
    ChunkAuthentication,
    #[error("wrapped key is malformed")]
    MalformedWrappedKey,
    #[error("wrapped key failed to unwrap")]
    UnwrapFailed,
    #[error("public key is malformed")]
    MalformedPublicKey,
    #[error("operating system randomness unavailable")]
    Randomness,
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|_| CryptoError::Randomness)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A release's 256-bit content key. Zeroized on drop; never logged.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ContentKey([u8; 32]);

impl ContentKey {
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = [0u8; 32];
        random_bytes(&mut k)?;
        Ok(Self(k))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentKey(..)")
    }
}

fn chunk_nonce(index: u32) -> [u8; 12] {
    // The content key is fresh per artifact, so the chunk index alone is a unique nonce.
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&index.to_be_bytes());
    n
}

fn chunk_aad(artifact: &ArtifactId, index: u32, count: u32) -> Vec<u8> {
    let a = artifact.as_str().as_bytes();
    let mut aad = Vec::with_capacity(CHUNK_AAD_LABEL.len() + 1 + a.len() + 8);
    aad.extend_from_slice(CHUNK_AAD_LABEL);
    aad.push(a.len() as u8); // ids are at most 64 bytes
    aad.extend_from_slice(a);
    aad.extend_from_slice(&index.to_be_bytes());
    aad.extend_from_slice(&count.to_be_bytes());
    aad
}

/// A content key made ready to seal and open chunks (AES-256-GCM): the key schedule and the
/// GHASH tables are set up once per download, not once per chunk.
///
/// The AES-GCM is aws-lc's (the TLS stack's provider): its stitched AES-NI/CLMUL code opens
/// chunks faster than RustCrypto's `aes-gcm`, which took a tenth of a simulated device's CPU
/// during a campaign (docs/BENCHMARKS.md). The wire format is the same: the ciphertext
/// followed by the 16-byte tag.
pub struct ChunkCipher(LessSafeKey);

impl ChunkCipher {
    pub fn new(key: &ContentKey) -> Self {
        // `UnboundKey::new` fails only for a key of the wrong length; a ContentKey is 32 bytes
        // and AES_256_GCM takes 32, so the error arm cannot run.
        match UnboundKey::new(&AES_256_GCM, &key.0) {
            Ok(k) => ChunkCipher(LessSafeKey::new(k)),
            Err(_) => unreachable!("AES-256-GCM takes a 32-byte key"),
        }
    }

    /// Seals chunk `index` of `count` of `artifact`: ciphertext followed by the 16-byte tag.
    pub fn seal(&self, artifact: &ArtifactId, index: u32, count: u32, plaintext: &[u8]) -> Vec<u8> {
        let aad = chunk_aad(artifact, index, count);
        let nonce = Nonce::assume_unique_for_key(chunk_nonce(index));
        let mut sealed = Vec::with_capacity(plaintext.len() + TAG_LEN);
        sealed.extend_from_slice(plaintext);
        // AES-GCM sealing fails only for inputs over 64 GiB; chunks are at most 1 MiB.
        match self
            .0
            .seal_in_place_append_tag(nonce, Aad::from(&aad), &mut sealed)
        {
            Ok(()) => sealed,
            Err(_) => Vec::new(),
        }
    }

    /// Opens a sealed chunk; fails unless it was sealed under this key for exactly this
    /// artifact, index and count. Decrypts straight into the returned buffer.
    pub fn open(
        &self,
        artifact: &ArtifactId,
        index: u32,
        count: u32,
        sealed: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let Some(body) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(CryptoError::ChunkAuthentication);
        };
        let (ciphertext, tag) = sealed.split_at(body);
        let aad = chunk_aad(artifact, index, count);
        let nonce = Nonce::assume_unique_for_key(chunk_nonce(index));
        let mut plain = vec![0u8; body];
        self.0
            .open_separate_gather(nonce, Aad::from(&aad), ciphertext, tag, &mut plain)
            .map_err(|_| CryptoError::ChunkAuthentication)?;
        Ok(plain)
    }
}

/// Seals chunk `index` of `count` of `artifact` ([`ChunkCipher::seal`] for one chunk).
pub fn seal_chunk(
    key: &ContentKey,
    artifact: &ArtifactId,
    index: u32,
    count: u32,
    plaintext: &[u8],
) -> Vec<u8> {
    ChunkCipher::new(key).seal(artifact, index, count, plaintext)
}

/// Opens a sealed chunk ([`ChunkCipher::open`] for one chunk).
pub fn open_chunk(
    key: &ContentKey,
    artifact: &ArtifactId,
    index: u32,
    count: u32,
    sealed: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    ChunkCipher::new(key).open(artifact, index, count, sealed)
}

/// A device's X25519 key for receiving wrapped content keys. The secret never leaves the device.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DeviceEncryptionKey {
    secret: [u8; 32],
}

impl DeviceEncryptionKey {
    pub fn generate() -> Result<Self, CryptoError> {
        let mut secret = [0u8; 32];
        random_bytes(&mut secret)?;
        Ok(Self { secret })
    }

    pub fn from_bytes(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    pub fn secret_bytes(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The public half, as carried in the device certificate.
    pub fn public_bytes(&self) -> Result<[u8; 32], CryptoError> {
        let sk = PrivateKey::from_private_key(&X25519, &self.secret)
            .map_err(|_| CryptoError::MalformedPublicKey)?;
        let pk = sk
            .compute_public_key()
            .map_err(|_| CryptoError::MalformedPublicKey)?;
        <[u8; 32]>::try_from(pk.as_ref()).map_err(|_| CryptoError::MalformedPublicKey)
    }
}

/// A content key wrapped for one device with HPKE (base mode, DHKEM(X25519, HKDF-SHA256),
/// HKDF-SHA256, AES-256-GCM). Both fields are standard base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    /// The HPKE encapsulated key (32 bytes).
    pub enc: String,
    /// The sealed content key (32 bytes + 16-byte tag).
    pub ct: String,
}

fn wrap_info(device: &DeviceId, artifact: &ArtifactId) -> Vec<u8> {
    let d = device.as_str().as_bytes();
    let a = artifact.as_str().as_bytes();
    let mut info = Vec::with_capacity(WRAP_INFO_LABEL.len() + 2 + d.len() + a.len());
    info.extend_from_slice(WRAP_INFO_LABEL);
    info.push(d.len() as u8);
    info.extend_from_slice(d);
    info.push(a.len() as u8);
    info.extend_from_slice(a);
    info
}

/// Wraps `key` so that only the holder of the secret behind `device_public` can unwrap it, and
/// only as the content key of `artifact` for `device`.
pub fn wrap_content_key(
    device_public: &[u8; 32],
    device: &DeviceId,
    artifact: &ArtifactId,
    key: &ContentKey,
) -> Result<WrappedKey, CryptoError> {
    let info = wrap_info(device, artifact);
    // Sealing fails only when the Diffie-Hellman result is all zeros: a public key of small
    // order, which no honest device has.
    let (enc, ct) = WRAP_SUITE
        .seal(
            &info,
            b"",
            key.as_bytes(),
            &HpkePublicKey(device_public.to_vec()),
        )
        .map_err(|_| CryptoError::MalformedPublicKey)?;
    Ok(WrappedKey {
        enc: B64.encode(enc.0),
        ct: B64.encode(ct),
    })
}

/// Unwraps a content key addressed to this device for `artifact`.
pub fn unwrap_content_key(
    device_key: &DeviceEncryptionKey,
    device: &DeviceId,
    artifact: &ArtifactId,
    wrapped: &WrappedKey,
) -> Result<ContentKey, CryptoError> {
    let enc_bytes = B64
        .decode(&wrapped.enc)
        .map_err(|_| CryptoError::MalformedWrappedKey)?;
    let ct = B64
        .decode(&wrapped.ct)
        .map_err(|_| CryptoError::MalformedWrappedKey)?;
    if enc_bytes.len() != 32 || ct.len() != 32 + TAG_LEN {
        return Err(CryptoError::MalformedWrappedKey);
    }
    let sk = HpkePrivateKey::from(device_key.secret.to_vec());
    let info = wrap_info(device, artifact);
    let mut pt = WRAP_SUITE
        .open(&EncapsulatedSecret(enc_bytes), &info, b"", &ct, &sk)
        .map_err(|_| CryptoError::UnwrapFailed)?;
    let mut key = [0u8; 32];
    if pt.len() != 32 {
        pt.zeroize();
        return Err(CryptoError::UnwrapFailed);
    }
    key.copy_from_slice(&pt);
    pt.zeroize();
    Ok(ContentKey(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (DeviceId, ArtifactId) {
        (
            DeviceId::new("dev-1").unwrap(),
            ArtifactId::new("fw-1").unwrap(),
        )
    }

    #[test]
    fn sealed_chunk_opens_only_in_its_place() {
        let key = ContentKey::generate().unwrap();
        let (_, art) = ids();
        let sealed = seal_chunk(&key, &art, 3, 10, b"hello");
        assert_eq!(sealed.len(), 5 + TAG_LEN);
        assert_eq!(open_chunk(&key, &art, 3, 10, &sealed).unwrap(), b"hello");
        assert!(open_chunk(&key, &art, 4, 10, &sealed).is_err(), "reordered");
        assert!(open_chunk(&key, &art, 3, 9, &sealed).is_err(), "truncated");
        let other = ArtifactId::new("fw-2").unwrap();
        assert!(open_chunk(&key, &other, 3, 10, &sealed).is_err(), "spliced");
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert!(open_chunk(&key, &art, 3, 10, &flipped).is_err(), "tampered");
    }

    #[test]
    fn wrapped_key_unwraps_only_for_its_device_and_artifact() {
        let (dev, art) = ids();
        let dk = DeviceEncryptionKey::generate().unwrap();
        let key = ContentKey::generate().unwrap();
        let w = wrap_content_key(&dk.public_bytes().unwrap(), &dev, &art, &key).unwrap();
        let got = unwrap_content_key(&dk, &dev, &art, &w).unwrap();
        assert_eq!(got.as_bytes(), key.as_bytes());

        let other_dev = DeviceId::new("dev-2").unwrap();
        assert!(unwrap_content_key(&dk, &other_dev, &art, &w).is_err());
        let other_art = ArtifactId::new("fw-9").unwrap();
        assert!(unwrap_content_key(&dk, &dev, &other_art, &w).is_err());
        let stranger = DeviceEncryptionKey::generate().unwrap();
        assert!(unwrap_content_key(&stranger, &dev, &art, &w).is_err());
    }

    #[test]
    fn malformed_wrapped_key_is_an_error_not_a_panic() {
        let (dev, art) = ids();
        let dk = DeviceEncryptionKey::generate().unwrap();
        for (enc, ct) in [("", ""), ("!!", "AA=="), (&*B64.encode([0u8; 32]), "AA==")] {
            let w = WrappedKey {
                enc: enc.into(),
                ct: ct.into(),
            };
            assert!(unwrap_content_key(&dk, &dev, &art, &w).is_err());
        }
        // A point of small order (here zero) gives an all-zero Diffie-Hellman result, which
        // RFC 9180 refuses on both sides.
        let zero = WrappedKey {
            enc: B64.encode([0u8; 32]),
            ct: B64.encode([0u8; 32 + TAG_LEN]),
        };
        assert_eq!(
            unwrap_content_key(&dk, &dev, &art, &zero).unwrap_err(),
            CryptoError::UnwrapFailed
        );
        let key = ContentKey::generate().unwrap();
        assert_eq!(
            wrap_content_key(&[0u8; 32], &dev, &art, &key).unwrap_err(),
            CryptoError::MalformedPublicKey
        );
    }

    /// The `hpke` crate (RustCrypto's curve25519-dalek underneath) implements the same suite
    /// independently: keys wrapped by either open with the other, so what devices receive did
    /// not change when the wrapping moved to aws-lc.
    mod against_the_hpke_crate {
        use super::*;
        use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};

        type Kem = hpke::kem::X25519HkdfSha256;
        type Kdf = hpke::kdf::HkdfSha256;
        type Aead = hpke::aead::AesGcm256;

        fn their_secret(dk: &DeviceEncryptionKey) -> <Kem as hpke::Kem>::PrivateKey {
            <Kem as hpke::Kem>::PrivateKey::from_bytes(dk.secret_bytes()).unwrap()
        }

        #[test]
        fn the_public_key_is_the_same_and_rfc_7748s() {
            // RFC 7748 §6.1, Alice's key pair.
            let alice = DeviceEncryptionKey::from_bytes(
                hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                    .unwrap()
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(
                hex::encode(alice.public_bytes().unwrap()),
                "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
            );
            for _ in 0..32 {
                let dk = DeviceEncryptionKey::generate().unwrap();
                let theirs = Kem::sk_to_pk(&their_secret(&dk)).to_bytes();
                assert_eq!(dk.public_bytes().unwrap().as_slice(), theirs.as_slice());
            }
        }

        #[test]
        fn a_key_wrapped_here_opens_there() {
            let (dev, art) = ids();
            for _ in 0..16 {
                let dk = DeviceEncryptionKey::generate().unwrap();
                let key = ContentKey::generate().unwrap();
                let w = wrap_content_key(&dk.public_bytes().unwrap(), &dev, &art, &key).unwrap();
                let enc_bytes = B64.decode(&w.enc).unwrap();
                let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc_bytes).unwrap();
                let ct = B64.decode(&w.ct).unwrap();
                let opened = hpke::single_shot_open::<Aead, Kdf, Kem>(
                    &OpModeR::Base,
                    &their_secret(&dk),
                    &enc,
                    &wrap_info(&dev, &art),
                    &ct,
                    b"",
                )
                .unwrap();
                assert_eq!(opened.as_slice(), key.as_bytes());
            }
        }

        #[test]
        fn a_key_wrapped_there_opens_here() {
            let (dev, art) = ids();
            for _ in 0..16 {
                let dk = DeviceEncryptionKey::generate().unwrap();
                let key = ContentKey::generate().unwrap();
                let public =
                    <Kem as hpke::Kem>::PublicKey::from_bytes(&dk.public_bytes().unwrap()).unwrap();
                let (enc, ct) = hpke::single_shot_seal::<Aead, Kdf, Kem>(
                    &OpModeS::Base,
                    &public,
                    &wrap_info(&dev, &art),
                    key.as_bytes(),
                    b"",
                )
                .unwrap();
                let w = WrappedKey {
                    enc: B64.encode(enc.to_bytes()),
                    ct: B64.encode(ct),
                };
                let got = unwrap_content_key(&dk, &dev, &art, &w).unwrap();
                assert_eq!(got.as_bytes(), key.as_bytes());
            }
        }
    }
}
