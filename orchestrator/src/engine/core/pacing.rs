//! Download slots: how many devices are sent chunks at once, over the whole fleet.
//!
//! Every device paces itself (a window of requests, a timer), but nothing paced the fleet: with
//! 1,000 devices downloading at once each got a thousandth of what the machine moves, every
//! window took longer than the devices' timers, and a quarter of the bytes were sent twice
//! (docs/BENCHMARKS.md). Here a device takes a slot with its first chunk request and keeps it
//! while it keeps asking; beyond `max` slots a request is answered `busy` with a wait. A device
//! gives its slot back when its download ends (its report leaves `downloading`) or when it has
//! been silent for `idle_ms`. Pure: time comes in as `now`.
//!
//! The wait brings a device back about when its turn comes: its place in the queue (a ticket
//! taken when it was first told to wait, so a device that has waited long is told a short
//! wait) divided by the rate at which slots are handed on. That rate is measured (downloads
//! ended per second, over one-second buckets) and taken at one and a half times what was seen
//! (before anything was measured: each slot four times a second): a device back too early
//! costs one more `busy` frame, a device back too late leaves a slot empty. Before, a fixed
//! 500 ms per generation of `max` waiters told 10,000 devices of a one-chunk campaign to wait
//! 10 s (the cap then; 3 s now, see [`MAX_WAIT_MS`]), drawn by the device as 10–20 s
//! (PROTOCOL.md §9.3), and the slots stood empty for most of that.

use std::collections::{BTreeSet, HashMap};

use aloft_proto::DeviceId;

/// Devices served chunks at once by default. 256 rather than 128: paired runs of
/// `aloft-demo --devices N` (docs/BENCHMARKS.md) took 6.9 s instead of 9.6 at 1,000 devices and
/// 29–32 s instead of 41 at 5,000, re-sending at most 0.4%, and tied at 10,000 (CPU-bound).
pub const DEFAULT_SLOTS: usize = 256;
/// A slot whose device asked for nothing for this long is given to another.
pub const IDLE_MS: u64 = 5_000;
/// Shortest and longest wait a `busy` frame asks for. The longest is 3 s, not the 10 s devices
/// accept (PROTOCOL.md §9.3): the rate is measured while a wave's jobs still take the CPU, so
/// the first waits of a large campaign are the longest and the most wrong. Told 10 s (drawn as
/// 10–20 s), 10,000 devices of a one-chunk campaign left the slots empty from 6 s to 13 s and
/// finished at 24 s; told at most 3 s, they ask again with their tickets kept, are told the
/// wait the measured rate now gives, and finished at 11 s (docs/BENCHMARKS.md).
pub const MIN_WAIT_MS: u32 = 100;
pub const MAX_WAIT_MS: u32 = 3_000;
/// The wait when the front's queues are full (the fleet's bytes in flight, or a device's
/// frames): they drain in about that time at the rates measured in docs/BENCHMARKS.md.
pub const QUEUE_FULL_WAIT_MS: u32 = 500;
/// The hand-on rate assumed before one was measured: each slot four times a second.
const FIRST_TURNS_PER_SLOT_PER_SEC: f64 = 4.0;
/// How much faster than measured slots are assumed to be handed on.
const RATE_MARGIN: f64 = 1.5;
/// A waiting device not heard of for this long is no longer counted as waiting: twice the
/// longest wait the reference device accepts (10 s, PROTOCOL.md §9.3), its longest draw, so a
/// device that asks again in time keeps its ticket even if it was told more than
/// [`MAX_WAIT_MS`] (by an older server).
const WAITING_FORGET_MS: u64 = 20_000;

pub(crate) struct DownloadSlots {
    max: usize,
    idle_ms: u64,
    /// Devices holding a slot, with the time of their last chunk request.
    holders: HashMap<DeviceId, u64>,
    /// Devices told to wait: their ticket and when they were last told.
    waiting: HashMap<DeviceId, (u64, u64)>,
    /// The tickets of `waiting`, to find the oldest.
    tickets: BTreeSet<u64>,
    next_ticket: u64,
    /// Downloads ended since `bucket_start` (set by the first), and the running rate of them
    /// per second (0 until a bucket is full).
    ended: u64,
    bucket_start: Option<u64>,
    ended_per_sec: f64,
    last_sweep: u64,
}

impl Default for DownloadSlots {
    fn default() -> Self {
        Self::new(DEFAULT_SLOTS, IDLE_MS)
    }
}

impl DownloadSlots {
    pub fn new(max: usize, idle_ms: u64) -> Self {
        Self {
            max: max.max(1),
            idle_ms,
            holders: HashMap::new(),
            waiting: HashMap::new(),
            tickets: BTreeSet::new(),
            next_ticket: 0,
            ended: 0,
            bucket_start: None,
            ended_per_sec: 0.0,
            last_sweep: 0,
        }
    }

