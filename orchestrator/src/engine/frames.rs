//! Encoded chunk frames of the releases being served, kept in memory and shared.
//!
//! A data frame depends only on the release and the chunk index, never on the device, so one
//! encoded copy serves the whole fleet: the front queues the same bytes for every device
//! (`aloft_broker::DirectRoutes::deliver` does not copy them). Without this, every chunk sent
//! cost a store read and two copies of the chunk on the engine's task.

use std::collections::HashMap;

use aloft_proto::chunkframe;
use aloft_proto::ArtifactId;
use bytes::Bytes;

use crate::store::{Store, StoreError};

/// Frames kept at most, in bytes; beyond it the cache starts again empty. Enough for the
/// images of several campaigns running at once; a bound, so that a long-lived process serving
/// many releases does not keep them all.
const MAX_BYTES: usize = 256 * 1024 * 1024;

#[derive(Default)]
pub(crate) struct FrameCache {
    /// Per release, its frames by chunk index (`None` until first served).
    frames: HashMap<ArtifactId, Vec<Option<Bytes>>>,
    bytes: usize,
}

impl FrameCache {
    /// The data frame of chunk `index` of `artifact` (of `count`), from memory or the store;
    /// `None` if the store lacks the chunk. A hit costs one lookup and no allocation: this runs
    /// for every chunk sent.
    pub fn get(
        &mut self,
        store: &Store,
        artifact: &ArtifactId,
        index: u32,
        count: u32,
    ) -> Result<Option<Bytes>, StoreError> {
        let slot = index as usize;
        if let Some(f) = self
            .frames
            .get(artifact)
            .and_then(|frames| frames.get(slot))
            .and_then(Option::as_ref)
        {
            return Ok(Some(f.clone()));
        }
        let Some(sealed) = store.chunk(artifact, index)? else {
            return Ok(None);
        };
        let frame = Bytes::from(chunkframe::encode_data(artifact, index, count, &sealed));
        if self.bytes + frame.len() > MAX_BYTES {
            self.frames.clear();
            self.bytes = 0;
        }
        self.bytes += frame.len();
        let frames = self.frames.entry(artifact.clone()).or_default();
        if frames.len() <= slot {
            frames.resize(slot + 1, None);
        }
        frames[slot] = Some(frame.clone());
        Ok(Some(frame))
    }
}
