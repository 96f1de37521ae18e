//! End-to-end encrypted backups of a data directory, and restores that never lower security
//! state. The orchestrator must be stopped for both: sled holds an exclusive lock on the
//! store, and a backup is consistent only if nothing writes while it is taken.
//!
//! A backup is one file: a plaintext header, then every file of the data directory (sealed
//! keys stay sealed, as they are) and every store record, encrypted with STREAM
//! (`aloft_vault::stream`) in 64 KiB segments under a fresh random backup key. The backup key
//! is wrapped by a fresh recovery key and optionally a passphrase (Argon2id).
//!
//! ```text
//! header: magic "ALOFTBAK" ‖ format u16 = 1 ‖ created unix secs u64 ‖ backup sequence u64
//!         ‖ segment bytes u32 ‖ STREAM nonce prefix [7] ‖ key slots ‖ SHA-256 of all before
//! body (STREAM, associated data = the whole header), a sequence of entries:
//!   'F' path_len u16 ‖ path (UTF-8, '/'-separated, relative) ‖ mode u32 ‖ len u64 ‖ bytes
//!   'R' tree_len u16 ‖ tree ‖ key_len u32 ‖ key ‖ value_len u32 ‖ value
//!   'E' files u64 ‖ records u64          (the last entry; the stream's final segment follows)
//! ```
//! Restore decrypts everything into a staging directory inside the data directory first, and
//! touches nothing else until the whole stream has authenticated; then it merges the surviving
//! security state (`RestoreReport`) and swaps the staged files in, moving the old ones to
//! `.pre-restore-<seq>-<time>/`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use aloft_vault::stream::{self, StreamReader, StreamWriter, NONCE_PREFIX_LEN, SEGMENT_BYTES};
use aloft_vault::{KeySlots, MasterKey, Protection, Unlock, VaultError};
use sha2::{Digest, Sha256};

use crate::config::layout;
use crate::store::{MergeReport, RawRecord, RawStore, StoreError, StoreLocation};

const MAGIC: &[u8; 8] = b"ALOFTBAK";
const FORMAT: u16 = 1;
const ENTRY_FILE: u8 = b'F';
const ENTRY_RECORD: u8 = b'R';
const ENTRY_END: u8 = b'E';
/// Largest single file a backup carries; data-directory files are small.
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Top-level names a backup skips besides the live store: restore leftovers.
const STAGING_PREFIX: &str = ".restore-staging-";
const PRE_RESTORE_PREFIX: &str = ".pre-restore-";

/// Why a backup or a restore failed. A failed restore has changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0} is not an orchestrator data directory (no keystore)")]
    NotADataDir(PathBuf),
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("not an aloft backup")]
    NotABackup,
    #[error("unsupported backup format {0}")]
    UnsupportedFormat(u16),
    #[error("the backup header is damaged or was altered")]
    HeaderDamaged,
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("the backup is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("merging the surviving CA directory's records: {0}")]
    Pki(#[from] aloft_certs::PkiError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |error| BackupError::Io {
        path: path.to_owned(),
        error,
    }
}

/// An I/O error from the encrypted stream: the vault's verdict when there is one.
fn stream_err(path: &Path, e: std::io::Error) -> BackupError {
    if let Some(v) = stream::vault_error(&e) {
        return BackupError::Vault(match v {
            VaultError::Truncated => VaultError::Truncated,
            VaultError::SegmentAuth(i) => VaultError::SegmentAuth(*i),
            VaultError::StreamTooLong => VaultError::StreamTooLong,
            _ => VaultError::Tampered,
        });
    }
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return BackupError::Vault(VaultError::Truncated);
    }
    io_err(path)(e)
}

/// The authenticated header of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupHeader {
    pub created_unix_secs: u64,
    /// Monotonic per data directory (`layout::BACKUP_SEQ`).
    pub seq: u64,
    pub segment_bytes: u32,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

/// What `create` wrote.
#[derive(Debug, Clone)]
pub struct BackupSummary {
    pub seq: u64,
    pub files: u64,
    pub records: u64,
    pub bytes: u64,
}

