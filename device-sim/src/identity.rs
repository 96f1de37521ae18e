//! A device's identity on disk: its TLS key and certificate, its X25519 encryption key, and the
//! CSR it sends to the fleet CA. Enrollment runs on the device: the private keys are generated
//! here and only the CSR leaves; the CA's certificate comes back beside it.
//!
//! Layout of a fleet directory (one file set per device, named by device id):
//! `ca.crt`, `devices/{id}.key` (TLS, PKCS#8 PEM), `devices/{id}.x25519` (hex secret),
//! `devices/{id}.csr`, `devices/{id}.crt`, `root.json` (the root of trust the fleet is
//! provisioned with, if enrolled with one), and at run time `state/{id}.json`,
//! `state/{id}.slots`.

use std::io::Write;
use std::path::{Path, PathBuf};

use aloft_certs::{FleetCa, Validity};
use aloft_proto::crypto::DeviceEncryptionKey;
use aloft_proto::DeviceId;
use anyhow::{bail, Context, Result};

pub const CA_FILE: &str = "ca.crt";
pub const DEVICES_DIR: &str = "devices";
pub const STATE_DIR: &str = "state";
/// The root of trust pinned at provisioning (a JSON `SignedRoot`).
pub const ROOT_FILE: &str = "root.json";

/// What a device needs to connect and decrypt.
#[derive(Clone)]
pub struct DeviceIdentity {
    pub id: DeviceId,
    pub key_pem: String,
    pub cert_pem: String,
    pub encryption_key: DeviceEncryptionKey,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The id of the `n`th device with `prefix`: `prefix-00042`.
pub fn device_id(prefix: &str, n: usize) -> Result<DeviceId> {
    Ok(DeviceId::new(format!("{prefix}-{n:05}"))?)
}

/// Where the certificate of `id` is kept in the fleet directory `dir` (renewal replaces it).
pub fn cert_path(dir: &Path, id: &DeviceId) -> PathBuf {
    device_path(dir, id, "crt")
}

fn device_path(dir: &Path, id: &DeviceId, ext: &str) -> PathBuf {
    dir.join(DEVICES_DIR).join(format!("{id}.{ext}"))
}

/// Writes a file readable only by its owner (keys), creating parent directories.
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents)?;
    Ok(())
}

/// Enrolls devices `prefix-00000 … prefix-{count-1}` in `dir`: generates each device's keys and
/// writes its CSR. Devices that already have keys keep them. Returns the CSR paths.
pub fn enroll(dir: &Path, prefix: &str, count: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir.join(DEVICES_DIR))?;
    let mut csrs = Vec::with_capacity(count);
    for n in 0..count {
        let id = device_id(prefix, n)?;
        let csr_path = device_path(dir, &id, "csr");
        if !csr_path.exists() {
            let enc = DeviceEncryptionKey::generate()?;
            let csr = aloft_certs::device_csr(&id, &enc.public_bytes()?)?;
            write_private(
                &device_path(dir, &id, "x25519"),
                hex::encode(enc.secret_bytes()).as_bytes(),
            )?;
            write_private(&device_path(dir, &id, "key"), csr.key_pem.as_bytes())?;
            std::fs::write(&csr_path, csr.csr_pem.as_bytes())?;
        }
        csrs.push(csr_path);
    }
    Ok(csrs)
}

/// Plays the CA's part for a lab: issues a certificate for every CSR in `dir` lacking one and
/// stores the CA certificate beside them. In production the CSRs go to `aloft pki issue-devices`.
pub fn issue_all(dir: &Path, ca: &FleetCa, validity: Validity) -> Result<usize> {
    issue_all_recorded(dir, ca, validity, None)
}

/// [`issue_all`], recording each certificate in the issuance ledger of the CA directory
/// `ca_dir` (if given) before it is written, as `aloft pki issue-devices` does: revoking a
/// device then reaches it.
pub fn issue_all_recorded(
    dir: &Path,
    ca: &FleetCa,
    validity: Validity,
    ca_dir: Option<&Path>,
) -> Result<usize> {
    let mut issued = 0;
    for path in list(dir, "csr")? {
        let crt = path.with_extension("crt");
        if crt.exists() {
            continue;
        }
        let csr = std::fs::read_to_string(&path)?;
        let cert = ca
            .issue_device(&csr, validity)
            .with_context(|| format!("issuing for {}", path.display()))?;
        if let Some(ca_dir) = ca_dir {
            aloft_certs::ledger::record_certs(ca_dir, &[&cert])?;
        }
        std::fs::write(&crt, cert)?;
        issued += 1;
    }
    std::fs::write(dir.join(CA_FILE), ca.cert_pem())?;
    Ok(issued)
}

fn list(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let devices = dir.join(DEVICES_DIR);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&devices)
        .with_context(|| format!("reading {}", devices.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Loads every device of `dir` that has a certificate, in id order, and the fleet CA.
pub fn load(dir: &Path) -> Result<(String, Vec<DeviceIdentity>)> {
    let ca_path = dir.join(CA_FILE);
    let ca = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("reading {}", ca_path.display()))?;
    let mut devices = Vec::new();
    for crt in list(dir, "crt")? {
        let Some(stem) = crt.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let id = DeviceId::new(stem).with_context(|| format!("{}", crt.display()))?;
        let cert_pem = std::fs::read_to_string(&crt)?;
        let key_pem = std::fs::read_to_string(crt.with_extension("key"))
            .with_context(|| format!("key of {id}"))?;
        let secret = std::fs::read_to_string(crt.with_extension("x25519"))
            .with_context(|| format!("x25519 key of {id}"))?;
        let secret: [u8; 32] = match hex::decode(secret.trim()).map(<[u8; 32]>::try_from) {
            Ok(Ok(b)) => b,
            _ => bail!("x25519 key of {id} is not 64 hex digits"),
        };
        devices.push(DeviceIdentity {
            id,
            key_pem,
            cert_pem,
            encryption_key: DeviceEncryptionKey::from_bytes(secret),
        });
    }
    Ok((ca, devices))
}
