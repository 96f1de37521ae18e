//! The device's persistent record: anti-rollback floor, slot table, the campaign in progress
//! (its job, phase, next report number and which chunks are written), the report outbox, the
//! last finished campaigns, which campaign installed the running image, and what the device has
//! learnt from signed metadata: the newest root of trust it accepted, the latest signed time it
//! has seen, and the sequence number of the manifest it installed last. [`DeviceStore`]
//! saves it; the JSON file store replaces the file atomically (temp file + rename) so a crash
//! leaves either the old record or the new one.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use aloft_proto::messages::{Job, StatusReport};
use aloft_proto::trust::TrustedRoot;
use aloft_proto::{CampaignId, DeviceState, Reason, SecurityVersion};
use serde::{Deserialize, Serialize};

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

    #[test]
    fn corrupt_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, b"{\"floor\":").unwrap();
        let mut s = JsonFileStore::new(path, false);
        assert!(matches!(s.load(), Err(StoreError::Corrupt { .. })));
    }
}
