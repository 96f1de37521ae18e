//! The device's persistent record: anti-rollback floor, slot table, the campaign in progress
//! (its job, phase, next report number and which chunks are written), the report outbox, the
//! last finished campaigns, which campaign installed the running image, and what the device has
//! learnt from signed metadata: the newest root of trust it accepted, the latest signed time it
//! has seen, and the sequence number of the manifest it installed last. [`DeviceStore`]
//! saves it.
//!
//! Two file stores keep it on disk. [`RecordFileStore`], what the simulator uses, keeps two
//! checksummed copies in one file and overwrites the older copy in place, as a device's
//! record partition would: a crash mid-write leaves the other copy, and a save creates no file
//! (creating a temporary file per save cost a sixth of all CPU in a 1,000-device campaign on
//! ext4, see docs/BENCHMARKS.md). The file may be the device's own or a place in a file the
//! whole simulated fleet shares (`fleet_files`). [`JsonFileStore`] replaces a JSON file
//! atomically (temporary file + rename); `RecordFileStore` reads it once as a legacy record.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aloft_proto::messages::{Job, StatusReport};
use aloft_proto::trust::TrustedRoot;
use aloft_proto::{CampaignId, DeviceState, Reason, SecurityVersion};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::slots::SlotTable;

/// How many finished campaigns a device remembers, to recognise redelivered jobs.
pub const FINISHED_HISTORY: usize = 16;

/// Which chunks of an image are verified and written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkBitmap {
    len: u32,
    words: Vec<u64>,
}

impl ChunkBitmap {
    pub fn new(len: u32) -> Self {
        ChunkBitmap {
            len,
            words: vec![0; (len as usize).div_ceil(64)],
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len
            && self
                .words
                .get(i as usize / 64)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn set(&mut self, i: u32) {
        if i < self.len {
            if let Some(w) = self.words.get_mut(i as usize / 64) {
                *w |= 1 << (i % 64);
            }
        }
    }

    pub fn count(&self) -> u32 {
        // `set` never sets a bit at or beyond `len`, so counting whole words is exact.
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.count() == self.len
    }

    /// Indices not yet set, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| !self.get(i))
    }

    /// True if the bitmap is well formed (a stored record may have been tampered with or cut).
    pub fn is_consistent(&self) -> bool {
        let stray = match (self.len % 64, self.words.last()) {
            (0, _) | (_, None) => false,
            (used, Some(last)) => last >> used != 0,
        };
        self.words.len() == (self.len as usize).div_ceil(64) && !stray
    }
}

/// The campaign a device is working on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignProgress {
    pub campaign: CampaignId,
    /// The accepted job, kept so the content key can be unwrapped again after a restart.
    pub job: Job,
    /// The last state reached: one of downloading, downloaded, installing, rebooting, verifying.
    pub phase: DeviceState,
    /// The `seq` of this campaign's next report.
    pub next_seq: u32,
    /// Chunks verified and written to the update slot (of the delta's patch while `delta` is
    /// set, else of the image).
    pub written: ChunkBitmap,
    /// (1.5) The delta being downloaded or rebuilt instead of the full image, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaProgress>,
    /// (1.5) Set while the manifest's preconditions do not hold: the deferral reason last
    /// reported. The phase stays where the campaign stopped (`downloading` or `downloaded`),
    /// with everything written so far kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<Reason>,
}

/// (1.5) A campaign taking a delta: which of the job's offers, and whether the rebuild has
/// begun (from then on the patch in the update slot is being overwritten, so a power loss
/// falls back to the full image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaProgress {
    /// Index into the job's `deltas`.
    pub offer: usize,
    pub rebuilding: bool,
}

/// A campaign the device is done with, and the report that closed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedCampaign {
    pub campaign: CampaignId,
    pub state: DeviceState,
    pub reason: Option<Reason>,
    pub final_report: StatusReport,
    /// True once the orchestrator acknowledged `final_report`.
    pub acked: bool,
}

