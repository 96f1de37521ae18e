//! Scenario tests of the root of trust on a device, with real crypto: roots rotated through a
//! job's chain, forged and overlong chains, revoked keys, release thresholds, expired roots (a
//! freeze) with and without a trusted clock, replayed manifests, and what the record keeps
//! across a power loss. Every refusal is followed by a valid update on the same device.

use aloft_proto::messages::AckOutcome;
use aloft_proto::trust::{SignedRoot, MAX_ROOT_CHAIN};
use aloft_proto::{DeviceState, Reason, SecurityVersion};

use super::testkit::*;
use super::*;
use crate::store::DeviceRecord;

use DeviceState::*;

/// Delivers `job` for `campaign` and checks that it is refused with `reason` as `failed` seq 1
/// and that nothing became current.
fn assert_refused(rig: &mut Rig, campaign: &str, job: &[u8], reason: Reason) {
    rig.step(Input::Job(job));
    while rig.ack_head(AckOutcome::Applied).is_some() {}
    assert_eq!(rig.states_of(campaign), vec![(1, Failed)], "{campaign}");
    let f = rig
        .agent
        .record()
        .finished(&CampaignId::new(campaign).unwrap())
        .expect("refused campaign recorded as finished");
    assert_eq!(f.reason, Some(reason), "{campaign}");
    assert!(rig.agent.record().current.is_none());
}

/// Delivers `job` for `campaign` and checks that `rel` installs.
fn assert_installs(rig: &mut Rig, campaign: &str, job: &[u8], rel: &TestRelease) {
    rig.step(Input::Job(job));
    rig.run(rel, &mut vec![]);
    assert_eq!(rig.states_of(campaign), numbered(HAPPY), "{campaign}");
    assert_eq!(rig.agent.record().running_version(), rel.manifest.version);
}

fn spec(
    artifact: &'static str,
    version: &'static str,
    security_version: u64,
) -> ReleaseSpec<'static> {
    ReleaseSpec {
        artifact,
        version,
        security_version,
        ..Default::default()
    }
}

fn trusted_version(rig: &Rig) -> u64 {
    rig.agent.trusted_root().map_or(0, |t| t.version())
}

#[test]
fn a_rotated_root_in_the_job_is_accepted_and_its_new_release_key_installs() {
    let fx = Fixture::new();
    let (root2, rel2) = (key(), key());
    let v2 = signed_root(
        &root_meta(2, &[&root2], &[&rel2], 1),
        &[&fx.root_key, &root2],
    );
    let rel = release(&rel2, &spec("fw-2", "2.0.0", 2));
    let mut rig = fx.rig();
    rig.connect();
    assert_installs(
        &mut rig,
        "c-1",
        &fx.job_with_roots("c-1", &rel, std::slice::from_ref(&v2)),
        &rel,
    );
    assert_eq!(trusted_version(&rig), 2);
    let saved = rig
        .saved
        .trusted_root
        .as_ref()
        .expect("the new root is saved");
    assert_eq!(saved.signed, v2);

    // The old release key left the release role with v2.
    let old = fx.release(&spec("fw-old", "3.0.0", 3));
    assert_refused(
        &mut rig,
        "c-old",
        &fx.job("c-old", &old),
        Reason::UnknownSigningKey,
    );

    // After a power loss the saved root still holds: no chain needed any more.
    rig.power_cycle(|r| fx.agent(r, Box::new(AlwaysHealthy)));
    assert_eq!(trusted_version(&rig), 2);
    rig.connect();
    let rel3 = release(&rel2, &spec("fw-3", "3.0.0", 3));
    assert_installs(&mut rig, "c-3", &fx.job("c-3", &rel3), &rel3);
}

