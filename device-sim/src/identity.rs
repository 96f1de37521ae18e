//! A device's identity on disk: its TLS key and certificate, its X25519 encryption key, and the
//! CSR it sends to the fleet CA. Enrollment runs on the device: the private keys are generated
//! here and only the CSR leaves; the CA's certificate comes back beside it.
//!
//! Layout of a fleet directory (one file set per device, named by device id):
//! `ca.crt`, `devices/{id}.key` (TLS, PKCS#8 PEM), `devices/{id}.x25519` (hex secret),
//! `devices/{id}.csr`, `devices/{id}.crt`, or for a lab's simulated fleet one file
//! `devices/{prefix}.fleet` holding every device's keys and certificate ([`enroll_issued`]) and
//! `devices/{id}.crt` only once a device renewed its certificate, `root.json` (the root of trust the fleet is
//! provisioned with, if enrolled with one), and at run time `state/{id}.rec`
//! (the record, two copies rewritten in place; `state/{id}.json` from an older simulator is read
//! once), `state/{id}.slots`.

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

/// Where a renewed certificate of `id` is to be saved, if the device was loaded from `dir`: its
/// certificate file, or beside the fleet file it was enrolled into ([`enroll_issued`], whose
/// devices are named `{prefix}-{n}`), where [`load`] finds it.
pub fn renewed_cert_path(dir: &Path, id: &DeviceId) -> Option<PathBuf> {
    let crt = cert_path(dir, id);
    let in_fleet_file = || {
        id.as_str().rsplit_once('-').is_some_and(|(prefix, _)| {
            dir.join(DEVICES_DIR)
                .join(format!("{prefix}.{FLEET_EXT}"))
                .exists()
        })
    };
    (crt.exists() || in_fleet_file()).then_some(crt)
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

/// Enrolls devices `prefix-00000 … prefix-{count-1}` and has `ca` certify them, in one pass, for
/// a lab that plays both the devices and the CA. Each device generates its keys and its CSR as in
/// [`enroll`]; the CSR goes to the CA in memory (a lab has no courier to play) and only the
/// certificate comes back. The simulator keeps the flash of all its devices in one file,
/// `devices/{prefix}.fleet` (owner-only, read by [`load`]), rather than three files per device.
/// The work is spread over every core; returns the devices in id order.
///
/// Design: the file-per-step flow ([`enroll`], [`issue_all`], [`load`]) created four files per
/// device, listed the directory twice and read four files back; on an ext4 without a journal
/// whose block group has recently deleted inodes, each file creation scans the inode table and
/// creating files was 84% of enrollment time (docs/BENCHMARKS.md, S7). One file per fleet leaves
/// the key generation, the CSR signature and the CA's check and signature.
pub fn enroll_issued(
    dir: &Path,
    prefix: &str,
    count: usize,
    ca: &FleetCa,
    validity: Validity,
) -> Result<Vec<DeviceIdentity>> {
    std::fs::create_dir_all(dir.join(DEVICES_DIR))?;
    std::fs::write(dir.join(CA_FILE), ca.cert_pem())?;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(count.max(1));
    let per = count.div_ceil(workers.max(1));
    let parts: Vec<Result<Vec<DeviceIdentity>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let range = (w * per)..((w + 1) * per).min(count);
                s.spawn(move || {
                    range
                        .map(|n| enroll_one(&device_id(prefix, n)?, ca, validity))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an enrollment worker panicked")))
            })
            .collect()
    });
    let mut devices = Vec::with_capacity(count);
    for part in parts {
        devices.extend(part?);
    }
    let records: Vec<FleetRecord> = devices.iter().map(FleetRecord::of).collect();
    write_private(
        &dir.join(DEVICES_DIR).join(format!("{prefix}.{FLEET_EXT}")),
        &serde_json::to_vec(&records)?,
    )?;
    Ok(devices)
}

fn enroll_one(id: &DeviceId, ca: &FleetCa, validity: Validity) -> Result<DeviceIdentity> {
    let enc = DeviceEncryptionKey::generate()?;
    let csr = aloft_certs::device_csr(id, &enc.public_bytes()?)?;
    let cert_pem = ca
        .issue_device(&csr.csr_pem, validity)
        .with_context(|| format!("issuing for {id}"))?;
    Ok(DeviceIdentity {
        id: id.clone(),
        key_pem: csr.key_pem,
        cert_pem,
        encryption_key: enc,
    })
}

/// The extension of a fleet file written by [`enroll_issued`].
const FLEET_EXT: &str = "fleet";

/// One device in a fleet file.
#[derive(serde::Serialize, serde::Deserialize)]
struct FleetRecord {
    id: DeviceId,
    key_pem: String,
    cert_pem: String,
    x25519_hex: String,
}