/// What `restore` did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    pub seq: u64,
    pub created_unix_secs: u64,
    pub files: u64,
    pub records: u64,
    /// Where the previous contents of the data directory went, if there were any.
    pub previous: Option<PathBuf>,
    /// With a PostgreSQL store: where its previous records went (a sled store), if it held one.
    pub previous_store: Option<PathBuf>,
    /// Security state taken from the surviving store.
    pub merged: MergeReport,
    /// Files whose surviving version was kept because it was newer (CRL, root metadata, trust).
    pub kept_surviving: Vec<String>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_seq(data_dir: &Path) -> Result<u64, BackupError> {
    let path = data_dir.join(layout::BACKUP_SEQ);
    match std::fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| BackupError::Malformed(format!("{} is not a number", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn write_seq(data_dir: &Path, seq: u64) -> Result<(), BackupError> {
    let path = data_dir.join(layout::BACKUP_SEQ);
    aloft_vault::write_atomic(&path, format!("{seq}\n").as_bytes(), 0o600, true)?;
    Ok(())
}

fn encode_header(h: &BackupHeader, slots: &KeySlots) -> Vec<u8> {
    let mut out = fixed_header(h);
    slots.encode(&mut out);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// The header before the key slots: also the context each slot's wrap is bound to.
fn fixed_header(h: &BackupHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_be_bytes());
    out.extend_from_slice(&h.created_unix_secs.to_be_bytes());
    out.extend_from_slice(&h.seq.to_be_bytes());
    out.extend_from_slice(&h.segment_bytes.to_be_bytes());
    out.extend_from_slice(&h.nonce_prefix);
    out
}

const FIXED_LEN: usize = 8 + 2 + 8 + 8 + 4 + NONCE_PREFIX_LEN;

/// A header as read: its fields, key slots, bytes (the STREAM's associated data), and what was
/// read past it (the start of the stream: the reader has no push-back).
struct ReadHeader {
    header: BackupHeader,
    slots: KeySlots,
    bytes: Vec<u8>,
    overshoot: Vec<u8>,
}

/// Reads and checks a header.
fn read_header(r: &mut impl Read, path: &Path) -> Result<ReadHeader, BackupError> {
    let mut fixed = [0u8; FIXED_LEN];
    r.read_exact(&mut fixed).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            BackupError::NotABackup
        } else {
            io_err(path)(e)
        }
    })?;
    if &fixed[..8] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let be = |a: usize, n: usize| {
        fixed[a..a + n]
            .iter()
            .fold(0u64, |acc, b| acc << 8 | u64::from(*b))
    };
    let format = be(8, 2) as u16;
    if format != FORMAT {
        return Err(BackupError::UnsupportedFormat(format));
    }
    let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
    nonce_prefix.copy_from_slice(&fixed[30..30 + NONCE_PREFIX_LEN]);
    let header = BackupHeader {
        created_unix_secs: be(10, 8),
        seq: be(18, 8),
        segment_bytes: be(26, 4) as u32,
        nonce_prefix,
    };
    if !(1024..=16 * 1024 * 1024).contains(&header.segment_bytes) {
        return Err(BackupError::HeaderDamaged);
    }
    // Key slots are at most 1 + 2 × (1 + 12 + 16 + 60) bytes; read the most they can be and
    // let the decoder say how much it used. A short read near the end is fine: the digest
    // check below decides.
    let mut rest = vec![0u8; 256 + 32];
    let mut have = 0;
    while have < rest.len() {
        match r.read(&mut rest[have..]).map_err(io_err(path))? {
            0 => break,
            n => have += n,
        }
    }
    rest.truncate(have);
    let (slots, used) = KeySlots::decode(&rest).map_err(|e| match e {
        VaultError::WeakKdf(_) | VaultError::KdfOutOfRange(_) => BackupError::Vault(e),
        _ => BackupError::HeaderDamaged,
    })?;
    let digest = rest
        .get(used..used + 32)
        .ok_or(BackupError::HeaderDamaged)?;
    let mut bytes = fixed.to_vec();
    bytes.extend_from_slice(&rest[..used]);
    if Sha256::digest(&bytes).as_slice() != digest {
        return Err(BackupError::HeaderDamaged);
    }
    bytes.extend_from_slice(digest);
    Ok(ReadHeader {
        header,
        slots,
        bytes,
        overshoot: rest[used + 32..].to_vec(),
    })
}

/// Reads the header of the backup at `path` (no secret needed), e.g. to show its sequence.
pub fn inspect(path: &Path) -> Result<BackupHeader, BackupError> {
    let mut f = BufReader::new(File::open(path).map_err(io_err(path))?);
    Ok(read_header(&mut f, path)?.header)
}

