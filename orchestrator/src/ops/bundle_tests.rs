//! Building and re-signing release bundles: round trips and refusals.

use super::*;
use aloft_proto::crypto::{open_chunk, sha256};

fn meta(artifact: &str, sv: u64, sequence: u64) -> ReleaseMeta {
    ReleaseMeta {
        artifact: ArtifactId::new(artifact).unwrap(),
        version: artifact.trim_start_matches("fw-").to_owned(),
        security_version: SecurityVersion(sv),
        hardware_model: "sim-v1".into(),
        chunk_size: 1024,
        created_at: 1_000,
        expires_at: 2_000,
        sequence: Some(sequence),
        preconditions: None,
    }
}

fn resign(artifact: &str, sv: Option<u64>, sequence: u64) -> Resign {
    Resign {
        artifact: ArtifactId::new(artifact).unwrap(),
        version: artifact.trim_start_matches("fw-").to_owned(),
        security_version: sv.map(SecurityVersion),
        created_at: 3_000,
        expires_at: 4_000,
        sequence,
    }
}

#[test]
fn a_resigned_bundle_carries_the_same_image_under_a_new_artifact_and_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..5_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let image_path = dir.path().join("image.bin");
    std::fs::write(&image_path, &image).unwrap();
    let key = ReleaseSigningKey::generate().unwrap();
    let old_dir = dir.path().join("old");
    build_bundle(&image_path, &meta("fw-1.9.1", 2, 100), &key, &old_dir).unwrap();

    let new_dir = dir.path().join("new");
    let (old, m) =
        resign_bundle(&old_dir, &resign("fw-1.9.1-r2", None, 200), &key, &new_dir).unwrap();
    assert_eq!(old.as_str(), "fw-1.9.1");
    assert_eq!(m.artifact.as_str(), "fw-1.9.1-r2");
    assert_eq!(
        (m.security_version, m.sequence),
        (SecurityVersion(2), Some(200))
    );
    assert_eq!((m.hardware_model.as_str(), m.chunk_size), ("sim-v1", 1024));
    let signed: SignedManifest =
        serde_json::from_slice(&std::fs::read(new_dir.join(bundle::MANIFEST)).unwrap()).unwrap();
    assert_eq!(signed.verify(&[key.public()]).unwrap(), m);
    // The new bundle's chunks open, under its own key and artifact, to the old image.
    let ck: [u8; 32] =
        hex::decode(std::fs::read_to_string(new_dir.join(bundle::CONTENT_KEY)).unwrap())
            .unwrap()
            .try_into()
            .unwrap();
    let ck = ContentKey::from_bytes(ck);
    let sealed = std::fs::read(new_dir.join(bundle::CHUNKS)).unwrap();
    let mut plain = Vec::new();
    let mut at = 0;
    for i in 0..m.chunk_count {
        let len = m.sealed_len(i).unwrap();
        let c = &sealed[at..at + len];
        at += len;
        assert_eq!(Some(sha256(c)), m.chunk_digest(i));
        plain.extend(open_chunk(&ck, &m.artifact, i, m.chunk_count, c).unwrap());
    }
    assert_eq!(plain, image);
}

#[test]
fn resigning_refuses_a_lower_security_version_an_old_sequence_the_same_artifact_and_tampered_chunks(
) {
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("image.bin");
    std::fs::write(&image_path, vec![7u8; 3_000]).unwrap();
    let key = ReleaseSigningKey::generate().unwrap();
    let old_dir = dir.path().join("old");
    build_bundle(&image_path, &meta("fw-1.9.1", 2, 100), &key, &old_dir).unwrap();
    let out = dir.path().join("out");
    for (r, why) in [
        (resign("fw-r2", Some(1), 200), "below the old release"),
        (resign("fw-r2", None, 100), "not above"),
        (resign("fw-1.9.1", None, 200), "artifact id"),
    ] {
        let e = resign_bundle(&old_dir, &r, &key, &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{e}");
    }
    let chunks = old_dir.join(bundle::CHUNKS);
    let mut sealed = std::fs::read(&chunks).unwrap();
    sealed[1500] ^= 1;
    std::fs::write(&chunks, sealed).unwrap();
    let e = format!(
        "{:#}",
        resign_bundle(&old_dir, &resign("fw-r2", Some(3), 200), &key, &out).unwrap_err()
    );
    assert!(e.contains("chunk 1: does not match"), "{e}");
}