/// Everything a device keeps across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The anti-rollback floor: the highest security version confirmed running.
    pub floor: SecurityVersion,
    pub slots: SlotTable,
    pub current: Option<CampaignProgress>,
    /// Reports not yet acknowledged, oldest first; only the head is in flight.
    pub outbox: VecDeque<StatusReport>,
    /// The most recent finished campaigns, newest last.
    pub finished: VecDeque<FinishedCampaign>,
    /// The campaign that installed the confirmed image running now; `None` for the factory
    /// image. Heartbeats name it. Records saved before it existed load with `None`.
    #[serde(default)]
    pub installed_by: Option<CampaignId>,
    /// The newest root of trust the device accepted from a job's chain, with every revocation
    /// seen so far. `None`: the root pinned at provisioning (`AgentConfig::root`), as in records
    /// saved before roots existed. Its signatures are checked again at each power-on.
    #[serde(default)]
    pub trusted_root: Option<TrustedRoot>,
    /// Unix seconds: the latest signed time the device has seen (the `issued_at` of roots and the
    /// `created_at` of manifests it accepted). It never goes back, so a device without a trusted
    /// clock still notices an expired root (a freeze), and one with a clock that was set back
    /// does too.
    #[serde(default)]
    pub time_floor: u64,
    /// The `sequence` of the last manifest whose image confirmed healthy; a manifest with a
    /// sequence not above it is a replay. Raised with the floor, after a healthy boot only.
    #[serde(default)]
    pub installed_sequence: Option<u64>,
}

impl DeviceRecord {
    /// A factory-fresh device running `version`.
    pub fn factory(version: &str, security_version: SecurityVersion) -> Self {
        DeviceRecord {
            floor: security_version,
            slots: SlotTable::factory(version, security_version),
            current: None,
            outbox: VecDeque::new(),
            finished: VecDeque::new(),
            installed_by: None,
            trusted_root: None,
            time_floor: 0,
            installed_sequence: None,
        }
    }

    /// The firmware version running now.
    pub fn running_version(&self) -> &str {
        self.slots.running_meta().version.as_deref().unwrap_or("")
    }

    pub fn finished(&self, campaign: &CampaignId) -> Option<&FinishedCampaign> {
        self.finished.iter().find(|f| &f.campaign == campaign)
    }

    pub fn finished_mut(&mut self, campaign: &CampaignId) -> Option<&mut FinishedCampaign> {
        self.finished.iter_mut().find(|f| &f.campaign == campaign)
    }

    /// Records a finished campaign, forgetting the oldest beyond [`FINISHED_HISTORY`].
    pub fn push_finished(&mut self, f: FinishedCampaign) {
        self.finished.retain(|old| old.campaign != f.campaign);
        self.finished.push_back(f);
        while self.finished.len() > FINISHED_HISTORY {
            self.finished.pop_front();
        }
    }
}

/// Why the record could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("device record i/o at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device record at {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("device record at {path}: no intact copy")]
    Damaged { path: PathBuf },
    #[error("device record for {path} is {len} bytes, more than a copy holds ({max})")]
    TooLarge {
        path: PathBuf,
        len: usize,
        max: usize,
    },
}

/// Where a device keeps its [`DeviceRecord`].
pub trait DeviceStore: Send {
    /// The saved record, or `None` for a device that never saved one.
    fn load(&mut self) -> Result<Option<DeviceRecord>, StoreError>;
    /// Replaces the saved record; when this returns, a restart sees `record`.
    fn save(&mut self, record: &DeviceRecord) -> Result<(), StoreError>;
}

/// A store that forgets everything on drop, for tests and memory-only simulations.
#[derive(Debug, Default)]
pub struct MemoryStore {
    record: Option<DeviceRecord>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl DeviceStore for MemoryStore {
    fn load(&mut self) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self.record.clone())
    }

    fn save(&mut self, record: &DeviceRecord) -> Result<(), StoreError> {
        self.record = Some(record.clone());
        Ok(())
    }
}

