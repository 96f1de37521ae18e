//! The issuance ledger: one line per device certificate the fleet CA signs (device id, serial,
//! not_after), kept in `issued.jsonl` beside the CA key, so that revoking a device reaches every
//! certificate ever issued to its id, renewals included ([`crate::revocation::revoke_device`]).
//!
//! Design: append-only JSON lines under the CA directory's lock (`ca.lock`, [`CaDirLock`]).
//! Every writer (`aloft pki issue-device(s)`, the orchestrator's renewals) appends and syncs the
//! line *before* the certificate leaves, so a line lost to a crash belongs to a certificate
//! nobody received, and a torn last line can be cut off by the next writer. `pki revoke` holds
//! the same lock while it reads the ledger and writes `revocations.json`, and a renewal holds it
//! while it checks that the requesting certificate is not revoked, signs and appends: either the
//! renewal's line is in the ledger before the revocation reads it, or the renewal sees the
//! revocation and is refused. A ledger that cannot be read is an error (fail closed).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use aloft_proto::DeviceId;
use serde::{Deserialize, Serialize};

use crate::identity::normalize_serial;
use crate::revocation::parse_serial_hex;
use crate::PkiError;

/// File name of the issuance ledger inside a CA directory.
pub const LEDGER_FILE: &str = "issued.jsonl";

/// File name of the lock every reader-then-writer of the CA directory's state holds.
pub const LOCK_FILE: &str = "ca.lock";

/// Most bytes of a ledger read into memory (about 100 bytes a line: over 10 million
/// certificates). A bigger file is refused rather than read without bound.
const MAX_LEDGER_BYTES: u64 = 1 << 30;

/// One certificate the CA issued to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issued {
    pub device: DeviceId,
    /// Serial number, lowercase hex, no leading zero bytes.
    pub serial: String,
    /// End of the certificate's validity, Unix seconds.
    pub not_after: i64,
}

impl Issued {
    /// The ledger line of a device certificate (PEM) the CA just signed.
    pub fn of_cert(cert_pem: &str) -> Result<Self, PkiError> {
        let der = crate::pem::parse_cert(cert_pem)?;
        let identity = crate::parse_identity(der.as_ref())?;
        let device = identity
            .device_id()
            .ok_or(PkiError::CertificateMismatch("not a device certificate"))?;
        Ok(Issued {
            device,
            serial: identity.serial_hex(),
            not_after: identity.not_after,
        })
    }
}

/// The CA directory's lock, held until dropped (an advisory `flock` on `ca.lock`): a process
/// that dies releases it.
#[derive(Debug)]
pub struct CaDirLock {
    _file: File,
}

impl CaDirLock {
    /// Waits for the lock of the CA directory `ca_dir`.
    pub fn acquire(ca_dir: &Path) -> Result<Self, PkiError> {
        let path = ca_dir.join(LOCK_FILE);
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let write_err = |source| PkiError::Write {
            path: path.clone(),
            source,
        };
        let file = options.open(&path).map_err(write_err)?;
        file.lock().map_err(write_err)?;
        Ok(CaDirLock { _file: file })
    }
}

/// Appends `entries` to the ledger of `ca_dir` and syncs it. The caller holds `_lock` and hands
/// the certificates out only after this returned.
pub fn append(ca_dir: &Path, entries: &[Issued], _lock: &CaDirLock) -> Result<(), PkiError> {
    if entries.is_empty() {
        return Ok(());
    }
    let path = ca_dir.join(LEDGER_FILE);
    let write_err = |source| PkiError::Write {
        path: path.clone(),
        source,
    };
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o644);
    }
    let mut file = options.open(&path).map_err(write_err)?;
    cut_torn_tail(&mut file).map_err(write_err)?;
    let mut text = String::new();
    for e in entries {
        let line = serde_json::to_string(e).map_err(|e| PkiError::Ledger(e.to_string()))?;
        text.push_str(&line);
        text.push('\n');
    }
    file.seek(SeekFrom::End(0)).map_err(write_err)?;
    file.write_all(text.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

/// Records device certificates (PEM) the caller just signed: what `aloft pki issue-device(s)`
/// calls before it writes the certificate files.
pub fn record_certs(ca_dir: &Path, certs: &[&str]) -> Result<(), PkiError> {
    let entries = certs
        .iter()
        .map(|c| Issued::of_cert(c))
        .collect::<Result<Vec<_>, _>>()?;
    let lock = CaDirLock::acquire(ca_dir)?;
    append(ca_dir, &entries, &lock)
}

/// A line cut short by a crash mid-append ends without a newline; its certificate was never
/// handed out, so it is removed before anything is appended after it.
fn cut_torn_tail(file: &mut File) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Walk back to the previous newline in small steps: a torn line is one line long.
    let mut end = len - 1;
    let mut buf = [0u8; 256];
    loop {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
            return file.set_len(start + i as u64 + 1);
        }
        if start == 0 {
            return file.set_len(0);
        }
        end = start;
    }
}

/// Every entry of the ledger of `ca_dir`, oldest first; none if there is no ledger yet. A torn
/// last line (no newline) is skipped: its certificate was never handed out. Any other line that
/// does not parse is an error.
pub fn read(ca_dir: &Path) -> Result<Vec<Issued>, PkiError> {
    let path = ca_dir.join(LEDGER_FILE);
    let read_err = |source| PkiError::Read {
        path: path.clone(),
        source,
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_LEDGER_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_LEDGER_BYTES {
        return Err(PkiError::Ledger(format!(
            "{} is larger than {MAX_LEDGER_BYTES} bytes",
            path.display()
        )));
    }
    parse(&path, &bytes)
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Issued>, PkiError> {
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(i) => &bytes[..=i],
        None => &[][..],
    };
    let mut entries = Vec::new();
    for (n, line) in complete.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad =
            |why: String| PkiError::Ledger(format!("{} line {}: {why}", path.display(), n + 1));
        let entry: Issued = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
        parse_serial_hex(&entry.serial).map_err(|e| bad(e.to_string()))?;
        entries.push(entry);
    }
    Ok(entries)
}

/// The serial numbers (big-endian, no leading zero bytes) of every certificate the ledger of
/// `ca_dir` records for `device`.
pub fn serials_of(ca_dir: &Path, device: &DeviceId) -> Result<Vec<Vec<u8>>, PkiError> {
    read(ca_dir)?
        .into_iter()
        .filter(|e| &e.device == device)
        .map(|e| parse_serial_hex(&e.serial).map(|s| normalize_serial(&s)))
        .collect()
}

/// Adds to the ledger of `ca_dir` every entry of the ledger of `other_dir` it lacks (by serial);
/// returns how many. What a backup restore calls, so that restoring an older CA directory never
/// forgets a certificate issued since: `pki revoke --device` must still reach it.
pub fn merge_from(ca_dir: &Path, other_dir: &Path) -> Result<usize, PkiError> {
    let lock = CaDirLock::acquire(ca_dir)?;
    let ours: std::collections::HashSet<String> =
        read(ca_dir)?.into_iter().map(|e| e.serial).collect();
    let missing: Vec<Issued> = read(other_dir)?
        .into_iter()
        .filter(|e| !ours.contains(&e.serial))
        .collect();
    append(ca_dir, &missing, &lock)?;
    Ok(missing.len())
}

/// Where the ledger of `ca_dir` is.
pub fn path(ca_dir: &Path) -> PathBuf {
    ca_dir.join(LEDGER_FILE)
}

#[cfg(test)]
mod tests;
