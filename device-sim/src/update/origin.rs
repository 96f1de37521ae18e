//! Which chunks a download fetches from an untrusted HTTPS origin (protocol 1.5), and what the
//! agent makes of each answer. Pure: the shell (`crate::origin`) does the fetching and hands the
//! outcome back as [`Input::Origin`](super::Input::Origin).
//!
//! The origin is never trusted. A chunk from it is checked against the signed manifest's digest
//! before it reaches the cipher, exactly as one from the orchestrator; a chunk that fails, or a
//! fetch that fails (an HTTP error, a redirect, a timeout, an oversize body), sends that chunk
//! to the orchestrator instead (chunk requests, §9.3), and after
//! [`AgentConfig::origin_max_failures`](super::AgentConfig::origin_max_failures) failures in a
//! row the origin is given up for the rest of the download. A lying origin therefore costs a
//! few wasted fetches, never a failed campaign (an origin's bad bytes do not count against the
//! chunk's retry budget).

use std::collections::{BTreeMap, HashSet};

use aloft_proto::messages::Job;
use aloft_proto::{ArtifactId, DeviceState, Reason};
use tracing::{debug, warn};

use super::download::ChunkOutcome;
use super::{Persist, UpdateAgent};
use crate::slots::Flash;

/// A chunk the shell should fetch from the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginFetch {
    pub url: String,
    pub artifact: ArtifactId,
    pub index: u32,
    /// The sealed chunk's exact length: a longer body is refused unread.
    pub len: usize,
}

/// Why a fetch brought no chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginFailure {
    /// No connection, TLS refused (the origin's certificate does not chain to the device's
    /// origin trust anchors), or the connection broke mid-response.
    Connect,
    /// A status other than 200 (a 404, a 5xx).
    Status,
    /// A 3xx: redirects are not followed (the URL is the job's, nowhere else).
    Redirect,
    /// The body (or its Content-Length) is longer than the chunk.
    Oversize,
    /// No complete answer within the shell's time limit.
    Timeout,
}

/// The origin side of one download, in memory only (after a restart the origin is tried again).
#[derive(Debug)]
pub(super) struct OriginPlan {
    base: String,
    /// Fetches handed to the shell and not answered yet, with when they were handed over.
    in_flight: BTreeMap<u32, u64>,
    /// Chunks that failed at the origin: they come from the orchestrator.
    fallback: HashSet<u32>,
    failures_in_a_row: u32,
    abandoned: bool,
}

impl OriginPlan {
    pub fn new(base: String) -> Self {
        OriginPlan {
            base,
            in_flight: BTreeMap::new(),
            fallback: HashSet::new(),
            failures_in_a_row: 0,
            abandoned: false,
        }
    }

    #[cfg(test)]
    pub fn abandoned(&self) -> bool {
        self.abandoned
    }

    /// Whether chunk `index` may be asked of the orchestrator now: always once the origin is
    /// given up, otherwise only the chunks that failed there.
    pub fn via_mqtt(&self, index: u32) -> bool {
        self.abandoned || self.fallback.contains(&index)
    }

    /// Picks up to `window` chunks in flight from the missing ones (`missing`, lowest first)
    /// that neither the origin nor the orchestrator is fetching; marks them in flight at `now`.
    pub fn next_fetches(
        &mut self,
        now: u64,
        artifact: &ArtifactId,
        missing: impl Iterator<Item = u32>,
        requested: impl Fn(u32) -> bool,
        sealed_len: impl Fn(u32) -> Option<usize>,
        window: u32,
    ) -> Vec<OriginFetch> {
        if self.abandoned {
            return Vec::new();
        }
        let room = (window as usize).saturating_sub(self.in_flight.len());
        let mut out = Vec::new();
        for index in missing {
            if out.len() >= room {
                break;
            }
            if self.in_flight.contains_key(&index)
                || self.fallback.contains(&index)
                || requested(index)
            {
                continue;
            }
            let (Some(url), Some(len)) = (
                aloft_proto::origin::chunk_url(&self.base, artifact, index),
                sealed_len(index),
            ) else {
                // No URL for this artifact id: the orchestrator serves everything.
                self.abandoned = true;
                return out;
            };
            self.in_flight.insert(index, now);
            out.push(OriginFetch {
                url,
                artifact: artifact.clone(),
                index,
                len,
            });
        }
        out
    }

    /// An answer for `index` arrived: it is no longer in flight. False if it was not asked for.
    pub fn answered(&mut self, index: u32) -> bool {
        self.in_flight.remove(&index).is_some()
    }

    /// Chunk `index` came from the origin and was written.
    pub fn succeeded(&mut self) {
        self.failures_in_a_row = 0;
    }

