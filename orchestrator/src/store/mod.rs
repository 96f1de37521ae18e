//! Durable state behind one narrow interface: devices, releases and their sealed chunks,
//! campaigns, and per-(campaign, device) progress. Only this module knows sled.
//!
//! Durability contract: a write is durable only after [`Store::flush`] returns. Callers
//! acknowledge anything to a peer only after flushing (DESIGN.md: sled's `insert` alone loses
//! acknowledged records on SIGKILL; an explicit flush loses none).

mod records;

pub use records::{CampaignRecord, CampaignStatus, DeviceRecord, ReleaseRecord, Target};

use std::path::Path;

use aloft_proto::{ArtifactId, CampaignId, DeviceId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::fleet::state::Progress;

/// Why the store failed. Any of these is fatal for the operation, never silently ignored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o: {0}")]
    Sled(#[from] sled::Error),
    #[error("store record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

/// The orchestrator's store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    devices: sled::Tree,
    releases: sled::Tree,
    chunks: sled::Tree,
    campaigns: sled::Tree,
    progress: sled::Tree,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Records are plain structs of strings, numbers and enums: serializing cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn chunk_key(artifact: &ArtifactId, index: u32) -> Vec<u8> {
    let mut k = artifact.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn progress_prefix(campaign: &CampaignId) -> Vec<u8> {
    let mut k = campaign.as_str().as_bytes().to_vec();
    k.push(0);
    k
}

fn progress_key(campaign: &CampaignId, device: &DeviceId) -> Vec<u8> {
    let mut k = progress_prefix(campaign);
    k.extend_from_slice(device.as_str().as_bytes());
    k
}

impl Store {
    /// Opens (or creates) the store in `dir`. An unreadable store is an error, never a fresh one.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open()?;
        Ok(Self {
            devices: db.open_tree("devices")?,
            releases: db.open_tree("releases")?,
            chunks: db.open_tree("chunks")?,
            campaigns: db.open_tree("campaigns")?,
            progress: db.open_tree("progress")?,
            db,
        })
    }

    /// Makes every earlier write durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>, StoreError> {
        tree.get(key)?.map(|v| decode(key, &v)).transpose()
    }

    fn scan<T: DeserializeOwned>(tree: &sled::Tree, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
        tree.scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn put_device(&self, d: &DeviceRecord) -> Result<(), StoreError> {
        self.devices.insert(d.id.as_str(), encode(d))?;
        Ok(())
    }

    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        Self::get(&self.devices, id.as_str().as_bytes())
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        Self::scan(&self.devices, b"")
    }

    pub fn put_release(&self, r: &ReleaseRecord) -> Result<(), StoreError> {
        self.releases.insert(r.artifact.as_str(), encode(r))?;
        Ok(())
    }

    pub fn release(&self, a: &ArtifactId) -> Result<Option<ReleaseRecord>, StoreError> {
        Self::get(&self.releases, a.as_str().as_bytes())
    }

    pub fn releases(&self) -> Result<Vec<ReleaseRecord>, StoreError> {
        Self::scan(&self.releases, b"")
    }

    pub fn put_chunk(&self, a: &ArtifactId, index: u32, sealed: &[u8]) -> Result<(), StoreError> {
        self.chunks.insert(chunk_key(a, index), sealed)?;
        Ok(())
    }

    /// A sealed chunk; sled hands out a reference-counted buffer, so serving is copy-free here.
    pub fn chunk(&self, a: &ArtifactId, index: u32) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.chunks.get(chunk_key(a, index))?)
    }

    pub fn chunk_count_stored(&self, a: &ArtifactId) -> usize {
        let mut prefix = a.as_str().as_bytes().to_vec();
        prefix.push(0);
        self.chunks.scan_prefix(prefix).count()
    }

    pub fn put_campaign(&self, c: &CampaignRecord) -> Result<(), StoreError> {
        self.campaigns.insert(c.id.as_str(), encode(c))?;
        Ok(())
    }

    pub fn campaign(&self, id: &CampaignId) -> Result<Option<CampaignRecord>, StoreError> {
        Self::get(&self.campaigns, id.as_str().as_bytes())
    }

    pub fn campaigns(&self) -> Result<Vec<CampaignRecord>, StoreError> {
        Self::scan(&self.campaigns, b"")
    }

    pub fn put_progress(
        &self,
        c: &CampaignId,
        d: &DeviceId,
        p: &Progress,
    ) -> Result<(), StoreError> {
        self.progress.insert(progress_key(c, d), encode(p))?;
        Ok(())
    }

    pub fn progress(&self, c: &CampaignId, d: &DeviceId) -> Result<Option<Progress>, StoreError> {
        Self::get(&self.progress, &progress_key(c, d))
    }

    /// Every device's progress in campaign `c`.
    pub fn campaign_progress(
        &self,
        c: &CampaignId,
    ) -> Result<Vec<(DeviceId, Progress)>, StoreError> {
        let prefix = progress_prefix(c);
        self.progress
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let id = std::str::from_utf8(&k[prefix.len()..])
                    .ok()
                    .and_then(|s| DeviceId::new(s).ok());
                let Some(id) = id else {
                    return Err(StoreError::Corrupt {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        source: serde::de::Error::custom("bad device id in key"),
                    });
                };
                Ok((id, decode(&k, &v)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_proto::DeviceState;

    #[test]
    fn progress_survives_reopen_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let c = CampaignId::new("c-1").unwrap();
        let d = DeviceId::new("dev-1").unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let mut p = Progress::new(1);
            p.state = DeviceState::Downloading;
            s.put_progress(&c, &d, &p).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let all = s.campaign_progress(&c).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, d);
        assert_eq!(all[0].1.state, DeviceState::Downloading);
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.devices.insert("dev-1", b"{not json".to_vec()).unwrap();
        let id = DeviceId::new("dev-1").unwrap();
        assert!(matches!(s.device(&id), Err(StoreError::Corrupt { .. })));
    }
}
