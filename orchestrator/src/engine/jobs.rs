//! The jobs a commit publishes, built off the engine's task: a new member's content keys
//! wrapped for its device alone (HPKE), a stored member's job rebuilt byte for byte, and each
//! job's payload encoded.
//!
//! A campaign's jobs differ only in the member's part (its wrapped keys, when it was issued);
//! the signed manifests, the same for every member, are encoded once per building task rather
//! than once per device: encoding the manifest (its chunk digests are most of a job's bytes)
//! was 4% of the orchestrator's CPU while a campaign's 10,000 jobs went out.

use std::sync::Arc;

use aloft_proto::crypto::{self, WrappedKey};
use aloft_proto::messages::{self, DeltaOffer, Job, PROTOCOL_VERSION};
use aloft_proto::trust::SignedRoot;
use aloft_proto::{ArtifactId, CampaignId, DeviceId};
use serde::Serialize;
use serde_json::value::RawValue;

use super::core::{JobOrder, JobTemplate};
use crate::store::MemberJob;

/// Jobs built (wrapped or rebuilt) per task of the blocking pool at least.
const JOBS_PER_TASK: usize = 32;

/// A job ready to leave: its payload, and the member's part of it if it was made now (to be
/// stored before the job leaves).
#[derive(Clone)]
pub(super) struct BuiltJob {
    pub device: DeviceId,
    pub campaign: CampaignId,
    pub payload: Vec<u8>,
    pub made: Option<Arc<MemberJob>>,
}

/// A job, or why its content key could not be wrapped.
pub(super) type Built = Result<BuiltJob, crypto::CryptoError>;

/// Builds each job on the blocking pool, a few tasks at once: a new one has its content keys
/// wrapped for its device, a stored one is rebuilt from what was stored. Each task comes with
/// the number of jobs it builds.
pub(super) fn build_jobs(jobs: Vec<JobOrder>) -> Vec<(tokio::task::JoinHandle<Vec<Built>>, usize)> {
    if jobs.is_empty() {
        return Vec::new();
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_task = jobs.len().div_ceil(threads).max(JOBS_PER_TASK);
    let mut tasks = Vec::new();
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        let part: Vec<JobOrder> = jobs.by_ref().take(per_task).collect();
        let len = part.len();
        let task = tokio::task::spawn_blocking(move || {
            let mut encoded = Encoded::default();
            part.iter()
                .map(|order| build_job(order, &mut encoded))
                .collect()
        });
        tasks.push((task, len));
    }
    tasks
}

/// One member's job: the stored one, or a new one with the content keys wrapped for it alone.
fn build_job(order: &JobOrder, encoded: &mut Encoded) -> Built {
    let (member, made) = match &order.stored {
        Some(job) => (job.clone(), None),
        None => {
            let job = Arc::new(make_member_job(order)?);
            (job.clone(), Some(job))
        }
    };
    Ok(BuiltJob {
        device: order.device.clone(),
        campaign: order.template.campaign.clone(),
        payload: encoded.payload(order, &member),
        made,
    })
}

/// Wraps the content key of the release, and of each delta offered, for one device
/// (HPKE with a fresh ephemeral key: each call gives other bytes, so it is made once).
fn make_member_job(order: &JobOrder) -> Result<MemberJob, crypto::CryptoError> {
    let t = &order.template;
    let public = &order.x25519_public;
    let wrapped_key = crypto::wrap_content_key(public, &order.device, &t.artifact, &t.key)?;
    let mut deltas = Vec::with_capacity(t.deltas.len());
    for d in &t.deltas {
        let wrapped = crypto::wrap_content_key(public, &order.device, &d.artifact, &d.key)?;
        deltas.push((d.artifact.clone(), wrapped));
    }
    Ok(MemberJob {
        issued_at: order.issued_at_ms / 1000,
        wrapped_key,
        deltas,
        root_version: order.root_version,
        wrapped_to: hex::encode(public),
    })
}

/// The signed manifests of the last template a task built jobs of, as JSON.
#[derive(Default)]
struct Encoded {
    template: Option<Arc<JobTemplate>>,
    manifest: Option<Box<RawValue>>,
    deltas: Vec<(ArtifactId, Box<RawValue>)>,
}

impl Encoded {
    /// The job for one device: the campaign's part (the signed manifest, origin, delta
    /// manifests) and the member's own (`MemberJob`). The same inputs give the same bytes, and
    /// the bytes [`messages::encode`] gives the [`Job`] they stand for (tested by
    /// `a_payload_is_byte_for_byte_the_encoding_of_the_job_it_stands_for`).
    fn payload(&mut self, order: &JobOrder, member: &MemberJob) -> Vec<u8> {
        let t = &order.template;
        if !self.template.as_ref().is_some_and(|k| Arc::ptr_eq(k, t)) {
            let json = |m| {
                serde_json::to_string(m)
                    .and_then(RawValue::from_string)
                    .ok()
            };
            self.manifest = json(&t.signed);
            self.deltas = t
                .deltas
                .iter()
                .filter_map(|d| Some((d.artifact.clone(), json(&d.signed)?)))
                .collect();
            self.template = Some(t.clone());
        }
        // Encoding a manifest cannot fail; if it did, the job is encoded whole.
        let Some(manifest) = self.manifest.as_deref() else {
            return messages::encode(&job_of(order, member));
        };
        let deltas = member
            .deltas
            .iter()
            .filter_map(|(artifact, wrapped_key)| {
                let (_, manifest) = self.deltas.iter().find(|(a, _)| a == artifact)?;
                Some(DeltaBytes {
                    manifest: manifest.as_ref(),
                    wrapped_key,
                })
            })
            .collect();
        let job = JobBytes {
            v: PROTOCOL_VERSION,
            campaign: &t.campaign,
            manifest,
            wrapped_key: &member.wrapped_key,
            issued_at: member.issued_at,
            roots: &order.roots,
            origin: t.origin.as_ref(),
            deltas,
        };
        serde_json::to_vec(&job).unwrap_or_default()
    }
}