    /// Chunk `index` failed at the origin: it comes from the orchestrator from now on. Returns
    /// true if this failure made the device give the origin up.
    pub fn failed(&mut self, index: u32, max_in_a_row: u32) -> bool {
        self.fallback.insert(index);
        self.failures_in_a_row += 1;
        if !self.abandoned && self.failures_in_a_row >= max_in_a_row.max(1) {
            self.abandoned = true;
            return true;
        }
        false
    }

    /// Fetches the shell never answered within `limit_ms` (it should always answer; this keeps
    /// a lost one from holding a chunk for good). Returns them; each counts as a failure.
    pub fn overdue(&mut self, now: u64, limit_ms: u64) -> Vec<u32> {
        let late: Vec<u32> = self
            .in_flight
            .iter()
            .filter(|(_, t)| now.saturating_sub(**t) >= limit_ms)
            .map(|(i, _)| *i)
            .collect();
        for i in &late {
            self.in_flight.remove(i);
        }
        late
    }
}

impl UpdateAgent {
    /// The origin side of a download of `job`: only if the job names an origin and this device
    /// fetches from origins (otherwise the job's origin is ignored, as a 1.4 device would).
    pub(super) fn origin_plan(&self, job: &Job) -> Option<OriginPlan> {
        if !self.cfg.origin_fetch {
            return None;
        }
        job.origin.clone().map(OriginPlan::new)
    }

    /// The origin fetches decided since the last call, for the shell to carry out; each is
    /// answered with an [`Input::Origin`](super::Input::Origin).
    pub fn take_origin_fetches(&mut self) -> Vec<OriginFetch> {
        std::mem::take(&mut self.origin_orders)
    }

    /// Counts a failed fetch or refused body of chunk `index`; the chunk goes to the
    /// orchestrator, and too many in a row give the origin up.
    fn origin_failure(&mut self, plan: &mut OriginPlan, index: u32) {
        if plan.failed(index, self.cfg.origin_max_failures) {
            self.stats.origin_abandoned += 1;
            warn!(device = %self.cfg.device, index, "origin given up; chunks come from the orchestrator");
        }
    }

    /// Fills the origin's window with missing chunks nobody is fetching (under the same gate as
    /// chunk requests: the `downloading` report went out first).
    pub(super) fn request_origin(&mut self, now: u64) {
        let (Some(cur), Some(s)) = (&self.record.current, &mut self.session) else {
            return;
        };
        if cur.phase != DeviceState::Downloading || !s.requests_enabled || cur.deferred.is_some() {
            return;
        }
        let Some(mut plan) = s.origin.take() else {
            return;
        };
        let overdue = plan.overdue(now, self.cfg.origin_timeout_ms);
        let artifact = s.manifest.artifact.clone();
        let fetches = plan.next_fetches(
            now,
            &artifact,
            cur.written.missing(),
            |i| s.is_requested(i),
            |i| s.manifest.sealed_len(i),
            self.cfg.origin_window,
        );
        self.origin_orders.extend(fetches);
        for index in overdue {
            self.stats.origin_failed += 1;
            self.origin_failure(&mut plan, index);
        }
        if let Some(s) = &mut self.session {
            s.origin = Some(plan);
        }
    }

