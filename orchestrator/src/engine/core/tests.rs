//! Unit tests of the core with no I/O: a release signed in memory, a campaign loaded as the shell
//! would load it, and events fed with the time. `Durable` stands in for the store: it keeps what
//! the core's writes would have made durable, so a test can restart a core from it.

use std::collections::BTreeMap;

use aloft_proto::manifest::ReleaseSigningKey;
use aloft_proto::messages::ChunkRequest;
use aloft_proto::release::{build_release, ReleaseMeta};
use aloft_proto::trust::{Role, Root, ROOT_FORMAT};
use aloft_proto::SecurityVersion;

use super::*;
use crate::admin::auth::AdminAuth;
use crate::rollout::{RolloutPolicy, RolloutState};
use crate::store::Target;

/// What the store would hold after the writes so far.
#[derive(Clone, Default)]
pub(super) struct Durable {
    pub devices: BTreeMap<DeviceId, DeviceRecord>,
    pub releases: BTreeMap<ArtifactId, ReleaseRecord>,
    pub campaigns: BTreeMap<CampaignId, CampaignRecord>,
    pub progress: BTreeMap<(CampaignId, DeviceId), Progress>,
    pub audit: Vec<AuditEvent>,
    /// Members' jobs as the shell made and stored them (`Core::job_made`).
    pub jobs: BTreeMap<(CampaignId, DeviceId), MemberJob>,
}

impl Durable {
    pub fn apply(&mut self, writes: &[Write]) {
        for w in writes {
            match w {
                Write::Progress {
                    campaign,
                    device,
                    progress,
                } => {
                    self.progress
                        .insert((campaign.clone(), device.clone()), progress.clone());
                }
                Write::Device(d) => {
                    self.devices.insert(d.id.clone(), d.clone());
                }
                Write::Campaign(c) => {
                    self.campaigns.insert(c.id.clone(), c.clone());
                }
                Write::Release(r) => {
                    self.releases.insert(r.artifact.clone(), r.clone());
                }
                Write::Chunk { .. } => {}
                Write::Audit { event, .. } => self.audit.push(event.clone()),
            }
        }
    }

    fn loaded(&self) -> Loaded {
        Loaded {
            devices: self.devices.values().cloned().collect(),
            releases: self.releases.values().cloned().collect(),
            campaigns: self
                .campaigns
                .values()
                .map(|c| {
                    let progress = self
                        .progress
                        .iter()
                        .filter(|((id, _), _)| *id == c.id)
                        .map(|((_, d), p)| (d.clone(), p.clone()))
                        .collect();
                    (c.clone(), progress)
                })
                .collect(),
            jobs: self.jobs.iter().fold(HashMap::new(), |mut m, ((c, d), j)| {
                m.entry(c.clone())
                    .or_insert_with(Vec::new)
                    .push((d.clone(), j.clone()));
                m
            }),
            uploads: HashMap::new(),
        }
    }
}

/// One campaign of `n` devices over a release of `chunks` chunks, as the store would hold it.
pub(super) struct Fixture {
    pub trust: crate::trust::TrustState,
    pub durable: Durable,
    pub campaign: CampaignId,
    pub artifact: ArtifactId,
    pub devices: Vec<DeviceId>,
    /// The CRL in force when a core starts.
    pub crl: Option<VerifiedCrl>,
}

fn signed_root(root_key: &ReleaseSigningKey, release: &ReleaseSigningKey) -> SignedRoot {
    let keys: BTreeMap<String, String> = [root_key, release]
        .iter()
        .map(|k| (k.public().key_id(), k.public().to_hex()))
        .collect();
    let r = Root {
        v: ROOT_FORMAT,
        version: 1,
        issued_at: 1,
        expires_at: u64::MAX,
        keys,
        root: Role {
            keyids: vec![root_key.public().key_id()],
            threshold: 1,
        },
        release: Role {
            keyids: vec![release.public().key_id()],
            threshold: 1,
        },
        revoked: Vec::new(),
    };
    let mut s = SignedRoot::new(&r);
    s.sign(root_key).unwrap();
    s
}

impl Fixture {
    pub fn new(n: usize, chunks: u32) -> Fixture {
        let (root_key, release_key) = (
            ReleaseSigningKey::generate().unwrap(),
            ReleaseSigningKey::generate().unwrap(),
        );
        let trust =
            crate::trust::TrustState::from_roots(vec![signed_root(&root_key, &release_key)])
                .unwrap();
        let artifact = ArtifactId::new("fw-2").unwrap();
        let meta = ReleaseMeta {
            artifact: artifact.clone(),
            version: "2".into(),
            security_version: SecurityVersion(2),
            hardware_model: "hw".into(),
            chunk_size: 1024,
            created_at: 0,
            expires_at: u64::MAX / 2,
            sequence: Some(2),
            preconditions: None,
        };
        let size = u64::from(chunks) * 1024;
        let image = vec![7u8; size as usize];
        let built = build_release(&mut image.as_slice(), size, &meta, &release_key, |_, _| {
            Ok(())
        })
        .unwrap();
        let operator = OperatorId::new("ops").unwrap();
        let release = ReleaseRecord {
            artifact: artifact.clone(),
            signed: built.signed,
            manifest: built.manifest,
            content_key_hex: hex::encode(built.content_key.as_bytes()),
            complete: true,
            uploaded_by: operator.clone(),
            uploaded_ms: 0,
        };
        let devices: Vec<DeviceId> = (0..n)
            .map(|i| DeviceId::new(format!("dev-{i}")).unwrap())
            .collect();
        let campaign = CampaignId::new("c-test").unwrap();
        let mut durable = Durable::default();
        for (i, d) in devices.iter().enumerate() {
            durable.devices.insert(
                d.clone(),
                DeviceRecord {
                    id: d.clone(),
                    x25519_public: hex::encode([(i % 255) as u8 + 1; 32]),
                    cert_not_after: i64::MAX,
                    cert_not_before: 0,
                    cert_serial: format!("{:02x}", i + 1),
                    revoked: false,
                    groups: Vec::new(),
                    labels: Default::default(),
                    registered_ms: 0,
                    last_seen_ms: 0,
                    floor: None,
                    installed_sequence: None,
                    running_version: None,
                },
            );
            durable
                .progress
                .insert((campaign.clone(), d.clone()), Progress::new(0));
        }
        durable.releases.insert(artifact.clone(), release);
        durable.campaigns.insert(
            campaign.clone(),
            CampaignRecord {
                id: campaign.clone(),
                artifact: artifact.clone(),
                target: Target::Devices(devices.clone()),
                devices: devices.clone(),
                status: CampaignStatus::Active,
                created_by: operator,
                created_ms: 0,
                finished_ms: None,
                policy: RolloutPolicy::default(),
                rollout: RolloutState::default(),
                rolls_back: None,
                origin: None,
            },
        );
        Fixture {
            trust,
            durable,
            campaign,
            artifact,
            devices,
            crl: None,
        }
    }

