//! (1.5) The device's side of a signed manifest's preconditions (PROTOCOL.md §9.5): a pure
//! judgement of the device's [`Conditions`] against the manifest's [`Preconditions`]. The
//! conditions come from the shell through an [`Environment`] (the battery gauge, the
//! application, the clock and time zone, the file system, the modem); the agent asks for them
//! when it checks, and never reads a sensor itself.

use aloft_proto::precondition::{Preconditions, MINUTES_PER_DAY};
use aloft_proto::Reason;

/// What the device knows about itself at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditions {
    /// Battery charge, percent.
    pub battery_pct: u8,
    /// On mains or another external supply: the battery level does not matter.
    pub external_power: bool,
    /// The application is in active use (a user, a job the device is doing).
    pub in_use: bool,
    /// Local time of day, minutes after midnight (below 1440).
    pub local_minute: u16,
    /// Free storage outside the update slot, bytes.
    pub free_bytes: u64,
    /// The link is metered (cellular): bytes cost money.
    pub metered: bool,
}

impl Conditions {
    /// A device on external power, idle, with ample storage on an unmetered link, at
    /// `local_minute`: every precondition but an install window holds.
    pub fn unconstrained(local_minute: u16) -> Self {
        Conditions {
            battery_pct: 100,
            external_power: true,
            in_use: false,
            local_minute: local_minute % MINUTES_PER_DAY,
            free_bytes: u64::MAX,
            metered: false,
        }
    }
}

/// Where a device's conditions come from: its shell (a real device's sensors, a simulator's
/// seeded model, a test's script).
pub trait Environment: Send {
    /// The device's conditions at `now_ms` (Unix milliseconds).
    fn conditions(&mut self, now_ms: u64) -> Conditions;
}

/// The environment of a device that has no sensors to ask: [`Conditions::unconstrained`] with
/// local time taken as UTC. The default of every agent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unconstrained;

impl Environment for Unconstrained {
    fn conditions(&mut self, now_ms: u64) -> Conditions {
        Conditions::unconstrained(utc_minute(now_ms))
    }
}

/// The minute of the UTC day at `now_ms`.
pub fn utc_minute(now_ms: u64) -> u16 {
    ((now_ms / 60_000) % u64::from(MINUTES_PER_DAY)) as u16
}

/// Which gate the device is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// About to download (or go on downloading) with this many bytes still to fetch.
    Download { remaining_bytes: u64 },
    /// The image is downloaded and verified; about to install it.
    Install,
}

/// A precondition that does not hold: the deferral reason and, for humans, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmet {
    pub reason: Reason,
    pub detail: String,
}

/// Judges `c` against `p` at `stage`. The metered-link limit applies to downloads only; the
/// install conditions (battery, use, window, storage) apply before the install, and before the
/// download too when `p.check_before_download` says so. The first unmet condition is returned,
/// in the order of the protocol's table.
pub fn check(p: &Preconditions, c: &Conditions, stage: Stage) -> Result<(), Unmet> {
    let unmet = |reason, detail: String| Err(Unmet { reason, detail });
    if let Stage::Download { remaining_bytes } = stage {
        if let Some(max) = p.max_metered_bytes {
            if c.metered && remaining_bytes > max {
                return unmet(
                    Reason::MeteredLink,
                    format!("{remaining_bytes} bytes to download on a metered link; at most {max} allowed there"),
                );
            }
        }
        if !p.check_before_download {
            return Ok(());
        }
    }
    if let Some(min) = p.min_battery_pct {
        if !c.external_power && c.battery_pct < min {
            return unmet(
                Reason::BatteryLow,
                format!(
                    "battery at {}% on battery power; {min}% needed",
                    c.battery_pct
                ),
            );
        }
    }
    if p.not_in_use && c.in_use {
        return unmet(Reason::InUse, "the device is in active use".into());
    }
    if let Some(w) = p.install_window {
        if !w.contains(c.local_minute) {
            let m = c.local_minute;
            return unmet(
                Reason::OutsideInstallWindow,
                format!(
                    "local time {:02}:{:02} is outside the install window {w}",
                    m / 60,
                    m % 60
                ),
            );
        }
    }
    if let Some(min) = p.min_free_bytes {
        if c.free_bytes < min {
            return unmet(
                Reason::StorageLow,
                format!("{} bytes free; {min} needed", c.free_bytes),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_proto::precondition::InstallWindow;

    fn all() -> Preconditions {
        Preconditions {
            min_battery_pct: Some(30),
            not_in_use: true,
            install_window: Some(InstallWindow::parse("01:00-05:00").unwrap()),
            min_free_bytes: Some(1000),
            max_metered_bytes: Some(500),
            check_before_download: false,
        }
    }

    fn good() -> Conditions {
        Conditions {
            battery_pct: 50,
            external_power: false,
            in_use: false,
            local_minute: 120,
            free_bytes: 5000,
            metered: true,
        }
    }

    fn reason(r: Result<(), Unmet>) -> Option<Reason> {
        r.err().map(|u| u.reason)
    }

    #[test]
    fn each_install_condition_defers_with_its_own_reason() {
        let p = all();
        assert_eq!(reason(check(&p, &good(), Stage::Install)), None);
        let cases = [
            (
                Conditions {
                    battery_pct: 29,
                    ..good()
                },
                Reason::BatteryLow,
            ),
            (
                Conditions {
                    in_use: true,
                    ..good()
                },
                Reason::InUse,
            ),
            (
                Conditions {
                    local_minute: 300,
                    ..good()
                },
                Reason::OutsideInstallWindow,
            ),
            (
                Conditions {
                    free_bytes: 999,
                    ..good()
                },
                Reason::StorageLow,
            ),
        ];
        for (c, want) in cases {
            assert_eq!(reason(check(&p, &c, Stage::Install)), Some(want), "{c:?}");
            assert!(want.is_deferral());
        }
    }

    #[test]
    fn external_power_stands_in_for_a_charged_battery() {
        let c = Conditions {
            battery_pct: 5,
            external_power: true,
            ..good()
        };
        assert_eq!(reason(check(&all(), &c, Stage::Install)), None);
    }

    #[test]
    fn the_metered_limit_gates_downloads_only_and_install_conditions_only_when_asked() {
        let p = all();
        let big = Stage::Download {
            remaining_bytes: 501,
        };
        let small = Stage::Download {
            remaining_bytes: 500,
        };
        assert_eq!(reason(check(&p, &good(), big)), Some(Reason::MeteredLink));
        let unmetered = Conditions {
            metered: false,
            ..good()
        };
        assert_eq!(reason(check(&p, &unmetered, big)), None);
        assert_eq!(reason(check(&p, &good(), small)), None);
        // Install conditions wait for the install unless the operator asked for them earlier.
        let drained = Conditions {
            battery_pct: 1,
            ..good()
        };
        assert_eq!(reason(check(&p, &drained, small)), None);
        let early = Preconditions {
            check_before_download: true,
            ..all()
        };
        assert_eq!(
            reason(check(&early, &drained, small)),
            Some(Reason::BatteryLow)
        );
        assert_eq!(reason(check(&p, &good(), Stage::Install)), None);
    }
}
