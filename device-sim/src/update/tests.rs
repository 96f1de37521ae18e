//! Scenario tests of the update agent with real crypto and in-memory flash; no sockets.

use aloft_proto::chunkframe::{self, ChunkErrorCode};
use aloft_proto::manifest::{ReleaseSigningKey, SignedManifest};
use aloft_proto::messages::AckOutcome;
use aloft_proto::{DeviceId, DeviceState, Reason, SecurityVersion};
use base64::Engine;

use super::testkit::*;
use super::*;
use crate::slots::{SlotId, SlotState};
use crate::store::{DeviceRecord, DeviceStore, MemoryStore};

use DeviceState::*;

fn finished(rig: &Rig, campaign: &str) -> (DeviceState, Option<Reason>) {
    let f = rig
        .agent
        .record()
        .finished
        .iter()
        .find(|f| f.campaign.as_str() == campaign)
        .expect("campaign finished");
    (f.state, f.reason)
}

#[test]
fn happy_path_reports_every_state_in_order_and_installs_the_image() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);

    assert_eq!(rig.states_of("c-1"), numbered(HAPPY));
    assert_eq!(finished(&rig, "c-1"), (Succeeded, None));
    let rec = rig.agent.record();
    assert_eq!(rec.floor, SecurityVersion(2));
    assert_eq!(rec.running_version(), "2.0.0");
    assert_eq!(rec.slots.running_slot(), SlotId::B);
    assert_eq!(rec.slots.running_meta().state, SlotState::Valid);
    assert!(rec.outbox.is_empty() && rec.current.is_none());
    assert_eq!(
        rig.flash.slot_bytes_mut(SlotId::B)[..rel.image.len()],
        rel.image[..]
    );
    let last = rig.reports().pop().unwrap();
    assert_eq!(last.running_version.as_deref(), Some("2.0.0"));
    assert_eq!(rig.agent.stats().chunks_received, 5);
}

#[test]
fn progress_does_not_wait_for_acks_but_only_the_head_is_in_flight() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    while let Some(i) = rig.requested.pop_front() {
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    }
    assert_eq!(finished(&rig, "c-1").0, Succeeded);
    assert_eq!(
        rig.agent.record().outbox.len(),
        6,
        "all queued, none acknowledged"
    );
    assert_eq!(
        rig.states_of("c-1"),
        numbered(&[Downloading]),
        "only the head was sent"
    );
    for _ in 0..6 {
        rig.ack_head(AckOutcome::Applied);
    }
    assert_eq!(rig.states_of("c-1"), numbered(HAPPY));
}

#[test]
fn tampered_chunk_is_rejected_and_requested_again() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.requested.clear();
    let out = rig.step(Input::ChunkFrame(&rel.tampered_frame(2)));
    let again: Vec<u32> = out
        .iter()
        .filter_map(as_request)
        .flat_map(|r| r.indices().collect::<Vec<_>>())
        .collect();
    assert_eq!(
        again,
        vec![2],
        "the rejected chunk is asked for again at once"
    );
    assert_eq!(rig.agent.stats().chunks_rejected, 1);
    assert!(!rig.agent.record().current.as_ref().unwrap().written.get(2));
    rig.requested = (0..5).collect();
    rig.run(&rel, &mut vec![]);
    assert_eq!(finished(&rig, "c-1").0, Succeeded);
}

#[test]
fn a_chunk_that_keeps_failing_fails_the_campaign_and_the_next_job_succeeds() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![3; 8]);
    assert_eq!(
        finished(&rig, "c-1"),
        (Failed, Some(Reason::ChunkVerificationFailed))
    );
    assert_eq!(rig.agent.stats().chunks_rejected, 8);
    assert_eq!(rig.agent.record().floor, SecurityVersion(1));

    rig.step(Input::Job(&fx.job("c-2", &rel)));
    rig.run(&rel, &mut vec![]);
    assert_eq!(rig.states_of("c-2"), numbered(HAPPY));
}

/// Each bad job is refused with its reason as `failed` seq 1, and the same agent then installs a
/// valid job.
fn assert_refused_then_recovers(rig: &mut Rig, fx: &Fixture, bad_job: &[u8], reason: Reason) {
    rig.connect();
    rig.step(Input::Job(bad_job));
    rig.run(&fx.release(&ReleaseSpec::default()), &mut vec![]);
    assert_eq!(rig.states_of("c-bad"), vec![(1, Failed)]);
    let r = rig
        .reports()
        .into_iter()
        .find(|r| r.campaign.as_str() == "c-bad")
        .unwrap();
    assert_eq!(r.reason, Some(reason));
    assert!(rig.agent.record().current.is_none());

    let sv = rig.agent.record().floor.0.max(2);
    let good = fx.release(&ReleaseSpec {
        artifact: "fw-good",
        security_version: sv,
        ..Default::default()
    });
    rig.step(Input::Job(&fx.job("c-good", &good)));
    rig.run(&good, &mut vec![]);
    assert_eq!(rig.states_of("c-good"), numbered(HAPPY), "after {reason}");
}

#[test]
fn unknown_signing_key_is_refused() {
    let fx = Fixture::new();
    let stranger = ReleaseSigningKey::generate().unwrap();
    let rel = release(&stranger, &ReleaseSpec::default());
    assert_refused_then_recovers(
        &mut fx.rig(),
        &fx,
        &fx.job("c-bad", &rel),
        Reason::UnknownSigningKey,
    );
}