    /// A core started from what is durable now, as the shell starts one after a restart.
    pub fn core(&self) -> Core {
        Core::new(
            CoreConfig {
                trust: self.trust.clone(),
                ca_pem: String::new(),
                crl: self.crl.clone(),
                seed: [0; 16],
                download_slots: super::pacing::DEFAULT_SLOTS,
                record_follows_issuance: false,
            },
            Metrics::new(None, None),
            self.durable.loaded(),
        )
    }

    pub fn report(&self, device: usize, seq: u32, state: DeviceState) -> Event {
        let reason = match state {
            DeviceState::Failed | DeviceState::RolledBack => Some(Reason::HealthCheckFailed),
            DeviceState::Deferred => Some(Reason::OutsideInstallWindow),
            _ => None,
        };
        let report = StatusReport {
            v: PROTOCOL_VERSION,
            campaign: self.campaign.clone(),
            seq,
            state,
            reason,
            detail: None,
            running_version: None,
        };
        Event::Status {
            device: self.devices[device].clone(),
            payload: Bytes::from(messages::encode(&report)),
        }
    }

    pub fn chunk_request(&self, device: usize, from: u32, to: u32) -> Event {
        let req = ChunkRequest {
            v: PROTOCOL_VERSION,
            campaign: self.campaign.clone(),
            artifact: self.artifact.clone(),
            ranges: vec![[from, to]],
        };
        Event::ChunkRequest {
            device: self.devices[device].clone(),
            payload: Bytes::from(messages::encode(&req)),
        }
    }
}

fn acks(outs: &[Out]) -> Vec<&StatusAck> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Ack { ack, .. } => Some(ack),
            _ => None,
        })
        .collect()
}

fn progress_writes(writes: &[Write]) -> Vec<(&DeviceId, &Progress)> {
    writes
        .iter()
        .filter_map(|w| match w {
            Write::Progress {
                device, progress, ..
            } => Some((device, progress)),
            _ => None,
        })
        .collect()
}

#[test]
fn recovery_notifies_the_members_durably_and_orders_their_jobs_after_the_commit() {
    let f = Fixture::new(3, 4);
    let mut core = f.core();
    let fx = core.recover(1_000);
    assert!(fx.flush);
    let notified: Vec<_> = progress_writes(&fx.writes)
        .into_iter()
        .filter(|(_, p)| p.state == DeviceState::Notified)
        .collect();
    assert_eq!(notified.len(), 3);
    let jobs = fx
        .after_commit
        .iter()
        .filter(|o| matches!(o, Out::Job(_)))
        .count();
    assert_eq!(jobs, 3);
    assert!(fx.now.is_empty(), "nothing leaves before the commit");
}

#[test]
fn an_applied_report_is_acknowledged_after_the_commit_with_its_write_in_the_same_batch() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    core.recover(1_000);
    let mut fx = core.on_event(2_000, f.report(0, 1, DeviceState::Downloading));
    fx.extend(core.settle(2_000));
    assert!(fx.flush);
    assert!(acks(&fx.now).is_empty());
    let acked = acks(&fx.after_commit);
    assert_eq!(acked.len(), 1);
    assert_eq!(acked[0].outcome, AckOutcome::Applied);
    assert_eq!(acked[0].state, DeviceState::Downloading);
    assert!(progress_writes(&fx.writes)
        .iter()
        .any(|(_, p)| p.state == DeviceState::Downloading && p.last_seq == 1));
}

#[test]
fn a_duplicate_report_is_acknowledged_again_and_writes_nothing() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    core.recover(1_000);
    core.on_event(2_000, f.report(0, 1, DeviceState::Downloading));
    core.settle(2_000);
    let fx = core.on_event(3_000, f.report(0, 1, DeviceState::Downloading));
    assert!(fx.writes.is_empty());
    assert_eq!(acks(&fx.after_commit)[0].outcome, AckOutcome::Duplicate);
}

