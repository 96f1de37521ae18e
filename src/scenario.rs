//! Scenario files (TOML): the fleet size, the fault mix and the campaign policy of one demo or
//! benchmark run, and what its outcome should be. `scenarios/` holds the ones the docs quote.
//!
//! ```toml
//! expect = "finished"        # or "paused": a bad release must stop itself
//! [fleet]
//! devices = 1000
//! [faults]                   # aloft_device::Faults, per-device probabilities, seeded
//! seed = 7
//! link_drop_probability = 0.1
//! [policy]                   # aloft_orchestrator::rollout::RolloutPolicy
//! waves = { canary = { percent = 1.0 }, growth = { percent = [10.0, 50.0, 100.0] } }
//! ```

use std::path::Path;

use aloft_device::Faults;
use aloft_orchestrator::rollout::RolloutPolicy;
use anyhow::{Context, Result};
use serde::Deserialize;

/// One run's set-up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub fleet: FleetSpec,
    pub faults: Faults,
    pub policy: RolloutPolicy,
    pub release: ReleaseScenario,
    pub expect: Expect,
}

/// The simulated fleet and the release it gets.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetSpec {
    pub devices: usize,
    pub image_kib: usize,
    pub chunk_kib: u32,
    /// Chunk requests in flight per device.
    pub window: u32,
    /// Devices handshaking at once.
    pub connect_concurrency: usize,
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            devices: 100,
            image_kib: 1024,
            chunk_kib: 16,
            window: 8,
            connect_concurrency: 64,
        }
    }
}

/// The release rolled out.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReleaseScenario {
    pub version: String,
    pub security_version: u64,
}

impl Default for ReleaseScenario {
    fn default() -> Self {
        ReleaseScenario {
            version: "2.0.0".into(),
            security_version: 2,
        }
    }
}

/// How the run should end for the demo to exit 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    /// Every device succeeds and the campaign finishes.
    #[default]
    Finished,
    /// The campaign pauses itself before its first wave is over, touching no one after it.
    Paused,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        Scenario::parse(&text).with_context(|| format!("scenario {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Scenario> {
        let s: Scenario = toml::from_str(text)?;
        s.faults.validate()?;
        s.policy.validate()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap();
                n += 1;
            }
        }
        assert!(n >= 2, "scenarios/ holds the documented scenarios");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(Scenario::parse("[fleet]\ndevise = 3\n").is_err());
        assert!(Scenario::parse("[faults]\nlink_drop_probability = 2.0\n").is_err());
        assert!(Scenario::parse("[policy]\nadvance_at = 0.0\n").is_err());
        assert_eq!(Scenario::parse("").unwrap().fleet.devices, 100);
    }
}
