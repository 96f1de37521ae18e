//! Chunk service on a replica (issue 12: "chunks are served by whichever replica receives the
//! request"). Every replica, the leader included, answers the chunk requests its broker link
//! hands it, from what the store says, without the engine: the engine's state lives in the
//! leader only.
//!
//! What a replica knows of a member is read from the store and kept for [`VIEW_TTL`]: its
//! progress row (state, withdrawal or revocation, whether it was served) and its campaign
//! (status, release). So a withdrawal or a revocation reaches every replica's chunk service
//! within that time; the leader refuses the member's reports at once. One read per member
//! per second, whatever it asks. Releases are immutable once complete and are kept without
//! expiry; an artifact that is unknown or not complete yet is remembered as such for
//! [`VIEW_TTL`], so a member asking for it again costs no read. The decision itself is
//! [`judge`], pure. The first chunks a member is handed by a replica wait, held, until a note
//! saying so is committed to the inbox (`KIND_SERVED`), as the engine's own "served" record
//! does, so a `succeeded` report of a device that was sent chunks is never flagged; the
//! thread goes on with other requests meanwhile.
//!
//! Pacing is per replica (`engine::core::pacing`): each replica hands out its own slots. A
//! slot is given back when the device asks for the image's last chunk or falls silent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_proto::chunkframe::{self, ChunkErrorCode};
use aloft_proto::manifest::Manifest;
use aloft_proto::messages::{self, ChunkRequest};
use aloft_proto::{topics, ArtifactId, CampaignId, DeviceId, DeviceState};
use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::engine::core::pacing::{DownloadSlots, IDLE_MS};
use crate::engine::frames::FrameCache;
use crate::fleet::state::Progress;
use crate::metrics::Metrics;
use crate::model::CampaignStatus;
use crate::mqtt::Publisher;
use crate::store::Store;

use super::inbox::InboxWriter;

/// How long what was read about a member or a campaign is trusted.
pub const VIEW_TTL: Duration = Duration::from_secs(1);
/// Most members and campaigns remembered; when full, the expired go, then everything.
const MAX_VIEWS: usize = 1 << 16;
/// Requests waiting for the chunk thread; beyond it a request is dropped (and counted) and
/// the device asks again when its timer runs out.
const QUEUE: usize = 4096;
/// Releases remembered (complete ones never change).
const MAX_RELEASES: usize = 64;

/// What a replica knows of one campaign.
#[derive(Debug, Clone)]
pub struct CampaignView {
    pub status: CampaignStatus,
    /// The policy's device timeout: members this replica serves are reported alive to the
    /// leader a few times within it.
    pub device_timeout: Option<Duration>,
    pub artifact: ArtifactId,
    pub chunk_count: u32,
    /// The image's manifest, to recognise its deltas.
    pub manifest: Option<Arc<Manifest>>,
}

/// What a replica knows of one member: its progress row. A revoked member's row says so
/// (the leader fails its members in flight, reason `revoked`, when the CRL revokes it).
#[derive(Debug, Clone)]
pub struct MemberView {
    pub progress: Progress,
}

/// What to do with a chunk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Answer the first index with this error; `reason` is the metric's label.
    Refuse {
        code: ChunkErrorCode,
        reason: &'static str,
    },
    /// Serve from an artifact of `count` chunks (`delta`: one of the campaign's deltas).
    Serve { count: u32, delta: bool },
}