#[test]
fn a_download_interrupted_by_a_power_loss_resumes_under_the_rotated_root() {
    let fx = Fixture::new();
    let (root2, rel2) = (key(), key());
    let v2 = signed_root(
        &root_meta(2, &[&root2], &[&rel2], 1),
        &[&fx.root_key, &root2],
    );
    let rel = release(&rel2, &spec("fw-2", "2.0.0", 2));
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&fx.job_with_roots("c-1", &rel, &[v2])));
    rig.ack_head(AckOutcome::Applied);
    for i in [0, 1] {
        rig.step(Input::ChunkFrame(&rel.frame(i)));
    }
    rig.save();
    // The restarted device checks the stored job again, against the root its record trusts.
    rig.power_cycle(|r| fx.agent(r, Box::new(AlwaysHealthy)));
    rig.connect();
    rig.run(&rel, &mut vec![]);
    let f = rig.agent.record().finished.back().expect("finished");
    assert_eq!((f.campaign.as_str(), f.state), ("c-1", Succeeded));
    assert_eq!(rig.agent.stats().chunks_received, 3, "chunks 2 to 4 only");
}

#[test]
fn a_forged_gapped_or_overlong_root_chain_is_refused_and_changes_nothing() {
    let fx = Fixture::new();
    let mut rig = fx.rig();
    rig.connect();
    let before = (
        rig.agent.record().trusted_root.clone(),
        rig.agent.record().time_floor,
    );

    // Signed by its own (new) keys only: the pinned root's keys never approved it.
    let (evil_root, evil_rel) = (key(), key());
    let forged = signed_root(&root_meta(2, &[&evil_root], &[&evil_rel], 1), &[&evil_root]);
    let evil = release(&evil_rel, &ReleaseSpec::default());
    let job = fx.job_with_roots("c-forged", &evil, &[forged]);
    assert_refused(&mut rig, "c-forged", &job, Reason::UntrustedRoot);

    // Version 3 without version 2.
    let v3 = signed_root(
        &root_meta(3, &[&fx.root_key], &[&fx.signing], 1),
        &[&fx.root_key],
    );
    let rel = fx.release(&ReleaseSpec::default());
    let job = fx.job_with_roots("c-gap", &rel, &[v3]);
    assert_refused(&mut rig, "c-gap", &job, Reason::UntrustedRoot);

    // One root more than a job may carry, each properly signed: the job does not decode, and
    // the device still answers why.
    let chain = |n: u64| -> Vec<SignedRoot> {
        (2..2 + n)
            .map(|v| {
                signed_root(
                    &root_meta(v, &[&fx.root_key], &[&fx.signing], 1),
                    &[&fx.root_key],
                )
            })
            .collect()
    };
    let long = chain(MAX_ROOT_CHAIN as u64 + 1);
    let job = fx.job_with_roots("c-long", &rel, &long);
    assert_refused(&mut rig, "c-long", &job, Reason::UntrustedRoot);

    let after = (
        rig.agent.record().trusted_root.clone(),
        rig.agent.record().time_floor,
    );
    assert_eq!(before, after, "no refused chain moved the root or the time");
    assert_eq!(trusted_version(&rig), 1);

    // A device as far behind as a job can carry catches up in one job.
    let longest = chain(MAX_ROOT_CHAIN as u64);
    let good = fx.release(&ReleaseSpec::default());
    assert_installs(
        &mut rig,
        "c-good",
        &fx.job_with_roots("c-good", &good, &longest),
        &good,
    );
    assert_eq!(trusted_version(&rig), 1 + MAX_ROOT_CHAIN as u64);
}

/// A root may not name a revoked key in any role (`Root::validate`), so once a root revokes a
/// release key it has left the release role too; `TrustedRoot::verify_manifest` still says
/// `revoked_key` (rather than `unknown_signing_key`) when a signature is by a key some accepted
/// root revoked, so the operator learns why.
#[test]
fn a_release_key_revoked_by_a_newer_root_is_refused_and_stays_revoked() {
    let fx = Fixture::new();
    let rel2 = key();
    let mut v2 = root_meta(2, &[&fx.root_key], &[&rel2], 1);
    let old_id = fx.signing.public().key_id();
    v2.keys.insert(old_id.clone(), fx.signing.public().to_hex());
    v2.revoked = vec![old_id.clone()];
    let v2 = signed_root(&v2, &[&fx.root_key]);
    let mut rig = fx.rig();
    rig.connect();
    let by_old = fx.release(&ReleaseSpec::default());
    let job = fx.job_with_roots("c-revoked", &by_old, std::slice::from_ref(&v2));
    assert_refused(&mut rig, "c-revoked", &job, Reason::RevokedKey);
    assert_eq!(
        trusted_version(&rig),
        2,
        "the newer root is kept although its job was refused"
    );
    assert_eq!(
        rig.saved.trusted_root.as_ref().map(|t| t.revoked.clone()),
        Some(vec![old_id.clone()])
    );

    // A root that forgets the revocation, and brings the old key back, is not accepted.
    let v3 = signed_root(
        &root_meta(3, &[&fx.root_key], &[&fx.signing], 1),
        &[&fx.root_key],
    );
    let job = fx.job_with_roots("c-unrevoked", &by_old, &[v2, v3]);
    assert_refused(&mut rig, "c-unrevoked", &job, Reason::UntrustedRoot);
    assert_eq!(trusted_version(&rig), 2);

    let good = release(&rel2, &ReleaseSpec::default());
    assert_installs(&mut rig, "c-good", &fx.job("c-good", &good), &good);
}