#[test]
fn bad_signature_is_refused() {
    let fx = Fixture::new();
    let mut rel = fx.release(&ReleaseSpec::default());
    let mut m = rel.manifest.clone();
    m.security_version = SecurityVersion(99);
    let b64 = base64::engine::general_purpose::STANDARD;
    rel.signed = SignedManifest {
        payload: b64.encode(serde_json::to_vec(&m).unwrap()).into(),
        signatures: rel.signed.signatures.clone(),
    };
    assert_refused_then_recovers(
        &mut fx.rig(),
        &fx,
        &fx.job("c-bad", &rel),
        Reason::BadSignature,
    );
}

#[test]
fn wrong_hardware_is_refused() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        hardware_model: "other-v9",
        ..Default::default()
    });
    assert_refused_then_recovers(
        &mut fx.rig(),
        &fx,
        &fx.job("c-bad", &rel),
        Reason::WrongHardware,
    );
}

#[test]
fn downgrade_below_the_floor_is_refused() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        security_version: 4,
        ..Default::default()
    });
    let mut rig = fx.rig_with(DeviceRecord::factory("5.0.0", SecurityVersion(5)), true);
    assert_refused_then_recovers(&mut rig, &fx, &fx.job("c-bad", &rel), Reason::Downgrade);
}

#[test]
fn expired_manifest_is_refused() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        expires_at: T0 / 1000 - 1,
        ..Default::default()
    });
    assert_refused_then_recovers(
        &mut fx.rig(),
        &fx,
        &fx.job("c-bad", &rel),
        Reason::ManifestExpired,
    );
}

#[test]
fn key_wrapped_for_another_device_is_refused() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let other = DeviceId::new("dev-99999").unwrap();
    let public = fx.device_key.public_bytes().unwrap();
    let job = fx.job_wrapped("c-bad", &rel, &other, &public);
    assert_refused_then_recovers(&mut fx.rig(), &fx, &job, Reason::KeyUnwrapFailed);
}

#[test]
fn image_larger_than_the_slot_is_refused() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        size: 9000,
        ..Default::default()
    });
    let mut rig = fx.rig();
    rig.flash = crate::slots::MemoryFlash::new(8192);
    assert_refused_then_recovers(&mut rig, &fx, &fx.job("c-bad", &rel), Reason::ImageTooLarge);
}

#[test]
fn malformed_job_with_a_readable_campaign_is_refused() {
    let fx = Fixture::new();
    let job = br#"{"v":1,"campaign":"c-bad","manifest":{"payload":"!","signatures":[]}}"#;
    assert_refused_then_recovers(&mut fx.rig(), &fx, job, Reason::MalformedJob);
}

#[test]
fn health_check_failure_rolls_back_and_keeps_the_floor() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        security_version: 7,
        ..Default::default()
    });
    let mut rig = fx.rig_with(DeviceRecord::factory("1.0.0", SecurityVersion(1)), false);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    assert_eq!(
        rig.states_of("c-1"),
        numbered(&[
            Downloading,
            Downloaded,
            Installing,
            Rebooting,
            Verifying,
            RolledBack
        ])
    );
    assert_eq!(
        finished(&rig, "c-1"),
        (RolledBack, Some(Reason::HealthCheckFailed))
    );
    let rec = rig.agent.record();
    assert_eq!(
        rec.floor,
        SecurityVersion(1),
        "floor never raised without a healthy boot"
    );
    assert_eq!(rec.slots.running_slot(), SlotId::A);
    assert_eq!(rec.slots.boot_slot(), SlotId::A);
    assert_eq!(rec.slots.meta(SlotId::B).state, SlotState::Invalid);
    assert_eq!(rec.running_version(), "1.0.0");
    let last = rig.reports().pop().unwrap();
    assert_eq!(last.running_version.as_deref(), Some("1.0.0"));
}

#[test]
fn floor_is_not_raised_while_downloading_or_installing() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        security_version: 7,
        ..Default::default()
    });
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    for i in 0..4 {
        rig.step(Input::ChunkFrame(&rel.frame(i)));
        assert_eq!(rig.agent.record().floor, SecurityVersion(1));
    }
    rig.step(Input::ChunkFrame(&rel.frame(4)));
    assert_eq!(
        rig.agent.record().floor,
        SecurityVersion(7),
        "raised once healthy"
    );
}

#[test]
fn duplicate_job_chunk_and_ack_deliveries_change_nothing() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let job = fx.job("c-1", &rel);
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&job));
    let before = rig.agent.record().clone();
    assert!(rig.step(Input::Job(&job)).is_empty(), "redelivered job");
    assert_eq!(rig.agent.record(), &before);

    rig.step(Input::ChunkFrame(&rel.frame(0)));
    let before = rig.agent.record().clone();
    assert!(
        rig.step(Input::ChunkFrame(&rel.frame(0))).is_empty(),
        "redelivered chunk"
    );
    assert_eq!(rig.agent.record(), &before);
    assert_eq!(rig.agent.stats().chunks_received, 1);

    let head = rig.agent.record().outbox.front().unwrap().clone();
    let ack = aloft_proto::messages::StatusAck {
        v: 1,
        campaign: head.campaign,
        seq: head.seq,
        outcome: AckOutcome::Applied,
        state: head.state,
        error: None,
    };
    let ack = aloft_proto::messages::encode(&ack);
    rig.step(Input::Ack(&ack));
    let before = rig.agent.record().clone();
    assert!(rig.step(Input::Ack(&ack)).is_empty(), "redelivered ack");
    assert_eq!(rig.agent.record(), &before);

    rig.requested = (1..5).collect();
    rig.run(&rel, &mut vec![]);
    let before = rig.agent.record().clone();
    assert!(
        rig.step(Input::Job(&job)).is_empty(),
        "job of a finished, acknowledged campaign"
    );
    assert_eq!(rig.agent.record(), &before);
    assert_eq!(rig.states_of("c-1"), numbered(HAPPY));
}