#[test]
fn a_report_for_a_campaign_the_device_is_not_in_is_rejected_without_a_write() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    core.recover(1_000);
    let mut stranger = Fixture::new(1, 4);
    stranger.campaign = CampaignId::new("c-other").unwrap();
    let fx = core.on_event(2_000, stranger.report(0, 1, DeviceState::Downloading));
    assert!(fx.writes.is_empty() && !fx.flush);
    let acked = acks(&fx.after_commit);
    assert_eq!(acked[0].outcome, AckOutcome::Rejected);
    assert_eq!(acked[0].error, Some(AckError::NotTargeted));
}

#[test]
fn a_members_first_chunk_requests_wait_for_the_commit_and_later_ones_are_served_at_once() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    core.recover(1_000);
    core.settle(1_000);
    let first = core.on_event(2_000, f.chunk_request(0, 0, 2));
    assert!(first.flush);
    assert!(progress_writes(&first.writes).iter().any(|(_, p)| p.served));
    assert!(first.now.is_empty());
    assert!(matches!(
        first.after_commit.as_slice(),
        [Out::ServeChunks { indices, .. }] if indices == &[0, 1]
    ));
    // A second request before the batch commits waits too: "served" is not durable yet.
    let second = core.on_event(2_001, f.chunk_request(0, 2, 4));
    assert!(second.now.is_empty());
    assert_eq!(second.after_commit.len(), 1);
    core.settle(2_002);
    let later = core.on_event(3_000, f.chunk_request(0, 0, 9));
    assert!(later.writes.is_empty());
    match later.now.as_slice() {
        [Out::ServeChunks { indices, count, .. }] => {
            assert_eq!(*count, 4);
            // Serving stops at the first index out of range.
            assert_eq!(indices, &[0, 1, 2, 3, 4]);
        }
        other => panic!("expected chunks served at once, got {other:?}"),
    }
}

#[test]
fn a_chunk_request_for_another_artifact_gets_an_error_frame_at_once() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    core.recover(1_000);
    let mut other = Fixture::new(1, 4);
    other.artifact = ArtifactId::new("fw-9").unwrap();
    let fx = core.on_event(2_000, other.chunk_request(0, 0, 1));
    assert!(fx.writes.is_empty() && fx.after_commit.is_empty());
    assert!(matches!(fx.now.as_slice(), [Out::ChunkFrame { .. }]));
}

#[test]
fn a_success_without_any_chunk_is_flagged_in_the_audit_log_and_raises_the_devices_floor() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    core.recover(1_000);
    let mut fx = Effects::default();
    for (seq, s) in [
        DeviceState::Downloading,
        DeviceState::Downloaded,
        DeviceState::Installing,
        DeviceState::Rebooting,
        DeviceState::Verifying,
        DeviceState::Succeeded,
    ]
    .into_iter()
    .enumerate()
    {
        fx.extend(core.on_event(2_000, f.report(0, seq as u32 + 1, s)));
    }
    let flagged = fx.writes.iter().any(
        |w| matches!(w, Write::Audit { event, .. } if event.action == SUCCESS_WITHOUT_DOWNLOAD),
    );
    assert!(flagged);
    let floor = fx.writes.iter().find_map(|w| match w {
        Write::Device(d) => Some((d.floor, d.installed_sequence)),
        _ => None,
    });
    assert_eq!(floor, Some((Some(SecurityVersion(2)), Some(2))));
}

#[test]
fn a_device_seen_for_the_first_time_is_registered_durably_but_last_seen_alone_needs_no_flush() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    let seen = |id: &str| {
        Event::DeviceSeen(SeenDevice {
            id: DeviceId::new(id).unwrap(),
            x25519_public: [9; 32],
            not_before: 0,
            not_after: 10,
            serial: vec![0x42],
        })
    };
    let fx = core.on_event(1_000, seen("dev-new"));
    assert!(fx.flush);
    assert!(matches!(fx.writes.as_slice(), [Write::Device(d)] if d.registered_ms == 1_000));
    let again = core.on_event(2_000, seen("dev-new"));
    assert!(!again.flush);
    assert!(matches!(again.writes.as_slice(), [Write::Device(d)] if d.last_seen_ms == 2_000));
}

#[test]
fn a_core_restarted_from_its_writes_republishes_the_jobs_of_members_in_flight_only() {
    let mut f = Fixture::new(2, 4);
    let mut core = f.core();
    let mut fx = core.recover(1_000);
    fx.extend(core.on_event(2_000, f.report(0, 1, DeviceState::Downloading)));
    fx.extend(core.on_event(2_000, f.report(1, 1, DeviceState::Failed)));
    fx.extend(core.settle(2_000));
    f.durable.apply(&fx.writes);
    let mut restarted = f.core();
    let fx = restarted.recover(5_000);
    assert_eq!(job_devices(&fx), vec![&f.devices[0]]);
}

fn admin(id: &str, body: crate::admin::wire::AdminBody) -> Event {
    let req = crate::admin::wire::AdminRequest {
        v: PROTOCOL_VERSION,
        id: id.into(),
        body,
        auth: None,
    };
    Event::Admin {
        operator: OperatorId::new("ops").unwrap(),
        auth: AdminAuth::Session(Some(aloft_certs::OperatorRole::SecurityAdmin)),
        payload: Bytes::from(messages::encode(&req)),
    }
}

fn replies(outs: &[Out]) -> Vec<crate::admin::wire::AdminReply> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Publish { payload, .. } => serde_json::from_slice(payload).ok(),
            _ => None,
        })
        .collect()
}

