//! Property tests: random interleavings of valid, duplicate, stale, mutated and garbage inputs,
//! slow, failing and hanging health checks, and power losses at any point never panic the agent,
//! never break its invariants (a Valid slot always exists, in memory and on disk), never wedge
//! it, and every campaign it took on ends with a reported terminal state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aloft_proto::messages::{self, AckOutcome, StatusAck};
use aloft_proto::{CampaignId, DeviceState, SecurityVersion};
use proptest::prelude::*;

use super::testkit::*;
use super::*;
use crate::store::DeviceRecord;

#[derive(Debug, Clone)]
enum Action {
    /// Deliver job `0..5` (see [`World::jobs`]); 4 is the empty "no job".
    Job(usize),
    /// Serve the oldest requested chunk, optionally tampered.
    Serve {
        tamper: bool,
    },
    /// A data frame of release `r`, chunk `i`, whether requested or not.
    Chunk {
        r: usize,
        i: u32,
    },
    AckHead(u8),
    StaleAck(u32),
    /// A valid payload of kind `k` with one byte flipped.
    Mutated {
        k: u8,
        at: usize,
        xor: u8,
    },
    Garbage {
        k: u8,
        bytes: Vec<u8>,
    },
    Connect,
    Disconnect,
    Tick(u64),
    /// The power goes: the agent restarts from the saved record.
    PowerLoss,
    /// Delayed progress (chunk bits) is saved, as the transport does now and then.
    Save,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0..5usize).prop_map(Action::Job),
        8 => proptest::bool::weighted(0.15).prop_map(|tamper| Action::Serve { tamper }),
        2 => (0..3usize, 0..6u32).prop_map(|(r, i)| Action::Chunk { r, i }),
        5 => (0..3u8).prop_map(Action::AckHead),
        1 => (0..10u32).prop_map(Action::StaleAck),
        2 => (0..3u8, any::<usize>(), 1..=255u8).prop_map(|(k, at, xor)| Action::Mutated { k, at, xor }),
        2 => (0..3u8, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(k, bytes)| Action::Garbage { k, bytes }),
        1 => Just(Action::Connect),
        1 => Just(Action::Disconnect),
        2 => (0..8_000u64).prop_map(Action::Tick),
        2 => Just(Action::PowerLoss),
        1 => Just(Action::Save),
    ]
}

fn health_status() -> impl Strategy<Value = HealthStatus> {
    prop_oneof![
        2 => Just(HealthStatus::Healthy),
        1 => Just(HealthStatus::Unhealthy),
        3 => Just(HealthStatus::Pending),
    ]
}

/// Health check answers replayed one per call (a run of `Pending` keeps a check pending for
/// that many steps), then always healthy.
#[derive(Clone)]
struct Scripted(Arc<Mutex<Vec<HealthStatus>>>);

impl HealthCheck for Scripted {
    fn check(&mut self, _: u64, _: &CampaignId, _: &str) -> HealthStatus {
        self.0
            .lock()
            .map(|mut v| v.pop().unwrap_or(HealthStatus::Healthy))
            .unwrap_or(HealthStatus::Healthy)
    }
}

struct World {
    fx: Fixture,
    releases: Vec<TestRelease>,
    jobs: Vec<Vec<u8>>,
    health: Scripted,
}

impl World {
    fn new() -> Self {
        Self::with_health(Vec::new())
    }

    fn with_health(health: Vec<HealthStatus>) -> Self {
        let fx = Fixture::new();
        let r1 = fx.release(&ReleaseSpec {
            artifact: "fw-1",
            version: "2.0",
            security_version: 2,
            size: 5000,
            ..Default::default()
        });
        let r2 = fx.release(&ReleaseSpec {
            artifact: "fw-2",
            version: "3.0",
            security_version: 3,
            size: 2500,
            ..Default::default()
        });
        let r0 = fx.release(&ReleaseSpec {
            artifact: "fw-0",
            version: "1.1",
            security_version: 1,
            size: 1024,
            ..Default::default()
        });
        let stranger = aloft_proto::manifest::ReleaseSigningKey::generate().unwrap();
        let forged = release(
            &stranger,
            &ReleaseSpec {
                artifact: "fw-x",
                ..Default::default()
            },
        );
        let fresh = fx.release(&ReleaseSpec {
            artifact: "fw-9",
            version: "9.0",
            security_version: 9,
            ..Default::default()
        });
        let jobs = vec![
            fx.job("c-1", &r1),
            fx.job("c-2", &r2),
            fx.job("c-3", &forged),
            fx.job("c-4", &r0),
            Vec::new(),
        ];
        World {
            fx,
            releases: vec![r1, r2, r0, fresh],
            jobs,
            health: Scripted(Arc::new(Mutex::new(health))),
        }
    }