/// Checks that `create` can start: a data directory, its store not in use, `out` free. For a
/// command line that wants to fail before it makes and shows a recovery key.
pub fn preflight(data_dir: &Path, out: &Path) -> Result<(), BackupError> {
    preflight_at(data_dir, &sled_store(data_dir), out)
}

/// [`preflight`] with the store at `store`.
pub fn preflight_at(data_dir: &Path, store: &StoreLocation, out: &Path) -> Result<(), BackupError> {
    if !data_dir.join(layout::KEYSTORE).is_file() {
        return Err(BackupError::NotADataDir(data_dir.to_owned()));
    }
    if out.symlink_metadata().is_ok() {
        return Err(BackupError::Exists(out.to_owned()));
    }
    open_existing(store)?;
    Ok(())
}

/// The data directory's own sled store.
fn sled_store(data_dir: &Path) -> StoreLocation {
    StoreLocation::Sled(data_dir.join(layout::STORE_DIR))
}

/// The store at `at`, which must hold one (a PostgreSQL database with only an empty schema
/// does not).
fn open_existing(at: &StoreLocation) -> Result<RawStore, BackupError> {
    let store = RawStore::open_at(at)?;
    if !store.holds_store()? {
        return Err(match at {
            StoreLocation::Sled(_) => StoreError::NoKeyCheck,
            StoreLocation::Postgres(_) => StoreError::MissingDatabase(at.to_string()),
        }
        .into());
    }
    Ok(store)
}

/// Writes a backup of the stopped orchestrator's `data_dir` to `out` (a new file).
pub fn create(
    data_dir: &Path,
    out: &Path,
    protection: &Protection,
) -> Result<BackupSummary, BackupError> {
    create_at(data_dir, &sled_store(data_dir), out, protection)
}