#[test]
fn a_registration_waits_for_crl_pem_and_fails_closed_when_the_shell_cannot_read_it() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    let body = crate::admin::wire::AdminBody::DeviceRegister {
        certs: Vec::new(),
        groups: vec!["lab".into()],
    };
    let fx = core.on_event(1_000, admin("r-1", body));
    assert!(
        fx.after_commit.is_empty(),
        "no answer before crl.pem is read"
    );
    let Some(Out::ReadCrl { pending, .. }) = fx.now.into_iter().next() else {
        panic!("the core did not ask for crl.pem");
    };
    let fx = core.on_event(
        1_001,
        Event::CrlRead {
            pending,
            certs: Vec::new(),
            groups: vec!["lab".into()],
            on_disk: Err("crl.pem: unreadable".into()),
        },
    );
    let answered = replies(&fx.after_commit);
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0].id, "r-1");
    assert_eq!(answered[0].error.as_ref().unwrap().code, "crl_unavailable");
    // The refusal is audited with the batch, and a redelivery is answered from the cache.
    assert!(fx.flush);
    let again = core.on_event(
        1_002,
        admin(
            "r-1",
            crate::admin::wire::AdminBody::DeviceRegister {
                certs: Vec::new(),
                groups: Vec::new(),
            },
        ),
    );
    assert!(again.now.is_empty());
    assert_eq!(
        replies(&again.after_commit)[0].error.as_ref().unwrap().code,
        "crl_unavailable"
    );
}

#[test]
fn a_crl_that_does_not_verify_is_refused_at_once_without_reaching_the_shell() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    let body = crate::admin::wire::AdminBody::CrlUpdate {
        crl: "not a crl".into(),
    };
    let fx = core.on_event(1_000, admin("c-1", body));
    assert!(fx.now.is_empty());
    assert_eq!(
        replies(&fx.after_commit)[0].error.as_ref().unwrap().code,
        "invalid_crl"
    );
}

#[test]
fn an_audit_list_is_left_to_the_shell_after_the_commit() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    let body = crate::admin::wire::AdminBody::AuditList {
        since: Some(3),
        limit: Some(5_000),
    };
    let fx = core.on_event(1_000, admin("a-1", body));
    assert!(fx.now.is_empty() && fx.writes.is_empty());
    assert!(matches!(
        fx.after_commit.as_slice(),
        [Out::AuditReply { id, since: 3, limit: 1000, .. }] if id == "a-1"
    ));
}

fn admin_as(
    role: Option<aloft_certs::OperatorRole>,
    id: &str,
    body: crate::admin::wire::AdminBody,
) -> Event {
    match admin(id, body) {
        Event::Admin {
            operator, payload, ..
        } => Event::Admin {
            operator,
            auth: AdminAuth::Session(role),
            payload,
        },
        other => other,
    }
}

fn admin_signed(auth: AdminAuth, id: &str, body: crate::admin::wire::AdminBody) -> Event {
    match admin(id, body) {
        Event::Admin {
            operator, payload, ..
        } => Event::Admin {
            operator,
            auth,
            payload,
        },
        other => other,
    }
}

#[test]
fn a_refused_signature_is_answered_unauthenticated_audited_and_not_cached() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    let pause = || crate::admin::wire::AdminBody::CampaignPause {
        campaign: f.campaign.clone(),
    };
    let fx = core.on_event(
        1_000,
        admin_signed(AdminAuth::Refused("bad_signature"), "p-1", pause()),
    );
    let all: Vec<_> = replies(&fx.now)
        .into_iter()
        .chain(replies(&fx.after_commit))
        .collect();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].error.as_ref().unwrap().code, "unauthenticated");
    assert!(fx.writes.iter().all(|w| matches!(
        w,
        Write::Audit { event, .. } if event.outcome == "unauthenticated"
    )));
    // The real request with that id is then carried out, not answered from a cache.
    let op = Some(aloft_certs::OperatorRole::Operator);
    let fx = core.on_event(
        1_000,
        admin_signed(
            AdminAuth::Signed {
                role: op,
                repeat: false,
            },
            "p-1",
            pause(),
        ),
    );
    assert!(replies(&fx.after_commit)[0].ok);
}

#[test]
fn a_signed_repeat_is_answered_from_the_cache_or_refused_never_run_twice() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    let op = Some(aloft_certs::OperatorRole::Operator);
    let pause = || crate::admin::wire::AdminBody::CampaignPause {
        campaign: f.campaign.clone(),
    };
    let first = AdminAuth::Signed {
        role: op,
        repeat: false,
    };
    let repeat = AdminAuth::Signed {
        role: op,
        repeat: true,
    };
    let fx = core.on_event(1_000, admin_signed(first, "p-1", pause()));
    assert!(replies(&fx.after_commit)[0].ok);
    // QoS 1 redelivery: the cached answer, nothing written.
    let fx = core.on_event(1_000, admin_signed(repeat, "p-1", pause()));
    let all: Vec<_> = replies(&fx.now)
        .into_iter()
        .chain(replies(&fx.after_commit))
        .collect();
    assert!(all[0].ok, "{all:?}");
    assert!(fx.writes.is_empty());
    // A repeat the cache does not hold (forgotten, or never answered here): refused.
    let fx = core.on_event(1_000, admin_signed(repeat, "p-2", pause()));
    let all: Vec<_> = replies(&fx.now)
        .into_iter()
        .chain(replies(&fx.after_commit))
        .collect();
    assert_eq!(all[0].error.as_ref().unwrap().code, "replayed");
    assert!(fx.writes.is_empty());
}