/// Decides a request for `artifact` from what the store said. `delta_count` is the chunk
/// count of `artifact` if it is a complete delta release for the campaign's image.
pub fn judge(
    campaign: Option<&CampaignView>,
    member: Option<&MemberView>,
    artifact: &ArtifactId,
    delta_count: Option<u32>,
) -> Verdict {
    let refuse = |code, reason| Verdict::Refuse { code, reason };
    let Some(campaign) = campaign else {
        return refuse(ChunkErrorCode::UnknownArtifact, "unknown_campaign");
    };
    let Some(member) = member else {
        return refuse(ChunkErrorCode::UnknownArtifact, "unknown_artifact");
    };
    if member.progress.reason == Some(aloft_proto::Reason::Revoked) {
        return refuse(ChunkErrorCode::NotDownloading, "revoked");
    }
    let (count, delta) = if &campaign.artifact == artifact {
        (campaign.chunk_count, false)
    } else if let Some(count) = delta_count {
        (count, true)
    } else {
        return refuse(ChunkErrorCode::UnknownArtifact, "unknown_artifact");
    };
    let p = &member.progress;
    let serving = matches!(p.state, DeviceState::Notified | DeviceState::Downloading);
    if !serving || crate::engine::core::withdrawn_reason(p, campaign.status).is_some() {
        return refuse(ChunkErrorCode::NotDownloading, "not_downloading");
    }
    Verdict::Serve { count, delta }
}

/// Whether a member served here must be reported alive to the leader again, last reported at
/// `last`, under a device timeout of `timeout`: a third of it apart (at least 500 ms), so that
/// two lost notes still leave one in time.
pub fn touch_due(last: Option<Instant>, now: Instant, timeout: Duration) -> bool {
    let every = (timeout / 3).max(Duration::from_millis(500));
    last.is_none_or(|at| now.duration_since(at) >= every)
}

/// What the chunk thread takes.
enum Job {
    /// A chunk request as received.
    Request(DeviceId, Bytes),
    /// The `served` note of a member is committed: its held requests may be answered.
    Noted(CampaignId, DeviceId),
}

/// Requests held per member while its `served` note is committed (a device's window); more
/// are dropped, counted, and asked again by the device.
const MAX_HELD: usize = 32;