/// [`create`] with the store at `store` (the data directory's, or a PostgreSQL database).
pub fn create_at(
    data_dir: &Path,
    store: &StoreLocation,
    out: &Path,
    protection: &Protection,
) -> Result<BackupSummary, BackupError> {
    if !data_dir.join(layout::KEYSTORE).is_file() {
        return Err(BackupError::NotADataDir(data_dir.to_owned()));
    }
    if out.symlink_metadata().is_ok() {
        return Err(BackupError::Exists(out.to_owned()));
    }
    // Opening the store first refuses a running orchestrator before anything is written.
    let store = open_existing(store)?;
    let seq = read_seq(data_dir)? + 1;
    // The number is spent before the file exists: a failed backup skips it, none repeats it.
    write_seq(data_dir, seq)?;

    let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
    getrandom::fill(&mut nonce_prefix).map_err(|_| VaultError::Randomness)?;
    let header = BackupHeader {
        created_unix_secs: now_secs(),
        seq,
        segment_bytes: SEGMENT_BYTES as u32,
        nonce_prefix,
    };
    let key = MasterKey::generate()?;
    let slots = KeySlots::wrap(&key, protection, &fixed_header(&header))?;
    let header_bytes = encode_header(&header, &slots);

    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = BufWriter::new(opts.open(&tmp).map_err(io_err(&tmp))?);
        file.write_all(&header_bytes).map_err(io_err(&tmp))?;
        let mut w = StreamWriter::new(
            &key,
            nonce_prefix,
            header_bytes.clone(),
            SEGMENT_BYTES,
            file,
        );
        let (files, records) = write_entries(&mut w, data_dir, &store, &tmp)?;
        let file = w.finish().map_err(io_err(&tmp))?;
        let file = file
            .into_inner()
            .map_err(|e| io_err(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err(&tmp))?;
        let bytes = file.metadata().map_err(io_err(&tmp))?.len();
        // A hard link refuses to replace a file that appeared meanwhile.
        std::fs::hard_link(&tmp, out).map_err(io_err(out))?;
        Ok(BackupSummary {
            seq,
            files,
            records,
            bytes,
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    result
}

fn put_bytes(w: &mut impl Write, len_bytes: usize, data: &[u8]) -> std::io::Result<()> {
    let len = data.len() as u64;
    w.write_all(&len.to_be_bytes()[8 - len_bytes..])?;
    w.write_all(data)
}

fn write_entries<W: Write>(
    w: &mut StreamWriter<W>,
    data_dir: &Path,
    store: &RawStore,
    tmp: &Path,
) -> Result<(u64, u64), BackupError> {
    let mut files = 0u64;
    for rel in data_files(data_dir)? {
        let path = data_dir.join(&rel);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let mode = file_mode(&path);
        let name = rel_to_string(&rel)?;
        (|| {
            w.write_all(&[ENTRY_FILE])?;
            put_bytes(w, 2, name.as_bytes())?;
            w.write_all(&mode.to_be_bytes())?;
            put_bytes(w, 8, &bytes)
        })()
        .map_err(io_err(tmp))?;
        files += 1;
    }
    let mut records = 0u64;
    store.export(|r: RawRecord| {
        (|| {
            w.write_all(&[ENTRY_RECORD])?;
            put_bytes(w, 2, &r.tree)?;
            put_bytes(w, 4, &r.key)?;
            put_bytes(w, 4, &r.value)
        })()
        .map_err(io_err(tmp))?;
        records += 1;
        Ok::<(), BackupError>(())
    })?;
    w.write_all(&[ENTRY_END]).map_err(io_err(tmp))?;
    w.write_all(&files.to_be_bytes()).map_err(io_err(tmp))?;
    w.write_all(&records.to_be_bytes()).map_err(io_err(tmp))?;
    Ok((files, records))
}

#[cfg(unix)]
fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o600)
}

#[cfg(not(unix))]
fn file_mode(_: &Path) -> u32 {
    0o600
}

fn rel_to_string(rel: &Path) -> Result<String, BackupError> {
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    parts
        .map(|p| p.join("/"))
        .ok_or_else(|| BackupError::Malformed(format!("{} is not UTF-8", rel.display())))
}

/// Every regular file under `data_dir` (relative paths, sorted), except the live store, the
/// backup counter and restore leftovers. Symbolic links are not followed.
fn data_files(data_dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = data_dir.join(&rel);
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            let name_s = name.to_string_lossy();
            if rel.as_os_str().is_empty()
                && (name_s == layout::STORE_DIR
                    || name_s == layout::BACKUP_SEQ
                    || name_s.starts_with(STAGING_PREFIX)
                    || name_s.starts_with(PRE_RESTORE_PREFIX))
            {
                continue;
            }
            // Atomic-write leftovers of a crash are not state.
            if name_s.starts_with('.') && name_s.contains(".tmp-") {
                continue;
            }
            let ty = entry.file_type().map_err(io_err(&dir))?;
            if ty.is_dir() {
                stack.push(rel.join(&name));
            } else if ty.is_file() {
                out.push(rel.join(&name));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A relative path from a backup, checked: no absolute paths, no `..`, nothing inside the
/// store or outside the data directory.
fn safe_rel(name: &str) -> Result<PathBuf, BackupError> {
    let p = PathBuf::from(name);
    let ok = !name.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && p.components().next().map(|c| c.as_os_str()) != Some(layout::STORE_DIR.as_ref());
    if !ok {
        return Err(BackupError::Malformed(format!("unsafe path {name:?}")));
    }
    Ok(p)
}

fn get(r: &mut impl Read, n: usize, path: &Path) -> Result<Vec<u8>, BackupError> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).map_err(|e| stream_err(path, e))?;
    Ok(buf)
}

fn get_len(
    r: &mut impl Read,
    len_bytes: usize,
    max: u64,
    path: &Path,
) -> Result<usize, BackupError> {
    let b = get(r, len_bytes, path)?;
    let n = b.iter().fold(0u64, |acc, x| acc << 8 | u64::from(*x));
    if n > max {
        return Err(BackupError::Malformed(format!("a length of {n} bytes")));
    }
    Ok(n as usize)
}

/// Restores the backup at `input` into `data_dir` (created if missing), opened with `unlock`.
/// The orchestrator must be stopped. Where `data_dir` already holds state, the higher security
/// state wins (see the module docs and `RestoreReport`).
pub fn restore(
    input: &Path,
    data_dir: &Path,
    unlock: &Unlock,
) -> Result<RestoreReport, BackupError> {
    restore_at(input, data_dir, &sled_store(data_dir), unlock)
}

/// [`restore`] with the store at `store`. A PostgreSQL store is replaced in one transaction
/// once the whole backup has authenticated and merged; its previous records are first copied
/// into a sled store in `.pre-restore-<seq>-<time>-store/` (`RestoreReport::previous_store`).
pub fn restore_at(
    input: &Path,
    data_dir: &Path,
    store: &StoreLocation,
    unlock: &Unlock,
) -> Result<RestoreReport, BackupError> {
    let mut f = BufReader::new(File::open(input).map_err(io_err(input))?);
    let ReadHeader {
        header,
        slots,
        bytes: header_bytes,
        overshoot,
    } = read_header(&mut f, input)?;
    let key = slots.unwrap(unlock, &fixed_header(&header))?;

    let created_dir = !data_dir.exists();
    if created_dir {
        std::fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
        restrict_dir(data_dir)?;
    }
    // Holding the surviving store open keeps `aloft serve` from starting mid-restore, and a
    // running one makes this fail here, before anything is written. A PostgreSQL database is
    // held (its lock) even when it holds no store yet: the restore writes into it.
    let database = match store {
        StoreLocation::Postgres(_) => Some(RawStore::open_at(store)?),
        StoreLocation::Sled(_) => None,
    };
    let surviving_sled = match store {
        StoreLocation::Sled(dir) if dir.exists() => Some(RawStore::open(dir)?),
        _ => None,
    };
    let database_holds_store = match &database {
        Some(db) => db.holds_store()?,
        None => false,
    };
    let surviving: Option<&RawStore> = match &database {
        Some(db) if database_holds_store => Some(db),
        _ => surviving_sled.as_ref(),
    };
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|_| VaultError::Randomness)?;
    let staging = data_dir.join(format!("{STAGING_PREFIX}{}", hex::encode(suffix)));
    let result = (|| {
        std::fs::create_dir(&staging).map_err(io_err(&staging))?;
        restrict_dir(&staging)?;
        let body = std::io::Cursor::new(overshoot).chain(f);
        let mut r = StreamReader::new(
            &key,
            header.nonce_prefix,
            header_bytes,
            header.segment_bytes as usize,
            body,
        );
        let staged_store = RawStore::create(&staging.join(layout::STORE_DIR))?;
        let (files, records) = read_entries(&mut r, &staging, &staged_store, input)?;
        let mut report = RestoreReport {
            seq: header.seq,
            created_unix_secs: header.created_unix_secs,
            files,
            records,
            ..RestoreReport::default()
        };
        if let Some(surviving) = surviving {
            report.merged = staged_store.merge_security_state(surviving)?;
        }
        staged_store.flush()?;
        report.kept_surviving = merge_files(data_dir, &staging)?;
        let seq = read_seq(data_dir)?.max(header.seq);
        aloft_vault::write_atomic(
            &staging.join(layout::BACKUP_SEQ),
            format!("{seq}\n").as_bytes(),
            0o600,
            true,
        )?;
        if let Some(db) = &database {
            // The last step that can fail before the files are swapped in, and one
            // transaction: a failure leaves the database as it was.
            report.previous_store = replace_database(
                db,
                database_holds_store,
                &staged_store,
                data_dir,
                header.seq,
            )?;
            drop(staged_store);
            // The staged sled copy must not land in the data directory beside the database.
            if let Err(error) = std::fs::remove_dir_all(staging.join(layout::STORE_DIR)) {
                tracing::warn!(%error, "removing the staged copy of the restored store");
            }
        }
        Ok(report)
    })();
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            drop(surviving_sled);
            drop(database);
            let _ = std::fs::remove_dir_all(&staging);
            if created_dir {
                let _ = std::fs::remove_dir(data_dir);
            }
            return Err(e);
        }
    };
    drop(surviving_sled);
    drop(database);
    report.previous = swap_in(data_dir, &staging, header.seq)?;
    Ok(report)
}