#[test]
fn outbox_resends_its_head_on_reconnect_and_after_the_timeout() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    let sent = |rig: &Rig| rig.reports().len();
    assert_eq!(sent(&rig), 1);
    rig.step(Input::Disconnected);
    assert!(
        rig.advance(10_000).is_empty(),
        "nothing is published while offline"
    );
    let out = rig.connect();
    let resent: Vec<_> = out.iter().filter_map(as_report).collect();
    assert_eq!(resent.len(), 1);
    assert_eq!((resent[0].seq, resent[0].state), (1, Downloading));
    assert!(
        out.iter().any(|o| as_request(o).is_some()),
        "missing chunks asked again"
    );
    assert!(rig.advance(4_000).iter().all(|o| as_report(o).is_none()));
    assert_eq!(
        rig.advance(1_000).iter().filter_map(as_report).count(),
        1,
        "resent after 5 s"
    );
}

/// An applied ack waits for the next save: a power loss before it re-sends the report, which
/// the orchestrator answers `duplicate`. A rejected report is forgotten at once, never re-sent.
#[test]
fn an_applied_ack_is_saved_with_the_next_save_and_a_rejection_at_once() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let power_on = |record| fx.agent(record, Box::new(AlwaysHealthy));
    for outcome in [
        AckOutcome::Applied,
        AckOutcome::Duplicate,
        AckOutcome::Rejected,
    ] {
        let mut rig = fx.rig();
        rig.connect();
        rig.step(Input::Job(&fx.job("c-1", &rel)));
        assert_eq!(
            rig.saved.outbox.len(),
            1,
            "a queued report is saved at once"
        );
        rig.ack_head(outcome);
        assert!(rig.agent.record().outbox.is_empty());
        let kept = outcome != AckOutcome::Rejected;
        assert_eq!(rig.saved.outbox.len(), usize::from(kept), "{outcome:?}");
        rig.power_cycle(power_on);
        let resent: Vec<_> = rig.connect().iter().filter_map(as_report).collect();
        assert_eq!(resent.len(), usize::from(kept), "{outcome:?}");
        if kept {
            assert_eq!((resent[0].seq, resent[0].state), (1, Downloading));
            // Acknowledged again, it is gone, and a save keeps it gone.
            rig.ack_head(AckOutcome::Duplicate);
            rig.save();
            rig.power_cycle(power_on);
            assert!(rig.connect().iter().all(|o| as_report(o).is_none()));
        }
    }
}

#[test]
fn redelivered_job_of_a_finished_campaign_resends_its_unacked_result() {
    let fx = Fixture::new();
    let stranger = ReleaseSigningKey::generate().unwrap();
    let job = fx.job("c-bad", &release(&stranger, &ReleaseSpec::default()));
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&job));
    let out = rig.step(Input::Job(&job));
    let r: Vec<_> = out.iter().filter_map(as_report).collect();
    assert_eq!((r.len(), r[0].seq, r[0].state), (1, 1, Failed));
}

#[test]
fn chunk_requests_wait_until_the_downloading_report_is_sent() {
    let fx = Fixture::new();
    let stranger = ReleaseSigningKey::generate().unwrap();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(
        &fx.job("c-bad", &release(&stranger, &ReleaseSpec::default())),
    ));
    let out = rig.step(Input::Job(&fx.job("c-1", &rel)));
    assert!(
        out.is_empty(),
        "the refusal of c-bad is still the unacknowledged head"
    );
    let out = rig.ack_head(AckOutcome::Applied).unwrap();
    assert_eq!(as_report(&out[0]).map(|r| r.state), Some(Downloading));
    assert!(out[1..].iter().all(|o| as_request(o).is_some()) && out.len() > 1);
}

#[test]
fn requests_fill_a_window_and_time_out_with_backoff() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        size: 40 * 1024,
        ..Default::default()
    });
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    assert_eq!(
        rig.requested.iter().copied().collect::<Vec<_>>(),
        (0..16).collect::<Vec<_>>()
    );
    rig.requested.clear();
    for i in 0..7 {
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    }
    assert!(rig.requested.is_empty(), "less than half the window free");
    rig.step(Input::ChunkFrame(&rel.frame(7)));
    assert_eq!(
        rig.requested.iter().copied().collect::<Vec<_>>(),
        (16..24).collect::<Vec<_>>(),
        "window refilled once half of it is free"
    );
    rig.requested.clear();
    assert!(rig.advance(2_999).is_empty());
    rig.advance(1);
    assert_eq!(
        rig.requested.len(),
        16,
        "all outstanding re-requested after 3 s"
    );
    rig.requested.clear();
    rig.advance(3_000);
    assert!(rig.requested.is_empty(), "backed off to 6 s");
    rig.advance(3_000);
    assert_eq!(rig.requested.len(), 16);
}

#[test]
fn not_downloading_error_pauses_requests() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.requested.clear();
    let err = chunkframe::encode_error(&rel.manifest.artifact, 0, ChunkErrorCode::NotDownloading);
    assert!(rig.step(Input::ChunkFrame(&err)).is_empty());
    assert!(rig.advance(999).is_empty());
    rig.advance(1);
    assert_eq!(rig.requested.len(), 5, "asked again after the pause");
}