#[test]
fn a_manifest_below_the_release_threshold_is_refused_until_cosigned() {
    let fx = Fixture::new();
    let second = key();
    let v2 = signed_root(
        &root_meta(2, &[&fx.root_key], &[&fx.signing, &second], 2),
        &[&fx.root_key],
    );
    let mut rig = fx.rig();
    rig.connect();
    let one = fx.release(&ReleaseSpec::default());
    let job = fx.job_with_roots("c-one", &one, std::slice::from_ref(&v2));
    assert_refused(&mut rig, "c-one", &job, Reason::BelowThreshold);

    // The same chain again is harmless: roots the device already has are skipped.
    let two = release_cosigned(&[&fx.signing, &second], &ReleaseSpec::default());
    assert_installs(
        &mut rig,
        "c-two",
        &fx.job_with_roots("c-two", &two, &[v2]),
        &two,
    );
}

/// A freeze: the orchestrator (or a network attacker) keeps serving metadata signed long ago. A
/// device with a clock refuses once the root it trusts has expired, until a newer root arrives.
#[test]
fn an_expired_root_is_refused_until_a_newer_root_arrives() {
    let fx = Fixture::new();
    let mut v1 = root_meta(1, &[&fx.root_key], &[&fx.signing], 1);
    v1.expires_at = T0 / 1000 - 1;
    let mut cfg = fx.config();
    cfg.root = signed_root(&v1, &[&fx.root_key]).into();
    let mut rig = fx.rig_cfg(cfg);
    rig.connect();
    let rel = fx.release(&ReleaseSpec::default());
    assert_refused(
        &mut rig,
        "c-frozen",
        &fx.job("c-frozen", &rel),
        Reason::RootExpired,
    );

    let v2 = signed_root(
        &root_meta(2, &[&fx.root_key], &[&fx.signing], 1),
        &[&fx.root_key],
    );
    assert_installs(
        &mut rig,
        "c-1",
        &fx.job_with_roots("c-1", &rel, &[v2]),
        &rel,
    );
}

/// Without a trusted clock the device's time is the latest signed time it has seen: a clock
/// running ahead is ignored, and metadata newer than the root's expiry still exposes a freeze.
#[test]
fn a_device_without_a_trusted_clock_takes_its_time_from_signed_metadata() {
    let fx = Fixture::new();
    let mut cfg = fx.config();
    cfg.trusted_clock = false;

    // Its clock says the root expired long ago; it does not believe it.
    let mut rig = fx.rig_cfg(cfg.clone());
    rig.now = (ROOT_EXPIRES_AT + 86_400) * 1000;
    rig.connect();
    let rel = fx.release(&ReleaseSpec::default());
    assert_installs(&mut rig, "c-1", &fx.job("c-1", &rel), &rel);
    assert_eq!(rig.agent.record().time_floor, rel.manifest.created_at);

    // It has seen signed time past the root's expiry: frozen, whatever its clock says.
    let mut record = DeviceRecord::factory("1.0.0", SecurityVersion(1));
    record.time_floor = ROOT_EXPIRES_AT + 1;
    let mut rig = Rig::new(fx.agent_with(cfg, record, Box::new(AlwaysHealthy)));
    rig.connect();
    assert_refused(
        &mut rig,
        "c-frozen",
        &fx.job("c-frozen", &rel),
        Reason::RootExpired,
    );

    let mut v2 = root_meta(2, &[&fx.root_key], &[&fx.signing], 1);
    v2.issued_at = ROOT_EXPIRES_AT + 10;
    v2.expires_at = ROOT_EXPIRES_AT + 365 * 86_400;
    let v2 = signed_root(&v2, &[&fx.root_key]);
    // The release expired by the device's signed time; a fresh one is needed as well.
    let fresh = fx.release(&ReleaseSpec {
        expires_at: ROOT_EXPIRES_AT + 30 * 86_400,
        ..Default::default()
    });
    assert_installs(
        &mut rig,
        "c-1",
        &fx.job_with_roots("c-1", &fresh, &[v2]),
        &fresh,
    );
    assert_eq!(rig.agent.record().time_floor, ROOT_EXPIRES_AT + 10);
}