#[test]
fn a_certificate_without_a_role_reads_but_is_refused_anything_else_and_the_refusal_is_audited() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    let fx = core.on_event(
        1_000,
        admin_as(None, "r-1", crate::admin::wire::AdminBody::DeviceCount {}),
    );
    assert!(replies(&fx.after_commit)[0].ok);
    let body = crate::admin::wire::AdminBody::CampaignPause {
        campaign: f.campaign.clone(),
    };
    let fx = core.on_event(1_000, admin_as(None, "r-2", body));
    let reply = &replies(&fx.after_commit)[0];
    assert_eq!(reply.error.as_ref().unwrap().code, "forbidden");
    assert!(
        reply
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("operator role"),
        "{reply:?}"
    );
    // Nothing changed but the audit log.
    assert!(fx.writes.iter().all(|w| matches!(
        w,
        Write::Audit { event, .. } if event.outcome == "forbidden" && event.action == "campaign_pause"
    )));
    assert_eq!(fx.writes.len(), 1);
}

#[test]
fn an_operator_may_pause_a_campaign_but_not_push_a_crl() {
    let f = Fixture::new(1, 4);
    let mut core = f.core();
    let op = Some(aloft_certs::OperatorRole::Operator);
    let body = crate::admin::wire::AdminBody::CampaignPause {
        campaign: f.campaign.clone(),
    };
    let fx = core.on_event(1_000, admin_as(op, "p-1", body));
    assert!(replies(&fx.after_commit)[0].ok);
    let body = crate::admin::wire::AdminBody::CrlUpdate {
        crl: "not a crl".into(),
    };
    let fx = core.on_event(1_000, admin_as(op, "c-1", body));
    assert_eq!(
        replies(&fx.after_commit)[0].error.as_ref().unwrap().code,
        "forbidden"
    );
}

#[test]
fn device_list_shows_the_version_a_device_runs_and_its_state_in_its_latest_campaign() {
    let f = Fixture::new(2, 4);
    let mut core = f.core();
    core.recover(1_000);
    let mut report = f.report(0, 1, DeviceState::Downloading);
    if let Event::Status { payload, .. } = &mut report {
        let mut r: StatusReport = serde_json::from_slice(payload).unwrap();
        r.running_version = Some("1.0.0".into());
        *payload = Bytes::from(messages::encode(&r));
    }
    let fx = core.on_event(2_000, report);
    let versions: Vec<_> = fx
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Device(d) => Some(d.running_version.as_deref()),
            _ => None,
        })
        .collect();
    assert_eq!(
        versions,
        vec![Some("1.0.0")],
        "written once, when it changed"
    );
    let fx = core.on_event(
        3_000,
        admin(
            "list",
            crate::admin::wire::AdminBody::DeviceList {
                after: None,
                limit: None,
            },
        ),
    );
    let reply = replies(&fx.now)
        .into_iter()
        .chain(replies(&fx.after_commit))
        .next()
        .unwrap();
    let list = reply.result.unwrap();
    let list = list.as_array().unwrap();
    let one = list
        .iter()
        .find(|d| d["id"] == f.devices[0].as_str())
        .unwrap();
    assert_eq!(one["running_version"], "1.0.0");
    assert_eq!(one["state"], "downloading");
    assert_eq!(one["campaign"], f.campaign.as_str());
    let other = list
        .iter()
        .find(|d| d["id"] == f.devices[1].as_str())
        .unwrap();
    assert_eq!(other["state"], "notified");
    assert!(other.get("running_version").is_none());
}

#[test]
fn device_list_pages_in_id_order_after_the_last_id_seen() {
    let f = Fixture::new(5, 4);
    let mut core = f.core();
    core.recover(1_000);
    let mut ids = Vec::new();
    let mut after = None;
    for n in 0.. {
        let fx = core.on_event(
            2_000,
            admin(
                &format!("page-{n}"),
                crate::admin::wire::AdminBody::DeviceList {
                    after: after.clone(),
                    limit: Some(2),
                },
            ),
        );
        let reply = replies(&fx.now)
            .into_iter()
            .chain(replies(&fx.after_commit))
            .next()
            .unwrap();
        let page: Vec<String> = reply
            .result
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(DeviceId::new(last.clone()).unwrap());
        ids.extend(page);
    }
    let mut expected: Vec<String> = f.devices.iter().map(|d| d.to_string()).collect();
    expected.sort();
    assert_eq!(ids, expected);
}

/// Feeds `events` at `now`, then settles; what the store would hold is applied to `durable`.
fn feed(core: &mut Core, durable: &mut Durable, now: u64, events: Vec<Event>) -> Effects {
    let mut fx = Effects::default();
    for e in events {
        fx.extend(core.on_event(now, e));
    }
    fx.extend(core.on_tick(now));
    fx.extend(core.settle(now));
    durable.apply(&fx.writes);
    fx
}

fn state_of(durable: &Durable, f: &Fixture, device: usize) -> (DeviceState, Option<Reason>) {
    let p = &durable.progress[&(f.campaign.clone(), f.devices[device].clone())];
    (p.state, p.reason)
}