#[test]
fn download_resumes_after_a_restart_from_the_saved_record() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig();
    let mut store = MemoryStore::new();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.ack_head(AckOutcome::Applied);
    for i in [0, 2] {
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    }
    store.save(rig.agent.record()).unwrap();

    let flash = std::mem::take(&mut rig.flash);
    let record = store.load().unwrap().unwrap();
    let mut rig = Rig::new(fx.agent(record, Box::new(AlwaysHealthy)));
    rig.flash = flash;
    rig.connect();
    assert_eq!(
        rig.requested.iter().copied().collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
    rig.run(&rel, &mut vec![]);
    assert_eq!(
        rig.states_of("c-1"),
        numbered(&HAPPY[1..])
            .into_iter()
            .map(|(s, st)| (s + 1, st))
            .collect::<Vec<_>>()
    );
    assert_eq!(finished(&rig, "c-1").0, Succeeded);
}

#[test]
fn a_new_job_replaces_a_download_and_an_empty_job_cancels_one() {
    let fx = Fixture::new();
    let rel1 = fx.release(&ReleaseSpec::default());
    let rel2 = fx.release(&ReleaseSpec {
        artifact: "fw-3",
        version: "3.0.0",
        security_version: 3,
        ..Default::default()
    });
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel1)));
    rig.step(Input::ChunkFrame(&rel1.frame(0)));
    rig.step(Input::Job(&fx.job("c-2", &rel2)));
    assert_eq!(finished(&rig, "c-1"), (Failed, Some(Reason::Cancelled)));
    rig.step(Input::Job(b""));
    assert_eq!(finished(&rig, "c-2"), (Failed, Some(Reason::Cancelled)));
    rig.requested.clear();
    rig.run(&rel1, &mut vec![]);
    assert_eq!(rig.states_of("c-1"), numbered(&[Downloading, Failed]));
    assert_eq!(rig.states_of("c-2"), numbered(&[Downloading, Failed]));
    assert!(rig.agent.record().outbox.is_empty());
}

fn withdrawal(campaign: &str, reason: Reason) -> Vec<u8> {
    messages::encode(&messages::Withdrawal {
        v: messages::PROTOCOL_VERSION,
        withdrawn: messages::Withdrawn {
            campaign: aloft_proto::CampaignId::new(campaign).unwrap(),
            reason,
        },
    })
}

#[test]
fn a_retained_withdrawal_after_a_restart_abandons_the_download_and_keeps_the_running_slot() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig();
    let mut store = MemoryStore::new();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.ack_head(AckOutcome::Applied);
    rig.step(Input::ChunkFrame(&rel.frame(0)));
    store.save(rig.agent.record()).unwrap();
    let running = rig.agent.record().slots.running_slot();

    // Offline while the orchestrator timed it out; powered on again, it subscribes and gets
    // the retained withdrawal instead of its job.
    let flash = std::mem::take(&mut rig.flash);
    let mut rig = Rig::new(fx.agent(store.load().unwrap().unwrap(), Box::new(AlwaysHealthy)));
    rig.flash = flash;
    rig.connect();
    rig.step(Input::Job(&withdrawal("c-1", Reason::TimedOut)));
    assert_eq!(finished(&rig, "c-1"), (Failed, Some(Reason::Cancelled)));
    let last = rig.agent.record().outbox.back().unwrap().clone();
    assert!(last.detail.unwrap().contains("timed_out"));
    let rec = rig.agent.record();
    assert!(rec.current.is_none(), "back to idle");
    assert_eq!(rec.slots.running_slot(), running);
    assert_eq!(rec.slots.running_meta().state, SlotState::Valid);
    assert_eq!(rec.running_version(), "1.0.0");
    rig.requested.clear();
    rig.run(&rel, &mut vec![]);
    assert!(
        rig.requested.is_empty(),
        "no chunk asked for after the withdrawal"
    );
    assert_eq!(rig.agent.stats().bad_payloads, 0);

    // The same withdrawal redelivered (every subscribe) and one of a campaign the device never
    // saw change nothing; a new job afterwards is taken as usual.
    let before = rig.agent.record().clone();
    rig.step(Input::Job(&withdrawal("c-1", Reason::TimedOut)));
    rig.step(Input::Job(&withdrawal("c-9", Reason::Cancelled)));
    assert_eq!(rig.agent.record(), &before);
    let rel2 = fx.release(&ReleaseSpec {
        artifact: "fw-3",
        version: "3.0.0",
        security_version: 3,
        ..Default::default()
    });
    rig.step(Input::Job(&fx.job("c-2", &rel2)));
    rig.settle(&rel2);
    assert_eq!(finished(&rig, "c-2"), (Succeeded, None));
}

#[test]
fn a_withdrawal_of_another_campaign_still_stops_the_download_but_not_an_install() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = fx.rig_cfg(slow_boot_config(&fx));
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.ack_head(AckOutcome::Applied);
    // A later campaign's job came and was withdrawn while the device was offline: the job
    // topic says "no job", which is what counts.
    rig.step(Input::Job(&withdrawal("c-2", Reason::TimedOut)));
    assert_eq!(finished(&rig, "c-1"), (Failed, Some(Reason::Cancelled)));

    // Past the download, a withdrawal lets the install finish.
    rig.step(Input::Job(&fx.job("c-3", &rel)));
    while rig.agent.current().is_some_and(|(_, p)| p < Installing) {
        assert!(one_move(&mut rig, &rel));
    }
    assert!(rig.agent.current().is_some_and(|(_, p)| p >= Installing));
    rig.step(Input::Job(&withdrawal("c-3", Reason::TimedOut)));
    rig.settle(&rel);
    assert_eq!(finished(&rig, "c-3"), (Succeeded, None));
}