    /// An origin fetch's outcome: a body matching the manifest is opened and written like a
    /// chunk frame; anything else sends the chunk to the orchestrator.
    pub(super) fn on_origin(
        &mut self,
        now: u64,
        artifact: &ArtifactId,
        index: u32,
        body: Result<&[u8], OriginFailure>,
        flash: &mut dyn Flash,
    ) {
        let downloading = self
            .current()
            .is_some_and(|(_, p)| p == DeviceState::Downloading);
        let Some(s) = self
            .session
            .as_mut()
            .filter(|s| downloading && s.artifact() == artifact)
        else {
            return;
        };
        let Some(mut plan) = s.origin.take() else {
            return;
        };
        if !plan.answered(index) {
            // Not asked for, or already counted overdue.
            s.origin = Some(plan);
            return;
        }
        let good = match body {
            Err(why) => {
                debug!(device = %self.cfg.device, index, ?why, "origin fetch failed");
                self.stats.origin_failed += 1;
                None
            }
            Ok(b) if !s.matches_manifest(index, b) => {
                debug!(device = %self.cfg.device, index, "origin chunk does not match the manifest");
                self.stats.origin_refused += 1;
                None
            }
            Ok(b) => Some(b),
        };
        let Some(sealed) = good else {
            self.origin_failure(&mut plan, index);
            if let Some(s) = &mut self.session {
                s.origin = Some(plan);
            }
            return;
        };
        plan.succeeded();
        s.origin = Some(plan);
        let (Some(s), Some(cur)) = (&mut self.session, &mut self.record.current) else {
            return;
        };
        let slot = self.record.slots.update_slot();
        let count = s.manifest.chunk_count;
        let outcome = s.accept(
            now,
            artifact,
            index,
            count,
            sealed,
            &mut cur.written,
            slot,
            flash,
            self.cfg.max_chunk_retries,
        );
        match outcome {
            ChunkOutcome::Written => {
                self.stats.origin_chunks += 1;
                self.dirty(Persist::Soon);
            }
            ChunkOutcome::Duplicate => self.stats.chunks_duplicate += 1,
            ChunkOutcome::Ignored => {}
            // Its digest is the signed one, yet it does not open: the release itself is bad,
            // and the orchestrator's copy would fail the same way.
            ChunkOutcome::Rejected { exhausted } => {
                self.stats.chunks_rejected += 1;
                if exhausted {
                    let detail =
                        format!("chunk {index} failed {} times", self.cfg.max_chunk_retries);
                    self.finish(
                        DeviceState::Failed,
                        Some(Reason::ChunkVerificationFailed),
                        Some(detail),
                    );
                }
            }
            ChunkOutcome::WriteFailed(e) => self.fail(Reason::InstallFailed, Some(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> ArtifactId {
        ArtifactId::new("fw-2").unwrap()
    }

    #[test]
    fn fetches_fill_the_window_and_skip_what_is_elsewhere() {
        let mut p = OriginPlan::new("https://o.example/x/".into());
        let f = p.next_fetches(0, &a(), 0..10, |i| i == 1, |_| Some(100), 3);
        assert_eq!(f.iter().map(|f| f.index).collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!(f[0].url, "https://o.example/x/fw-2/chunks/0");
        assert_eq!(f[0].len, 100);
        assert!(p
            .next_fetches(1, &a(), 0..10, |_| false, |_| Some(1), 3)
            .is_empty());
        assert!(p.answered(2));
        assert!(!p.answered(2));
        assert!(!p.failed(2, 3));
        assert!(p.via_mqtt(2) && !p.via_mqtt(4));
        let f = p.next_fetches(2, &a(), 0..10, |i| i == 1, |_| Some(1), 3);
        assert_eq!(f.iter().map(|f| f.index).collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn failures_in_a_row_give_the_origin_up_and_a_success_resets_them() {
        let mut p = OriginPlan::new("https://o".into());
        assert!(!p.failed(0, 3));
        assert!(!p.failed(1, 3));
        p.succeeded();
        assert!(!p.failed(2, 3));
        assert!(!p.failed(3, 3));
        assert!(p.failed(4, 3));
        assert!(p.abandoned() && p.via_mqtt(9));
        assert!(p
            .next_fetches(0, &a(), 0..10, |_| false, |_| Some(1), 3)
            .is_empty());
    }

    #[test]
    fn unanswered_fetches_become_overdue() {
        let mut p = OriginPlan::new("https://o".into());
        p.next_fetches(0, &a(), 0..2, |_| false, |_| Some(1), 4);
        assert!(p.overdue(10, 20).is_empty());
        assert_eq!(p.overdue(20, 20), vec![0, 1]);
        assert!(!p.answered(0));
    }
}

/// The agent with an origin, driven with real crypto and in-memory flash: every kind of lie is
/// refused by hash, the chunk comes over MQTT instead, and the image is still the right one.
#[cfg(test)]
mod agent_tests {
    use aloft_proto::messages::{self, Job};

    use super::super::testkit::*;
    use super::super::*;
    use crate::slots::SlotId;

    fn origin_job(fx: &Fixture, rel: &TestRelease) -> Vec<u8> {
        let mut job: Job = messages::decode(&fx.job("c-1", rel)).unwrap();
        job.origin = Some("https://origin.example/fw".into());
        messages::encode(&job)
    }

    fn origin_rig(fx: &Fixture, max_failures: u32) -> Rig {
        let mut cfg = fx.config();
        cfg.origin_fetch = true;
        cfg.origin_window = 2;
        cfg.origin_max_failures = max_failures;
        fx.rig_cfg(cfg)
    }

    #[test]
    fn every_lie_of_the_origin_is_refused_and_the_chunk_comes_over_mqtt() {
        let fx = Fixture::new();
        let rel = fx.release(&ReleaseSpec {
            size: 12_000,
            ..ReleaseSpec::default()
        });
        let other = fx.release(&ReleaseSpec {
            artifact: "fw-3",
            size: 12_000,
            ..ReleaseSpec::default()
        });
        let count = rel.manifest.chunk_count;
        assert_eq!(count, 12);
        let mut rig = origin_rig(&fx, 100);
        rig.connect();
        rig.step(Input::Job(&origin_job(&fx, &rel)));
        rig.ack_head(messages::AckOutcome::Applied);
        assert!(
            rig.requested.is_empty(),
            "nothing asked over MQTT while the origin serves"
        );
        let artifact = rel.manifest.artifact.clone();
        let mut served = 0u32;
        for _ in 0..100 {
            let fetches = rig.agent.take_origin_fetches();
            if fetches.is_empty() {
                break;
            }
            assert!(fetches.len() <= 2, "the origin window holds");
            for f in fetches {
                assert_eq!(
                    f.url,
                    format!("https://origin.example/fw/fw-2/chunks/{}", f.index)
                );
                assert_eq!(Some(f.len), rel.manifest.sealed_len(f.index));
                let good = rel.sealed[f.index as usize].clone();
                let mut flipped = good.clone();
                flipped[3] ^= 1;
                let lie: Result<Vec<u8>, OriginFailure> = match f.index {
                    0 => Ok(flipped),                         // wrong bytes
                    1 => Ok(good[..good.len() - 7].to_vec()), // truncated
                    2 => Ok(other.sealed[2].clone()),         // another release's chunk
                    3 => Err(OriginFailure::Timeout),         // very slow
                    4 => Err(OriginFailure::Status),          // 404
                    5 => Err(OriginFailure::Redirect),        // a redirect elsewhere
                    6 => Err(OriginFailure::Oversize),        // too long
                    7 => Err(OriginFailure::Connect),         // TLS refused
                    _ => {
                        served += 1;
                        Ok(good)
                    }
                };
                rig.step(Input::Origin {
                    artifact: &artifact,
                    index: f.index,
                    body: lie.as_deref().map_err(|e| *e),
                });
            }
        }
        assert_eq!(served, count - 8);
        let mut asked: Vec<u32> = rig.requested.iter().copied().collect();
        asked.sort();
        assert_eq!(
            asked,
            (0..8).collect::<Vec<_>>(),
            "each refused chunk is asked over MQTT"
        );
        // Nothing the origin lied with reached the slot.
        let st = rig.agent.stats();
        assert_eq!((st.origin_refused, st.origin_failed), (3, 5));
        assert_eq!(st.origin_chunks, u64::from(count - 8));
        assert_eq!(
            st.chunks_rejected, 0,
            "an origin's lie is not a chunk failure"
        );
        rig.run(&rel, &mut vec![]);
        rig.settle(&rel);
        let f = rig.agent.record().finished.back().unwrap().clone();
        assert_eq!(f.state, DeviceState::Succeeded);
        assert_eq!(
            rig.flash.slot_bytes_mut(SlotId::B)[..rel.image.len()],
            rel.image[..]
        );
    }

    #[test]
    fn an_origin_failing_in_a_row_is_given_up_for_mqtt() {
        let fx = Fixture::new();
        let rel = fx.release(&ReleaseSpec {
            size: 12_000,
            ..ReleaseSpec::default()
        });
        let mut rig = origin_rig(&fx, 3);
        rig.connect();
        rig.step(Input::Job(&origin_job(&fx, &rel)));
        rig.ack_head(messages::AckOutcome::Applied);
        let artifact = rel.manifest.artifact.clone();
        for _ in 0..3 {
            for f in rig.agent.take_origin_fetches() {
                rig.step(Input::Origin {
                    artifact: &artifact,
                    index: f.index,
                    body: Err(OriginFailure::Status),
                });
            }
        }
        assert_eq!(rig.agent.stats().origin_abandoned, 1);
        assert!(rig.agent.take_origin_fetches().is_empty());
        rig.run(&rel, &mut vec![]);
        rig.settle(&rel);
        assert_eq!(
            rig.agent.record().finished.back().unwrap().state,
            DeviceState::Succeeded
        );
        assert_eq!(rig.agent.stats().origin_chunks, 0);
    }

    #[test]
    fn without_origin_fetching_a_job_origin_is_ignored() {
        let fx = Fixture::new();
        let rel = fx.release(&ReleaseSpec::default());
        let mut rig = fx.rig();
        rig.connect();
        rig.step(Input::Job(&origin_job(&fx, &rel)));
        assert!(rig.agent.take_origin_fetches().is_empty());
        rig.settle(&rel);
        assert_eq!(
            rig.agent.record().finished.back().unwrap().state,
            DeviceState::Succeeded
        );
    }
}
