//! The store record by record, for backups: export every record of every tree as raw bytes
//! (sealed content keys stay sealed: a backup needs no key to read the store), import them
//! into a new store, and merge the security state of a surviving store into a restored one so
//! that a restore never lowers it (device floors, report sequence numbers).

use std::path::Path;

use aloft_proto::{CampaignId, DeviceId};

use super::{decode, encode, progress_key, Sled, StoreError};
use crate::fleet::state::Progress;
use crate::store::DeviceRecord;

/// One record of one tree, exactly as sled holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub tree: Vec<u8>,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A store opened without its master key: raw records only.
pub struct RawStore {
    db: Sled<sled::Db>,
}

/// What a merge kept from the surviving store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MergeReport {
    /// Devices whose floor or installed sequence the surviving store had higher.
    pub floors_raised: usize,
    /// Devices only the surviving store knew, added with their floor.
    pub devices_added: usize,
    /// Progress records the surviving store had further along (higher `last_seq`).
    pub progress_kept: usize,
    /// Audit entries taken from the surviving store, whose log was longer (0: the backup's).
    pub audit_entries_kept: usize,
}

impl RawStore {
    /// Opens an existing store; a missing one is an error.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        if !dir.join("conf").exists() {
            return Err(StoreError::Missing(dir.to_owned()));
        }
        Ok(Self {
            db: Sled::open(dir)?,
        })
    }

    /// Creates an empty store to import into; `dir` must not exist.
    pub fn create(dir: &Path) -> Result<Self, StoreError> {
        if dir.exists() {
            return Err(StoreError::Exists(dir.to_owned()));
        }
        Ok(Self {
            db: Sled::open(dir)?,
        })
    }

    /// Calls `f` with every record of every named tree (sled's own default tree is empty for
    /// us and skipped).
    pub fn export<E>(&self, mut f: impl FnMut(RawRecord) -> Result<(), E>) -> Result<(), E>
    where
        E: From<StoreError>,
    {
        for name in self.db.tree_names() {
            if name.as_ref() == b"__sled__default" {
                continue;
            }
            let tree = self.db.open_tree(&name).map_err(StoreError::from)?;
            for kv in tree.iter() {
                let (k, v) = kv.map_err(StoreError::from)?;
                f(RawRecord {
                    tree: name.to_vec(),
                    key: k.to_vec(),
                    value: v.to_vec(),
                })?;
            }
        }
        Ok(())
    }

    pub fn insert(&self, r: &RawRecord) -> Result<(), StoreError> {
        self.db
            .open_tree(&r.tree)?
            .insert(&r.key, r.value.as_slice())?;
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Raises this (restored) store's security state to `surviving`'s wherever that is higher:
    /// each device's floor, and each progress record whose `last_seq` is higher (the device's
    /// later reports were acknowledged; taking the record whole keeps its state consistent with
    /// that sequence number). Devices only `surviving` knows are added. Nothing else of
    /// `surviving` (releases sealed under its own key, campaigns) is taken.
    pub fn merge_security_state(&self, surviving: &RawStore) -> Result<MergeReport, StoreError> {
        let mut report = MergeReport::default();
        let ours = self.db.open_tree("devices")?;
        for kv in surviving.db.open_tree("devices")?.iter() {
            let (k, v) = kv?;
            let theirs: DeviceRecord = decode(&k, &v)?;
            match ours.get(&k)? {
                Some(mine) => {
                    let mut mine: DeviceRecord = decode(&k, &mine)?;
                    if theirs.floor > mine.floor
                        || theirs.installed_sequence > mine.installed_sequence
                    {
                        mine.floor = mine.floor.max(theirs.floor);
                        mine.installed_sequence =
                            mine.installed_sequence.max(theirs.installed_sequence);
                        ours.insert(&k, encode(&mine))?;
                        report.floors_raised += 1;
                    }
                }
                None => {
                    ours.insert(&k, v)?;
                    report.devices_added += 1;
                }
            }
        }
        let ours = self.db.open_tree("progress")?;
        for kv in surviving.db.open_tree("progress")?.iter() {
            let (k, v) = kv?;
            let Some(mine) = ours.get(&k)? else {
                // Its campaign is not in the backup; the device's floor above is what matters.
                continue;
            };
            let theirs: Progress = decode(&k, &v)?;
            let mine: Progress = decode(&k, &mine)?;
            if theirs.last_seq > mine.last_seq {
                ours.insert(&k, v)?;
                report.progress_kept += 1;
            }
        }
        // The audit log is append-only: the longer of the two holds everything the other does
        // (and what happened after the backup), so it is kept whole.
        let ours = self.db.open_tree(super::AUDIT_TREE)?;
        let theirs = surviving.db.open_tree(super::AUDIT_TREE)?;
        let last = |t: &sled::Tree| -> Result<u64, StoreError> {
            Ok(t.last()?
                .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
                .map_or(0, u64::from_be_bytes))
        };
        if last(&theirs)? > last(&ours)? {
            ours.clear()?;
            for kv in theirs.iter() {
                let (k, v) = kv?;
                ours.insert(k, v)?;
                report.audit_entries_kept += 1;
            }
        }
        Ok(report)
    }

    /// A device's record, for tests and reports.
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let tree = self.db.open_tree("devices")?;
        let key = id.as_str().as_bytes();
        tree.get(key)?.map(|v| decode(key, &v)).transpose()
    }

    /// A progress record, for tests and reports.
    pub fn progress(&self, c: &CampaignId, d: &DeviceId) -> Result<Option<Progress>, StoreError> {
        let tree = self.db.open_tree("progress")?;
        let key = progress_key(c, d);
        tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }
}