#[test]
fn deferred_members_are_in_flight_not_failures_and_trip_no_threshold() {
    let mut f = Fixture::new(4, 2);
    let threshold = crate::rollout::policy::Threshold {
        ratio: 0.25,
        min_sample: 1,
    };
    if let Some(c) = f.durable.campaigns.get_mut(&f.campaign) {
        c.policy.pause_at = Some(threshold);
        c.policy.abort_at = Some(threshold);
    }
    let mut durable = f.durable.clone();
    let mut core = f.core();
    durable.apply(&core.recover(1_000).writes);
    // Three of four defer (one before its download, two after it); one succeeds.
    let mut events = vec![f.report(0, 1, DeviceState::Deferred)];
    for d in 1..3 {
        events.push(f.report(d, 1, DeviceState::Downloading));
        events.push(f.report(d, 2, DeviceState::Downloaded));
        events.push(f.report(d, 3, DeviceState::Deferred));
    }
    for (seq, s) in DeviceState::SUCCESS_PATH[2..].iter().enumerate() {
        events.push(f.report(3, seq as u32 + 1, *s));
    }
    let fx = feed(&mut core, &mut durable, 2_000, events);
    assert!(acks(&fx.after_commit)
        .iter()
        .all(|a| a.outcome == AckOutcome::Applied));
    for d in 0..3 {
        assert_eq!(
            state_of(&durable, &f, d),
            (DeviceState::Deferred, Some(Reason::OutsideInstallWindow))
        );
    }
    let counts = core.campaigns[&f.campaign].rollout.waves()[0];
    assert_eq!(
        (counts.deferred, counts.failures(), counts.finished()),
        (3, 0, 1)
    );
    assert_eq!(
        durable.campaigns[&f.campaign].status,
        CampaignStatus::Active
    );
    assert!(!core.campaigns[&f.campaign].rollout.settled());

    // The window opens: the deferred devices go on where they stopped, and the campaign ends.
    let mut events = vec![f.report(0, 2, DeviceState::Downloading)];
    for (seq, s) in DeviceState::SUCCESS_PATH[3..].iter().enumerate() {
        events.push(f.report(0, seq as u32 + 3, *s));
    }
    for d in 1..3 {
        for (seq, s) in DeviceState::SUCCESS_PATH[4..].iter().enumerate() {
            events.push(f.report(d, seq as u32 + 4, *s));
        }
    }
    let fx = feed(&mut core, &mut durable, 3_000, events);
    assert!(acks(&fx.after_commit)
        .iter()
        .all(|a| a.outcome == AckOutcome::Applied));
    for d in 0..4 {
        assert_eq!(
            state_of(&durable, &f, d).0,
            DeviceState::Succeeded,
            "dev-{d}"
        );
    }
    assert_eq!(
        durable.campaigns[&f.campaign].status,
        CampaignStatus::Finished
    );
}

/// Regression (the flaky `postgresql_stopped_mid_campaign_holds_acknowledgements_until_it_is_back`):
/// a status request in the same batch as the last member's report was answered before the
/// batch's settle moved the rollout, so it said every member succeeded and the campaign was
/// still `Active`, which no commit ever held.
#[test]
fn a_status_asked_in_the_batch_that_finishes_a_campaign_says_finished() {
    use crate::admin::wire::AdminBody;
    let f = Fixture::new(2, 2);
    let mut durable = f.durable.clone();
    let mut core = f.core();
    durable.apply(&core.recover(1_000).writes);
    let success = |d: usize| -> Vec<Event> {
        DeviceState::SUCCESS_PATH[2..]
            .iter()
            .enumerate()
            .map(|(seq, s)| f.report(d, seq as u32 + 1, *s))
            .collect()
    };
    feed(&mut core, &mut durable, 2_000, success(0));
    // One batch, as the engine takes it: the last member's reports, then the operator's
    // questions, then the settle; no timer in between.
    let mut fx = Effects::default();
    for e in success(1) {
        fx.extend(core.on_event(3_000, e));
    }
    let status = AdminBody::CampaignStatus {
        campaign: f.campaign.clone(),
        devices: false,
    };
    fx.extend(core.on_event(3_000, admin("status", status)));
    fx.extend(core.on_event(3_000, admin("list", AdminBody::CampaignList {})));
    assert!(
        replies(&fx.after_commit).is_empty(),
        "summaries are answered at the settle"
    );
    fx.extend(core.settle(3_000));
    let replies = replies(&fx.after_commit);
    let summary = |id: &str| -> serde_json::Value {
        let r = replies.iter().find(|r| r.id == id).expect("answered");
        serde_json::to_value(r.result.as_ref().expect("ok")).unwrap()
    };
    let one = summary("status");
    assert_eq!(one["status"], "finished", "{one}");
    assert_eq!(summary("list")[0]["status"], "finished");
}

#[test]
fn a_deferral_past_the_campaign_deadline_is_timed_out_and_its_job_withdrawn() {
    let mut f = Fixture::new(3, 2);
    if let Some(c) = f.durable.campaigns.get_mut(&f.campaign) {
        c.policy.deadline_secs = Some(60);
        // Silence alone never times a deferred device out: it waits on purpose.
        c.policy.device_timeout_secs = Some(5);
    }
    let mut durable = f.durable.clone();
    let mut core = f.core();
    durable.apply(&core.recover(1_000).writes);
    let mut events = vec![
        f.report(0, 1, DeviceState::Deferred),
        f.report(1, 1, DeviceState::Downloading),
    ];
    for (seq, s) in DeviceState::SUCCESS_PATH[2..].iter().enumerate() {
        events.push(f.report(2, seq as u32 + 1, *s));
    }
    feed(&mut core, &mut durable, 2_000, events);
    feed(
        &mut core,
        &mut durable,
        40_000,
        vec![f.report(1, 2, DeviceState::Downloaded)],
    );
    // Device 1 defers after the install gate closed on it; long silence, still deferred.
    feed(
        &mut core,
        &mut durable,
        50_000,
        vec![f.report(1, 3, DeviceState::Deferred)],
    );
    feed(&mut core, &mut durable, 59_000, vec![]);
    assert_eq!(state_of(&durable, &f, 0).0, DeviceState::Deferred);
    assert_eq!(state_of(&durable, &f, 1).0, DeviceState::Deferred);

    let fx = feed(&mut core, &mut durable, 61_000, vec![]);
    for d in 0..2 {
        assert_eq!(
            state_of(&durable, &f, d),
            (DeviceState::Failed, Some(Reason::TimedOut)),
            "dev-{d}"
        );
        let job = aloft_proto::topics::job(&f.devices[d]);
        let withdrawn = fx.after_commit.iter().any(|o| {
            matches!(o, Out::Publish { topic, payload, retain: true }
                if *topic == job
                    && messages::decode::<messages::Withdrawal>(payload)
                        .is_ok_and(|w| w.withdrawn.reason == Reason::TimedOut))
        });
        assert!(withdrawn, "dev-{d}'s job is withdrawn as timed_out");
    }
    assert_eq!(state_of(&durable, &f, 2).0, DeviceState::Succeeded);
    assert_eq!(
        durable.campaigns[&f.campaign].status,
        CampaignStatus::Expired
    );
    assert!(core.campaigns[&f.campaign].rollout.settled());
    // A late report of the timed-out device changes nothing.
    let fx = feed(
        &mut core,
        &mut durable,
        62_000,
        vec![f.report(0, 2, DeviceState::Downloading)],
    );
    assert_eq!(acks(&fx.after_commit)[0].outcome, AckOutcome::Rejected);
}

