//! The download half of a campaign, in memory only: which chunks are requested and when, how
//! often each failed, the request timeout, and the check of every sealed chunk against the
//! signed manifest *before* it is decrypted and written.
//!
//! The timeout follows the measured response time as TCP's does (RFC 6298: SRTT + 4·RTTVAR,
//! never below the configured base; samples only from chunks asked for once, Karn's rule) and
//! doubles on expiry. A fixed timeout breaks down when a loaded orchestrator shares its
//! bandwidth among thousands of devices: a window then takes longer to drain than the timeout,
//! and devices re-request what is merely slow, which adds load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use aloft_proto::crypto::{ChunkCipher, ContentKey};
use aloft_proto::manifest::Manifest;
use aloft_proto::messages::{MAX_CHUNKS_PER_REQUEST, MAX_RANGES_PER_REQUEST};
use aloft_proto::precondition::Preconditions;
use aloft_proto::ArtifactId;

use super::origin::OriginPlan;
use super::shared::{ChunkChecks, ChunkMatch, SharedManifests};
use crate::slots::{Flash, FlashError, HashChain, Known, SlotId};
use crate::store::ChunkBitmap;

/// What became of one data frame.
#[derive(Debug)]
pub(super) enum ChunkOutcome {
    /// Verified, opened and written.
    Written,
    /// Already written: a redelivery.
    Duplicate,
    /// Not part of this download (another artifact, a bad index or count).
    Ignored,
    /// Failed its digest or authentication; `exhausted` once the retry budget is spent.
    Rejected {
        exhausted: bool,
    },
    WriteFailed(FlashError),
}

/// The in-memory companion of a campaign in progress.
pub(super) struct Session {
    /// The verified manifest, without its `chunk_sha256` (decoded into `digests`, the only form
    /// the device uses: the text is three times the size, and was a tenth of a simulated
    /// device's heap while it downloaded).
    pub manifest: Manifest,
    /// The chunk digests, shared (with the tags of the chunks found to match them) by every
    /// download of the same manifest when the agent has a
    /// [`SharedManifests`](super::shared::SharedManifests).
    checks: Arc<ChunkChecks>,
    /// The hash chain of the image this download's key opens, when `checks` keeps one: a
    /// chunk known by its tag is written as that chain's chunk.
    chain: Option<Arc<HashChain>>,
    /// The content key made ready to open chunks, held only while downloading: dropping it
    /// frees aws-lc's state, which aws-lc clears as it frees it.
    cipher: Option<ChunkCipher>,
    /// Requested chunks not yet received: the time of their last request, and whether it was a
    /// repeat (whose answer may be to the first request, so it gives no response time).
    outstanding: BTreeMap<u32, (u64, bool)>,
    /// Chunks asked for before whose answer has not arrived; asking again is a repeat.
    asked_before: HashSet<u32>,
    failures: HashMap<u32, u32>,
    /// The current request timeout: doubles on every expiry, back to the estimate on progress.
    timeout_ms: u64,
    /// Smoothed response time and its variation, once measured (ms).
    srtt: Option<f64>,
    rttvar: f64,
    /// A response time was measured since the timeout was last set.
    fresh_sample: bool,
    /// No requests before this time (the orchestrator said it is not serving us yet).
    pub paused_until: u64,
    /// Chunk requests wait until the campaign's `downloading` report has been published once,
    /// so the orchestrator knows the device is downloading before it is asked for chunks.
    pub requests_enabled: bool,
    /// (1.5) The job's untrusted origin, when the device fetches from one: chunks it is
    /// fetching there are not asked of the orchestrator.
    pub origin: Option<OriginPlan>,
    /// (1.5) The preconditions of the campaign's (full image's) signed manifest: with a
    /// delta, `manifest` is the patch's, but the job's manifest says when to install.
    pub preconditions: Option<Preconditions>,
}

impl Session {
    pub fn new(
        mut manifest: Manifest,
        key: Option<ContentKey>,
        base_timeout_ms: u64,
        shared: Option<&SharedManifests>,
    ) -> Self {
        let checks = match shared {
            Some(s) => s.checks(&manifest),
            None => Arc::new(ChunkChecks::new(manifest.chunk_digests(), false)),
        };
        manifest.chunk_sha256 = String::new();
        let chain = key.as_ref().and_then(|k| checks.chain(k, &manifest));
        Session {
            checks,
            chain,
            cipher: key.as_ref().map(ChunkCipher::new),
            outstanding: BTreeMap::new(),
            asked_before: HashSet::new(),
            failures: HashMap::new(),
            timeout_ms: base_timeout_ms,
            srtt: None,
            rttvar: 0.0,
            fresh_sample: false,
            paused_until: 0,
            requests_enabled: false,
            origin: None,
            preconditions: manifest.preconditions.clone(),
            manifest,
        }
    }