    fn release_of(&self, campaign: &str) -> Option<&TestRelease> {
        match campaign {
            "c-1" => Some(&self.releases[0]),
            "c-2" => Some(&self.releases[1]),
            "c-4" => Some(&self.releases[2]),
            "c-final" => Some(&self.releases[3]),
            // The campaign id is outside the signed manifest, so a job of `c-1` whose id a
            // mutation changed into another valid id ("c-1" → "c91") is accepted as a campaign
            // of that id, with `c-1`'s release. (Without this the harness served it no chunk
            // and the device rightly never settled.)
            _ => Some(&self.releases[0]),
        }
    }

    /// A device that powers on with `record`. Resets take a second and a new image must confirm
    /// within ten, so both are pauses a power loss or a tick can fall into.
    fn agent(&self, record: DeviceRecord) -> UpdateAgent {
        let mut cfg = self.fx.config();
        cfg.reboot_delay_ms = 1_000;
        cfg.confirm_deadline_ms = 10_000;
        self.fx
            .agent_with(cfg, record, Box::new(self.health.clone()))
    }
}

/// Checks what must hold after every step.
struct Invariants {
    floor: SecurityVersion,
    /// Per campaign, every report published so far by seq.
    reports: HashMap<CampaignId, Vec<Vec<u8>>>,
}

impl Invariants {
    fn check(&mut self, rig: &Rig, out: &[Output]) -> Result<(), TestCaseError> {
        let rec = rig.agent.record();
        prop_assert!(rec.slots.has_valid_slot(), "no valid slot to fall back to");
        prop_assert!(
            rig.saved.slots.has_valid_slot(),
            "no valid slot in the saved record"
        );
        prop_assert!(rec.floor >= self.floor, "floor decreased");
        prop_assert!(
            rec.floor <= rec.slots.running_meta().security_version,
            "floor above the running image"
        );
        self.floor = rec.floor;
        for o in out {
            let Output::Publish {
                topic: OutTopic::Status,
                payload,
            } = o
            else {
                continue;
            };
            let r = as_report(o).unwrap();
            let seen = self.reports.entry(r.campaign.clone()).or_default();
            let seq = r.seq as usize;
            prop_assert!(
                seq >= 1 && seq <= seen.len() + 1,
                "seq {} after {}",
                seq,
                seen.len()
            );
            if seq == seen.len() + 1 {
                seen.push(payload.clone());
            } else {
                prop_assert_eq!(
                    &seen[seq - 1],
                    payload,
                    "a resend differs from the original"
                );
            }
        }
        let mut next: HashMap<&CampaignId, u32> = HashMap::new();
        for r in &rec.outbox {
            if let Some(prev) = next.insert(&r.campaign, r.seq) {
                prop_assert_eq!(r.seq, prev + 1, "outbox seqs not consecutive");
            }
        }
        Ok(())
    }
}

fn apply(world: &World, rig: &mut Rig, inv: &Invariants, a: &Action) -> Vec<Output> {
    match a {
        Action::Job(j) => rig.step(Input::Job(&world.jobs[*j])),
        Action::Serve { tamper } => {
            let Some(i) = rig.requested.pop_front() else {
                return Vec::new();
            };
            let rel = rig
                .agent
                .current()
                .and_then(|(c, _)| world.release_of(c.as_str()));
            match rel {
                Some(rel) if i < rel.manifest.chunk_count => {
                    let f = if *tamper {
                        rel.tampered_frame(i)
                    } else {
                        rel.frame(i)
                    };
                    rig.step(Input::ChunkFrame(&f))
                }
                _ => Vec::new(),
            }
        }
        Action::Chunk { r, i } => {
            let rel = &world.releases[*r];
            let i = i % rel.manifest.chunk_count;
            rig.step(Input::ChunkFrame(&rel.frame(i)))
        }
        Action::AckHead(o) => {
            // The orchestrator can only acknowledge a report it has received.
            let published = rig.agent.record().outbox.front().is_some_and(|h| {
                inv.reports
                    .get(&h.campaign)
                    .is_some_and(|v| v.len() >= h.seq as usize)
            });
            if !published {
                return Vec::new();
            }
            let outcome = [
                AckOutcome::Applied,
                AckOutcome::Duplicate,
                AckOutcome::Rejected,
            ][*o as usize % 3];
            rig.ack_head(outcome).unwrap_or_default()
        }
        Action::StaleAck(seq) => {
            let ack = StatusAck {
                v: 1,
                campaign: CampaignId::new("c-1").unwrap(),
                seq: *seq,
                outcome: AckOutcome::Applied,
                state: DeviceState::Downloading,
                error: None,
            };
            // Only acks that do not match the head are stale; a matching one is a real ack.
            let head = rig
                .agent
                .record()
                .outbox
                .front()
                .map(|h| (h.campaign.clone(), h.seq));
            if head == Some((ack.campaign.clone(), ack.seq)) {
                return Vec::new();
            }
            rig.step(Input::Ack(&messages::encode(&ack)))
        }
        Action::Mutated { k, at, xor } => {
            let mut p = match k {
                0 => world.jobs[0].clone(),
                1 => world.releases[0].frame(0),
                _ => messages::encode(&StatusAck {
                    v: 1,
                    campaign: CampaignId::new("c-1").unwrap(),
                    seq: 1,
                    outcome: AckOutcome::Applied,
                    state: DeviceState::Downloading,
                    error: None,
                }),
            };
            let n = p.len();
            p[at % n] ^= xor;
            feed(rig, *k, &p)
        }
        Action::Garbage { k, bytes } => feed(rig, *k, bytes),
        Action::Connect => rig.connect(),
        Action::Disconnect => rig.step(Input::Disconnected),
        Action::Tick(ms) => rig.advance(*ms),
        Action::PowerLoss => {
            rig.power_cycle(|record| world.agent(record));
            Vec::new()
        }
        Action::Save => {
            rig.save();
            Vec::new()
        }
    }
}