/// The record as one JSON file, replaced atomically.
#[derive(Debug)]
pub struct JsonFileStore {
    path: PathBuf,
    /// Whether to fsync each save. A real device must; a simulator of thousands of devices on
    /// one disk need not, since its "power loss" is only ever simulated.
    sync: bool,
}

impl JsonFileStore {
    pub fn new(path: impl Into<PathBuf>, sync: bool) -> Self {
        JsonFileStore {
            path: path.into(),
            sync,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

impl DeviceStore for JsonFileStore {
    fn load(&mut self) -> Result<Option<DeviceRecord>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            })
    }

    fn save(&mut self, record: &DeviceRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|source| StoreError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp).map_err(|e| self.io(e))?;
        f.write_all(&bytes).map_err(|e| self.io(e))?;
        if self.sync {
            f.sync_data().map_err(|e| self.io(e))?;
        }
        drop(f);
        fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        if self.sync {
            if let Some(dir) = self.path.parent() {
                // The rename is durable only once the directory entry is.
                fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| self.io(e))?;
            }
        }
        Ok(())
    }
}

/// The record as two checksummed copies in one file, the older overwritten in place.
///
/// Copy `i` starts at `i * COPY_BYTES` from the record's base (the file is sparse: only what
/// was written takes blocks): a [`HEADER_BYTES`] header (magic, sequence number, body length,
/// the first 8 bytes of the SHA-256 of sequence, length and body), then the record as JSON. A
/// save writes the copy that does not hold the newest record, with the next sequence number; a
/// load takes the intact copy with the highest one. A torn write (a crash, a real power loss)
/// damages only the copy being written, so a load finds the previous record, as with a rename.
///
/// Its own file ([`new`](Self::new), base 0) is created by the first save only, and open only
/// during a load or a save (a simulator runs thousands of these beside thousands of sockets). A
/// place in a shared file ([`at`](Self::at)) creates nothing: the simulator keeps its fleet's
/// records in a few such files, because creating two files per device at its first job was
/// most of a 10,000-device campaign's start (see `fleet_files`).
#[derive(Debug)]
pub struct RecordFileStore {
    /// The file, for opening it (its own) and for errors (either).
    path: PathBuf,
    /// A file shared with other records, held open, and this record's offset in it.
    shared: Option<(Arc<fs::File>, u64)>,
    /// Read once if `path` does not exist yet: the JSON record of an older simulator.
    legacy: Option<PathBuf>,
    /// Whether each save is flushed to the disk before it returns (see [`JsonFileStore`]).
    sync: bool,
    /// The copy holding the newest record and its sequence number, if there is one.
    newest: Option<(u64, u64)>,
    /// Whether `newest` is what the file holds (a load or a save read it), so a save need not
    /// read the file first: at a campaign's start every simulated device's first save came
    /// right after a load that had found its place blank, and read it again.
    newest_known: bool,
}

/// What one copy's place holds.
enum Held {
    /// Nothing was ever written there: past the end of the file, or a header of zeros (a hole).
    Blank,
    /// Something that is not an intact copy: torn, cut or not a record.
    Torn,
    Intact(u64, Vec<u8>),
}

impl Held {
    fn seq(&self) -> Option<u64> {
        match self {
            Held::Intact(seq, _) => Some(*seq),
            _ => None,
        }
    }
}

/// Bytes of one record's place in a file: its two copies.
pub const RECORD_BYTES: u64 = 2 * COPY_BYTES;

/// Bytes reserved for each copy (header included).
pub const COPY_BYTES: u64 = 256 * 1024;
/// Bytes of a copy's header.
pub const HEADER_BYTES: usize = 32;
const MAGIC: &[u8; 8] = b"ALOFTRC1";

