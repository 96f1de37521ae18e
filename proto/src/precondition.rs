//! (1.5) Device preconditions a signed manifest may carry (PROTOCOL.md §4.4): what must hold
//! on the device before it installs (and, if the operator asks, before it downloads). They live
//! inside the signed payload, so a compromised orchestrator can neither strip nor forge them.
//! The check itself is the device's (`aloft_device::update`); this module is the wire format.

use serde::{Deserialize, Serialize};

/// Minutes in a day: [`InstallWindow`] bounds are below it.
pub const MINUTES_PER_DAY: u16 = 24 * 60;

/// What a device must satisfy before installing a release. Every field is optional; a present
/// `Preconditions` names at least one condition. Unknown fields are refused, so a condition a
/// device does not know makes it refuse the manifest instead of ignoring the condition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preconditions {
    /// Battery charge in percent (1 to 100) at or above which the device may install; a device
    /// on external power may install at any charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_battery_pct: Option<u8>,
    /// The device may install only while its application is not in active use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_in_use: bool,
    /// The device installs only inside this daily window of its local time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_window: Option<InstallWindow>,
    /// Free storage, in bytes, the device must have (beyond the update slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_bytes: Option<u64>,
    /// On a metered link the device downloads only if what remains to download is at most this
    /// many bytes; otherwise it waits for an unmetered link. Always a download-time check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_metered_bytes: Option<u64>,
    /// Check the install conditions (battery, use, window, storage) before downloading too, not
    /// only before installing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check_before_download: bool,
}

impl Preconditions {
    /// Whether no condition is set (such a value is not put into a manifest).
    pub fn is_empty(&self) -> bool {
        self.min_battery_pct.is_none()
            && !self.not_in_use
            && self.install_window.is_none()
            && self.min_free_bytes.is_none()
            && self.max_metered_bytes.is_none()
    }

    /// The rules [`crate::manifest::Manifest::validate`] applies.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.is_empty() {
            return Err("preconditions name no condition");
        }
        if self.min_battery_pct.is_some_and(|p| p == 0 || p > 100) {
            return Err("min_battery_pct must be 1 to 100");
        }
        if let Some(w) = &self.install_window {
            w.validate()?;
        }
        Ok(())
    }
}

/// A daily window of local time, `[start, end)` in minutes after midnight; it wraps midnight
/// when `end_minute < start_minute` (22:00-04:00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallWindow {
    pub start_minute: u16,
    pub end_minute: u16,
}

impl InstallWindow {
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.start_minute >= MINUTES_PER_DAY || self.end_minute >= MINUTES_PER_DAY {
            return Err("install_window minutes must be below 1440");
        }
        if self.start_minute == self.end_minute {
            return Err("install_window is empty");
        }
        Ok(())
    }

    /// Whether `minute` (after local midnight) falls inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        let (s, e) = (self.start_minute, self.end_minute);
        if s < e {
            (s..e).contains(&minute)
        } else {
            minute >= s || minute < e
        }
    }

    /// Parses `HH:MM-HH:MM` (the CLI's spelling).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("install window {s:?} is not HH:MM-HH:MM");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let w = InstallWindow {
            start_minute: minute(a).ok_or_else(bad)?,
            end_minute: minute(b).ok_or_else(bad)?,
        };
        w.validate()
            .map_err(|e| format!("install window {s:?}: {e}"))?;
        Ok(w)
    }
}

impl std::fmt::Display for InstallWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (s, e) = (self.start_minute, self.end_minute);
        write!(f, "{:02}:{:02}-{:02}:{:02}", s / 60, s % 60, e / 60, e % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_print_and_wrap_midnight() {
        let w = InstallWindow::parse("01:00-05:00").unwrap();
        assert_eq!((w.start_minute, w.end_minute), (60, 300));
        assert_eq!(w.to_string(), "01:00-05:00");
        assert!(w.contains(60) && w.contains(299) && !w.contains(300) && !w.contains(59));
        let night = InstallWindow::parse("22:30-04:00").unwrap();
        assert!(night.contains(23 * 60) && night.contains(0) && night.contains(239));
        assert!(!night.contains(240) && !night.contains(12 * 60));
        for bad in [
            "",
            "1-2",
            "24:00-01:00",
            "01:60-02:00",
            "03:00-03:00",
            "a:b-c:d",
        ] {
            assert!(InstallWindow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn preconditions_must_name_a_condition_and_stay_in_range() {
        assert!(Preconditions::default().validate().is_err());
        let only_flag = Preconditions {
            check_before_download: true,
            ..Default::default()
        };
        assert!(only_flag.validate().is_err());
        let battery = |p| Preconditions {
            min_battery_pct: Some(p),
            ..Default::default()
        };
        assert!(battery(30).validate().is_ok());
        assert!(battery(0).validate().is_err() && battery(101).validate().is_err());
    }

    #[test]
    fn an_unknown_condition_is_refused_not_ignored() {
        let r: Result<Preconditions, _> =
            serde_json::from_str(r#"{"min_battery_pct":30,"max_temperature_c":40}"#);
        assert!(r.is_err());
    }
}