/// Replaces a PostgreSQL store's records by the restored ones (one transaction), after
/// copying its previous records, if it held a store, into a sled store in
/// `.pre-restore-<seq>-<time>-store/` beside the data directory's other leftovers; returns
/// that directory.
fn replace_database(
    db: &RawStore,
    held_store: bool,
    restored: &RawStore,
    data_dir: &Path,
    seq: u64,
) -> Result<Option<PathBuf>, BackupError> {
    let previous = if held_store {
        let dir = data_dir.join(format!("{PRE_RESTORE_PREFIX}{seq}-{}-store", now_secs()));
        std::fs::create_dir(&dir).map_err(io_err(&dir))?;
        restrict_dir(&dir)?;
        let copy = (|| {
            let copy = RawStore::create(&dir.join(layout::STORE_DIR))?;
            db.export(|r| copy.insert(&r))?;
            copy.flush()
        })();
        if let Err(e) = copy {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        Some(dir)
    } else {
        None
    };
    db.replace_with(restored)?;
    Ok(previous)
}

/// Creates `dir` and its parents, owner-only (they may hold keys).
fn create_dirs(dir: &Path) -> Result<(), BackupError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent)?;
    }
    std::fs::create_dir(dir).map_err(io_err(dir))?;
    restrict_dir(dir)
}