    /// Lets `device` be served now (`Ok`), or says how long it should wait (`Err(ms)`).
    pub fn admit(&mut self, device: &DeviceId, now: u64) -> Result<(), u32> {
        if let Some(last) = self.holders.get_mut(device) {
            *last = now;
            return Ok(());
        }
        if self.holders.len() >= self.max {
            self.sweep(now);
        }
        if self.holders.len() < self.max {
            self.forget_waiter(device);
            self.holders.insert(device.clone(), now);
            return Ok(());
        }
        let ticket = match self.waiting.get_mut(device) {
            Some((ticket, told)) => {
                *told = now;
                *ticket
            }
            None => {
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.waiting.insert(device.clone(), (ticket, now));
                self.tickets.insert(ticket);
                ticket
            }
        };
        // Waiters ahead of this one: at most the tickets between the oldest and its own.
        let oldest = self.tickets.first().copied().unwrap_or(ticket);
        let ahead = (ticket - oldest).min(self.waiting.len() as u64);
        let rate = if self.ended_per_sec > 0.0 {
            RATE_MARGIN * self.ended_per_sec
        } else {
            FIRST_TURNS_PER_SLOT_PER_SEC * self.max as f64
        };
        let expected_ms = ahead as f64 * 1_000.0 / rate;
        // The device draws its wait from [w, 2w] (PROTOCOL.md §9.3): asking for two thirds of
        // the expected wait brings it back, on average, when its turn comes.
        let wait = (expected_ms * 2.0 / 3.0) as u64;
        Err(wait.clamp(u64::from(MIN_WAIT_MS), u64::from(MAX_WAIT_MS)) as u32)
    }

    /// `device`'s download ended (or it may no longer download): its slot is free.
    pub fn release(&mut self, device: &DeviceId, now: u64) {
        if self.holders.remove(device).is_some() {
            self.ended += 1;
            let start = *self.bucket_start.get_or_insert(now);
            let elapsed = now.saturating_sub(start);
            if elapsed >= 1_000 {
                let seen = self.ended as f64 * 1_000.0 / elapsed as f64;
                self.ended_per_sec = if self.ended_per_sec == 0.0 {
                    seen
                } else {
                    (self.ended_per_sec + seen) / 2.0
                };
                self.ended = 0;
                self.bucket_start = Some(now);
            }
        }
        self.forget_waiter(device);
    }

    fn forget_waiter(&mut self, device: &DeviceId) {
        if let Some((ticket, _)) = self.waiting.remove(device) {
            self.tickets.remove(&ticket);
        }
    }

    /// Devices holding a slot and devices waiting for one.
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        (self.holders.len(), self.waiting.len())
    }

    /// Frees the slots of silent holders and forgets long-gone waiters; at most once a second,
    /// so its O(slots + waiting) cost is not paid per request. A slot freed for silence does
    /// not count as a hold: it says nothing of how long downloads take.
    fn sweep(&mut self, now: u64) {
        if now.saturating_sub(self.last_sweep) < 1_000 {
            return;
        }
        self.last_sweep = now;
        let idle = self.idle_ms;
        self.holders
            .retain(|_, last| now.saturating_sub(*last) < idle);
        let tickets = &mut self.tickets;
        self.waiting.retain(|_, (ticket, told)| {
            let keep = now.saturating_sub(*told) < WAITING_FORGET_MS;
            if !keep {
                tickets.remove(ticket);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u32) -> DeviceId {
        DeviceId::new(format!("dev-{i}")).unwrap()
    }

    #[test]
    fn slots_are_kept_while_asking_and_waits_grow_with_the_queue() {
        let mut s = DownloadSlots::new(2, 5_000);
        assert!(s.admit(&d(1), 0).is_ok());
        assert!(s.admit(&d(2), 0).is_ok());
        assert!(s.admit(&d(1), 100).is_ok(), "a holder keeps its slot");
        // Before any download ended, each slot is assumed handed on 4 times a second: with 2
        // slots, 125 ms per waiter ahead, two thirds of it asked for, at least 100 ms.
        assert_eq!(s.admit(&d(3), 100), Err(MIN_WAIT_MS));
        assert_eq!(s.admit(&d(4), 100), Err(MIN_WAIT_MS));
        assert_eq!(s.admit(&d(5), 100), Err(166));
        assert_eq!(s.counts(), (2, 3));
        s.release(&d(2), 200);
        assert!(s.admit(&d(4), 200).is_ok());
        assert_eq!(s.counts(), (2, 2));
    }

    #[test]
    fn a_silent_holder_loses_its_slot_and_waits_are_capped() {
        let mut s = DownloadSlots::new(1, 5_000);
        assert!(s.admit(&d(1), 0).is_ok());
        for i in 2..200 {
            let wait = s.admit(&d(i), 1_000).unwrap_err();
            assert!((MIN_WAIT_MS..=MAX_WAIT_MS).contains(&wait));
        }
        assert!(s.admit(&d(2), 4_000).is_err(), "not idle long enough yet");
        assert!(s.admit(&d(2), 6_000).is_ok(), "dev-1 was silent for 6 s");
        assert!(s.admit(&d(1), 6_100).is_err());
    }

    #[test]
    fn waits_follow_how_fast_slots_are_handed_on_and_a_long_waiter_is_told_a_short_wait() {
        let mut s = DownloadSlots::new(2, 5_000);
        // Downloads ending 100 a second, for a few seconds: assumed handed on 150 a second.
        for i in 0..400u32 {
            let t = u64::from(i) * 10;
            assert!(s.admit(&d(1000 + i), t).is_ok());
            s.release(&d(1000 + i), t + 10);
        }
        assert!(s.admit(&d(1), 10_000).is_ok());
        assert!(s.admit(&d(2), 10_000).is_ok());
        assert_eq!(s.admit(&d(3), 10_000), Err(MIN_WAIT_MS));
        for i in 4..303 {
            let _ = s.admit(&d(i), 10_000);
        }
        // 299 ahead at 150 a second: 2 s expected, 1.33 s asked for.
        let late = s.admit(&d(302), 10_001).unwrap_err();
        assert!((1_280..=1_380).contains(&late), "{late}");
        // Once those ahead of it were served, the same device is told a short wait.
        for i in 3..300 {
            s.release(&d(i), 10_010);
        }
        assert_eq!(s.admit(&d(302), 10_020), Err(MIN_WAIT_MS));
    }
}
