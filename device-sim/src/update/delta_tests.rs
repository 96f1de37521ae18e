//! Delta updates on the device (1.5): the delta taken when the device runs its base, the full
//! image otherwise, and the fallbacks (a lying base, an unsigned delta, a power loss in the
//! rebuild), each ending with the signed image installed.

use std::collections::{BTreeMap, VecDeque};

use aloft_proto::crypto;
use aloft_proto::manifest::{ReleaseSigningKey, SignedManifest};
use aloft_proto::messages::DeltaOffer;
use aloft_proto::release::{build_delta_release, build_release, ReleaseMeta};
use aloft_proto::{ArtifactId, SecurityVersion};

use super::testkit::*;
use super::*;
use crate::slots::SlotId;

fn base_image() -> Vec<u8> {
    (0..40_000u32).map(|i| ((i * 7) % 251) as u8).collect()
}

fn target_image() -> Vec<u8> {
    let mut t = base_image();
    t[1_000..1_400].fill(3);
    t.splice(20_000..20_000, vec![9u8; 800]);
    t
}

fn meta(artifact: &str) -> ReleaseMeta {
    ReleaseMeta {
        artifact: ArtifactId::new(artifact).unwrap(),
        version: "2.0.0".into(),
        security_version: SecurityVersion(2),
        hardware_model: HW.into(),
        chunk_size: 1024,
        created_at: T0 / 1000 - 86_400,
        expires_at: T0 / 1000 + 86_400,
        sequence: None,
        preconditions: None,
    }
}

fn collect(
    built: aloft_proto::release::BuiltRelease,
    sealed: Vec<Vec<u8>>,
    image: Vec<u8>,
) -> TestRelease {
    TestRelease {
        manifest: built.manifest,
        signed: built.signed,
        content_key: built.content_key,
        sealed,
        image,
    }
}

fn full(key: &ReleaseSigningKey) -> TestRelease {
    let image = target_image();
    let mut sealed = Vec::new();
    let built = build_release(
        &mut image.as_slice(),
        image.len() as u64,
        &meta("fw-2"),
        key,
        |_, c| {
            sealed.push(c);
            Ok(())
        },
    )
    .unwrap();
    collect(built, sealed, image)
}

fn delta_from(base: &[u8], key: &ReleaseSigningKey) -> TestRelease {
    let mut sealed = Vec::new();
    let built = build_delta_release(
        base,
        "1.0.0",
        &target_image(),
        &meta("fw-2-from-1"),
        key,
        |_, c| {
            sealed.push(c);
            Ok(())
        },
    )
    .unwrap();
    collect(built, sealed, Vec::new())
}

fn job(fx: &Fixture, full: &TestRelease, deltas: &[&TestRelease]) -> Vec<u8> {
    let public = fx.device_key.public_bytes().unwrap();
    let wrap = |r: &TestRelease| {
        crypto::wrap_content_key(&public, &fx.device, &r.manifest.artifact, &r.content_key).unwrap()
    };
    messages::encode(&Job {
        v: messages::PROTOCOL_VERSION,
        campaign: CampaignId::new("c-delta").unwrap(),
        manifest: full.signed.clone(),
        wrapped_key: wrap(full),
        issued_at: T0 / 1000,
        roots: Vec::new(),
        origin: None,
        deltas: deltas
            .iter()
            .map(|d| DeltaOffer {
                manifest: d.signed.clone(),
                wrapped_key: wrap(d),
            })
            .collect(),
    })
}

/// A device running the base image, its SHA-256 recorded at provisioning.
fn rig_on_base(fx: &Fixture) -> Rig {
    let mut record = DeviceRecord::factory("1.0.0", SecurityVersion(1));
    record
        .slots
        .set_running_image_sha256(&hex::encode(crypto::sha256(&base_image())));
    let mut rig = fx.rig_with(record, true);
    let base = base_image();
    let slot = rig.flash.slot_bytes_mut(SlotId::A);
    slot.resize(slot.len().max(base.len()), 0);
    slot[..base.len()].copy_from_slice(&base);
    rig
}