fn restrict_dir(dir: &Path) -> Result<(), BackupError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir))?;
    }
    Ok(())
}

fn read_entries<R: Read>(
    r: &mut StreamReader<R>,
    staging: &Path,
    store: &RawStore,
    input: &Path,
) -> Result<(u64, u64), BackupError> {
    let (mut files, mut records) = (0u64, 0u64);
    loop {
        let tag = get(r, 1, input)?[0];
        match tag {
            ENTRY_FILE => {
                let n = get_len(r, 2, 4096, input)?;
                let name = String::from_utf8(get(r, n, input)?)
                    .map_err(|_| BackupError::Malformed("a path that is not UTF-8".into()))?;
                let rel = safe_rel(&name)?;
                let mode = u32::from_be_bytes(
                    get(r, 4, input)?
                        .try_into()
                        .map_err(|_| BackupError::Malformed("mode".into()))?,
                );
                let len = get_len(r, 8, MAX_FILE_BYTES, input)?;
                let bytes = get(r, len, input)?;
                let path = staging.join(&rel);
                if let Some(parent) = path.parent() {
                    create_dirs(parent)?;
                }
                // Never more permissive than owner read/write, whatever the backup says.
                aloft_vault::write_atomic(&path, &bytes, mode & 0o644, false)?;
                files += 1;
            }
            ENTRY_RECORD => {
                let n = get_len(r, 2, 1024, input)?;
                let tree = get(r, n, input)?;
                let n = get_len(r, 4, MAX_FILE_BYTES, input)?;
                let key = get(r, n, input)?;
                let n = get_len(r, 4, MAX_FILE_BYTES, input)?;
                let value = get(r, n, input)?;
                store.insert(&RawRecord { tree, key, value })?;
                records += 1;
            }
            ENTRY_END => {
                let counts = get(r, 16, input)?;
                let want_files = u64::from_be_bytes(counts[..8].try_into().unwrap_or_default());
                let want_records = u64::from_be_bytes(counts[8..].try_into().unwrap_or_default());
                if (want_files, want_records) != (files, records) {
                    return Err(BackupError::Malformed("entry counts do not match".into()));
                }
                // Only the final segment proves the stream is whole: read to it.
                let mut rest = Vec::new();
                r.read_to_end(&mut rest).map_err(|e| stream_err(input, e))?;
                if !rest.is_empty() {
                    return Err(BackupError::Malformed("data after the end entry".into()));
                }
                return Ok((files, records));
            }
            other => {
                return Err(BackupError::Malformed(format!(
                    "unknown entry {other:#04x}"
                )));
            }
        }
    }
}

/// Brings surviving files that hold newer security state into the staging directory; returns
/// their names. Rules: `crl.pem` with the higher CRL number; files under `trust/` (one accepted
/// root version per file, `root-<N>.json`): the surviving copy, and the union of both sides, so
/// the newest root either side accepted stays trusted; any file only the survivor has: kept; the
/// CA directory's issuance ledger and revocation state: the union of both. Keys,
/// certificates and the keystore come from the backup (the store's sealed content keys need
/// the backup's keystore).
fn merge_files(data_dir: &Path, staging: &Path) -> Result<Vec<String>, BackupError> {
    let mut kept = Vec::new();
    for rel in data_files(data_dir)? {
        let ours = data_dir.join(&rel);
        let staged = staging.join(&rel);
        let name = rel_to_string(&rel)?;
        let keep_surviving = if !staged.exists() {
            true
        } else if name == layout::CRL {
            surviving_crl_is_newer(&ours, &staged)
        } else if is_root_metadata(&rel) {
            surviving_root_is_newer(&ours, &staged)
        } else {
            name.starts_with("trust/")
        };
        if keep_surviving {
            let bytes = std::fs::read(&ours).map_err(io_err(&ours))?;
            if let Some(parent) = staged.parent() {
                create_dirs(parent)?;
            }
            aloft_vault::write_atomic(&staged, &bytes, file_mode(&ours), true)?;
            kept.push(name);
        }
    }
    kept.extend(merge_ca_records(
        &data_dir.join(layout::PKI_DIR),
        &staging.join(layout::PKI_DIR),
    )?);
    Ok(kept)
}