#[test]
fn garbage_on_every_topic_is_counted_and_ignored() {
    let fx = Fixture::new();
    let mut rig = fx.rig();
    rig.connect();
    for junk in [&b"{"[..], b"\xff\xfe", b"ALC1", b"null", b"{\"v\":9}"] {
        assert!(rig.step(Input::Job(junk)).is_empty());
        assert!(rig.step(Input::ChunkFrame(junk)).is_empty());
        assert!(rig.step(Input::Ack(junk)).is_empty());
    }
    assert_eq!(rig.agent.stats().bad_payloads, 15);
    assert_eq!(
        rig.agent.record(),
        &DeviceRecord::factory("1.0.0", SecurityVersion(1))
    );
}

#[test]
fn the_request_timeout_follows_the_measured_response_time() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        size: 40 * 1024,
        ..Default::default()
    });
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    // A loaded orchestrator: the window's chunks trickle in over 2.5 s. The timeout grows past
    // the 3 s base instead of re-requesting what is merely slow.
    for i in 0..16 {
        rig.advance(2_500 / 16);
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    }
    // The refills (16..32) were requested between 0.16 s and 2.5 s. At 6 s a fixed 3 s timeout
    // would ask for all 16 again; the estimate (well above 3 s here) only for the oldest.
    rig.requested.clear();
    rig.advance(3_500);
    assert!(rig.requested.len() < 16, "asked again: {:?}", rig.requested);
    assert!(rig.requested.iter().all(|i| *i < 20), "{:?}", rig.requested);
}

/// A health check that stays pending for its first `pending` calls, then says `then`; the
/// application's health is `app`.
#[derive(Clone)]
struct SlowHealth {
    pending: std::sync::Arc<std::sync::atomic::AtomicU32>,
    then: HealthStatus,
    app: AppHealth,
}

impl SlowHealth {
    fn new(pending: u32, then: HealthStatus) -> Self {
        SlowHealth {
            pending: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(pending)),
            then,
            app: AppHealth::healthy(),
        }
    }
}

impl HealthCheck for SlowHealth {
    fn check(&mut self, _: u64, _: &CampaignId, _: &str) -> HealthStatus {
        use std::sync::atomic::Ordering;
        let left = self.pending.load(Ordering::SeqCst);
        if left == 0 {
            return self.then;
        }
        self.pending.store(left - 1, Ordering::SeqCst);
        HealthStatus::Pending
    }

    fn app_health(&mut self, _: u64) -> AppHealth {
        self.app.clone()
    }
}

use aloft_proto::CampaignId;

/// The agent settings of the power-loss tests: resets take a second, confirmation may take ten.
fn slow_boot_config(fx: &Fixture) -> AgentConfig {
    let mut cfg = fx.config();
    cfg.reboot_delay_ms = 1_000;
    cfg.confirm_deadline_ms = 10_000;
    cfg
}

/// One move of the orchestrator or the clock: serve a requested chunk, else acknowledge the
/// head, else let half a second pass while a campaign is in progress. False once all is done.
fn one_move(rig: &mut Rig, rel: &TestRelease) -> bool {
    if let Some(i) = rig.requested.pop_front() {
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    } else if rig.ack_head(AckOutcome::Applied).is_some() {
    } else if rig.agent.current().is_some() {
        rig.advance(500);
    } else {
        return false;
    }
    true
}

#[test]
fn a_health_check_that_never_finishes_rolls_back_at_the_confirm_deadline() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let health = SlowHealth::new(u32::MAX, HealthStatus::Healthy);
    let mut rig = Rig::new(fx.agent_with(
        fx.config(),
        DeviceRecord::factory("1.0.0", SecurityVersion(1)),
        Box::new(health),
    ));
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    assert_eq!(rig.agent.current().map(|(_, p)| p), Some(Verifying));
    assert_eq!(rig.agent.record().slots.running_slot(), SlotId::B);
    rig.advance(59_999);
    assert_eq!(
        rig.agent.current().map(|(_, p)| p),
        Some(Verifying),
        "still within the deadline"
    );
    rig.advance(1);
    rig.run(&rel, &mut vec![]);
    assert_eq!(
        finished(&rig, "c-1"),
        (RolledBack, Some(Reason::BootFailed))
    );
    assert_eq!(
        rig.states_of("c-1"),
        numbered(&[
            Downloading,
            Downloaded,
            Installing,
            Rebooting,
            Verifying,
            RolledBack
        ])
    );
    let rec = rig.agent.record();
    assert_eq!(rec.slots.running_slot(), SlotId::A);
    assert_eq!(rec.slots.meta(SlotId::B).state, SlotState::Invalid);
    assert_eq!(rec.floor, SecurityVersion(1));
}

/// A health check that finishes `takes_ms` after it was first asked. With `own_time` it says so,
/// as the simulator's does, whenever the agent asks again; without, it answers when asked, as a
/// check running on the device does.
struct OwnTimeHealth {
    takes_ms: u64,
    started: Option<u64>,
    own_time: bool,
}

impl HealthCheck for OwnTimeHealth {
    fn check(&mut self, now: u64, _: &CampaignId, _: &str) -> HealthStatus {
        let started = *self.started.get_or_insert(now);
        if now.saturating_sub(started) < self.takes_ms {
            HealthStatus::Pending
        } else {
            HealthStatus::Healthy
        }
    }

    fn decided_at(&self, now: u64) -> u64 {
        match self.started {
            Some(s) if self.own_time => s.saturating_add(self.takes_ms).min(now),
            _ => now,
        }
    }

    fn ready_at(&self) -> Option<u64> {
        self.started.map(|s| s.saturating_add(self.takes_ms))
    }
}