impl FleetRecord {
    fn of(d: &DeviceIdentity) -> FleetRecord {
        FleetRecord {
            id: d.id.clone(),
            key_pem: d.key_pem.clone(),
            cert_pem: d.cert_pem.clone(),
            x25519_hex: hex::encode(d.encryption_key.secret_bytes()),
        }
    }

    fn identity(self) -> Result<DeviceIdentity> {
        let id = self.id;
        let secret =
            x25519_secret(&self.x25519_hex).with_context(|| format!("x25519 key of {id}"))?;
        Ok(DeviceIdentity {
            id,
            key_pem: self.key_pem,
            cert_pem: self.cert_pem,
            encryption_key: DeviceEncryptionKey::from_bytes(secret),
        })
    }
}

fn x25519_secret(hex_text: &str) -> Result<[u8; 32]> {
    match hex::decode(hex_text.trim()).map(<[u8; 32]>::try_from) {
        Ok(Ok(b)) => Ok(b),
        _ => bail!("not 64 hex digits"),
    }
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

/// Loads every device of `dir` that has a certificate, in id order, and the fleet CA: devices
/// with their own files and devices of fleet files ([`enroll_issued`]).
pub fn load(dir: &Path) -> Result<(String, Vec<DeviceIdentity>)> {
    let ca_path = dir.join(CA_FILE);
    let ca = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("reading {}", ca_path.display()))?;
    let mut devices = Vec::new();
    for pack in list(dir, FLEET_EXT)? {
        let records: Vec<FleetRecord> = serde_json::from_slice(&std::fs::read(&pack)?)
            .with_context(|| format!("reading {}", pack.display()))?;
        for r in records {
            let mut d = r.identity()?;
            // A certificate renewed since enrollment is saved where the device keeps it.
            if let Ok(renewed) = std::fs::read_to_string(cert_path(dir, &d.id)) {
                d.cert_pem = renewed;
            }
            devices.push(d);
        }
    }
    let in_packs: std::collections::HashSet<DeviceId> =
        devices.iter().map(|d| d.id.clone()).collect();
    for crt in list(dir, "crt")? {
        let Some(stem) = crt.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let id = DeviceId::new(stem).with_context(|| format!("{}", crt.display()))?;
        if !in_packs.contains(&id) {
            devices.push(load_one(&crt, id)?);
        }
    }
    devices.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    Ok((ca, devices))
}

/// The identity of `id` whose certificate is at `crt`, its keys beside it.
fn load_one(crt: &Path, id: DeviceId) -> Result<DeviceIdentity> {
    let cert_pem = std::fs::read_to_string(crt)?;
    let key_pem = std::fs::read_to_string(crt.with_extension("key"))
        .with_context(|| format!("key of {id}"))?;
    let secret = std::fs::read_to_string(crt.with_extension("x25519"))
        .with_context(|| format!("x25519 key of {id}"))?;
    let secret = x25519_secret(&secret).with_context(|| format!("x25519 key of {id}"))?;
    Ok(DeviceIdentity {
        id,
        key_pem,
        cert_pem,
        encryption_key: DeviceEncryptionKey::from_bytes(secret),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_enrolled_in_one_pass_loads_back_with_its_keys_and_a_renewed_certificate() {
        aloft_certs::tls::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let ca = FleetCa::create("Test CA", 30).unwrap();
        let enrolled = enroll_issued(tmp.path(), "dev", 5, &ca, Validity::days(1)).unwrap();
        let ids: Vec<String> = enrolled.iter().map(|d| d.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                "dev-00000",
                "dev-00001",
                "dev-00002",
                "dev-00003",
                "dev-00004"
            ]
        );
        // Device 2 renewed its certificate: it is saved beside the fleet file.
        let renewed = renewed_cert_path(tmp.path(), &enrolled[2].id).unwrap();
        std::fs::write(renewed, "renewed").unwrap();
        let stranger = DeviceId::new("other-00001").unwrap();
        assert_eq!(renewed_cert_path(tmp.path(), &stranger), None);

        let (ca_pem, loaded) = load(tmp.path()).unwrap();
        assert_eq!(ca_pem, ca.cert_pem());
        assert_eq!(loaded.len(), 5);
        for (a, b) in enrolled.iter().zip(&loaded) {
            assert_eq!(a.id, b.id);
            assert_eq!(a.key_pem, b.key_pem);
            assert_eq!(
                a.encryption_key.secret_bytes(),
                b.encryption_key.secret_bytes()
            );
        }
        assert_eq!(loaded[2].cert_pem, "renewed");
        assert_eq!(loaded[3].cert_pem, enrolled[3].cert_pem);
    }
}