    pub fn artifact(&self) -> &ArtifactId {
        &self.manifest.artifact
    }

    /// Forgets the content key once every chunk is written.
    pub fn drop_key(&mut self) {
        self.cipher = None;
    }

    /// Forgets what was requested: after a reconnect or a pause everything missing is asked again.
    pub fn forget_outstanding(&mut self) {
        let asked: Vec<u32> = self.outstanding.keys().copied().collect();
        self.asked_before.extend(asked);
        self.outstanding.clear();
    }

    /// The orchestrator sent no chunk from `index` on (`busy`, PROTOCOL.md §5.5): those
    /// requests are forgotten without counting as asked (nothing was sent, so a later answer
    /// still measures the response time) and without backing off the timeout, and no request
    /// leaves before `resume_at`.
    pub fn on_busy(&mut self, index: u32, resume_at: u64) {
        let _ = self.outstanding.split_off(&index);
        self.paused_until = self.paused_until.max(resume_at);
    }

    /// Whether chunk `index` is asked of the orchestrator and not yet received.
    pub fn is_requested(&self, index: u32) -> bool {
        self.outstanding.contains_key(&index)
    }

    /// Whether `sealed` is chunk `index` as the signed manifest describes it (length and
    /// digest): checked before anything else is done with bytes from an untrusted origin.
    pub fn matches_manifest(&self, index: u32, sealed: &[u8]) -> bool {
        self.check(index, sealed) != ChunkMatch::No
    }

    fn check(&self, index: u32, sealed: &[u8]) -> ChunkMatch {
        if self.manifest.sealed_len(index) != Some(sealed.len()) {
            return ChunkMatch::No;
        }
        self.checks.check(index, sealed)
    }

    /// Handles one data frame for chunk `index` of `count`, received at `now`.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &mut self,
        now: u64,
        artifact: &ArtifactId,
        index: u32,
        count: u32,
        sealed: &[u8],
        written: &mut ChunkBitmap,
        slot: SlotId,
        flash: &mut dyn Flash,
        max_retries: u32,
    ) -> ChunkOutcome {
        if artifact != &self.manifest.artifact
            || count != self.manifest.chunk_count
            || index >= count
            || written.len() != count
        {
            return ChunkOutcome::Ignored;
        }
        if written.get(index) {
            self.outstanding.remove(&index);
            return ChunkOutcome::Duplicate;
        }
        let Some(cipher) = &self.cipher else {
            return ChunkOutcome::Ignored;
        };
        // The digest is checked before decrypting: a tampered chunk never reaches the cipher.
        let matched = self.check(index, sealed);
        let offset = u64::from(index) * u64::from(self.manifest.chunk_size);
        if let (ChunkMatch::Known, Some(chain)) = (matched, &self.chain) {
            // These sealed bytes, opened under this key (the chain's) for this artifact, index
            // and count, gave the plaintext a fleet's store holds once some device of it opened
            // them: opening them again gives the same bytes (it was 6% of the simulator's CPU
            // while 10,000 devices downloaded). A slot that can name the stored chunk does,
            // unopened.
            match flash.name_known(slot, offset, &Known { chain, index }) {
                Ok(true) => return self.written(now, index, written),
                Ok(false) => {}
                Err(e) => return ChunkOutcome::WriteFailed(e),
            }
        }
        let plain = if matched != ChunkMatch::No {
            cipher.open(artifact, index, count, sealed).ok()
        } else {
            None
        };
        let Some(plain) = plain else {
            // Dropping it from `outstanding` makes the next window fill request it again.
            self.outstanding.remove(&index);
            let n = self.failures.entry(index).or_insert(0);
            *n += 1;
            return ChunkOutcome::Rejected {
                exhausted: *n >= max_retries,
            };
        };
        let written_ok = match (&self.chain, matched) {
            // Same sealed bytes, same key, artifact and count: the same plaintext.
            (Some(chain), ChunkMatch::Known) => {
                let known = Known { chain, index };
                flash.write_known(slot, offset, &plain, &known)
            }
            _ => flash.write(slot, offset, &plain),
        };
        if let Err(e) = written_ok {
            return ChunkOutcome::WriteFailed(e);
        }
        self.written(now, index, written)
    }

    /// Chunk `index` is in the slot: it is marked written, and its response time sampled.
    fn written(&mut self, now: u64, index: u32, written: &mut ChunkBitmap) -> ChunkOutcome {
        written.set(index);
        if let Some((sent, false)) = self.outstanding.remove(&index) {
            self.sample_response_time(now.saturating_sub(sent) as f64);
        }
        self.asked_before.remove(&index);
        self.failures.remove(&index);
        ChunkOutcome::Written
    }

    fn sample_response_time(&mut self, ms: f64) {
        self.fresh_sample = true;
        match self.srtt {
            None => {
                self.srtt = Some(ms);
                self.rttvar = ms / 2.0;
            }
            Some(srtt) => {
                self.rttvar = 0.75 * self.rttvar + 0.25 * (srtt - ms).abs();
                self.srtt = Some(0.875 * srtt + 0.125 * ms);
            }
        }
    }

    /// Progress was made: if it brought a new response time, requests time out after the new
    /// estimate, never sooner than `base_ms` nor later than `max_ms`. Without one (only answers
    /// to repeated requests arrived), a backed-off timeout stays backed off (RFC 6298 §5.7):
    /// falling back to the base would re-request everything again under the same load.
    pub fn reset_timeout(&mut self, base_ms: u64, max_ms: u64) {
        let Some(srtt) = self.srtt.filter(|_| self.fresh_sample) else {
            return;
        };
        self.fresh_sample = false;
        let estimate = srtt + 4.0 * self.rttvar;
        self.timeout_ms = (estimate.ceil() as u64).clamp(base_ms, max_ms.max(base_ms));
    }

    /// Drops requests older than the current timeout so they are asked again, and backs off.
    /// Returns how many expired.
    pub fn expire(&mut self, now: u64, max_ms: u64) -> u64 {
        let timeout = self.timeout_ms;
        let before = self.outstanding.len();
        let asked_before = &mut self.asked_before;
        self.outstanding.retain(|i, (sent, _)| {
            let keep = now.saturating_sub(*sent) < timeout;
            if !keep {
                asked_before.insert(*i);
            }
            keep
        });
        let expired = before - self.outstanding.len();
        if expired > 0 {
            self.timeout_ms = timeout.saturating_mul(2).min(max_ms);
        }
        expired as u64
    }

    /// Picks missing chunks to fill the window up to `window` outstanding, marks them requested
    /// at `now`, and returns them as request range lists within the protocol's limits.
    ///
    /// The window is refilled once half of it is free, not at every chunk: one request (and
    /// one acknowledgement, one event for the orchestrator) then covers several chunks, while
    /// half a window stays in flight to keep the link busy. Asking per chunk made a request,
    /// its PUBACK and an engine event for every 16 KiB delivered (docs/BENCHMARKS.md).
    pub fn next_requests(
        &mut self,
        now: u64,
        written: &ChunkBitmap,
        window: u32,
    ) -> Vec<Vec<[u32; 2]>> {
        let window = window.max(1) as usize;
        let room = window.saturating_sub(self.outstanding.len());
        if room == 0 || room < window.div_ceil(2) {
            return Vec::new();
        }
        let origin = &self.origin;
        let picked: Vec<u32> = written
            .missing()
            .filter(|i| !self.outstanding.contains_key(i))
            .filter(|i| origin.as_ref().is_none_or(|o| o.via_mqtt(*i)))
            .take(room)
            .collect();
        for &i in &picked {
            let repeat = self.asked_before.contains(&i);
            self.outstanding.insert(i, (now, repeat));
        }
        to_requests(&picked)
    }
}

