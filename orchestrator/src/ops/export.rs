//! `aloft release export`: a built bundle's sealed chunks as static files any HTTPS server can
//! serve (protocol 1.5, an untrusted download origin). The layout comes from
//! `aloft_proto::origin`: `<artifact>/chunks/<index>` and `<artifact>/manifest.json`.
//!
//! The export is made from the bundle (`release build`), which the operator has on the machine
//! that signed it; it needs no connection to the orchestrator. Nothing secret is written: the
//! bundle's `content-key` is never read, and the chunks are the sealed ones whose digests the
//! signed manifest carries. Each chunk is checked against its digest on the way, so a damaged
//! bundle is not published.

use std::io::Read;
use std::path::Path;

use aloft_proto::crypto::sha256;
use aloft_proto::manifest::SignedManifest;
use aloft_proto::origin::{chunk_path, manifest_path};
use aloft_proto::ArtifactId;
use anyhow::{bail, Context, Result};

use super::bundle;

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub artifact: ArtifactId,
    pub chunks: u32,
    pub bytes: u64,
}

/// Writes the sealed chunks and the signed manifest of the bundle in `bundle_dir` under
/// `out_dir` (created if missing; files of an earlier export of the same release are replaced).
pub fn export_bundle(bundle_dir: &Path, out_dir: &Path) -> Result<Exported> {
    let manifest_file = bundle_dir.join(bundle::MANIFEST);
    let manifest_json = std::fs::read(&manifest_file)
        .with_context(|| format!("reading {}", manifest_file.display()))?;
    let signed: SignedManifest = serde_json::from_slice(&manifest_json)
        .with_context(|| format!("{} is not a signed manifest", manifest_file.display()))?;
    // The device verifies the signature against its root; here the manifest only says which
    // bytes belong where, and a wrong one produces an export no device accepts.
    let manifest = signed.peek_unverified()?;
    manifest.validate()?;
    let artifact = manifest.artifact.clone();
    let Some(manifest_rel) = manifest_path(&artifact) else {
        bail!("artifact id {artifact} cannot name a directory");
    };
    let chunks_file = bundle_dir.join(bundle::CHUNKS);
    let mut chunks = std::io::BufReader::new(
        std::fs::File::open(&chunks_file)
            .with_context(|| format!("opening {}", chunks_file.display()))?,
    );
    let mut bytes = 0u64;
    for index in 0..manifest.chunk_count {
        let (Some(len), Some(rel)) = (manifest.sealed_len(index), chunk_path(&artifact, index))
        else {
            bail!("chunk {index} is out of the manifest's range");
        };
        let mut sealed = vec![0u8; len];
        chunks
            .read_exact(&mut sealed)
            .with_context(|| format!("{} is shorter than the manifest says", bundle::CHUNKS))?;
        if Some(sha256(&sealed)) != manifest.chunk_digest(index) {
            bail!("chunk {index} of the bundle does not match the manifest's digest");
        }
        write_file(&out_dir.join(rel), &sealed)?;
        bytes += len as u64;
    }
    let mut probe = [0u8; 1];
    if chunks.read(&mut probe)? != 0 {
        bail!("{} is longer than the manifest says", bundle::CHUNKS);
    }
    write_file(&out_dir.join(manifest_rel), &manifest_json)?;
    Ok(Exported {
        artifact,
        chunks: manifest.chunk_count,
        bytes,
    })
}

/// Writes a file through a temporary name, so a server never serves half of one; world-readable
/// (0644), since a web server usually runs as another user and nothing here is secret.
fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .context("an export path always has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_proto::manifest::ReleaseSigningKey;
    use aloft_proto::release::ReleaseMeta;
    use aloft_proto::SecurityVersion;

    fn built(dir: &Path) -> Vec<u8> {
        let image: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let meta = ReleaseMeta {
            artifact: ArtifactId::new("fw-9").unwrap(),
            version: "9".into(),
            security_version: SecurityVersion(1),
            hardware_model: "m".into(),
            chunk_size: 1024,
            created_at: 1,
            expires_at: 2,
            sequence: Some(1),
            preconditions: None,
        };
        let key = ReleaseSigningKey::generate().unwrap();
        super::super::write_bundle(&mut image.as_slice(), 5000, &meta, &key, dir).unwrap();
        image
    }

    #[test]
    fn export_writes_every_sealed_chunk_and_the_manifest_and_no_key() {
        let tmp = tempfile::tempdir().unwrap();
        let b = tmp.path().join("bundle");
        built(&b);
        let out = tmp.path().join("out");
        let e = export_bundle(&b, &out).unwrap();
        assert_eq!(e.chunks, 5);
        let signed: SignedManifest =
            serde_json::from_slice(&std::fs::read(out.join("fw-9/manifest.json")).unwrap())
                .unwrap();
        let m = signed.peek_unverified().unwrap();
        let all = std::fs::read(b.join(bundle::CHUNKS)).unwrap();
        let mut joined = Vec::new();
        for i in 0..5 {
            let c = std::fs::read(out.join(format!("fw-9/chunks/{i}"))).unwrap();
            assert_eq!(Some(sha256(&c)), m.chunk_digest(i));
            joined.extend(c);
        }
        assert_eq!(joined, all);
        assert_eq!(e.bytes, all.len() as u64);
        let key = std::fs::read_to_string(b.join(bundle::CONTENT_KEY)).unwrap();
        for entry in walk(&out) {
            let data = std::fs::read(&entry).unwrap();
            let text = String::from_utf8_lossy(&data);
            assert!(
                !text.contains(key.trim()),
                "{} holds the key",
                entry.display()
            );
            assert!(!entry.ends_with(bundle::CONTENT_KEY));
        }
    }

    #[test]
    fn a_damaged_bundle_is_not_exported() {
        let tmp = tempfile::tempdir().unwrap();
        let b = tmp.path().join("bundle");
        built(&b);
        let path = b.join(bundle::CHUNKS);
        let mut all = std::fs::read(&path).unwrap();
        all[2000] ^= 1;
        std::fs::write(&path, &all).unwrap();
        let err = export_bundle(&b, &tmp.path().join("out")).unwrap_err();
        assert!(err.to_string().contains("digest"), "{err}");
        all.truncate(100);
        std::fs::write(&path, &all).unwrap();
        assert!(export_bundle(&b, &tmp.path().join("out2")).is_err());
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