/// Plays the orchestrator for both artifacts until nothing moves; returns the chunks served
/// per artifact. `stop` may end the run early (a power loss), checked after every step.
fn serve(
    rig: &mut Rig,
    rels: &[&TestRelease],
    mut stop: impl FnMut(&Rig) -> bool,
) -> BTreeMap<String, u32> {
    let mut served = BTreeMap::new();
    let mut queue: VecDeque<(ArtifactId, u32)> = VecDeque::new();
    let mut seen = rig.published.len();
    for _ in 0..100_000 {
        for o in &rig.published[seen..] {
            if let Some(req) = as_request(o) {
                queue.extend(req.indices().map(|i| (req.artifact.clone(), i)));
            }
        }
        seen = rig.published.len();
        if stop(rig) {
            return served;
        }
        if let Some((a, i)) = queue.pop_front() {
            let Some(r) = rels.iter().find(|r| r.manifest.artifact == a) else {
                continue;
            };
            *served.entry(a.to_string()).or_insert(0) += 1;
            rig.step(Input::ChunkFrame(&r.frame(i)));
        } else if rig.ack_head(AckOutcome::Applied).is_none() {
            if rig.agent.current().is_none() {
                return served;
            }
            rig.advance(1_000);
        }
    }
    panic!("the agent never went quiet");
}

fn installed(rig: &mut Rig, image: &[u8]) -> bool {
    let slot = rig.agent.record().slots.running_slot();
    rig.flash.slot_bytes_mut(slot).get(..image.len()) == Some(image)
        && rig.agent.record().slots.running_meta().version.as_deref() == Some("2.0.0")
}

#[test]
fn a_device_on_the_base_downloads_only_the_delta_and_installs_the_signed_image() {
    let fx = Fixture::new();
    let (full, delta) = (full(&fx.signing), delta_from(&base_image(), &fx.signing));
    let mut rig = rig_on_base(&fx);
    rig.connect();
    rig.step(Input::Job(&job(&fx, &full, &[&delta])));
    let served = serve(&mut rig, &[&full, &delta], |_| false);
    assert_eq!(served.get("fw-2"), None, "{served:?}");
    assert_eq!(served["fw-2-from-1"], delta.manifest.chunk_count);
    assert!(delta.manifest.chunk_count * 10 <= full.manifest.chunk_count);
    assert_eq!(rig.agent.stats().delta_rebuilds, 1);
    assert!(installed(&mut rig, &full.image));
    assert_eq!(
        rig.agent
            .record()
            .slots
            .running_meta()
            .image_sha256
            .as_deref(),
        Some(full.manifest.image_sha256.as_str()),
        "the new image is the base of the next delta"
    );
}

#[test]
fn a_device_on_another_base_downloads_the_full_image() {
    let fx = Fixture::new();
    let (full, delta) = (full(&fx.signing), delta_from(&base_image(), &fx.signing));
    let mut rig = fx.rig();
    rig.connect();
    rig.step(Input::Job(&job(&fx, &full, &[&delta])));
    let served = serve(&mut rig, &[&full, &delta], |_| false);
    assert_eq!(served.get("fw-2-from-1"), None);
    assert!(installed(&mut rig, &full.image));
}

#[test]
fn a_delta_signed_by_an_unknown_key_is_skipped_for_the_full_image() {
    let fx = Fixture::new();
    let full = full(&fx.signing);
    let forged = delta_from(&base_image(), &key());
    let mut rig = rig_on_base(&fx);
    rig.connect();
    rig.step(Input::Job(&job(&fx, &full, &[&forged])));
    let served = serve(&mut rig, &[&full, &forged], |_| false);
    assert_eq!(served.get("fw-2-from-1"), None);
    assert!(installed(&mut rig, &full.image));
}

