//! What an operator does, as functions the `aloft` CLI, the demo and the tests share: set up a
//! data directory, issue an operator profile, trust a release key, build a signed release
//! bundle and upload it. The CLI (`cli`) only parses arguments and prints.

use std::io::Write;
use std::path::Path;

use aloft_certs::{FleetCa, OperatorRole, Validity};
use aloft_proto::crypto::ContentKey;
use aloft_proto::manifest::{Manifest, ReleaseSigningKey, SignedManifest};
use aloft_proto::release::{build_release, ReleaseMeta};
use aloft_proto::trust::SignedRoot;
use aloft_proto::{ArtifactId, OperatorId, SecurityVersion};
use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::Value;

use aloft_vault::{MasterKey, Protection, RecoveryKey, Unlock, VaultError};
use zeroize::Zeroizing;

use crate::admin::client::{AdminClient, PROFILE_CA, PROFILE_CERT, PROFILE_KEY};
use crate::admin::wire::AdminBody;
use crate::config::layout;
use crate::store::{Store, StoreLocation};

pub mod export;
#[cfg(test)]
mod tests;

/// Files of a release bundle directory (`aloft release build`).
pub mod bundle {
    pub const MANIFEST: &str = "manifest.json";
    pub const CHUNKS: &str = "chunks.bin";
    /// The content key, hex; a secret.
    pub const CONTENT_KEY: &str = "content-key";
}

/// Names the server certificate carries whatever else it is given: operator commands and a
/// simulator run on the server itself reach it by these (`--server 127.0.0.1:8883`).
pub const LOCAL_SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// Writes a certificate in the clear and its key sealed, beside each other in `pki`.
fn write_cert_and_sealed_key(
    pki: &Path,
    cert_file: &str,
    key_file: &str,
    (cert_pem, key_pem): (String, Zeroizing<String>),
    protection: &Protection,
) -> Result<()> {
    write_new(&pki.join(cert_file), cert_pem.as_bytes(), false)?;
    aloft_vault::seal_file(&pki.join(key_file), key_pem.as_bytes(), protection, false)?;
    Ok(())
}

