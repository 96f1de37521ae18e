//! Delta updates on the device (PROTOCOL.md §9.7, 1.5): which of a job's delta offers the device
//! can take, and the rebuild of the new image from the running slot and the downloaded patch.
//!
//! Taking a delta is the device's own choice and never a reason to refuse a job: an offer whose
//! signature, target, base or key does not check out is skipped and the full image downloaded.
//! The patch is downloaded into the update slot like an image (same chunk checks), verified
//! against its signed digest, then read into memory, and the new image is streamed over it
//! into the same slot. Memory holds the base image and the patch, never the new image: it goes
//! to flash as the patcher produces it, in [`WRITE_BLOCK_BYTES`] blocks.

use aloft_proto::crypto::{self, ContentKey, DeviceEncryptionKey};
use aloft_proto::delta::apply_patch;
use aloft_proto::manifest::Manifest;
use aloft_proto::messages::Job;
use aloft_proto::trust::TrustedRoot;
use aloft_proto::DeviceId;
use sha2::{Digest, Sha256};

use super::checks::verify_signature;
use super::shared::SharedManifests;
use crate::slots::{Flash, SlotId};

/// Bytes the rebuild buffers before each flash write.
pub(super) const WRITE_BLOCK_BYTES: usize = 64 * 1024;

/// A delta the device will take: the offer's index, its verified manifest and its key.
pub(super) struct Chosen {
    pub offer: usize,
    pub manifest: Manifest,
    pub key: ContentKey,
}

/// The first offer of `job` that rebuilds `full`'s image from the image the device runs
/// (`running_sha256`), signed by the release role of `trust`, whose key unwraps, and whose
/// patch is smaller than the image (a larger one saves nothing). `None` means: download the
/// full image.
pub(super) fn choose(
    shared: Option<&SharedManifests>,
    trust: &TrustedRoot,
    job: &Job,
    full: &Manifest,
    running_sha256: Option<&str>,
    key: &DeviceEncryptionKey,
    device: &DeviceId,
) -> Option<Chosen> {
    let running = running_sha256?;
    job.deltas.iter().enumerate().find_map(|(offer, o)| {
        let manifest = verify_signature(shared, trust, &o.manifest).ok()?;
        let d = manifest.delta.as_ref()?;
        if !manifest.is_delta_for(full)
            || d.base_sha256 != running
            || manifest.image_size >= full.image_size
        {
            return None;
        }
        let key =
            crypto::unwrap_content_key(key, device, &manifest.artifact, &o.wrapped_key).ok()?;
        Some(Chosen {
            offer,
            manifest,
            key,
        })
    })
}

/// What a rebuild cost, for the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildStats {
    /// Bytes the rebuild held in memory at its peak: the base, the patch and the write buffer.
    pub peak_buffer_bytes: u64,
}

/// Rebuilds `full`'s image into `update` from the base in `running` and the patch `delta`
/// describes, which is in `update` now and is overwritten. Ok only if the rebuilt image's
/// SHA-256 is the signed target's; the caller then verifies the slot as after any download.
pub(super) fn rebuild(
    flash: &mut dyn Flash,
    running: SlotId,
    update: SlotId,
    delta: &Manifest,
    full: &Manifest,
) -> Result<RebuildStats, String> {
    let d = delta.delta.as_ref().ok_or("not a delta manifest")?;
    let mut base = vec![0u8; usize::try_from(d.base_size).map_err(|e| e.to_string())?];
    flash
        .read(running, 0, &mut base)
        .map_err(|e| format!("reading the base: {e}"))?;
    if hex::encode(crypto::sha256(&base)) != d.base_sha256 {
        return Err("the running slot does not hold the delta's base".into());
    }
    let mut patch = vec![0u8; usize::try_from(delta.image_size).map_err(|e| e.to_string())?];
    flash
        .read(update, 0, &mut patch)
        .map_err(|e| format!("reading the patch: {e}"))?;
    let mut out = SlotWriter {
        flash,
        slot: update,
        offset: 0,
        buf: Vec::with_capacity(WRITE_BLOCK_BYTES),
        hash: Sha256::new(),
    };
    apply_patch(&base, &patch, full.image_size, &mut out).map_err(|e| e.to_string())?;
    out.drain().map_err(|e| format!("writing the image: {e}"))?;
    let digest: [u8; 32] = out.hash.finalize().into();
    if full.image_digest() != Some(digest) {
        return Err("the rebuilt image does not match the signed target".into());
    }
    Ok(RebuildStats {
        peak_buffer_bytes: (base.len() + patch.len() + WRITE_BLOCK_BYTES) as u64,
    })
}

/// Streams the rebuilt image into a slot, hashing it on the way.
struct SlotWriter<'a> {
    flash: &'a mut dyn Flash,
    slot: SlotId,
    offset: u64,
    buf: Vec<u8>,
    hash: Sha256,
}

impl SlotWriter<'_> {
    fn drain(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.flash
            .write(self.slot, self.offset, &self.buf)
            .map_err(std::io::Error::other)?;
        self.hash.update(&self.buf);
        self.offset += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

impl std::io::Write for SlotWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(WRITE_BLOCK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == WRITE_BLOCK_BYTES {
            self.drain()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.drain()
    }
}
