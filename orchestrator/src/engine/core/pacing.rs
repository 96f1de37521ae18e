//! Download slots: how many devices are sent chunks at once, over the whole fleet.
//!
//! Every device paces itself (a window of requests, a timer), but nothing paced the fleet: with
//! 1,000 devices downloading at once each got a thousandth of what the machine moves, every
//! window took longer than the devices' timers, and a quarter of the bytes were sent twice
//! (docs/BENCHMARKS.md). Here a device takes a slot with its first chunk request and keeps it
//! while it keeps asking; beyond `max` slots a request is answered `busy` with a wait that
//! grows with the number of devices waiting, so a waiting device neither times out nor polls
//! hard. A device gives its slot back when its download ends (its report leaves
//! `downloading`) or when it has been silent for `idle_ms`. Pure: time comes in as `now`.

use std::collections::HashMap;

use aloft_proto::DeviceId;

/// Devices served chunks at once by default. 256 rather than 128: paired runs of
/// `aloft-demo --devices N` (docs/BENCHMARKS.md) took 6.9 s instead of 9.6 at 1,000 devices and
/// 29–32 s instead of 41 at 5,000, re-sending at most 0.4%, and tied at 10,000 (CPU-bound).
pub const DEFAULT_SLOTS: usize = 256;
/// A slot whose device asked for nothing for this long is given to another.
pub const IDLE_MS: u64 = 5_000;
/// Shortest and longest wait a `busy` frame asks for.
pub const MIN_WAIT_MS: u32 = 500;
pub const MAX_WAIT_MS: u32 = 10_000;
/// A waiting device not heard of for this long is no longer counted as waiting.
const WAITING_FORGET_MS: u64 = 2 * MAX_WAIT_MS as u64;

pub(super) struct DownloadSlots {
    max: usize,
    idle_ms: u64,
    /// Devices holding a slot, with the time of their last chunk request.
    holders: HashMap<DeviceId, u64>,
    /// Devices told to wait, with when they were last told.
    waiting: HashMap<DeviceId, u64>,
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
            self.waiting.remove(device);
            self.holders.insert(device.clone(), now);
            return Ok(());
        }
        self.waiting.insert(device.clone(), now);
        // One wait per "generation" of slots ahead of it: with W waiting for S slots, a device
        // comes back about when the ones served now are done.
        let generations = self.waiting.len().div_ceil(self.max) as u64;
        let wait = u64::from(MIN_WAIT_MS).saturating_mul(generations);
        Err(wait.clamp(u64::from(MIN_WAIT_MS), u64::from(MAX_WAIT_MS)) as u32)
    }

    /// `device`'s download ended (or it may no longer download): its slot is free.
    pub fn release(&mut self, device: &DeviceId) {
        self.holders.remove(device);
        self.waiting.remove(device);
    }

    /// Devices holding a slot and devices waiting for one.
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        (self.holders.len(), self.waiting.len())
    }

    /// Frees the slots of silent holders and forgets long-gone waiters; at most once a second,
    /// so its O(slots + waiting) cost is not paid per request.
    fn sweep(&mut self, now: u64) {
        if now.saturating_sub(self.last_sweep) < 1_000 {
            return;
        }
        self.last_sweep = now;
        let idle = self.idle_ms;
        self.holders
            .retain(|_, last| now.saturating_sub(*last) < idle);
        self.waiting
            .retain(|_, last| now.saturating_sub(*last) < WAITING_FORGET_MS);
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
        assert_eq!(s.admit(&d(3), 100), Err(MIN_WAIT_MS));
        assert_eq!(s.admit(&d(4), 100), Err(MIN_WAIT_MS));
        assert_eq!(s.admit(&d(5), 100), Err(2 * MIN_WAIT_MS));
        assert_eq!(s.counts(), (2, 3));
        s.release(&d(2));
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
}
