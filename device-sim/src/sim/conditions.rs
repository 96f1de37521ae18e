//! (1.5) The simulated devices' conditions for a manifest's preconditions: battery, use, local
//! time, storage and link, per device from an RNG seeded with the model's seed and the device's
//! index, as a function of time (so a power loss does not change them). As a table of a TOML
//! scenario file:
//!
//! ```toml
//! [conditions]
//! seed = 5
//! low_battery_probability = 0.33   # a third start low and charge up
//! ```

use super::*;
use crate::update::preconditions::utc_minute;
use crate::update::{Conditions, Environment};

/// How conditions are spread over the fleet. Probabilities are per device and lie in `[0, 1]`;
/// everything off (the default) is a fleet on external power, idle, unmetered, with ample
/// storage, whose local time is UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConditionModel {
    pub seed: u64,
    /// A device runs on its battery, starting at `low_battery_pct`, with this probability; it
    /// charges at `charge_pct_per_sec` from the start. The others are on external power.
    pub low_battery_probability: f64,
    pub low_battery_pct: u8,
    pub charge_pct_per_sec: f64,
    /// A device is in active use from the start for a seeded time up to `in_use_ms` (at least
    /// half of it) with this probability.
    pub in_use_probability: f64,
    pub in_use_ms: u64,
    /// A device is on a metered link from the start for a seeded time up to `metered_ms` (at
    /// least half of it) with this probability.
    pub metered_probability: f64,
    pub metered_ms: u64,
    /// Devices' local time is UTC plus a seeded offset below this many minutes (time zones).
    pub time_zone_spread_minutes: u16,
    /// Local clocks run this many times faster than real time, so a simulated day (and every
    /// install window in it) passes in a demo's minutes. 1: real time.
    pub clock_speedup: u32,
    /// Free storage of every device, bytes.
    pub free_bytes: u64,
}

impl Default for ConditionModel {
    fn default() -> Self {
        ConditionModel {
            seed: 0,
            low_battery_probability: 0.0,
            low_battery_pct: 10,
            charge_pct_per_sec: 2.0,
            in_use_probability: 0.0,
            in_use_ms: 10_000,
            metered_probability: 0.0,
            metered_ms: 10_000,
            time_zone_spread_minutes: 0,
            clock_speedup: 1,
            free_bytes: 1 << 30,
        }
    }
}

impl ConditionModel {
    /// Refuses probabilities outside `[0, 1]`, a battery level above 100 and a stopped clock.
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("low_battery_probability", self.low_battery_probability),
            ("in_use_probability", self.in_use_probability),
            ("metered_probability", self.metered_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                bail!("conditions.{name} = {p}: must be between 0 and 1");
            }
        }
        if self.low_battery_pct > 100 {
            bail!("conditions.low_battery_pct must be at most 100");
        }
        if !self.charge_pct_per_sec.is_finite() || self.charge_pct_per_sec < 0.0 {
            bail!("conditions.charge_pct_per_sec must be 0 or more");
        }
        if self.clock_speedup == 0 {
            bail!("conditions.clock_speedup must be at least 1");
        }
        Ok(())
    }

    /// Device `n`'s environment, its clock starting at `start_ms` (Unix ms).
    pub fn device(&self, n: usize, start_ms: u64) -> SimEnvironment {
        let seed = self.seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = StdRng::seed_from_u64(seed.rotate_left(29) ^ 0x636f_6e64);
        let seeded_ms = |rng: &mut StdRng, max: u64| {
            let half = max / 2;
            half + rng.gen_range(0..=max - half)
        };
        let on_battery = chance(&mut rng, self.low_battery_probability);
        let in_use_for = if chance(&mut rng, self.in_use_probability) {
            seeded_ms(&mut rng, self.in_use_ms)
        } else {
            0
        };
        let metered_for = if chance(&mut rng, self.metered_probability) {
            seeded_ms(&mut rng, self.metered_ms)
        } else {
            0
        };
        let offset = if self.time_zone_spread_minutes > 0 {
            rng.gen_range(0..self.time_zone_spread_minutes)
        } else {
            0
        };
        SimEnvironment {
            start_ms,
            on_battery,
            battery_start_pct: if on_battery {
                self.low_battery_pct
            } else {
                100
            },
            charge_pct_per_sec: self.charge_pct_per_sec,
            in_use_until_ms: start_ms + in_use_for,
            metered_until_ms: start_ms + metered_for,
            local_start_minute: (utc_minute(start_ms) + offset) % 1440,
            clock_speedup: u64::from(self.clock_speedup.max(1)),
            free_bytes: self.free_bytes,
        }
    }
}

