//! The store record by record, for backups: export every record of every tree as raw bytes
//! (sealed content keys stay sealed: a backup needs no key to read the store), import them
//! into a new store, and merge the security state of a surviving store into a restored one so
//! that a restore never lowers it (device floors, report sequence numbers).

use std::ops::Bound;
use std::path::Path;

use aloft_proto::{CampaignId, DeviceId};

use super::kv::{Entry, Kv, Scan, Tree};
use super::{decode, encode, open_kv, progress_key, StoreError, StoreLocation, KEY_CHECK};
use crate::fleet::state::Progress;
use crate::store::DeviceRecord;

/// Records read per page when a whole tree is walked (backups, merges): a large store is never
/// held in memory at once.
const PAGE: usize = 1024;

/// One record of one tree, exactly as the store holds it (sled's key bytes; PostgreSQL's key
/// columns joined the same way), so a backup of either engine restores into either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub tree: Vec<u8>,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A store opened without its master key: raw records only.
pub struct RawStore {
    kv: Kv,
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
    /// Values of the replicas' shared security state (accepted roots, the CRL in force) taken
    /// from the surviving store.
    pub shared_kept: usize,
}

/// Calls `f` with every record of `tree` in key order, a page at a time.
fn for_each<E: From<StoreError>>(
    kv: &Kv,
    tree: Tree,
    mut f: impl FnMut(Entry) -> Result<(), E>,
) -> Result<(), E> {
    let mut from = Bound::Unbounded;
    loop {
        let page = kv.scan(tree, &Scan::all().from(from.clone()).limit(PAGE))?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        from = Bound::Excluded(last.clone());
        for e in page {
            f(e)?;
        }
    }
}