/// Hands chunk requests to the chunk thread.
#[derive(Clone)]
pub struct ChunkServer {
    tx: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl ChunkServer {
    /// Starts the chunk thread reading `store` (a replica's reading connection) and
    /// publishing through `publisher`; `slots` devices are served at once.
    pub fn start(
        store: Store,
        publisher: Publisher,
        inbox: InboxWriter,
        metrics: Arc<Metrics>,
        slots: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let runtime = tokio::runtime::Handle::current();
        let worker = Worker {
            jobs: tx.clone(),
            held: HashMap::new(),
            store,
            publisher,
            inbox,
            metrics: metrics.clone(),
            runtime,
            slots: DownloadSlots::new(slots, IDLE_MS),
            frames: FrameCache::default(),
            campaigns: HashMap::new(),
            members: HashMap::new(),
            releases: HashMap::new(),
            missing: HashMap::new(),
            touched: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("aloft-chunks".into())
            .spawn(move || worker.run(rx))?;
        Ok(ChunkServer { tx, metrics })
    }

    /// Queues a request; a full queue drops it (the device asks again).
    pub fn request(&self, device: DeviceId, payload: Bytes) {
        if self.tx.try_send(Job::Request(device, payload)).is_err() {
            self.metrics.rejected("chunk_request", "replica_queue_full");
        }
    }
}

struct Worker {
    /// Its own queue, for the writer's thread to say a `served` note is committed.
    jobs: mpsc::Sender<Job>,
    /// Requests waiting for their member's `served` note.
    held: HashMap<(CampaignId, DeviceId), Vec<Bytes>>,
    store: Store,
    publisher: Publisher,
    inbox: InboxWriter,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    slots: DownloadSlots,
    frames: FrameCache,
    campaigns: HashMap<CampaignId, (Instant, Option<CampaignView>)>,
    members: HashMap<(CampaignId, DeviceId), (Instant, Option<MemberView>)>,
    /// Complete releases (immutable).
    releases: HashMap<ArtifactId, Arc<Manifest>>,
    /// Artifacts found unknown or not complete, and when.
    missing: HashMap<ArtifactId, (Instant, ())>,
    /// When each member served here was last reported alive to the leader.
    touched: HashMap<(CampaignId, DeviceId), (Instant, ())>,
}

/// Keeps a view map under [`MAX_VIEWS`]: the expired go first, then everything.
fn make_room<K, V>(map: &mut HashMap<K, (Instant, V)>, now: Instant, metrics: &Metrics) {
    if map.len() < MAX_VIEWS {
        return;
    }
    map.retain(|_, (at, _)| now.duration_since(*at) < VIEW_TTL);
    if map.len() >= MAX_VIEWS {
        metrics.rejected("chunk_request", "replica_views_full");
        map.clear();
    }
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(job) = rx.blocking_recv() {
            match job {
                Job::Request(device, payload) => {
                    let started = Instant::now();
                    self.serve(device, &payload);
                    self.metrics
                        .chunk_request_served(started.elapsed().as_secs_f64());
                }
                Job::Noted(campaign, device) => {
                    let (key, now) = ((campaign, device), Instant::now());
                    make_room(&mut self.touched, now, &self.metrics);
                    self.touched.insert(key.clone(), (now, ()));
                    for payload in self.held.remove(&key).unwrap_or_default() {
                        self.serve(key.1.clone(), &payload);
                    }
                }
            }
        }
        debug!("chunk thread stops: the link is gone");
    }

    fn send(&self, device: &DeviceId, frame: Vec<u8>) {
        let topic = topics::chunk_response(device);
        // A closed link ends the process elsewhere; the device asks again meanwhile.
        let _ = self
            .runtime
            .block_on(self.publisher.publish(topic, frame, false));
    }

    fn campaign(&mut self, id: &CampaignId, now: Instant) -> Option<CampaignView> {
        if let Some((at, v)) = self.campaigns.get(id) {
            if now.duration_since(*at) < VIEW_TTL {
                return v.clone();
            }
        }
        let view = match self.store.campaign(id) {
            Ok(Some(record)) => self
                .release(&record.artifact, now)
                .map(|manifest| CampaignView {
                    status: record.status,
                    device_timeout: record.policy.device_timeout_secs.map(Duration::from_secs),
                    artifact: record.artifact,
                    chunk_count: manifest.chunk_count,
                    manifest: Some(manifest),
                }),
            Ok(None) => None,
            Err(e) => {
                warn!(campaign = %id, error = %e, "reading a campaign for chunk service failed");
                return None;
            }
        };
        make_room(&mut self.campaigns, now, &self.metrics);
        self.campaigns.insert(id.clone(), (now, view.clone()));
        view
    }

    /// A complete release's manifest; `None` for one unknown or not complete yet.
    fn release(&mut self, artifact: &ArtifactId, now: Instant) -> Option<Arc<Manifest>> {
        if let Some(manifest) = self.releases.get(artifact) {
            return Some(manifest.clone());
        }
        if let Some((at, ())) = self.missing.get(artifact) {
            if now.duration_since(*at) < VIEW_TTL {
                return None;
            }
        }
        let found = match self.store.release(artifact) {
            Ok(r) => r.filter(|r| r.complete).map(|r| Arc::new(r.manifest)),
            Err(e) => {
                warn!(%artifact, error = %e, "reading a release for chunk service failed");
                return None;
            }
        };
        match &found {
            Some(manifest) => {
                if self.releases.len() >= MAX_RELEASES {
                    self.releases.clear();
                }
                self.releases.insert(artifact.clone(), manifest.clone());
                self.missing.remove(artifact);
            }
            // It may be uploaded or finished later: asked again after the view's time.
            None => {
                make_room(&mut self.missing, now, &self.metrics);
                self.missing.insert(artifact.clone(), (now, ()));
            }
        }
        found
    }

    fn member(
        &mut self,
        campaign: &CampaignId,
        device: &DeviceId,
        now: Instant,
    ) -> Option<MemberView> {
        let key = (campaign.clone(), device.clone());
        if let Some((at, v)) = self.members.get(&key) {
            if now.duration_since(*at) < VIEW_TTL {
                return v.clone();
            }
        }
        let read = self
            .store
            .progress(campaign, device)
            .map(|p| p.map(|progress| MemberView { progress }));
        let view = match read {
            Ok(v) => v,
            Err(e) => {
                warn!(%device, %campaign, error = %e, "reading a member for chunk service failed");
                return None;
            }
        };
        make_room(&mut self.members, now, &self.metrics);
        self.members.insert(key, (now, view.clone()));
        view
    }

    fn serve(&mut self, device: DeviceId, payload: &[u8]) {
        let req: ChunkRequest = match messages::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.rejected("chunk_request", e.code());
                warn!(%device, error = %e, "chunk request refused");
                return;
            }
        };
        let now = Instant::now();
        let now_ms = crate::clock::now_ms();
        let first = req.ranges[0][0];
        let campaign = self.campaign(&req.campaign, now);
        let member = match &campaign {
            Some(_) => self.member(&req.campaign, &device, now),
            None => None,
        };
        // Another artifact than the image is looked up only for a member (it may be a delta).
        let delta_count = match (&campaign, &member) {
            (
                Some(CampaignView {
                    artifact,
                    manifest: Some(image),
                    ..
                }),
                Some(_),
            ) if *artifact != req.artifact => self
                .release(&req.artifact, now)
                .filter(|m| m.is_delta_for(image))
                .map(|m| m.chunk_count),
            _ => None,
        };
        let (count, _delta) = match judge(
            campaign.as_ref(),
            member.as_ref(),
            &req.artifact,
            delta_count,
        ) {
            Verdict::Refuse { code, reason } => {
                self.metrics.rejected("chunk_request", reason);
                self.send(
                    &device,
                    chunkframe::encode_error(&req.artifact, first, code),
                );
                return;
            }
            Verdict::Serve { count, delta } => (count, delta),
        };
        if let Err(wait_ms) = self.slots.admit(&device, now_ms) {
            self.metrics.rejected("chunk_request", "busy");
            self.send(
                &device,
                chunkframe::encode_busy(&req.artifact, first, wait_ms),
            );
            return;
        }
        let served = member.as_ref().is_some_and(|m| m.progress.served);
        let key = (req.campaign.clone(), device.clone());
        // `touched` holds the members whose `served` note this replica committed.
        if first < count && !served && !self.touched.contains_key(&key) {
            // The request waits for the note's commit; the thread goes on with others.
            if let Some(held) = self.held.get_mut(&key) {
                if held.len() < MAX_HELD {
                    held.push(Bytes::copy_from_slice(payload));
                } else {
                    self.metrics.rejected("chunk_request", "replica_held_full");
                }
                return;
            }
            if self.held.len() >= MAX_VIEWS {
                self.metrics.rejected("chunk_request", "replica_held_full");
                return;
            }
            let jobs = self.jobs.clone();
            let (c, d) = key.clone();
            let noted = Box::new(move || {
                // From the writer's thread; a full queue waits: this thread drains it.
                let _ = jobs.blocking_send(Job::Noted(c, d));
            });
            if self
                .inbox
                .served(device.as_str(), req.campaign.as_str(), noted)
            {
                self.held.insert(key, vec![Bytes::copy_from_slice(payload)]);
            }
            return;
        } else if let Some(timeout) = campaign.as_ref().and_then(|c| c.device_timeout) {
            if touch_due(self.touched.get(&key).map(|(at, _)| *at), now, timeout) {
                self.inbox.touch(device.as_str(), req.campaign.as_str());
                make_room(&mut self.touched, now, &self.metrics);
                self.touched.insert(key, (now, ()));
            }
        }
        let mut last = false;
        for index in req.indices() {
            if index >= count {
                self.send(
                    &device,
                    chunkframe::encode_error(&req.artifact, index, ChunkErrorCode::OutOfRange),
                );
                break;
            }
            last |= index + 1 == count;
            let frame = match self.frames.get(&self.store, &req.artifact, index, count) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    warn!(artifact = %req.artifact, index, "stored release is missing a chunk");
                    self.send(
                        &device,
                        chunkframe::encode_error(
                            &req.artifact,
                            index,
                            ChunkErrorCode::UnknownArtifact,
                        ),
                    );
                    break;
                }
                Err(e) => {
                    warn!(artifact = %req.artifact, index, error = %e, "reading a chunk failed");
                    break;
                }
            };
            let sealed = frame.len() - chunkframe::header_len(&req.artifact);
            self.metrics.chunk_served(sealed);
            self.send(&device, frame.to_vec());
        }
        // Its download is nearly over: the slot goes to the next device now, not after the
        // idle time (this replica does not see the report that ends the download).
        if last {
            self.slots.release(&device, now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_proto::Reason;

    fn campaign(status: CampaignStatus) -> CampaignView {
        CampaignView {
            status,
            device_timeout: None,
            artifact: ArtifactId::new("a1").unwrap(),
            chunk_count: 4,
            manifest: None,
        }
    }

    fn member(state: DeviceState, reason: Option<Reason>) -> MemberView {
        let mut progress = Progress::new(0);
        progress.state = state;
        progress.reason = reason;
        MemberView { progress }
    }

    #[test]
    fn a_member_served_here_is_reported_alive_three_times_per_device_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(30);
        assert!(touch_due(None, t0, timeout));
        assert!(!touch_due(Some(t0), t0 + Duration::from_secs(9), timeout));
        assert!(touch_due(Some(t0), t0 + Duration::from_secs(10), timeout));
        // A very short timeout still leaves half a second between notes.
        let short = Duration::from_millis(600);
        assert!(!touch_due(Some(t0), t0 + Duration::from_millis(400), short));
        assert!(touch_due(Some(t0), t0 + Duration::from_millis(500), short));
    }

    #[test]
    fn only_a_downloading_member_of_a_running_campaign_is_served() {
        let a1 = ArtifactId::new("a1").unwrap();
        let run = campaign(CampaignStatus::Active);
        let serve = Verdict::Serve {
            count: 4,
            delta: false,
        };
        for state in [DeviceState::Notified, DeviceState::Downloading] {
            let m = member(state, None);
            assert_eq!(judge(Some(&run), Some(&m), &a1, None), serve);
        }
        let refused = |v: Verdict| match v {
            Verdict::Refuse { reason, .. } => reason,
            Verdict::Serve { .. } => "served",
        };
        let done = member(DeviceState::Succeeded, None);
        assert_eq!(
            refused(judge(Some(&run), Some(&done), &a1, None)),
            "not_downloading"
        );
        let timed_out = member(DeviceState::Failed, Some(Reason::TimedOut));
        assert_eq!(
            refused(judge(Some(&run), Some(&timed_out), &a1, None)),
            "not_downloading"
        );
        let aborted = campaign(CampaignStatus::Aborted);
        let m = member(DeviceState::Downloading, None);
        assert_eq!(
            refused(judge(Some(&aborted), Some(&m), &a1, None)),
            "not_downloading"
        );
        let revoked = member(DeviceState::Failed, Some(Reason::Revoked));
        assert_eq!(
            refused(judge(Some(&run), Some(&revoked), &a1, None)),
            "revoked"
        );
        assert_eq!(
            refused(judge(Some(&run), None, &a1, None)),
            "unknown_artifact"
        );
        assert_eq!(
            refused(judge(None, Some(&m), &a1, None)),
            "unknown_campaign"
        );
        let other = ArtifactId::new("a2").unwrap();
        assert_eq!(
            refused(judge(Some(&run), Some(&m), &other, None)),
            "unknown_artifact"
        );
        assert_eq!(
            judge(Some(&run), Some(&m), &other, Some(7)),
            Verdict::Serve {
                count: 7,
                delta: true
            }
        );
    }
}