/// A shell that steps the agent at a coarse tick learns when the reset, the health check's
/// verdict and the end of a `busy` pause are due, and nothing once the campaign is over.
#[test]
fn the_agent_names_the_moment_its_reset_verdict_and_busy_pause_are_due() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let health = OwnTimeHealth {
        takes_ms: 200,
        started: None,
        own_time: true,
    };
    let mut rig = Rig::new(fx.agent_with(
        slow_boot_config(&fx),
        DeviceRecord::factory("1.0.0", SecurityVersion(1)),
        Box::new(health),
    ));
    rig.connect();
    assert_eq!(rig.agent.next_wake(), None, "no campaign");
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    while rig.requested.is_empty() {
        assert!(rig.ack_head(AckOutcome::Applied).is_some());
    }
    assert_eq!(rig.agent.next_wake(), None, "downloading, not told to wait");
    let first = rig.requested[0];
    let artifact = rel.manifest.artifact.clone();
    rig.step(Input::ChunkFrame(&chunkframe::encode_busy(
        &artifact, first, 400,
    )));
    let pause = rig.agent.next_wake().expect("a busy pause has an end");
    assert!(
        (rig.now + 400..rig.now + 800).contains(&pause),
        "between the hint and twice it: {} ms",
        pause - rig.now
    );

    rig.now = pause;
    while rig.agent.current().map(|(_, p)| p) != Some(Rebooting) {
        assert!(one_move(&mut rig, &rel));
    }
    assert_eq!(rig.agent.next_wake(), Some(rig.now + 1_000), "the reset");
    rig.advance(1_000);
    assert_eq!(rig.agent.current().map(|(_, p)| p), Some(Verifying));
    assert_eq!(rig.agent.next_wake(), Some(rig.now + 200), "the verdict");
    rig.advance(200);
    while rig.ack_head(AckOutcome::Applied).is_some() {}
    assert_eq!(finished(&rig, "c-1"), (Succeeded, None));
    assert_eq!(rig.agent.next_wake(), None, "the campaign is over");
}

/// Verifying with `health`, then one step `late_ms` after the reset.
fn verify_late(health: Box<dyn HealthCheck>, late_ms: u64) -> (Rig, TestRelease) {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = Rig::new(fx.agent_with(
        fx.config(),
        DeviceRecord::factory("1.0.0", SecurityVersion(1)),
        health,
    ));
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    assert_eq!(rig.agent.current().map(|(_, p)| p), Some(Verifying));
    rig.advance(late_ms);
    rig.run(&rel, &mut vec![]);
    (rig, rel)
}

/// Regression (issue 10): 2,000 simulated devices on two cores rolled back healthy images
/// because their agents were stepped more than the deadline after the reset, although their
/// 200 ms health check had long finished on the device's own time.
#[test]
fn a_verdict_reached_before_the_deadline_confirms_even_if_the_agent_steps_after_it() {
    let health = OwnTimeHealth {
        takes_ms: 200,
        started: None,
        own_time: true,
    };
    let (rig, _) = verify_late(Box::new(health), 120_000);
    assert_eq!(finished(&rig, "c-1"), (Succeeded, None));
    assert_eq!(rig.agent.record().floor, SecurityVersion(2));
}

#[test]
fn a_verdict_reached_after_the_deadline_rolls_back_as_boot_failed() {
    let health = OwnTimeHealth {
        takes_ms: 60_000,
        started: None,
        own_time: true,
    };
    let (rig, _) = verify_late(Box::new(health), 120_000);
    assert_eq!(
        finished(&rig, "c-1"),
        (RolledBack, Some(Reason::BootFailed))
    );
    assert_eq!(rig.agent.record().floor, SecurityVersion(1));
}

/// A check on the device answers when it is asked: healthy only after the deadline is too late.
#[test]
fn a_check_that_answers_healthy_after_the_deadline_is_too_late() {
    let health = OwnTimeHealth {
        takes_ms: 200,
        started: None,
        own_time: false,
    };
    let (rig, _) = verify_late(Box::new(health), 60_000);
    assert_eq!(
        finished(&rig, "c-1"),
        (RolledBack, Some(Reason::BootFailed))
    );
}

#[test]
fn a_pending_health_check_confirms_once_it_passes() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut rig = Rig::new(fx.agent_with(
        fx.config(),
        DeviceRecord::factory("1.0.0", SecurityVersion(1)),
        Box::new(SlowHealth::new(3, HealthStatus::Healthy)),
    ));
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.settle(&rel);
    assert_eq!(rig.states_of("c-1"), numbered(HAPPY));
    assert_eq!(rig.agent.record().floor, SecurityVersion(2));
}

/// With a boot limit of 1 (esp-idf's rollback) there is no second boot.
#[test]
fn a_reset_before_the_new_image_confirms_falls_back_and_reports_boot_failed() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let health = SlowHealth::new(5, HealthStatus::Healthy);
    let power_on = |record| {
        let mut cfg = slow_boot_config(&fx);
        cfg.boot_limit = 1;
        fx.agent_with(
            cfg,
            record,
            Box::new(health.clone()) as Box<dyn HealthCheck>,
        )
    };
    let mut rig = Rig::new(power_on(DeviceRecord::factory("1.0.0", SecurityVersion(1))));
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    while rig.agent.current().map(|(_, p)| p) != Some(Verifying) {
        assert!(one_move(&mut rig, &rel));
    }
    assert_eq!(rig.saved.slots.running_meta().state, SlotState::Unverified);

    rig.power_cycle(power_on);
    assert_eq!(
        finished(&rig, "c-1"),
        (RolledBack, Some(Reason::BootFailed))
    );
    let rec = rig.agent.record();
    assert_eq!(rec.slots.running_slot(), SlotId::A);
    assert_eq!(rec.running_version(), "1.0.0");
    assert_eq!(rec.slots.meta(SlotId::B).state, SlotState::Invalid);
    assert_eq!(rec.floor, SecurityVersion(1));
    assert_eq!(&rig.saved, rec, "the fallback is saved at once");
    rig.connect();
    rig.settle(&rel);
    assert_eq!(
        rig.states_of("c-1").last(),
        Some(&(6, RolledBack)),
        "reported after the power-on"
    );
}

