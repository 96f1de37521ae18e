//! What an operator does, as functions the `aloft` CLI, the demo and the tests share: set up a
//! data directory, issue an operator profile, trust a release key, build a signed release
//! bundle and upload it. The CLI (`cli`) only parses arguments and prints.

use std::io::Write;
use std::path::Path;

use aloft_certs::{FleetCa, Validity};
use aloft_proto::manifest::{ReleaseSigningKey, SignedManifest};
use aloft_proto::release::{build_release, ReleaseMeta};
use aloft_proto::trust::SignedRoot;
use aloft_proto::{ArtifactId, OperatorId};
use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::Value;

use crate::admin::client::{AdminClient, PROFILE_CA, PROFILE_CERT, PROFILE_KEY};
use crate::admin::wire::AdminBody;
use crate::config::layout;

/// Files of a release bundle directory (`aloft release build`).
pub mod bundle {
    pub const MANIFEST: &str = "manifest.json";
    pub const CHUNKS: &str = "chunks.bin";
    /// The content key, hex; a secret.
    pub const CONTENT_KEY: &str = "content-key";
}

/// Creates the fleet CA and the server certificate under `data_dir/pki`.
pub fn init(data_dir: &Path, ca_name: &str, hostnames: &[String]) -> Result<FleetCa> {
    let pki = data_dir.join(layout::PKI_DIR);
    std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    // The data directory holds the CA key, the server key and (in the store) content keys:
    // owner-only whatever the umask.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for dir in [data_dir, pki.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
    }
    let ca = FleetCa::create(ca_name, 3650)?;
    ca.save(&pki)?;
    let server = ca.issue_server(hostnames, Validity::days(825))?;
    write_new(
        &pki.join(layout::SERVER_CERT),
        server.cert_pem.as_bytes(),
        false,
    )?;
    write_new(
        &pki.join(layout::SERVER_KEY),
        server.key_pem.as_bytes(),
        true,
    )?;
    println!(
        "initialized {}: fleet CA and server certificate",
        data_dir.display()
    );
    Ok(ca)
}

/// Writes a file that must not exist yet; secrets get mode 0600 from creation on.
pub fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes a new signing key file (release or root key), readable by its owner only.
/// Every signing key file goes through this and [`read_signing_key`].
pub fn write_signing_key(path: &Path, key: &ReleaseSigningKey) -> Result<()> {
    write_new(path, key.to_hex().as_bytes(), true)
}

/// Reads a signing key file written by [`write_signing_key`].
pub fn read_signing_key(path: &Path) -> Result<ReleaseSigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ReleaseSigningKey::from_hex(&text)
        .map_err(|_| anyhow::anyhow!("{} does not hold a signing key", path.display()))
}

/// Writes an operator profile directory: the CA, the operator's certificate and key.
pub fn issue_operator_profile(
    ca: &FleetCa,
    name: &OperatorId,
    out_dir: &Path,
    days: u32,
) -> Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let issued = ca.issue_operator(name, Validity::days(days))?;
    write_new(&out_dir.join(PROFILE_CA), ca.cert_pem().as_bytes(), false)?;
    write_new(
        &out_dir.join(PROFILE_CERT),
        issued.cert_pem.as_bytes(),
        false,
    )?;
    write_new(&out_dir.join(PROFILE_KEY), issued.key_pem.as_bytes(), true)?;
    Ok(())
}

/// Installs root metadata into a data directory (offline, before `aloft serve`; later roots
/// go through `aloft trust push`). Returns the version now trusted.
pub fn install_roots(data_dir: &Path, roots: Vec<SignedRoot>) -> Result<u64> {
    Ok(crate::trust::install(
        &data_dir.join(layout::TRUST_DIR),
        roots,
    )?)
}

/// Reads a signed root file.
pub fn read_root(path: &Path) -> Result<SignedRoot> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not signed root metadata", path.display()))
}

/// Adds `key`'s signature to a bundle's manifest (threshold release signing: each approver
/// runs this on the bundle in turn). Returns the number of signatures now on it.
pub fn cosign_bundle(dir: &Path, key: &ReleaseSigningKey) -> Result<usize> {
    let path = dir.join(bundle::MANIFEST);
    let mut signed: SignedManifest = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    signed.cosign(key)?;
    let tmp = dir.join(".manifest.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&signed)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(signed.signatures.len())
}

/// Builds and signs a release into `out_dir`; returns the artifact id.
pub fn build_bundle(
    image: &Path,
    meta: &ReleaseMeta,
    key: &ReleaseSigningKey,
    out_dir: &Path,
) -> Result<ArtifactId> {
    std::fs::create_dir_all(out_dir)?;
    let mut file =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = file.metadata()?.len();
    let chunks_path = out_dir.join(bundle::CHUNKS);
    let mut chunks = std::io::BufWriter::new(
        std::fs::File::create(&chunks_path)
            .with_context(|| format!("creating {}", chunks_path.display()))?,
    );
    let built = build_release(&mut file, size, meta, key, |_, sealed| {
        chunks.write_all(&sealed)
    })?;
    chunks.flush()?;
    let manifest = serde_json::to_vec_pretty(&built.signed)?;
    std::fs::write(out_dir.join(bundle::MANIFEST), manifest)?;
    let key_path = out_dir.join(bundle::CONTENT_KEY);
    let _ = std::fs::remove_file(&key_path);
    write_new(
        &key_path,
        hex::encode(built.content_key.as_bytes()).as_bytes(),
        true,
    )?;
    Ok(built.manifest.artifact)
}

/// Chunk uploads in flight at once.
const UPLOAD_CONCURRENCY: usize = 16;

/// Uploads a bundle through `client`, chunk by chunk, with a progress bar.
pub async fn upload_bundle(client: &AdminClient, dir: &Path, progress: bool) -> Result<ArtifactId> {
    let signed: SignedManifest =
        serde_json::from_slice(&std::fs::read(dir.join(bundle::MANIFEST))?)?;
    let manifest = signed.peek_unverified()?;
    let content_key = std::fs::read_to_string(dir.join(bundle::CONTENT_KEY))?;
    let chunks = std::fs::read(dir.join(bundle::CHUNKS))?;
    let _: Value = client
        .call(AdminBody::ReleasePut {
            manifest: signed,
            content_key: content_key.trim().to_owned(),
        })
        .await?;
    let bar = if progress {
        indicatif::ProgressBar::new(u64::from(manifest.chunk_count))
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Cut the file into the manifest's sealed chunks first, so a short file fails before upload.
    let mut pieces = Vec::with_capacity(manifest.chunk_count as usize);
    let mut offset = 0usize;
    for index in 0..manifest.chunk_count {
        let len = manifest.sealed_len(index).unwrap_or(0);
        let Some(sealed) = chunks.get(offset..offset + len) else {
            bail!("{} is shorter than the manifest says", bundle::CHUNKS);
        };
        offset += len;
        pieces.push((index, sealed));
    }
    // Several calls in flight: each is a round trip through the broker and a store flush, and
    // the engine commits a batch of them with one flush. Chunks may arrive in any order.
    futures_util::stream::iter(pieces)
        .map(|(index, sealed)| {
            let body = AdminBody::ReleaseChunk {
                artifact: manifest.artifact.clone(),
                index,
                data: B64.encode(sealed),
            };
            let bar = &bar;
            async move {
                let _: Value = client.call(body).await?;
                bar.inc(1);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(UPLOAD_CONCURRENCY)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    bar.finish_and_clear();
    Ok(manifest.artifact)
}