#[test]
fn a_delta_whose_base_claim_lies_fails_its_rebuild_and_falls_back_to_the_full_image() {
    let fx = Fixture::new();
    let full = full(&fx.signing);
    // Signed, but built from another base under the name of the one the device runs.
    let mut other = base_image();
    // Small differences everywhere, so the patch carries differences to the base (a region
    // that differs wholly would travel as literal bytes and rebuild right from any base).
    for b in other.iter_mut().step_by(50) {
        *b ^= 1;
    }
    let mut lying = delta_from(&other, &fx.signing);
    let mut m = lying.manifest.clone();
    m.delta.as_mut().unwrap().base_sha256 = hex::encode(crypto::sha256(&base_image()));
    m.delta.as_mut().unwrap().base_size = base_image().len() as u64;
    lying.signed = SignedManifest::sign(&m, &fx.signing);
    lying.manifest = m;
    let mut rig = rig_on_base(&fx);
    rig.connect();
    rig.step(Input::Job(&job(&fx, &full, &[&lying])));
    let served = serve(&mut rig, &[&full, &lying], |_| false);
    assert_eq!(served["fw-2-from-1"], lying.manifest.chunk_count);
    assert_eq!(
        served.get("fw-2").copied(),
        Some(full.manifest.chunk_count),
        "{served:?} {:?} {:?}",
        rig.agent.record().finished,
        rig.agent.stats()
    );
    assert_eq!(rig.agent.stats().delta_fallbacks, 1);
    assert!(installed(&mut rig, &full.image));
    assert_eq!(rig.agent.record().finished[0].state, DeviceState::Succeeded);
}

#[test]
fn a_power_loss_in_the_rebuild_falls_back_to_the_full_image_and_never_bricks() {
    let fx = Fixture::new();
    let (full, delta) = (full(&fx.signing), delta_from(&base_image(), &fx.signing));
    let mut rig = rig_on_base(&fx);
    rig.connect();
    rig.step(Input::Job(&job(&fx, &full, &[&delta])));
    let rebuilding = |r: &Rig| {
        r.saved
            .current
            .as_ref()
            .and_then(|c| c.delta)
            .is_some_and(|d| d.rebuilding)
    };
    serve(&mut rig, &[&full, &delta], rebuilding);
    assert!(rebuilding(&rig), "the rebuild was marked before it began");
    // The rebuild had begun overwriting the patch when the power went.
    let update = rig.agent.record().slots.update_slot();
    rig.flash.slot_bytes_mut(update)[..100].fill(0xee);
    let (cfg, key) = (fx.config(), fx.device_key.clone());
    rig.power_cycle(|r| UpdateAgent::new(cfg, key, r, Box::new(FixedHealth(true))));
    assert_eq!(
        rig.agent.record().slots.running_meta().version.as_deref(),
        Some("1.0.0")
    );
    rig.connect();
    let served = serve(&mut rig, &[&full, &delta], |_| false);
    assert_eq!(
        served.get("fw-2").copied(),
        Some(full.manifest.chunk_count),
        "{served:?} {:?} {:?}",
        rig.agent.record().finished,
        rig.agent.stats()
    );
    assert!(installed(&mut rig, &full.image));
}

#[test]
fn a_power_loss_before_the_rebuild_wrote_anything_resumes_the_rebuild() {
    let fx = Fixture::new();
    let (full, delta) = (full(&fx.signing), delta_from(&base_image(), &fx.signing));
    let mut rig = rig_on_base(&fx);
    rig.connect();
    rig.step(Input::Job(&job(&fx, &full, &[&delta])));
    let rebuilding = |r: &Rig| {
        r.saved
            .current
            .as_ref()
            .and_then(|c| c.delta)
            .is_some_and(|d| d.rebuilding)
    };
    serve(&mut rig, &[&full, &delta], rebuilding);
    let (cfg, key) = (fx.config(), fx.device_key.clone());
    rig.power_cycle(|r| UpdateAgent::new(cfg, key, r, Box::new(FixedHealth(true))));
    rig.connect();
    let served = serve(&mut rig, &[&full, &delta], |_| false);
    assert_eq!(served.get("fw-2"), None, "{served:?}");
    assert_eq!(rig.agent.stats().delta_rebuilds, 1);
    assert!(installed(&mut rig, &full.image));
}