/// The server certificate's names: [`LOCAL_SERVER_NAMES`], then `hostnames`, each once.
pub fn server_names(hostnames: &[String]) -> Vec<String> {
    let mut names: Vec<String> = LOCAL_SERVER_NAMES.iter().map(|n| (*n).to_owned()).collect();
    for name in hostnames {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// Creates a data directory: the fleet CA and the server certificate under `data_dir/pki`
/// (both keys sealed; the certificate names `hostnames` and [`LOCAL_SERVER_NAMES`]), the
/// keystore (a sealed master key for the store's content keys) and an empty store. Every
/// sealed file opens with what `protection` holds.
pub fn init(
    data_dir: &Path,
    ca_name: &str,
    hostnames: &[String],
    protection: &Protection,
) -> Result<FleetCa> {
    let at = StoreLocation::Sled(data_dir.join(layout::STORE_DIR));
    init_at(data_dir, &at, ca_name, hostnames, protection)
}

/// Checks that `init_at` can make a data directory with its store at `at`, before anything is
/// written or a recovery key shown: no keystore, CA or sled store there yet, and a PostgreSQL
/// database that is reachable, not in use and holds no store.
pub fn init_preflight(data_dir: &Path, at: &StoreLocation) -> Result<()> {
    let pki = data_dir.join(layout::PKI_DIR);
    let mut paths = vec![
        data_dir.join(layout::KEYSTORE),
        pki.join(aloft_certs::CA_CERT_FILE),
    ];
    if let StoreLocation::Sled(dir) = at {
        paths.push(dir.clone());
    }
    for path in paths {
        if path.symlink_metadata().is_ok() {
            bail!(
                "{} already exists: refusing to overwrite a data directory",
                path.display()
            );
        }
    }
    if at.is_postgres() {
        let raw = crate::store::RawStore::open_at(at)?;
        if raw.holds_store()? {
            bail!("{at} already holds a store: refusing to overwrite it");
        }
    }
    Ok(())
}

/// [`init`] with the store at `at` (the data directory's sled store, or a PostgreSQL database).
pub fn init_at(
    data_dir: &Path,
    at: &StoreLocation,
    ca_name: &str,
    hostnames: &[String],
    protection: &Protection,
) -> Result<FleetCa> {
    init_preflight(data_dir, at)?;
    let pki = data_dir.join(layout::PKI_DIR);
    std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    // The data directory holds the CA key, the server key and (in the store) content keys:
    // owner-only whatever the umask, even though each is sealed.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for dir in [data_dir, pki.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
    }
    let ca = FleetCa::create(ca_name, 3650)?;
    save_ca(&ca, &pki, protection)?;
    let server = ca.issue_server(&server_names(hostnames), Validity::days(825))?;
    let server = (server.cert_pem, Zeroizing::new(server.key_pem));
    write_cert_and_sealed_key(
        &pki,
        layout::SERVER_CERT,
        layout::SERVER_KEY,
        server,
        protection,
    )
    .context("writing the server certificate and key")?;
    // The orchestrator's client certificate, for when it runs beside an external broker
    // (`external_broker`): role `orchestrator`, a CN no device or operator can hold.
    let client = ca.issue_orchestrator(Validity::days(825))?;
    let client = (client.cert_pem, Zeroizing::new(client.key_pem));
    write_cert_and_sealed_key(
        &pki,
        layout::ORCHESTRATOR_CERT,
        layout::ORCHESTRATOR_KEY,
        client,
        protection,
    )
    .context("writing the orchestrator's client certificate and key")?;
    let store_key = MasterKey::generate()?;
    create_keystore(data_dir, &store_key, protection)?;
    Store::create_at(at, store_key)?;
    println!(
        "initialized {}: fleet CA, server and orchestrator certificates, keystore and store ({at})",
        data_dir.display()
    );
    Ok(ca)
}

/// Label sealed with the store's master key, so a keystore is recognised as one.
const KEYSTORE_LABEL: &[u8] = b"aloft-keystore-v1\0";

/// Writes `data_dir/keystore`: the store's master key, sealed.
fn create_keystore(data_dir: &Path, key: &MasterKey, protection: &Protection) -> Result<()> {
    let mut body = Zeroizing::new(KEYSTORE_LABEL.to_vec());
    body.extend_from_slice(&key.to_bytes()[..]);
    aloft_vault::seal_file(&data_dir.join(layout::KEYSTORE), &body, protection, false)
        .context("sealing the keystore")?;
    Ok(())
}

/// Opens `data_dir/keystore`: the master key that seals the store's content keys.
pub fn open_keystore(data_dir: &Path, unlock: &Unlock) -> Result<MasterKey, VaultError> {
    let body = aloft_vault::open_file(&data_dir.join(layout::KEYSTORE), unlock)?;
    let key = body
        .strip_prefix(KEYSTORE_LABEL)
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or(VaultError::Malformed("not a keystore"))?;
    Ok(MasterKey::from_bytes(Zeroizing::new(key)))
}

/// Writes `ca.crt` and the sealed `ca.key` into `dir`, refusing to replace either.
pub fn save_ca(ca: &FleetCa, dir: &Path, protection: &Protection) -> Result<()> {
    let cert_path = dir.join(aloft_certs::CA_CERT_FILE);
    let key_path = dir.join(aloft_certs::CA_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.symlink_metadata().is_ok() {
            bail!("{} already exists", path.display());
        }
    }
    let key_pem = Zeroizing::new(ca.key_pem());
    aloft_vault::seal_file(&key_path, key_pem.as_bytes(), protection, false)
        .context("sealing the CA key")?;
    write_new(&cert_path, ca.cert_pem().as_bytes(), false)
}

/// Loads the fleet CA from `dir` (`ca.crt` and the sealed `ca.key`).
pub fn load_ca(dir: &Path, unlock: &Unlock) -> Result<FleetCa> {
    let cert_path = dir.join(aloft_certs::CA_CERT_FILE);
    let key_path = dir.join(aloft_certs::CA_KEY_FILE);
    let cert_pem = std::fs::read_to_string(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?;
    let key = aloft_vault::open_file(&key_path, unlock)
        .with_context(|| format!("unsealing {}", key_path.display()))?;
    let key_pem = std::str::from_utf8(&key).context("the CA key is not PEM")?;
    Ok(FleetCa::from_pem(cert_pem, key_pem)?)
}

/// How a new sealed file (a data directory, a signing key, a backup) is locked, for a command
/// line: always a fresh recovery key (returned, for the caller to show once), plus a passphrase
/// from `--unlock-file`, `ALOFT_UNLOCK` or a prompt unless `no_passphrase`.
pub fn new_protection(
    unlock_file: Option<&Path>,
    no_passphrase: bool,
    what: &str,
) -> Result<(Protection, RecoveryKey)> {
    let recovery = RecoveryKey::generate()?;
    let protection = if no_passphrase {
        Protection::recovery_key(recovery.clone())
    } else {
        let passphrase = aloft_vault::new_passphrase(unlock_file, what).context(
            "choosing a passphrase (or pass --no-passphrase to rely on the recovery key alone)",
        )?;
        Protection::passphrase(passphrase).and_recovery_key(recovery.clone())
    };
    Ok((protection, recovery))
}

/// Shows a freshly generated recovery key, once, labeled, with what it opens. On stderr: stdout
/// is for what scripts capture (a public key), and a secret should not land in their logs.
pub fn print_recovery_key(key: &RecoveryKey, opens: &str) {
    eprintln!("recovery key: {}", key.to_hex().as_str());
    eprintln!(
        "WARNING: this recovery key is shown once and never stored. It opens {opens}. Write it \
         down and keep it offline, apart from the files it opens: without it (and without the \
         passphrase, if you set one) they cannot be recovered."
    );
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

/// Writes a new signing key file (release or root key), sealed, readable by its owner only.
/// Every signing key file goes through this and [`read_signing_key`].
pub fn write_signing_key(
    path: &Path,
    key: &ReleaseSigningKey,
    protection: &Protection,
) -> Result<()> {
    let hex = key.to_hex();
    aloft_vault::seal_file(path, hex.as_bytes(), protection, false)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads a signing key file written by [`write_signing_key`].
pub fn read_signing_key(path: &Path, unlock: &Unlock) -> Result<ReleaseSigningKey> {
    let text = aloft_vault::open_file(path, unlock)
        .with_context(|| format!("unsealing {}", path.display()))?;
    std::str::from_utf8(&text)
        .ok()
        .and_then(|t| ReleaseSigningKey::from_hex(t).ok())
        .ok_or_else(|| anyhow::anyhow!("{} does not hold a signing key", path.display()))
}

/// Writes an operator profile directory: the CA, the operator's certificate (with `role`) and key.
pub fn issue_operator_profile(
    ca: &FleetCa,
    name: &OperatorId,
    role: OperatorRole,
    out_dir: &Path,
    days: u32,
) -> Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let issued = ca.issue_operator(name, role, Validity::days(days))?;
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
    aloft_vault::write_atomic(&path, &serde_json::to_vec_pretty(&signed)?, 0o644, true)?;
    Ok(signed.signatures.len())
}

/// Builds and signs a release into `out_dir`; returns the artifact id.
pub fn build_bundle(
    image: &Path,
    meta: &ReleaseMeta,
    key: &ReleaseSigningKey,
    out_dir: &Path,
) -> Result<ArtifactId> {
    let mut file =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = file.metadata()?.len();
    Ok(write_bundle(&mut file, size, meta, key, out_dir)?.artifact)
}

/// (1.5) The folder under a release bundle that holds its delta from base `base_version`:
/// `release upload` uploads it after the full image.
pub fn delta_bundle_dir(out_dir: &Path, base_version: &str) -> std::path::PathBuf {
    out_dir.join(format!("delta-from-{base_version}"))
}

/// (1.5) Builds the delta from the image `base` (firmware `base_version`) to `image` as a
/// release bundle of its own in [`delta_bundle_dir`], its artifact `<artifact>-from-<base>`.
/// Both images are read whole: this runs on the operator's machine. Returns the delta's
/// manifest.
pub fn build_delta_bundle(
    base: &Path,
    base_version: &str,
    image: &Path,
    meta: &ReleaseMeta,
    key: &ReleaseSigningKey,
    out_dir: &Path,
) -> Result<Manifest> {
    let base_bytes = std::fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    let target = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let mut delta_meta = meta.clone();
    delta_meta.artifact = ArtifactId::new(format!("{}-from-{base_version}", meta.artifact))
        .context("the delta's artifact id (<artifact>-from-<base version>)")?;
    let dir = delta_bundle_dir(out_dir, base_version);
    std::fs::create_dir_all(&dir)?;
    let chunks_path = dir.join(bundle::CHUNKS);
    let mut chunks = std::io::BufWriter::new(
        std::fs::File::create(&chunks_path)
            .with_context(|| format!("creating {}", chunks_path.display()))?,
    );
    let built = aloft_proto::release::build_delta_release(
        &base_bytes,
        base_version,
        &target,
        &delta_meta,
        key,
        |_, sealed| chunks.write_all(&sealed),
    )?;
    chunks.flush()?;
    std::fs::write(
        dir.join(bundle::MANIFEST),
        serde_json::to_vec_pretty(&built.signed)?,
    )?;
    let key_path = dir.join(bundle::CONTENT_KEY);
    let _ = std::fs::remove_file(&key_path);
    write_new(
        &key_path,
        hex::encode(built.content_key.as_bytes()).as_bytes(),
        true,
    )?;
    Ok(built.manifest)
}

/// (1.5) The delta bundles built beside a release bundle, in name order.
pub fn delta_bundles(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("delta-from-"))
        .map(|e| e.path())
        .filter(|p| p.join(bundle::MANIFEST).is_file())
        .collect();
    found.sort();
    found
}

/// What `release resign` changes; everything else (image, hardware model, chunk size) is the
/// old release's.
#[derive(Debug, Clone)]
pub struct Resign {
    pub artifact: ArtifactId,
    pub version: String,
    /// `None`: the old release's. Never below it.
    pub security_version: Option<SecurityVersion>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// Must be above the old release's.
    pub sequence: u64,
}

/// Signs the image of the release in bundle `old_dir` again as a new release into `out_dir`
/// (new artifact id, fresh sequence and content key): what lets an operator roll devices back
/// to an image they would refuse as a replayed manifest. Each sealed chunk is checked against
/// the old manifest's digest before it is opened, and the whole image against its SHA-256, so
/// only the image that manifest describes is signed. Returns the old artifact and the new
/// manifest.
pub fn resign_bundle(
    old_dir: &Path,
    new: &Resign,
    key: &ReleaseSigningKey,
    out_dir: &Path,
) -> Result<(ArtifactId, Manifest)> {
    let manifest_path = old_dir.join(bundle::MANIFEST);
    let signed: SignedManifest = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?,
    )
    .with_context(|| format!("{} is not a signed manifest", manifest_path.display()))?;
    let old = signed.peek_unverified()?;
    if new.artifact == old.artifact {
        bail!(
            "the new release needs an artifact id other than {}",
            old.artifact
        );
    }
    let security_version = new.security_version.unwrap_or(old.security_version);
    if security_version < old.security_version {
        bail!(
            "security version {} is below the old release's {}: devices that installed it would refuse it",
            security_version.0,
            old.security_version.0
        );
    }
    if old.sequence.is_some_and(|s| new.sequence <= s) {
        bail!(
            "sequence {} is not above the old release's {}",
            new.sequence,
            old.sequence.unwrap_or(0)
        );
    }
    let key_text = Zeroizing::new(
        std::fs::read_to_string(old_dir.join(bundle::CONTENT_KEY))
            .with_context(|| format!("reading {}", old_dir.join(bundle::CONTENT_KEY).display()))?,
    );
    let content_key = hex::decode(key_text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(ContentKey::from_bytes)
        .context("the old bundle's content key is not 64 hex digits")?;
    let chunks_path = old_dir.join(bundle::CHUNKS);
    let chunks = std::io::BufReader::new(
        std::fs::File::open(&chunks_path)
            .with_context(|| format!("opening {}", chunks_path.display()))?,
    );
    let mut image = OpenedChunks {
        manifest: &old,
        key: &content_key,
        sealed: chunks,
        next: 0,
        plain: Vec::new(),
        at: 0,
    };
    let meta = ReleaseMeta {
        artifact: new.artifact.clone(),
        version: new.version.clone(),
        security_version,
        hardware_model: old.hardware_model.clone(),
        chunk_size: old.chunk_size,
        created_at: new.created_at,
        expires_at: new.expires_at,
        sequence: Some(new.sequence),
        // The conditions are part of what was released: a re-signed image keeps them.
        preconditions: old.preconditions.clone(),
    };
    let built = write_bundle(&mut image, old.image_size, &meta, key, out_dir)?;
    if built.image_sha256 != old.image_sha256 {
        bail!("the re-signed image does not match the old manifest's image_sha256");
    }
    Ok((old.artifact, built))
}

/// The plaintext image of a bundle, read chunk by chunk from its sealed chunks.
struct OpenedChunks<'a, R> {
    manifest: &'a Manifest,
    key: &'a ContentKey,
    sealed: R,
    next: u32,
    plain: Vec<u8>,
    at: usize,
}

impl<R: std::io::Read> std::io::Read for OpenedChunks<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::{Error, ErrorKind};
        if self.at == self.plain.len() {
            if self.next == self.manifest.chunk_count {
                return Ok(0);
            }
            let index = self.next;
            let bad =
                |why: &str| Error::new(ErrorKind::InvalidData, format!("chunk {index}: {why}"));
            let len = self
                .manifest
                .sealed_len(index)
                .ok_or_else(|| bad("out of range"))?;
            let mut sealed = vec![0u8; len];
            self.sealed.read_exact(&mut sealed)?;
            if Some(aloft_proto::crypto::sha256(&sealed)) != self.manifest.chunk_digest(index) {
                return Err(bad("does not match the manifest's digest"));
            }
            self.plain = aloft_proto::crypto::open_chunk(
                self.key,
                &self.manifest.artifact,
                index,
                self.manifest.chunk_count,
                &sealed,
            )
            .map_err(|_| bad("does not open with the bundle's content key"))?;
            self.at = 0;
            self.next += 1;
        }
        let n = buf.len().min(self.plain.len() - self.at);
        buf[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Seals `size` bytes of `image` into a signed bundle in `out_dir`; returns its manifest.
fn write_bundle(
    image: &mut dyn std::io::Read,
    size: u64,
    meta: &ReleaseMeta,
    key: &ReleaseSigningKey,
    out_dir: &Path,
) -> Result<Manifest> {
    std::fs::create_dir_all(out_dir)?;
    let chunks_path = out_dir.join(bundle::CHUNKS);
    let mut chunks = std::io::BufWriter::new(
        std::fs::File::create(&chunks_path)
            .with_context(|| format!("creating {}", chunks_path.display()))?,
    );
    let built = build_release(image, size, meta, key, |_, sealed| {
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
    Ok(built.manifest)
}

/// Chunk uploads in flight at once.
const UPLOAD_CONCURRENCY: usize = 16;

/// Uploads a bundle through `client`, chunk by chunk, with a progress bar.
pub async fn upload_bundle(client: &AdminClient, dir: &Path, progress: bool) -> Result<ArtifactId> {
    let signed: SignedManifest =
        serde_json::from_slice(&std::fs::read(dir.join(bundle::MANIFEST))?)?;
    let manifest = signed.peek_unverified()?;
    // The counts below size allocations and slices: a damaged bundle must not claim 2^32 chunks.
    manifest.validate()?;
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

#[cfg(test)]
mod bundle_tests;