fn copy_digest(seq: u64, body: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(seq.to_le_bytes());
    h.update((body.len() as u32).to_le_bytes());
    h.update(body);
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

impl RecordFileStore {
    pub fn new(path: impl Into<PathBuf>, sync: bool) -> Self {
        RecordFileStore {
            path: path.into(),
            shared: None,
            legacy: None,
            sync,
            newest: None,
            newest_known: false,
        }
    }

    /// The record at `base` in `file`, an open file shared with other records ([`RECORD_BYTES`]
    /// each), named `path` in errors.
    pub fn at(file: Arc<fs::File>, path: impl Into<PathBuf>, base: u64, sync: bool) -> Self {
        RecordFileStore {
            path: path.into(),
            shared: Some((file, base)),
            legacy: None,
            sync,
            newest: None,
            newest_known: false,
        }
    }

    /// Loads the JSON record at `legacy` (a [`JsonFileStore`]'s) while this store has none.
    pub fn with_legacy(mut self, legacy: impl Into<PathBuf>) -> Self {
        self.legacy = Some(legacy.into());
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn base(&self) -> u64 {
        self.shared.as_ref().map_or(0, |(_, base)| *base)
    }

    /// What copy `i` holds.
    fn read_copy(&self, f: &fs::File, i: u64) -> Result<Held, StoreError> {
        let at = self.base() + i * COPY_BYTES;
        let mut header = [0u8; HEADER_BYTES];
        match f.read_exact_at(&mut header, at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Held::Blank),
            Err(e) => return Err(self.io(e)),
        }
        if header.iter().all(|&b| b == 0) {
            return Ok(Held::Blank);
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&header[8..16]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[16..20]);
        let (seq, len) = (u64::from_le_bytes(seq), u32::from_le_bytes(len) as usize);
        if &header[..8] != MAGIC || len as u64 > COPY_BYTES - HEADER_BYTES as u64 {
            return Ok(Held::Torn);
        }
        let mut body = vec![0u8; len];
        match f.read_exact_at(&mut body, at + HEADER_BYTES as u64) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Held::Torn),
            Err(e) => return Err(self.io(e)),
        }
        Ok(if header[24..32] == copy_digest(seq, &body) {
            Held::Intact(seq, body)
        } else {
            Held::Torn
        })
    }

    /// Which copy holds the newest record, and its sequence number, if either is intact.
    fn newest_of(a: &Held, b: &Held) -> Option<(u64, u64)> {
        match (a.seq(), b.seq()) {
            (Some(sa), Some(sb)) if sa > sb => Some((0, sa)),
            (_, Some(sb)) => Some((1, sb)),
            (Some(sa), None) => Some((0, sa)),
            (None, None) => None,
        }
    }

    /// The file to read, if there is one: a shared file always is; an empty own file is one
    /// whose first save never reached the disk.
    fn file_to_read(&self) -> Result<Option<FileRef<'_>>, StoreError> {
        if let Some((f, _)) = &self.shared {
            return Ok(Some(FileRef::Shared(f)));
        }
        match fs::File::open(&self.path).and_then(|f| {
            let empty = f.metadata()?.len() == 0;
            Ok((!empty).then_some(f))
        }) {
            Ok(f) => Ok(f.map(FileRef::Own)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    /// The record of an older simulator, if any, where the file holds none.
    fn load_legacy(&mut self) -> Result<Option<DeviceRecord>, StoreError> {
        self.newest = None;
        self.newest_known = true;
        match &self.legacy {
            Some(legacy) => JsonFileStore::new(legacy.clone(), false).load(),
            None => Ok(None),
        }
    }
}

/// A record's file: its own, opened for one load or save, or a shared one held open.
enum FileRef<'a> {
    Own(fs::File),
    Shared(&'a fs::File),
}

impl std::ops::Deref for FileRef<'_> {
    type Target = fs::File;
    fn deref(&self) -> &fs::File {
        match self {
            FileRef::Own(f) => f,
            FileRef::Shared(f) => f,
        }
    }
}