#[test]
fn each_settled_batch_puts_the_campaigns_it_touched_on_the_board() {
    let f = Fixture::new(1, 4);
    let board = Arc::new(crate::board::Board::default());
    let mut core = f.core().with_board(board.clone());
    let mut changes = board.subscribe();
    core.recover(1_000);
    let on_board = board.campaign(&f.campaign).unwrap();
    let n = f.devices.len() as u32;
    assert_eq!(on_board.total, n);
    assert_eq!(on_board.counts.get("notified"), Some(&n));
    assert!(changes.has_changed().unwrap());
    changes.mark_unchanged();
    // A report changes nothing on the board until its batch settles.
    core.on_event(2_000, f.report(0, 1, DeviceState::Downloading));
    assert!(!changes.has_changed().unwrap());
    core.settle(2_000);
    assert!(changes.has_changed().unwrap());
    let on_board = board.campaign(&f.campaign).unwrap();
    assert_eq!(on_board.counts.get("downloading"), Some(&1));
    assert_eq!(
        on_board
            .waves
            .iter()
            .map(|w| w.counts.downloading)
            .sum::<u32>(),
        1
    );
    // What costs a pass over the members is left out.
    assert!(on_board.devices.is_empty() && on_board.reasons.is_empty());
}

/// The devices `fx` orders a job for, in order.
fn job_devices(fx: &Effects) -> Vec<&DeviceId> {
    fx.after_commit
        .iter()
        .filter_map(|o| match o {
            Out::Job(j) => Some(&j.device),
            _ => None,
        })
        .collect()
}

/// The devices notified by `fx` (progress written as notified), each with its job ordered.
fn notified_with_jobs(fx: &Effects) -> Vec<DeviceId> {
    let notified: Vec<DeviceId> = progress_writes(&fx.writes)
        .into_iter()
        .filter(|(_, p)| p.state == DeviceState::Notified)
        .map(|(d, _)| d.clone())
        .collect();
    let jobs: HashSet<&DeviceId> = job_devices(fx).into_iter().collect();
    for d in &notified {
        assert!(
            jobs.contains(d),
            "{d} notified without its job in the same batch"
        );
    }
    notified
}

#[test]
fn a_wave_larger_than_a_slice_is_notified_over_several_batches_each_job_after_its_own_commit() {
    let slice = crate::rollout::NOTIFY_PER_TICK as usize;
    let n = 2 * slice + 7;
    let f = Fixture::new(n, 4);
    let mut core = f.core();
    let mut fx = core.recover(1_000);
    let mut seen = HashSet::new();
    let mut batches = Vec::new();
    loop {
        assert!(fx.now.is_empty(), "nothing leaves before the commit");
        let notified = notified_with_jobs(&fx);
        assert!(notified.len() <= slice);
        for d in &notified {
            assert!(seen.insert(d.clone()), "{d} notified twice");
        }
        batches.push(notified.len());
        if !core.has_more() {
            break;
        }
        fx = core.settle(1_001);
    }
    assert_eq!(batches, vec![slice, slice, 7]);
    assert_eq!(seen.len(), n);
}

#[test]
fn a_restart_between_slices_notifies_the_rest_and_no_member_twice() {
    let slice = crate::rollout::NOTIFY_PER_TICK as usize;
    let n = slice + 5;
    let f = Fixture::new(n, 4);
    let mut core = f.core();
    let fx = core.recover(1_000);
    let first = notified_with_jobs(&fx);
    assert_eq!(first.len(), slice);
    assert!(core.has_more());
    // The first slice was committed; the process dies before the next settle.
    let mut durable = f.durable.clone();
    durable.apply(&fx.writes);
    let mut again = Fixture { durable, ..f }.core();
    let fx = again.recover(2_000);
    let rest = notified_with_jobs(&fx);
    assert_eq!(rest.len(), 5, "only members still idle are notified");
    assert!(rest.iter().all(|d| !first.contains(d)));
    // Members notified before the restart get their job again (no retained messages survive a
    // restart of the embedded broker), the same campaign's.
    let jobs = fx
        .after_commit
        .iter()
        .filter(|o| matches!(o, Out::Job(_)))
        .count();
    assert_eq!(jobs, n);
    assert!(!again.has_more());
}

/// The job orders among `outs`, in order.
fn job_orders(outs: &[Out]) -> Vec<&JobOrder> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Job(j) => Some(j),
            _ => None,
        })
        .collect()
}

