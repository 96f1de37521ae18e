//! The sealed file: a header of key slots, then the body sealed under the file's own random
//! master key. Files are replaced atomically and are readable by their owner only.
//!
//! ```text
//! magic "ALOFTVLT" (8) ‖ version u8 = 1 ‖ key slots (see `slots`) ‖ SHA-256 of all before (32)
//! ‖ body: nonce (12) ‖ AES-256-GCM ciphertext ‖ tag (16), associated data = the whole header
//! ```
//! The checksum only turns accidental damage into a precise message; the header's integrity
//! comes from the AEADs (each slot binds magic, version and its own parameters; the body binds
//! the whole header).

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::keys::{MasterKey, Protection, Unlock};
use crate::slots::{KeySlots, Reader};
use crate::{random_bytes, VaultError};

/// The first bytes of every sealed file.
pub const SEALED_MAGIC: &[u8; 8] = b"ALOFTVLT";
const VERSION: u8 = 1;

fn context() -> [u8; 9] {
    let mut c = [0u8; 9];
    c[..8].copy_from_slice(SEALED_MAGIC);
    c[8] = VERSION;
    c
}

/// Seals `plaintext` under a fresh master key locked as `protection` says.
pub fn seal(plaintext: &[u8], protection: &Protection) -> Result<Vec<u8>, VaultError> {
    let master = MasterKey::generate()?;
    let ctx = context();
    let slots = KeySlots::wrap(&master, protection, &ctx)?;
    let mut header = ctx.to_vec();
    slots.encode(&mut header);
    let digest = Sha256::digest(&header);
    header.extend_from_slice(&digest);
    let body = master.seal(&header, plaintext)?;
    header.extend_from_slice(&body);
    Ok(header)
}

/// Opens what [`seal`] made. Refuses weak KDF parameters, a damaged header, a wrong secret and
/// an altered body, each with its own error.
pub fn open_sealed(bytes: &[u8], unlock: &Unlock) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let ctx = context();
    if bytes.len() < 8 || &bytes[..8] != SEALED_MAGIC {
        return Err(VaultError::NotSealed);
    }
    let mut r = Reader {
        input: bytes,
        pos: 8,
    };
    let version = r.u8()?;
    if version != VERSION {
        return Err(VaultError::UnsupportedVersion(version));
    }
    let (slots, used) = KeySlots::decode(&bytes[r.pos..])?;
    r.pos += used;
    let header_end = r.pos;
    let digest = r.take(32)?;
    if Sha256::digest(&bytes[..header_end]).as_slice() != digest {
        return Err(VaultError::HeaderDamaged);
    }
    let master = slots.unwrap(unlock, &ctx)?;
    let header = &bytes[..r.pos];
    master.open(header, &bytes[r.pos..])
}

/// Seals `plaintext` into `path` (mode 0600, atomic). With `replace` false an existing file is
/// an error and is left untouched.
pub fn seal_file(
    path: &Path,
    plaintext: &[u8],
    protection: &Protection,
    replace: bool,
) -> Result<(), VaultError> {
    let sealed = seal(plaintext, protection)?;
    write_atomic(path, &sealed, 0o600, replace)
}

/// Reads and opens a sealed file.
pub fn open_file(path: &Path, unlock: &Unlock) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let bytes = std::fs::read(path).map_err(|e| VaultError::io(path, e))?;
    open_sealed(&bytes, unlock)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, created with
/// `mode`, written and fsynced, then renamed over `path` (or, with `replace` false, hard-linked
/// to it, which fails if `path` exists), then the directory is fsynced. A crash leaves either
/// the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, replace: bool) -> Result<(), VaultError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or(VaultError::Malformed("a file path is needed"))?
        .to_string_lossy();
    let mut suffix = [0u8; 6];
    random_bytes(&mut suffix)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", hex::encode(suffix)));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut f = opts.open(&tmp).map_err(|e| VaultError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| VaultError::io(&tmp, e))?;
        f.sync_all().map_err(|e| VaultError::io(&tmp, e))?;
        if replace {
            std::fs::rename(&tmp, path).map_err(|e| VaultError::io(path, e))?;
        } else {
            std::fs::hard_link(&tmp, path).map_err(|e| VaultError::io(path, e))?;
            let _ = std::fs::remove_file(&tmp);
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // The rename is durable only once the directory entry is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