/// Splits sorted indices into half-open ranges, at most 64 chunks and 16 ranges per request.
fn to_requests(indices: &[u32]) -> Vec<Vec<[u32; 2]>> {
    let mut requests = Vec::new();
    let mut ranges: Vec<[u32; 2]> = Vec::new();
    let mut chunks = 0u32;
    for &i in indices {
        let extends = ranges.last().is_some_and(|r| r[1] == i);
        if chunks == MAX_CHUNKS_PER_REQUEST || (!extends && ranges.len() == MAX_RANGES_PER_REQUEST)
        {
            requests.push(std::mem::take(&mut ranges));
            chunks = 0;
        }
        match ranges.last_mut() {
            Some(r) if r[1] == i => r[1] = i + 1,
            _ => ranges.push([i, i + 1]),
        }
        chunks += 1;
    }
    if !ranges.is_empty() {
        requests.push(ranges);
    }
    requests
}

/// Compares the SHA-256 of the image in the update slot with the manifest's image digest.
pub(super) fn verify_image(
    flash: &mut dyn Flash,
    slot: SlotId,
    manifest: &Manifest,
) -> Result<bool, FlashError> {
    let digest = flash.digest(slot, manifest.image_size)?;
    Ok(manifest.image_digest() == Some(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_respect_chunk_and_range_limits() {
        let all: Vec<u32> = (0..100).collect();
        let r = to_requests(&all);
        assert_eq!(r, vec![vec![[0, 64]], vec![[64, 100]]]);
        let sparse: Vec<u32> = (0..40).map(|i| i * 2).collect();
        let r = to_requests(&sparse);
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|q| q.len() <= MAX_RANGES_PER_REQUEST));
        let flat: Vec<u32> = r.iter().flatten().flat_map(|[s, e]| *s..*e).collect();
        assert_eq!(flat, sparse);
        assert!(to_requests(&[]).is_empty());
    }
}