impl DeviceStore for RecordFileStore {
    fn load(&mut self) -> Result<Option<DeviceRecord>, StoreError> {
        let Some(f) = self.file_to_read()? else {
            return self.load_legacy();
        };
        let a = self.read_copy(&f, 0)?;
        let b = self.read_copy(&f, 1)?;
        drop(f);
        if matches!((&a, &b), (Held::Blank, Held::Blank)) && self.shared.is_some() {
            // A place in a shared file nobody has saved to yet (its own file would not exist).
            return self.load_legacy();
        }
        let Some((i, seq)) = Self::newest_of(&a, &b) else {
            return Err(StoreError::Damaged {
                path: self.path.clone(),
            });
        };
        let body = match if i == 0 { a } else { b } {
            Held::Intact(_, body) => body,
            _ => Vec::new(),
        };
        let record = serde_json::from_slice(&body).map_err(|source| StoreError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        self.newest = Some((i, seq));
        self.newest_known = true;
        Ok(Some(record))
    }

    fn save(&mut self, record: &DeviceRecord) -> Result<(), StoreError> {
        if !self.newest_known {
            // Which copy is newer is read from the file once; a damaged file is overwritten.
            if let Some(f) = self.file_to_read()? {
                let a = self.read_copy(&f, 0)?;
                let b = self.read_copy(&f, 1)?;
                self.newest = Self::newest_of(&a, &b);
            }
            self.newest_known = true;
        }
        let (copy, seq) = match self.newest {
            Some((i, seq)) => (1 - i, seq + 1),
            None => (0, 1),
        };
        let mut buf = vec![0u8; HEADER_BYTES];
        serde_json::to_writer(&mut buf, record).map_err(|source| StoreError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        let len = buf.len() - HEADER_BYTES;
        let max = (COPY_BYTES as usize) - HEADER_BYTES;
        if len > max {
            return Err(StoreError::TooLarge {
                path: self.path.clone(),
                len,
                max,
            });
        }
        let digest = copy_digest(seq, buf.get(HEADER_BYTES..).unwrap_or(&[]));
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&seq.to_le_bytes());
        header[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        header[24..32].copy_from_slice(&digest);
        buf[..HEADER_BYTES].copy_from_slice(&header);
        let at = self.base() + copy * COPY_BYTES;
        if let Some((f, _)) = &self.shared {
            f.write_all_at(&buf, at).map_err(|e| self.io(e))?;
            if self.sync {
                f.sync_data().map_err(|e| self.io(e))?;
            }
        } else {
            let created = !self.path.exists();
            let f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
                .map_err(|e| self.io(e))?;
            f.write_all_at(&buf, at).map_err(|e| self.io(e))?;
            if self.sync {
                f.sync_data().map_err(|e| self.io(e))?;
                if created {
                    if let Some(dir) = self.path.parent() {
                        // A new file is durable only once its directory entry is.
                        fs::File::open(dir)
                            .and_then(|d| d.sync_all())
                            .map_err(|e| self.io(e))?;
                    }
                }
            }
        }
        self.newest = Some((copy, seq));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_tracks_missing_chunks() {
        let mut b = ChunkBitmap::new(70);
        b.set(0);
        b.set(69);
        b.set(70);
        assert!(b.get(69) && !b.get(68) && !b.get(70));
        assert_eq!(b.count(), 2);
        assert_eq!(b.missing().count(), 68);
        (0..70).for_each(|i| b.set(i));
        assert!(b.is_complete());
    }

    #[test]
    fn json_store_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = JsonFileStore::new(dir.path().join("state.json"), true);
        assert_eq!(s.load().unwrap(), None);
        let mut r = DeviceRecord::factory("1.0", SecurityVersion(3));
        s.save(&r).unwrap();
        r.floor = SecurityVersion(4);
        s.save(&r).unwrap();
        assert_eq!(s.load().unwrap(), Some(r));
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn a_record_saved_before_installed_by_existed_still_loads() {
        let mut r = serde_json::to_value(DeviceRecord::factory("1.0", SecurityVersion(1))).unwrap();
        r.as_object_mut().unwrap().remove("installed_by");
        let r: DeviceRecord = serde_json::from_value(r).unwrap();
        assert_eq!(r.installed_by, None);
    }

    #[test]
    fn a_record_saved_before_roots_existed_loads_with_the_pinned_root_and_no_floor() {
        let mut r = serde_json::to_value(DeviceRecord::factory("1.0", SecurityVersion(1))).unwrap();
        let o = r.as_object_mut().unwrap();
        for k in ["trusted_root", "time_floor", "installed_sequence"] {
            o.remove(k);
        }
        let r: DeviceRecord = serde_json::from_value(r).unwrap();
        assert_eq!(
            (r.trusted_root, r.time_floor, r.installed_sequence),
            (None, 0, None)
        );
    }

    fn record_store(dir: &Path) -> RecordFileStore {
        RecordFileStore::new(dir.join("dev.rec"), true)
    }

    #[test]
    fn record_store_round_trips_alternating_copies_and_creates_no_other_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = record_store(dir.path());
        assert_eq!(s.load().unwrap(), None);
        let mut r = DeviceRecord::factory("1.0", SecurityVersion(3));
        for v in 4..9 {
            r.floor = SecurityVersion(v);
            s.save(&r).unwrap();
            // A new store (a restarted simulator) reads what the last save wrote.
            assert_eq!(record_store(dir.path()).load().unwrap(), Some(r.clone()));
        }
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("dev.rec")]);
        // A store that saves before it ever loaded continues after the newest copy.
        let mut fresh = record_store(dir.path());
        r.floor = SecurityVersion(20);
        fresh.save(&r).unwrap();
        assert_eq!(record_store(dir.path()).load().unwrap(), Some(r));
    }