/// A [`Job`] with its manifests encoded already: the same fields, in the same order, with
/// the same rules for leaving them out.
#[derive(Serialize)]
struct JobBytes<'a> {
    v: u8,
    campaign: &'a CampaignId,
    manifest: &'a RawValue,
    wrapped_key: &'a WrappedKey,
    issued_at: u64,
    #[serde(skip_serializing_if = "<[SignedRoot]>::is_empty")]
    roots: &'a [SignedRoot],
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<&'a String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deltas: Vec<DeltaBytes<'a>>,
}

/// A [`DeltaOffer`] with its manifest encoded already.
#[derive(Serialize)]
struct DeltaBytes<'a> {
    manifest: &'a RawValue,
    wrapped_key: &'a WrappedKey,
}

/// The [`Job`] a member's payload stands for.
fn job_of(order: &JobOrder, member: &MemberJob) -> Job {
    let t = &order.template;
    let deltas = member
        .deltas
        .iter()
        .filter_map(|(artifact, wrapped_key)| {
            let d = t.deltas.iter().find(|d| &d.artifact == artifact)?;
            Some(DeltaOffer {
                manifest: d.signed.clone(),
                wrapped_key: wrapped_key.clone(),
            })
        })
        .collect();
    Job {
        v: PROTOCOL_VERSION,
        campaign: t.campaign.clone(),
        manifest: t.signed.clone(),
        wrapped_key: member.wrapped_key.clone(),
        issued_at: member.issued_at,
        roots: order.roots.to_vec(),
        origin: t.origin.clone(),
        deltas,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::core::DeltaTemplate;
    use aloft_proto::crypto::ContentKey;
    use aloft_proto::manifest::{ManifestSignature, SignedManifest};

    fn signed(text: &str) -> SignedManifest {
        SignedManifest {
            // Characters JSON escapes, so the two encodings must agree on them too.
            payload: Arc::from(format!("{text} \"quoted\" \\ \u{1} é")),
            signatures: vec![ManifestSignature {
                keyid: "k1".into(),
                sig: format!("sig-of-{text}"),
            }],
        }
    }

    fn wrapped(n: u8) -> WrappedKey {
        WrappedKey {
            enc: format!("enc{n}"),
            ct: format!("ct{n}"),
        }
    }

    fn order(template: &Arc<JobTemplate>, roots: Vec<SignedRoot>, device: &str) -> JobOrder {
        JobOrder {
            device: DeviceId::new(device).unwrap(),
            x25519_public: [9; 32],
            template: template.clone(),
            roots: Arc::new(roots),
            root_version: 3,
            issued_at_ms: 1_700_000_000_123,
            stored: None,
        }
    }

    fn member(deltas: Vec<(ArtifactId, WrappedKey)>) -> MemberJob {
        MemberJob {
            issued_at: 1_700_000_000,
            wrapped_key: wrapped(0),
            deltas,
            root_version: 3,
            wrapped_to: "ab".into(),
        }
    }

    #[test]
    fn a_payload_is_byte_for_byte_the_encoding_of_the_job_it_stands_for() {
        let delta = |name: &str| DeltaTemplate {
            artifact: ArtifactId::new(name).unwrap(),
            signed: signed(name),
            key: ContentKey::from_bytes([2; 32]),
            chunk_count: 4,
        };
        let plain = Arc::new(JobTemplate {
            campaign: CampaignId::new("c-1").unwrap(),
            artifact: ArtifactId::new("fw-2").unwrap(),
            signed: signed("full"),
            key: ContentKey::from_bytes([1; 32]),
            origin: None,
            deltas: Vec::new(),
        });
        let full = Arc::new(JobTemplate {
            campaign: CampaignId::new("c-2").unwrap(),
            artifact: ArtifactId::new("fw-3").unwrap(),
            signed: signed("other"),
            key: ContentKey::from_bytes([3; 32]),
            origin: Some("https://origin.example/x".into()),
            deltas: vec![delta("d-1"), delta("d-2")],
        });
        let root = SignedRoot {
            payload: "root".into(),
            signatures: Vec::new(),
        };
        let offers = vec![
            (ArtifactId::new("d-2").unwrap(), wrapped(2)),
            // An offer the template no longer holds is left out, as `job_of` leaves it.
            (ArtifactId::new("gone").unwrap(), wrapped(3)),
        ];
        let cases = [
            (order(&plain, Vec::new(), "dev-1"), member(Vec::new())),
            (order(&full, vec![root.clone()], "dev-2"), member(offers)),
            // Back to the first template: its manifests are encoded anew.
            (order(&plain, vec![root], "dev-3"), member(Vec::new())),
        ];
        let mut encoded = Encoded::default();
        for (order, member) in &cases {
            let job = job_of(order, member);
            assert_eq!(
                String::from_utf8(encoded.payload(order, member)).unwrap(),
                String::from_utf8(messages::encode(&job)).unwrap()
            );
            let back: Job = serde_json::from_slice(&encoded.payload(order, member)).unwrap();
            assert_eq!(back, job);
        }
    }
}
