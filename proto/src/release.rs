//! Building a release: cut an image into chunks, seal each under a fresh content key, and sign a
//! manifest over the sealed chunks. Used by the operator CLI; streaming, so an image is never
//! held whole.

use std::io::Read;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::crypto::{sha256, ChunkCipher, ContentKey, CryptoError};
use crate::delta::{make_patch, DeltaError, DeltaOf};
use crate::ids::{ArtifactId, SecurityVersion};
use crate::manifest::{
    Manifest, ManifestError, ReleaseSigningKey, SignedManifest, MANIFEST_VERSION, MAX_CHUNKS,
};

/// What the operator says about an image.
#[derive(Debug, Clone)]
pub struct ReleaseMeta {
    pub artifact: ArtifactId,
    pub version: String,
    pub security_version: SecurityVersion,
    pub hardware_model: String,
    pub chunk_size: u32,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// The manifest's sequence number ([`Manifest::sequence`]).
    pub sequence: Option<u64>,
    /// (1.5) Device preconditions ([`Manifest::preconditions`]); `None` for none.
    pub preconditions: Option<crate::precondition::Preconditions>,
}

/// Why a release could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
    #[error("image is larger than {MAX_CHUNKS} chunks of the chosen size")]
    TooLarge,
    #[error("image size changed while reading it")]
    SizeChanged,
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Delta(#[from] DeltaError),
}

/// A built release: the signed manifest and the content key the orchestrator wraps per device.
pub struct BuiltRelease {
    pub manifest: Manifest,
    pub signed: SignedManifest,
    pub content_key: ContentKey,
}

/// Reads `image_size` bytes from `image`, hands every sealed chunk to `sink(index, sealed)` in
/// order, and returns the signed manifest.
pub fn build_release(
    image: &mut dyn Read,
    image_size: u64,
    meta: &ReleaseMeta,
    key: &ReleaseSigningKey,
    sink: impl FnMut(u32, Vec<u8>) -> Result<(), std::io::Error>,
) -> Result<BuiltRelease, ReleaseError> {
    build(image, image_size, meta, None, key, sink)
}

/// (1.5) Builds a delta release: the patch from `base` to `target` ([`crate::delta`]), chunked,
/// sealed and signed like an image, its manifest naming the base (`base_version`, SHA-256) and
/// the target's SHA-256 and size. `meta` is the delta's own (its artifact id differs from the
/// full release's; version, security version and model are the target's).
pub fn build_delta_release(
    base: &[u8],
    base_version: &str,
    target: &[u8],
    meta: &ReleaseMeta,
    key: &ReleaseSigningKey,
    sink: impl FnMut(u32, Vec<u8>) -> Result<(), std::io::Error>,
) -> Result<BuiltRelease, ReleaseError> {
    let patch = make_patch(base, target)?;
    let of = DeltaOf {
        base_sha256: hex::encode(sha256(base)),
        base_version: base_version.to_owned(),
        base_size: base.len() as u64,
        target_sha256: hex::encode(sha256(target)),
        target_size: target.len() as u64,
    };
    build(
        &mut patch.as_slice(),
        patch.len() as u64,
        meta,
        Some(of),
        key,
        sink,
    )
}

fn build(
    image: &mut dyn Read,
    image_size: u64,
    meta: &ReleaseMeta,
    delta: Option<DeltaOf>,
    key: &ReleaseSigningKey,
    mut sink: impl FnMut(u32, Vec<u8>) -> Result<(), std::io::Error>,
) -> Result<BuiltRelease, ReleaseError> {
    let chunk_count = image_size.div_ceil(u64::from(meta.chunk_size.max(1)));
    if chunk_count > u64::from(MAX_CHUNKS) {
        return Err(ReleaseError::TooLarge);
    }
    let chunk_count = chunk_count as u32;
    let content_key = ContentKey::generate()?;
    let cipher = ChunkCipher::new(&content_key);
    let mut image_hash = Sha256::new();
    let mut digests = Vec::with_capacity(32 * chunk_count as usize);
    let mut buf = vec![0u8; meta.chunk_size as usize];
    let mut remaining = image_size;
    for index in 0..chunk_count {
        let n = remaining.min(u64::from(meta.chunk_size)) as usize;
        image.read_exact(&mut buf[..n])?;
        remaining -= n as u64;
        image_hash.update(&buf[..n]);
        let sealed = cipher.seal(&meta.artifact, index, chunk_count, &buf[..n]);
        digests.extend_from_slice(&sha256(&sealed));
        sink(index, sealed)?;
    }
    let mut probe = [0u8; 1];
    if image.read(&mut probe)? != 0 {
        return Err(ReleaseError::SizeChanged);
    }
    let manifest = Manifest {
        v: MANIFEST_VERSION,
        artifact: meta.artifact.clone(),
        version: meta.version.clone(),
        security_version: meta.security_version,
        hardware_model: meta.hardware_model.clone(),
        image_size,
        image_sha256: hex::encode(image_hash.finalize()),
        chunk_size: meta.chunk_size,
        chunk_count,
        chunk_sha256: B64.encode(&digests),
        created_at: meta.created_at,
        expires_at: meta.expires_at,
        sequence: meta.sequence,
        delta,
        preconditions: meta.preconditions.clone(),
    };
    manifest.validate()?;
    let signed = SignedManifest::sign(&manifest, key);
    Ok(BuiltRelease {
        manifest,
        signed,
        content_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::open_chunk;

    #[test]
    fn built_release_round_trips_through_chunks() {
        let image: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let key = ReleaseSigningKey::generate().unwrap();
        let meta = ReleaseMeta {
            artifact: ArtifactId::new("fw-2").unwrap(),
            version: "2.0.0".into(),
            security_version: SecurityVersion(2),
            hardware_model: "sim-v1".into(),
            chunk_size: 1024,
            created_at: 1,
            expires_at: 2,
            sequence: Some(1),
            preconditions: None,
        };
        let mut chunks = Vec::new();
        let built = build_release(&mut image.as_slice(), 5000, &meta, &key, |i, c| {
            chunks.push((i, c));
            Ok(())
        })
        .unwrap();
        let m = built.signed.verify(&[key.public()]).unwrap();
        assert_eq!(m.chunk_count, 5);
        let mut out = Vec::new();
        for (i, c) in &chunks {
            assert_eq!(sha256(c), m.chunk_digest(*i).unwrap());
            out.extend(open_chunk(&built.content_key, &m.artifact, *i, 5, c).unwrap());
        }
        assert_eq!(out, image);
        assert_eq!(hex::encode(sha256(&out)), m.image_sha256);
    }

    #[test]
    fn image_longer_than_declared_is_refused() {
        let key = ReleaseSigningKey::generate().unwrap();
        let meta = ReleaseMeta {
            artifact: ArtifactId::new("fw-3").unwrap(),
            version: "1".into(),
            security_version: SecurityVersion(1),
            hardware_model: "m".into(),
            chunk_size: 1024,
            created_at: 1,
            expires_at: 2,
            sequence: Some(1),
            preconditions: None,
        };
        let image = vec![0u8; 3000];
        let r = build_release(&mut image.as_slice(), 2048, &meta, &key, |_, _| Ok(()));
        assert!(matches!(r, Err(ReleaseError::SizeChanged)));
    }
}