    #[test]
    fn a_torn_save_leaves_the_record_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = record_store(dir.path());
        let mut r = DeviceRecord::factory("1.0", SecurityVersion(1));
        s.save(&r).unwrap();
        let before = r.clone();
        r.floor = SecurityVersion(2);
        s.save(&r).unwrap(); // copy 1
                             // Tear the newest copy's body, as a crash mid-write would.
        let f = fs::OpenOptions::new().write(true).open(s.path()).unwrap();
        f.write_all_at(b"garbage", COPY_BYTES + HEADER_BYTES as u64 + 5)
            .unwrap();
        assert_eq!(record_store(dir.path()).load().unwrap(), Some(before));
        // Tear the other one too: no intact copy is an error, not a panic nor a factory record.
        f.write_all_at(b"garbage", HEADER_BYTES as u64 + 5).unwrap();
        assert!(matches!(
            record_store(dir.path()).load(),
            Err(StoreError::Damaged { .. })
        ));
    }

    #[test]
    fn record_store_reads_a_legacy_json_record_until_it_saves() {
        let dir = tempfile::tempdir().unwrap();
        let mut legacy = JsonFileStore::new(dir.path().join("dev.json"), false);
        let r = DeviceRecord::factory("2.0", SecurityVersion(7));
        legacy.save(&r).unwrap();
        let mut s = record_store(dir.path()).with_legacy(dir.path().join("dev.json"));
        assert_eq!(s.load().unwrap(), Some(r.clone()));
        let mut r2 = r.clone();
        r2.floor = SecurityVersion(8);
        s.save(&r2).unwrap();
        let mut again = record_store(dir.path()).with_legacy(dir.path().join("dev.json"));
        assert_eq!(again.load().unwrap(), Some(r2));
    }

    #[test]
    fn a_header_naming_more_than_a_copy_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.rec");
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(MAGIC);
        header[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(&path, header).unwrap();
        assert!(matches!(
            RecordFileStore::new(path, false).load(),
            Err(StoreError::Damaged { .. })
        ));
    }

    #[test]
    fn corrupt_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, b"{\"floor\":").unwrap();
        let mut s = JsonFileStore::new(path, false);
        assert!(matches!(s.load(), Err(StoreError::Corrupt { .. })));
    }
}