/// What the shell would make and store for an order with nothing stored (the keys are stand-ins:
/// the core never reads them).
fn made_job(order: &JobOrder, n: u8) -> MemberJob {
    MemberJob {
        issued_at: order.issued_at_ms / 1000,
        wrapped_key: crypto::WrappedKey {
            enc: format!("enc-{n}"),
            ct: format!("ct-{n}"),
        },
        deltas: Vec::new(),
        root_version: order.root_version,
        wrapped_to: hex::encode(order.x25519_public),
    }
}

/// Recovers `core`, makes and stores the job of each order as the shell does, and returns them.
fn recover_and_make_jobs(f: &mut Fixture, core: &mut Core) -> Vec<(DeviceId, MemberJob)> {
    let fx = core.recover(1_000);
    f.durable.apply(&fx.writes);
    let mut made = Vec::new();
    for (n, order) in job_orders(&fx.after_commit).into_iter().enumerate() {
        assert!(order.stored.is_none(), "a first job is made, not found");
        let job = made_job(order, n as u8);
        core.job_made(&f.campaign, &order.device, Arc::new(job.clone()));
        f.durable
            .jobs
            .insert((f.campaign.clone(), order.device.clone()), job.clone());
        made.push((order.device.clone(), job));
    }
    made
}

#[test]
fn a_members_job_is_made_once_and_every_later_order_carries_the_stored_one() {
    let mut f = Fixture::new(3, 4);
    let mut core = f.core();
    let made = recover_and_make_jobs(&mut f, &mut core);
    assert_eq!(made.len(), 3);
    let stored_of = |outs: &[Out]| -> BTreeMap<DeviceId, MemberJob> {
        job_orders(outs)
            .into_iter()
            .map(|o| {
                let stored = o.stored.as_deref().expect("the stored job, not a new one");
                (o.device.clone(), stored.clone())
            })
            .collect()
    };
    let made: BTreeMap<DeviceId, MemberJob> = made.into_iter().collect();
    // The broker link comes back: the same jobs, from what was stored.
    let fx = core.on_event(2_000, Event::LinkRestored);
    assert_eq!(stored_of(&fx.after_commit), made);
    // A restart loads them with the members' progress and republishes them as they were.
    let mut restarted = f.core();
    let fx = restarted.recover(3_000);
    assert_eq!(stored_of(&fx.after_commit), made);
}

#[test]
fn a_member_notified_before_jobs_were_stored_gets_its_job_made_once_at_recovery() {
    let mut f = Fixture::new(2, 4);
    let mut core = f.core();
    recover_and_make_jobs(&mut f, &mut core);
    // A store written before jobs were stored: the members are notified, no job row.
    f.durable.jobs.clear();
    let mut upgraded = f.core();
    let made = recover_and_make_jobs(&mut f, &mut upgraded);
    assert_eq!(made.len(), 2);
    let fx = upgraded.on_event(2_000, Event::LinkRestored);
    let orders = job_orders(&fx.after_commit);
    assert_eq!(orders.len(), 2);
    assert!(orders.iter().all(|o| o.stored.is_some()));
}

#[test]
fn a_job_stored_before_its_device_was_revoked_is_not_published_again() {
    let mut f = Fixture::new(2, 4);
    let mut core = f.core();
    recover_and_make_jobs(&mut f, &mut core);
    // dev-0's certificate (serial 01) is revoked while the orchestrator is down.
    let ca = aloft_certs::FleetCa::create("test ca", 1).unwrap();
    let der = ca.crl(&[vec![0x01]], 1, 7).unwrap();
    let pem = format!(
        "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der.as_ref())
    );
    f.crl = Some(VerifiedCrl::parse(&pem, ca.cert_pem()).unwrap());
    let mut restarted = f.core();
    let fx = restarted.recover(2_000);
    let orders = job_orders(&fx.after_commit);
    assert_eq!(
        orders.iter().map(|o| o.device.as_str()).collect::<Vec<_>>(),
        ["dev-1"],
        "no job, stored or new, for the revoked device"
    );
    let failed = progress_writes(&fx.writes)
        .into_iter()
        .any(|(d, p)| d == &f.devices[0] && p.reason == Some(Reason::Revoked));
    assert!(failed, "the revoked member is failed");
    let withdrawn = fx.after_commit.iter().any(|o| {
        matches!(o, Out::Publish { topic, payload, retain: true }
            if *topic == topics::job(&f.devices[0]) && payload.is_empty())
    });
    assert!(withdrawn, "the revoked device's retained job is cleared");
    // The broker link coming back does not bring it back either.
    let fx = restarted.on_event(3_000, Event::LinkRestored);
    assert!(job_orders(&fx.after_commit)
        .iter()
        .all(|o| o.device != f.devices[0]));
}

#[test]
fn a_device_registered_again_with_another_key_gets_a_new_job() {
    let mut f = Fixture::new(2, 4);
    let mut core = f.core();
    recover_and_make_jobs(&mut f, &mut core);
    if let Some(d) = f.durable.devices.get_mut(&f.devices[1]) {
        d.x25519_public = hex::encode([0xee; 32]);
    }
    let mut restarted = f.core();
    let fx = restarted.recover(2_000);
    let orders = job_orders(&fx.after_commit);
    let by_device = |i: usize| orders.iter().find(|o| o.device == f.devices[i]).unwrap();
    assert!(by_device(0).stored.is_some());
    assert!(
        by_device(1).stored.is_none(),
        "its stored keys were wrapped to the old key"
    );
}