/// Plays the orchestrator, serving the chunks of whichever campaign is current and
/// acknowledging every report, and lets time pass until nothing is in progress.
fn settle(world: &World, rig: &mut Rig) -> Result<(), TestCaseError> {
    rig.connect();
    for _ in 0..10_000 {
        if let Some(i) = rig.requested.pop_front() {
            let rel = rig
                .agent
                .current()
                .and_then(|(c, _)| world.release_of(c.as_str()))
                .filter(|r| i < r.manifest.chunk_count);
            if let Some(rel) = rel {
                rig.step(Input::ChunkFrame(&rel.frame(i)));
            }
        } else if rig.ack_head(AckOutcome::Applied).is_none() {
            if rig.agent.current().is_none() {
                return Ok(());
            }
            rig.advance(1_000);
        }
    }
    Err(TestCaseError::fail("the device never settled"))
}

/// Every campaign the device reported on has a terminal state as its last report.
fn assert_all_reported_terminal(rig: &Rig) -> Result<(), TestCaseError> {
    let mut last: HashMap<CampaignId, (u32, DeviceState)> = HashMap::new();
    for r in rig.reports() {
        let e = last.entry(r.campaign.clone()).or_insert((r.seq, r.state));
        if r.seq >= e.0 {
            *e = (r.seq, r.state);
        }
    }
    for (c, (seq, state)) in last {
        prop_assert!(
            state.is_terminal(),
            "{} ended at seq {} in {}",
            c,
            seq,
            state
        );
    }
    Ok(())
}

fn feed(rig: &mut Rig, k: u8, p: &[u8]) -> Vec<Output> {
    match k {
        0 => rig.step(Input::Job(p)),
        1 => rig.step(Input::ChunkFrame(p)),
        _ => rig.step(Input::Ack(p)),
    }
}

/// After any history, a fresh valid job still installs (or is rolled back by its health check).
fn assert_not_wedged(world: &World, rig: &mut Rig) -> Result<(), TestCaseError> {
    rig.connect();
    rig.step(Input::Job(&world.fx.job("c-final", &world.releases[3])));
    settle(world, rig)?;
    let f = rig
        .agent
        .record()
        .finished
        .iter()
        .find(|f| f.campaign.as_str() == "c-final")
        .cloned();
    prop_assert!(f.is_some(), "c-final did not finish");
    let f = f.unwrap();
    prop_assert!(
        matches!(f.state, DeviceState::Succeeded | DeviceState::RolledBack),
        "c-final ended {:?}",
        f.state
    );
    prop_assert!(rig.agent.record().outbox.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_the_invariants(
        actions in proptest::collection::vec(action(), 1..80),
        health in proptest::collection::vec(health_status(), 0..8),
    ) {
        let world = World::with_health(health);
        let mut rig = Rig::new(world.agent(DeviceRecord::factory("1.0", SecurityVersion(1))));
        let mut inv = Invariants { floor: SecurityVersion(1), reports: HashMap::new() };
        for a in &actions {
            let out = apply(&world, &mut rig, &inv, a);
            inv.check(&rig, &out)?;
        }
        let published = rig.published.len();
        settle(&world, &mut rig)?;
        inv.check(&rig, &rig.published[published..])?;
        assert_all_reported_terminal(&rig)?;
        assert_not_wedged(&world, &mut rig)?;
        let out: Vec<Output> = rig.published.clone();
        inv.reports.clear();
        inv.check(&rig, &out)?;
    }

    #[test]
    fn random_bytes_on_any_topic_never_panic_or_wedge(
        inputs in proptest::collection::vec((0..3u8, proptest::collection::vec(any::<u8>(), 0..600)), 1..20),
    ) {
        let world = World::new();
        let mut rig = world.fx.rig();
        rig.connect();
        for (k, bytes) in &inputs {
            prop_assert!(feed(&mut rig, *k, bytes).is_empty());
        }
        assert_not_wedged(&world, &mut rig)?;
    }
}