/// The CA directory's records only grow: the restored issuance ledger gets every certificate
/// the surviving one recorded since the backup (so `pki revoke --device` still reaches them), and
/// the restored revocation state every surviving revocation and the higher CRL number.
fn merge_ca_records(ours: &Path, staged: &Path) -> Result<Vec<String>, BackupError> {
    let mut merged = Vec::new();
    if !ours.is_dir() || !staged.is_dir() {
        return Ok(merged);
    }
    if aloft_certs::ledger::merge_from(staged, ours)? > 0 {
        merged.push(format!(
            "{}/{} (merged)",
            layout::PKI_DIR,
            aloft_certs::ledger::LEDGER_FILE
        ));
    }
    let mut state = aloft_certs::revocation::RevocationState::load(staged)?;
    if state.merge(&aloft_certs::revocation::RevocationState::load(ours)?) {
        state.save(staged)?;
        merged.push(format!(
            "{}/{} (merged)",
            layout::PKI_DIR,
            aloft_certs::revocation::REVOCATIONS_FILE
        ));
    }
    Ok(merged)
}

fn is_root_metadata(rel: &Path) -> bool {
    rel.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".json") && (n.starts_with("root") || n.contains(".root")))
}

/// When in doubt (an unreadable side), the surviving file is kept: a restore must not lower
/// trust state it cannot compare.
fn surviving_crl_is_newer(ours: &Path, staged: &Path) -> bool {
    let number = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|pem| aloft_certs::crl_number(&pem).ok().flatten())
    };
    match (number(ours), number(staged)) {
        (Some(a), Some(b)) => !aloft_certs::newer_crl_number(&b, &a),
        (_, None) => true,
        (None, Some(_)) => false,
    }
}

fn surviving_root_is_newer(ours: &Path, staged: &Path) -> bool {
    let version = |p: &Path| -> Option<u64> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
        v.get("signed")
            .and_then(|s| s.get("version"))
            .or_else(|| v.get("version"))
            .and_then(serde_json::Value::as_u64)
    };
    match (version(ours), version(staged)) {
        (Some(a), Some(b)) => a >= b,
        (_, None) => true,
        (None, Some(_)) => false,
    }
}

/// Moves the data directory's current entries into `.pre-restore-<seq>-<time>/` and the staged
/// ones into their place. Each step is a rename within one file system; a crash in between
/// leaves every file in one of the two directories.
fn swap_in(data_dir: &Path, staging: &Path, seq: u64) -> Result<Option<PathBuf>, BackupError> {
    let staging_name = staging
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_default();
    let current: Vec<_> = std::fs::read_dir(data_dir)
        .map_err(io_err(data_dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| *n != staging_name && !n.to_string_lossy().starts_with(PRE_RESTORE_PREFIX))
        .collect();
    let previous = if current.is_empty() {
        None
    } else {
        let pre = data_dir.join(format!("{PRE_RESTORE_PREFIX}{seq}-{}", now_secs()));
        std::fs::create_dir(&pre).map_err(io_err(&pre))?;
        restrict_dir(&pre)?;
        for name in &current {
            std::fs::rename(data_dir.join(name), pre.join(name)).map_err(io_err(&pre))?;
        }
        Some(pre)
    };
    for entry in std::fs::read_dir(staging).map_err(io_err(staging))? {
        let entry = entry.map_err(io_err(staging))?;
        std::fs::rename(entry.path(), data_dir.join(entry.file_name()))
            .map_err(io_err(data_dir))?;
    }
    std::fs::remove_dir(staging).map_err(io_err(staging))?;
    if let Ok(d) = File::open(data_dir) {
        let _ = d.sync_all();
    }
    Ok(previous)
}

#[cfg(test)]
mod tests;
