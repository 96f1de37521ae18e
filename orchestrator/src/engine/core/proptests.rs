//! "No ack before the flush", as a property of the core: random sequences of reports (random
//! sequence numbers and states), chunk requests, heartbeats, ticks, batch ends and crashes, for
//! the members of one campaign. The test plays the shell: it collects a batch's effects, ends the
//! batch with `settle`, makes the writes durable (`Durable`), and only then counts the batch's
//! held output as sent. A crash drops the batch in progress (its writes never reached the disk,
//! its output never left) and starts a new core from what is durable.
//!
//! Checked: nothing that needs the commit is in an event's immediate output; every `applied` ack
//! leaves with the write of the transition it acknowledges in the same batch, and that batch
//! flushes; chunks leave at once only for a member whose "served" record is durable already, and
//! otherwise with that record's write in their batch; and after any crash every acknowledged
//! report is still on record (its sequence number or a later one).

use proptest::prelude::*;

use super::tests::{Durable, Fixture};
use super::*;

const DEVICES: usize = 4;
const CHUNKS: u32 = 4;

#[derive(Debug, Clone)]
enum Op {
    Report {
        device: usize,
        seq: u32,
        state: DeviceState,
    },
    Chunks {
        device: usize,
        from: u32,
        len: u32,
    },
    Health {
        device: usize,
        healthy: bool,
    },
    /// Time passes by this many milliseconds and the timer fires.
    Tick(u64),
    /// The shell ends the batch: settle, write, flush, then the held output leaves.
    Commit,
    /// The process dies between two commits.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let device = 0..DEVICES;
    prop_oneof![
        6 => (device.clone(), 1u32..12, prop::sample::select(DeviceState::ALL.to_vec()))
            .prop_map(|(device, seq, state)| Op::Report { device, seq, state }),
        3 => (device.clone(), 0..CHUNKS + 1, 1u32..4)
            .prop_map(|(device, from, len)| Op::Chunks { device, from, len }),
        1 => (device, any::<bool>()).prop_map(|(device, healthy)| Op::Health { device, healthy }),
        1 => (0u64..120_000).prop_map(Op::Tick),
        3 => Just(Op::Commit),
        1 => Just(Op::Crash),
    ]
}

/// The test's shell: a core, what is durable, and the batch in progress.
struct Run {
    f: Fixture,
    core: Core,
    now: u64,
    batch: Effects,
    /// Applied acks that left the process: (device, seq).
    sent: Vec<(DeviceId, u32)>,
}

impl Run {
    fn start() -> Run {
        let f = Fixture::new(DEVICES, CHUNKS);
        let mut core = f.core();
        let batch = core.recover(1_000);
        Run {
            f,
            core,
            now: 1_000,
            batch,
            sent: Vec::new(),
        }
    }

    fn durable(&self) -> &Durable {
        &self.f.durable
    }

    fn served_durably(&self, device: &DeviceId) -> bool {
        self.durable()
            .progress
            .get(&(self.f.campaign.clone(), device.clone()))
            .is_some_and(|p| p.served)
    }

    /// An event's output that may leave at once must need no commit.
    fn check_immediate(&self, fx: &Effects) -> Result<(), TestCaseError> {
        for o in &fx.now {
            match o {
                // Chunk frames carry no state; the rest never leaves the process.
                Out::ChunkFrame { .. }
                | Out::Sign(_)
                | Out::ApplyCrl { .. }
                | Out::ReadCrl { .. }
                | Out::StoreRoots { .. } => {}
                // Serving stops at the first index out of range: such a request gets an error
                // frame and no chunk.
                Out::ServeChunks {
                    device,
                    indices,
                    count,
                    ..
                } => prop_assert!(
                    indices.first().is_none_or(|i| i >= count) || self.served_durably(device),
                    "chunks for {device} left before its served record was durable"
                ),
                other => prop_assert!(false, "{other:?} would leave before the flush"),
            }
        }
        Ok(())
    }

    fn event(&mut self, ev: Event) -> Result<(), TestCaseError> {
        let fx = self.core.on_event(self.now, ev);
        self.check_immediate(&fx)?;
        self.batch.extend(fx);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), TestCaseError> {
        let fx = self.core.settle(self.now);
        self.check_immediate(&fx)?;
        self.batch.extend(fx);
        let batch = std::mem::take(&mut self.batch);
        let campaign = &self.f.campaign;
        let wrote = |device: &DeviceId, pred: &dyn Fn(&Progress) -> bool| {
            batch.writes.iter().any(|w| {
                matches!(w, Write::Progress { campaign: c, device: d, progress }
                    if c == campaign && d == device && pred(progress))
            })
        };
        for o in &batch.after_commit {
            match o {
                Out::Ack { device, ack } if ack.outcome == AckOutcome::Applied => {
                    prop_assert!(batch.flush, "an applied ack in a batch that does not flush");
                    prop_assert!(
                        wrote(device, &|p| p.last_seq == ack.seq && p.state == ack.state),
                        "ack of {device} seq {} ({}) without its write",
                        ack.seq,
                        ack.state
                    );
                }
                Out::ServeChunks { device, .. } => {
                    prop_assert!(
                        self.served_durably(device)
                            || (batch.flush && wrote(device, &|p| p.served)),
                        "chunks held for {device} without its served record"
                    );
                }
                _ => {}
            }
        }
        // The writes are durable; now the output leaves.
        self.f.durable.apply(&batch.writes);
        for o in &batch.after_commit {
            if let Out::Ack { device, ack } = o {
                if ack.outcome == AckOutcome::Applied {
                    self.sent.push((device.clone(), ack.seq));
                }
            }
        }
        Ok(())
    }

    fn crash(&mut self) -> Result<(), TestCaseError> {
        self.batch = Effects::default();
        self.check_acked_state_survived()?;
        self.core = self.f.core();
        self.batch = self.core.recover(self.now);
        Ok(())
    }

    fn check_acked_state_survived(&self) -> Result<(), TestCaseError> {
        for (device, seq) in &self.sent {
            let kept = self
                .durable()
                .progress
                .get(&(self.f.campaign.clone(), device.clone()))
                .map_or(0, |p| p.last_seq);
            prop_assert!(kept >= *seq, "{device}: acked seq {seq} lost (kept {kept})");
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_ack_leaves_before_the_write_it_acknowledges_is_flushed(
        ops in prop::collection::vec(op(), 1..80)
    ) {
        let mut run = Run::start();
        for op in ops {
            match op {
                Op::Report { device, seq, state } => {
                    let ev = run.f.report(device, seq, state);
                    run.event(ev)?;
                }
                Op::Chunks { device, from, len } => {
                    let ev = run.f.chunk_request(device, from, from + len);
                    run.event(ev)?;
                }
                Op::Health { device, healthy } => {
                    let hb = messages::Heartbeat {
                        v: PROTOCOL_VERSION,
                        campaign: Some(run.f.campaign.clone()),
                        running_version: "2".into(),
                        healthy,
                        detail: None,
                    };
                    let ev = Event::Health {
                        device: run.f.devices[device].clone(),
                        payload: Bytes::from(messages::encode(&hb)),
                    };
                    run.event(ev)?;
                }
                Op::Tick(ms) => {
                    run.now += ms;
                    let fx = run.core.on_tick(run.now);
                    run.check_immediate(&fx)?;
                    run.batch.extend(fx);
                }
                Op::Commit => run.commit()?,
                Op::Crash => run.crash()?,
            }
            run.now += 1;
        }
        run.commit()?;
        run.crash()?;
    }
}