#[test]
fn a_replayed_manifest_is_refused_after_a_newer_one_installed() {
    let fx = Fixture::new();
    let mut rig = fx.rig();
    rig.connect();
    let rel10 = fx.release(&ReleaseSpec {
        sequence: Some(10),
        ..Default::default()
    });
    assert_installs(&mut rig, "c-10", &fx.job("c-10", &rel10), &rel10);
    assert_eq!(rig.agent.record().installed_sequence, Some(10));

    // The very manifest installed, in a new campaign: same security version, so only its
    // sequence tells it apart from a fresh release.
    assert_refused(
        &mut rig,
        "c-again",
        &fx.job("c-again", &rel10),
        Reason::ReplayedManifest,
    );
    let older = fx.release(&ReleaseSpec {
        artifact: "fw-5",
        security_version: 3,
        sequence: Some(5),
        ..Default::default()
    });
    assert_refused(
        &mut rig,
        "c-5",
        &fx.job("c-5", &older),
        Reason::ReplayedManifest,
    );

    let rel11 = fx.release(&ReleaseSpec {
        artifact: "fw-11",
        version: "2.1.0",
        sequence: Some(11),
        ..Default::default()
    });
    assert_installs(&mut rig, "c-11", &fx.job("c-11", &rel11), &rel11);
    assert_eq!(rig.agent.record().installed_sequence, Some(11));
}

#[test]
fn the_installed_sequence_rises_only_after_a_healthy_boot() {
    let fx = Fixture::new();
    let rel = fx.release(&ReleaseSpec {
        sequence: Some(10),
        ..Default::default()
    });
    let mut rig = fx.rig_with(DeviceRecord::factory("1.0.0", SecurityVersion(1)), false);
    rig.connect();
    rig.step(Input::Job(&fx.job("c-1", &rel)));
    rig.run(&rel, &mut vec![]);
    let f = rig.agent.record().finished.back().expect("finished");
    assert_eq!(f.state, RolledBack);
    assert_eq!(rig.agent.record().installed_sequence, None);
}

#[test]
fn a_stored_root_that_no_longer_verifies_falls_back_to_the_pinned_one() {
    let fx = Fixture::new();
    let (root2, rel2) = (key(), key());
    let v2 = signed_root(
        &root_meta(2, &[&root2], &[&rel2], 1),
        &[&fx.root_key, &root2],
    );
    let rel = release(&rel2, &ReleaseSpec::default());
    let mut rig = fx.rig();
    rig.connect();
    assert_installs(
        &mut rig,
        "c-1",
        &fx.job_with_roots("c-1", &rel, &[v2]),
        &rel,
    );

    // Tampered at rest: the stored root's signatures are gone.
    if let Some(t) = rig.saved.trusted_root.as_mut() {
        t.signed.signatures.clear();
    }
    rig.power_cycle(|r| fx.agent(r, Box::new(AlwaysHealthy)));
    assert_eq!(trusted_version(&rig), 1);
    rig.connect();
    let rel3 = release(&rel2, &spec("fw-3", "3.0.0", 3));
    assert_refused(
        &mut rig,
        "c-3",
        &fx.job("c-3", &rel3),
        Reason::UnknownSigningKey,
    );
    let good = release(&fx.signing, &spec("fw-4", "4.0.0", 4));
    assert_installs(&mut rig, "c-4", &fx.job("c-4", &good), &good);
}