#[test]
fn a_power_loss_between_the_rebooting_report_and_the_reset_boots_and_verifies_the_new_image() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let power_on = |record| {
        fx.agent_with(
            slow_boot_config(&fx),
            record,
            Box::new(AlwaysHealthy) as Box<dyn HealthCheck>,
        )
    };
    let mut rig = Rig::new(power_on(DeviceRecord::factory("1.0.0", SecurityVersion(1))));
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    while rig.agent.current().map(|(_, p)| p) != Some(Rebooting) {
        assert!(one_move(&mut rig, &rel));
    }
    let slots = &rig.saved.slots;
    assert_eq!(
        (slots.running_slot(), slots.boot_slot()),
        (SlotId::A, SlotId::B)
    );

    rig.power_cycle(power_on);
    assert_eq!(rig.agent.record().slots.running_slot(), SlotId::B);
    rig.connect();
    rig.settle(&rel);
    assert_eq!(rig.states_of("c-1"), numbered(HAPPY));
    assert_eq!(
        rig.agent.record().slots.running_meta().state,
        SlotState::Valid
    );
}

/// A reset before the new image confirms costs one of its boots; `boot_limit` of them and
/// the bootloader falls back.
#[test]
fn an_unconfirmed_image_boots_again_until_its_boot_limit() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let health = SlowHealth::new(5, HealthStatus::Healthy);
    let power_on = |record| {
        fx.agent_with(
            slow_boot_config(&fx),
            record,
            Box::new(health.clone()) as Box<dyn HealthCheck>,
        )
    };
    let verifying = |rig: &mut Rig| {
        while rig.agent.current().map(|(_, p)| p) != Some(Verifying) {
            assert!(one_move(rig, &rel));
        }
    };
    // One power loss before the confirm: the image boots again and confirms.
    let mut rig = Rig::new(power_on(DeviceRecord::factory("1.0.0", SecurityVersion(1))));
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    verifying(&mut rig);
    rig.power_cycle(power_on);
    assert_eq!(rig.agent.record().running_version(), "2.0.0");
    rig.connect();
    rig.settle(&rel);
    assert_eq!(finished(&rig, "c-1"), (Succeeded, None));
    assert_eq!(rig.agent.record().floor, SecurityVersion(2));

    // Three boots without a confirm (the default limit): back to the old image.
    let health = SlowHealth::new(5, HealthStatus::Healthy);
    let power_on = |record| {
        fx.agent_with(
            slow_boot_config(&fx),
            record,
            Box::new(health.clone()) as Box<dyn HealthCheck>,
        )
    };
    let mut rig = Rig::new(power_on(DeviceRecord::factory("1.0.0", SecurityVersion(1))));
    rig.connect();
    rig.step(Input::Job(&fx.job("c-2", &rel)));
    verifying(&mut rig);
    rig.power_cycle(power_on);
    rig.power_cycle(power_on);
    assert_eq!(rig.agent.record().running_version(), "2.0.0");
    rig.power_cycle(power_on);
    assert_eq!(
        finished(&rig, "c-2"),
        (RolledBack, Some(Reason::BootFailed))
    );
    assert_eq!(rig.agent.record().running_version(), "1.0.0");
    assert!(rig.agent.record().slots.has_valid_slot());
}

#[test]
fn a_power_loss_at_any_step_of_an_update_keeps_a_valid_slot_and_still_reports_an_end() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let power_on = |record| {
        let mut cfg = slow_boot_config(&fx);
        cfg.boot_limit = 1;
        fx.agent_with(
            cfg,
            record,
            Box::new(SlowHealth::new(2, HealthStatus::Healthy)) as Box<dyn HealthCheck>,
        )
    };
    let mut outcomes = std::collections::BTreeSet::new();
    for k in 0.. {
        let mut rig = Rig::new(power_on(DeviceRecord::factory("1.0.0", SecurityVersion(1))));
        rig.connect();
        rig.step(Input::Job(&fx.job("c-1", &rel)));
        let mut moves = 0;
        while moves < k && one_move(&mut rig, &rel) {
            moves += 1;
        }
        if moves < k {
            break; // The update finished before the k-th move: every point has been tried.
        }
        rig.power_cycle(power_on);
        assert!(rig.agent.record().slots.has_valid_slot(), "after move {k}");
        rig.connect();
        rig.settle(&rel);
        let end = finished(&rig, "c-1");
        let reports = rig.states_of("c-1");
        assert_eq!(reports.last().map(|r| r.1), Some(end.0), "after move {k}");
        assert!(rig.agent.record().slots.has_valid_slot());
        assert!(rig.agent.record().outbox.is_empty());
        outcomes.insert(format!("{:?}", end));
    }
    // Before the reset the new image is still booted and verified; after it, unconfirmed, it is
    // abandoned (a boot limit of 1).
    let expected = ["(Succeeded, None)", "(RolledBack, Some(BootFailed))"];
    assert_eq!(outcomes, expected.into_iter().map(String::from).collect());
}