/// One simulated device's conditions over time. Plain values: a power loss keeps them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimEnvironment {
    start_ms: u64,
    on_battery: bool,
    battery_start_pct: u8,
    charge_pct_per_sec: f64,
    in_use_until_ms: u64,
    metered_until_ms: u64,
    local_start_minute: u16,
    clock_speedup: u64,
    free_bytes: u64,
}

impl SimEnvironment {
    /// Whether any precondition could fail on this device at some time (for the fleet's
    /// counters): it starts on a low battery, in use or metered.
    pub fn constrained(&self) -> bool {
        (self.on_battery && self.battery_start_pct < 100)
            || self.in_use_until_ms > self.start_ms
            || self.metered_until_ms > self.start_ms
    }
}

impl Environment for SimEnvironment {
    fn conditions(&mut self, now_ms: u64) -> Conditions {
        let elapsed_ms = now_ms.saturating_sub(self.start_ms);
        let charged = self.charge_pct_per_sec * elapsed_ms as f64 / 1000.0;
        let battery = (f64::from(self.battery_start_pct) + charged).min(100.0) as u8;
        let local_elapsed_min = elapsed_ms.saturating_mul(self.clock_speedup) / 60_000;
        Conditions {
            battery_pct: battery,
            external_power: !self.on_battery,
            in_use: now_ms < self.in_use_until_ms,
            local_minute: ((u64::from(self.local_start_minute) + local_elapsed_min) % 1440) as u16,
            free_bytes: self.free_bytes,
            metered: now_ms < self.metered_until_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_model_gives_each_device_the_same_conditions_every_run() {
        let m = ConditionModel {
            seed: 5,
            low_battery_probability: 0.33,
            in_use_probability: 0.2,
            ..Default::default()
        };
        let t0 = 1_700_000_000_000;
        let a: Vec<_> = (0..50).map(|n| m.device(n, t0)).collect();
        let b: Vec<_> = (0..50).map(|n| m.device(n, t0)).collect();
        assert_eq!(a, b);
        let low = a.iter().filter(|e| e.on_battery).count();
        assert!((5..=30).contains(&low), "{low} of 50 on a low battery");
    }

    #[test]
    fn a_low_battery_charges_and_use_and_metering_end() {
        let m = ConditionModel {
            low_battery_probability: 1.0,
            in_use_probability: 1.0,
            metered_probability: 1.0,
            ..Default::default()
        };
        let t0 = 1_700_000_000_000;
        let mut e = m.device(0, t0);
        let c = e.conditions(t0);
        assert_eq!(
            (c.battery_pct, c.external_power, c.in_use, c.metered),
            (10, false, true, true)
        );
        let c = e.conditions(t0 + 20_000);
        assert_eq!((c.battery_pct, c.in_use, c.metered), (50, false, false));
        assert_eq!(e.conditions(t0 + 3_600_000).battery_pct, 100);
    }

    #[test]
    fn a_sped_up_local_clock_passes_a_day_quickly() {
        let m = ConditionModel {
            clock_speedup: 1440,
            ..Default::default()
        };
        let t0 = 1_700_000_000_000;
        let mut e = m.device(0, t0);
        let start = e.conditions(t0).local_minute;
        assert_eq!(e.conditions(t0 + 30_000).local_minute, (start + 720) % 1440);
        assert!(m.validate().is_ok());
        assert!(ConditionModel {
            clock_speedup: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