impl RawStore {
    /// Opens an existing sled store; a missing one is an error.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_at(&StoreLocation::Sled(dir.to_owned()))
    }

    /// Creates an empty sled store to import into; `dir` must not exist.
    pub fn create(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            kv: open_kv(
                &StoreLocation::Sled(dir.to_owned()),
                true,
                super::Sharing::Exclusive,
            )?,
        })
    }

    /// Opens the store at `at`: a sled directory must exist; a PostgreSQL database is
    /// connected to (and its schema migrated), store or not ([`RawStore::holds_store`]).
    pub fn open_at(at: &StoreLocation) -> Result<Self, StoreError> {
        Ok(Self {
            kv: open_kv(at, false, super::Sharing::Exclusive)?,
        })
    }

    /// Whether this holds a store (its key check record), not just an empty schema.
    pub fn holds_store(&self) -> Result<bool, StoreError> {
        Ok(self.kv.get(Tree::Meta, KEY_CHECK)?.is_some())
    }

    /// Calls `f` with every record of every tree.
    pub fn export<E>(&self, mut f: impl FnMut(RawRecord) -> Result<(), E>) -> Result<(), E>
    where
        E: From<StoreError>,
    {
        for tree in Tree::ALL {
            for_each(&self.kv, tree, |(key, value)| {
                f(RawRecord {
                    tree: tree.name().as_bytes().to_vec(),
                    key,
                    value,
                })
            })?;
        }
        Ok(())
    }

    pub fn insert(&self, r: &RawRecord) -> Result<(), StoreError> {
        let tree = Tree::from_name(&r.tree)
            .ok_or_else(|| StoreError::UnknownTree(String::from_utf8_lossy(&r.tree).into()))?;
        self.kv.insert(tree, &r.key, &r.value)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.kv.flush()
    }

    /// Replaces everything this store holds by `other`'s records, durably at once (on
    /// PostgreSQL: one transaction, so a failure leaves the old contents whole).
    pub fn replace_with(&self, other: &RawStore) -> Result<u64, StoreError> {
        for tree in Tree::ALL {
            self.kv.clear(tree)?;
        }
        let mut n = 0u64;
        other.export(|r| {
            n += 1;
            self.insert(&r)
        })?;
        self.flush()?;
        Ok(n)
    }

    /// Raises this (restored) store's security state to `surviving`'s wherever that is higher:
    /// each device's floor, and each progress record whose `last_seq` is higher (the device's
    /// later reports were acknowledged; taking the record whole keeps its state consistent with
    /// that sequence number). Devices only `surviving` knows are added, and its stored jobs
    /// (`MemberJob`) of members the restored store has. Nothing else of
    /// `surviving` (releases sealed under its own key, campaigns) is taken.
    pub fn merge_security_state(&self, surviving: &RawStore) -> Result<MergeReport, StoreError> {
        let mut report = MergeReport::default();
        let ours = &self.kv;
        for_each(&surviving.kv, Tree::Devices, |(k, v)| {
            let theirs: DeviceRecord = decode(&k, &v)?;
            match ours.get(Tree::Devices, &k)? {
                Some(mine) => {
                    let mut mine: DeviceRecord = decode(&k, &mine)?;
                    if theirs.floor > mine.floor
                        || theirs.installed_sequence > mine.installed_sequence
                    {
                        mine.floor = mine.floor.max(theirs.floor);
                        mine.installed_sequence =
                            mine.installed_sequence.max(theirs.installed_sequence);
                        ours.insert(Tree::Devices, &k, &encode(&mine))?;
                        report.floors_raised += 1;
                    }
                }
                None => {
                    ours.insert(Tree::Devices, &k, &v)?;
                    report.devices_added += 1;
                }
            }
            Ok::<(), StoreError>(())
        })?;
        for_each(&surviving.kv, Tree::Progress, |(k, v)| {
            let Some(mine) = ours.get(Tree::Progress, &k)? else {
                // Its campaign is not in the backup; the device's floor above is what matters.
                return Ok(());
            };
            let theirs: Progress = decode(&k, &v)?;
            let mine: Progress = decode(&k, &mine)?;
            if theirs.last_seq > mine.last_seq {
                ours.insert(Tree::Progress, &k, &v)?;
                report.progress_kept += 1;
            }
            Ok::<(), StoreError>(())
        })?;
        // The jobs devices received last are the surviving store's: keep each wherever the
        // restored store has the member, so what is republished is what the device holds.
        for_each(&surviving.kv, Tree::Jobs, |(k, v)| {
            if ours.get(Tree::Progress, &k)?.is_some() {
                ours.insert(Tree::Jobs, &k, &v)?;
            }
            Ok::<(), StoreError>(())
        })?;
        // The security state replicas share (`replica::security`: the roots accepted, the CRL in
        // force). In a live database it only moves forward (leaders add roots and write a CRL
        // only once they applied it, which they do only for a newer one), so the surviving
        // store's is never older than a backup's: it is kept. Otherwise a replica whose own
        // files are old could take the lease after the restore and un-revoke devices. (Each
        // leader also checks what it reads: roots must walk forward, CRLs must verify.)
        for_each(&surviving.kv, Tree::Meta, |(k, v)| {
            if k.starts_with(super::SHARED.as_bytes())
                && ours.get(Tree::Meta, &k)?.as_deref() != Some(&v[..])
            {
                ours.insert(Tree::Meta, &k, &v)?;
                report.shared_kept += 1;
            }
            Ok::<(), StoreError>(())
        })?;
        // The audit log is append-only: the longer of the two holds everything the other does
        // (and what happened after the backup), so it is kept whole.
        let last = |kv: &Kv| -> Result<u64, StoreError> {
            Ok(kv
                .scan(Tree::Audit, &Scan::all().rev().limit(1).keys_only())?
                .first()
                .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_slice()).ok())
                .map_or(0, u64::from_be_bytes))
        };
        if last(&surviving.kv)? > last(ours)? {
            ours.clear(Tree::Audit)?;
            for_each(&surviving.kv, Tree::Audit, |(k, v)| {
                ours.insert(Tree::Audit, &k, &v)?;
                report.audit_entries_kept += 1;
                Ok::<(), StoreError>(())
            })?;
        }
        Ok(report)
    }

    /// A device's record, for tests and reports.
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let key = id.as_str().as_bytes();
        self.kv
            .get(Tree::Devices, key)?
            .map(|v| decode(key, &v))
            .transpose()
    }

    /// A progress record, for tests and reports.
    pub fn progress(&self, c: &CampaignId, d: &DeviceId) -> Result<Option<Progress>, StoreError> {
        let key = progress_key(c, d);
        self.kv
            .get(Tree::Progress, &key)?
            .map(|v| decode(&key, &v))
            .transpose()
    }
}