#[test]
fn a_download_resumes_after_a_power_loss_from_the_chunks_saved() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        size: 20 * 1024,
        ..Default::default()
    });
    let power_on = |record| fx.agent(record, Box::new(AlwaysHealthy));
    let mut rig = Rig::new(power_on(DeviceRecord::factory("1.0.0", SecurityVersion(1))));
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.ack_head(AckOutcome::Applied);
    for i in 0..12 {
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    }
    rig.save();
    for i in 12..15 {
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    }
    // Chunks 12..15 were written to flash, but the record saying so was not saved.
    rig.power_cycle(power_on);
    let served_before = rig.agent.stats().chunks_received;
    assert_eq!(served_before, 0, "a new agent");
    rig.connect();
    let mut fetched = 0;
    while let Some(i) = rig.requested.pop_front() {
        fetched += 1;
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    }
    assert_eq!(fetched, 8, "only the chunks not saved are fetched again");
    assert!(fetched < rel.manifest.chunk_count);
    rig.run(&rel, &mut vec![]);
    assert_eq!(finished(&rig, "c-1"), (Succeeded, None));
}

#[test]
fn heartbeats_start_when_an_update_confirms_and_repeat_while_connected() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let mut health = SlowHealth::new(0, HealthStatus::Healthy);
    health.app = AppHealth {
        healthy: false,
        detail: Some("x".repeat(1_000)),
    };
    let mut rig = Rig::new(fx.agent(
        DeviceRecord::factory("1.0.0", SecurityVersion(1)),
        Box::new(health),
    ));
    rig.connect();
    assert!(
        rig.advance(20_000)
            .iter()
            .all(|o| as_heartbeat(o).is_none()),
        "the factory image sends none"
    );
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    let beats: Vec<_> = rig.published.iter().filter_map(as_heartbeat).collect();
    assert_eq!(beats.len(), 1, "the first goes out at the confirm");
    let b = &beats[0];
    assert_eq!(b.campaign.as_ref().map(|c| c.as_str()), Some("c-1"));
    assert_eq!(b.running_version, "2.0.0");
    assert!(!b.healthy);
    assert_eq!(
        b.detail.as_ref().map(|d| d.len()),
        Some(aloft_proto::messages::MAX_DETAIL_LEN)
    );
    let count = |rig: &Rig| rig.published.iter().filter_map(as_heartbeat).count();
    rig.advance(9_999);
    assert_eq!(count(&rig), 1);
    rig.advance(1);
    assert_eq!(count(&rig), 2, "every 10 s");
    rig.step(Input::Disconnected);
    rig.advance(30_000);
    assert_eq!(count(&rig), 2, "none while offline");
    rig.connect();
    assert_eq!(count(&rig), 3, "one at once on reconnect");
    let payload = rig
        .published
        .iter()
        .rev()
        .find_map(|o| match o {
            Output::Publish {
                topic: OutTopic::Health,
                payload,
            } => Some(payload.clone()),
            _ => None,
        })
        .unwrap();
    assert!(aloft_proto::messages::decode::<aloft_proto::messages::Heartbeat>(&payload).is_ok());
    assert!(OutTopic::Health.is_best_effort() && !OutTopic::Status.is_best_effort());
    assert_eq!(rig.agent.stats().heartbeats_sent, 3);
}

#[test]
fn heartbeats_keep_naming_the_confirmed_campaign_after_a_later_rollback() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let rel3 = fx.release(&ReleaseSpec {
        artifact: "fw-3",
        version: "3.0.0",
        security_version: 3,
        ..Default::default()
    });
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    let power_on = |record| fx.agent(record, Box::new(FixedHealth(false)));
    rig.power_cycle(power_on);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-2", &rel3)));
    rig.run(&rel3, &mut vec![]);
    assert_eq!(finished(&rig, "c-2").0, RolledBack);
    rig.advance(10_000);
    let last = rig.published.iter().rev().find_map(as_heartbeat).unwrap();
    assert_eq!(last.campaign.as_ref().map(|c| c.as_str()), Some("c-1"));
    assert_eq!(last.running_version, "2.0.0");
    assert_eq!(
        rig.agent.record().installed_by.as_ref().map(|c| c.as_str()),
        Some("c-1")
    );
}

#[test]
fn agents_sharing_a_pool_hold_one_copy_of_a_campaigns_manifest_and_still_install() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec::default());
    let pool = Arc::new(shared::SharedManifests::default());
    let mut cfg = fx.config();
    cfg.manifests = Some(pool.clone());
    let (mut a, mut b) = (fx.rig_cfg(cfg.clone()), fx.rig_cfg(cfg.clone()));
    for rig in [&mut a, &mut b] {
        rig.connect();
        rig.step(Input::Job(&fx.job("c-1", &rel)));
    }
    let held = |rig: &Rig| {
        let cur = rig.agent.record().current.as_ref().expect("job accepted");
        cur.job.manifest.payload.clone()
    };
    assert!(Arc::ptr_eq(&held(&a), &held(&b)));
    // A device powering on from its saved record shares it too.
    let saved = a.agent.record().clone();
    let again = fx.agent_with(cfg, saved, Box::new(FixedHealth(true)));
    let cur = again.record().current.as_ref().expect("campaign kept");
    assert!(Arc::ptr_eq(&cur.job.manifest.payload, &held(&b)));
    assert_eq!(pool.len(), 1);
    for rig in [&mut a, &mut b] {
        rig.run(&rel, &mut vec![]);
        assert_eq!(finished(rig, "c-1"), (Succeeded, None));
    }
}
