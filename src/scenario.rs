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
//! [conditions]               # aloft_device::ConditionModel: battery, use, local time (1.5)
//! low_battery_probability = 0.33
//! [release.preconditions]    # signed into the manifest (1.5)
//! min_battery_pct = 30
//! [starve]                   # the orchestrator stopped (SIGSTOP) during the installs
//! orchestrator_stop_secs = 12
//! after_downloaded_percent = 20.0
//! ```
//!
//! [`starve_during_installs`] carries out the `[starve]` table: a slow or stopped update server
//! must never make a device abandon a healthy image.

use std::path::Path;
use std::time::{Duration, Instant};

use aloft_device::{ConditionModel, Faults, Fleet};
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_proto::DeviceState;
use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One run's set-up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub fleet: FleetSpec,
    pub faults: Faults,
    /// (1.5) The devices' battery, use, local time and link (seeded per device).
    pub conditions: ConditionModel,
    pub policy: RolloutPolicy,
    pub release: ReleaseScenario,
    pub starve: Starve,
    pub expect: Expect,
}

/// CPU starvation of the orchestrator during the campaign.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Starve {
    /// Stop the orchestrator process (SIGSTOP) as soon as a device is installing, rebooting or
    /// verifying, for this many seconds, then let it go on (SIGCONT). 0: never. Longer than the
    /// simulated devices' confirm deadline, this checks that the confirm does not wait for the
    /// server.
    pub orchestrator_stop_secs: u64,
    /// Stop only once this share of the fleet (percent) is past its download, so that the stop
    /// catches many devices installing rather than the first one. 0: at the first install.
    pub after_downloaded_percent: f64,
}

/// What [`starve_during_installs`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Starvation {
    /// Devices past their download (installing, rebooting or verifying) when it stopped.
    pub installing_at_stop: usize,
    /// Devices that confirmed the new image (`succeeded` in their own record) while the
    /// orchestrator was stopped.
    pub confirmed_while_stopped: usize,
    /// Devices that rolled back while the orchestrator was stopped.
    pub rolled_back_while_stopped: usize,
    /// How long the orchestrator was stopped.
    pub stopped_for: Duration,
}

/// Whether a device is between the end of its download and its verdict.
fn installing(phase: DeviceState) -> bool {
    matches!(
        phase,
        DeviceState::Installing | DeviceState::Rebooting | DeviceState::Verifying
    )
}

/// Stops process `pid` (SIGSTOP) as soon as a device of `fleet` is installing, rebooting or
/// verifying (once `spec.after_downloaded_percent` of the fleet is past its download), keeps it
/// stopped for at least `spec.orchestrator_stop_secs` and until every device that was past its
/// download at the stop has reached its own verdict, then resumes it (SIGCONT). Gives up
/// waiting after `limit` (the process is resumed in any case).
pub async fn starve_during_installs(
    fleet: &Fleet,
    pid: u32,
    spec: &Starve,
    limit: Duration,
) -> Result<Starvation> {
    let hold = Duration::from_secs(spec.orchestrator_stop_secs);
    let give_up = Instant::now() + limit;
    // The devices installing now, and whether enough of the fleet is past its download.
    let in_install = || -> (Vec<aloft_proto::DeviceId>, bool) {
        let views = fleet.views();
        let total = views.len();
        let mut past = 0usize;
        let mut ids = Vec::new();
        for (id, v) in views {
            match &v.current {
                Some((_, p)) if installing(*p) => {
                    past += 1;
                    ids.push(id);
                }
                Some(_) => {}
                None => past += usize::from(v.last_finished.is_some()),
            }
        }
        let enough = past as f64 * 100.0 >= spec.after_downloaded_percent * total as f64;
        (ids, enough)
    };
    let caught = loop {
        let (ids, enough) = in_install();
        if enough && !ids.is_empty() {
            break ids;
        }
        if Instant::now() > give_up {
            bail!("no device began installing within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let stopped = Stopped::new(pid)?;
    let verdicts = |id: &aloft_proto::DeviceId| {
        fleet.view(id).and_then(|v| {
            let (_, state, _, _) = v.last_finished?;
            // Still installing means no verdict yet, whatever an older campaign ended as.
            v.current.is_none().then_some(state)
        })
    };
    loop {
        let done = caught.iter().all(|id| verdicts(id).is_some());
        if (done && stopped.since.elapsed() >= hold) || Instant::now() > give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let states: Vec<DeviceState> = fleet
        .views()
        .into_iter()
        .filter_map(|(_, v)| {
            let (_, state, _, _) = v.last_finished?;
            v.current.is_none().then_some(state)
        })
        .collect();
    let stopped_for = stopped.resume()?;
    Ok(Starvation {
        installing_at_stop: caught.len(),
        confirmed_while_stopped: states
            .iter()
            .filter(|s| **s == DeviceState::Succeeded)
            .count(),
        rolled_back_while_stopped: states
            .iter()
            .filter(|s| **s == DeviceState::RolledBack)
            .count(),
        stopped_for,
    })
}

/// A process stopped with SIGSTOP; SIGCONT when resumed or dropped, so a failing caller never
/// leaves it stopped.
struct Stopped {
    pid: libc::pid_t,
    since: Instant,
    resumed: bool,
}

impl Stopped {
    fn new(pid: u32) -> Result<Stopped> {
        let pid = libc::pid_t::try_from(pid).context("process id out of range")?;
        if pid <= 0 {
            // 0 and negative ids name process groups, never one process.
            bail!("not a process id: {pid}");
        }
        signal(pid, libc::SIGSTOP)?;
        Ok(Stopped {
            pid,
            since: Instant::now(),
            resumed: false,
        })
    }

    fn resume(mut self) -> Result<Duration> {
        self.resumed = true;
        signal(self.pid, libc::SIGCONT)?;
        Ok(self.since.elapsed())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = signal(self.pid, libc::SIGCONT);
        }
    }
}

fn signal(pid: libc::pid_t, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of this process; `pid` is a
    // child this process started (positive, so never a process group).
    let r = unsafe { libc::kill(pid, sig) };
    if r != 0 {
        bail!(
            "signal {sig} to process {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
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
    /// (1.5) Device preconditions signed into the manifest, as `release build` takes them
    /// (`install_window = { start_minute = 60, end_minute = 300 }`).
    pub preconditions: Option<aloft_proto::precondition::Preconditions>,
}

impl Default for ReleaseScenario {
    fn default() -> Self {
        ReleaseScenario {
            version: "2.0.0".into(),
            security_version: 2,
            preconditions: None,
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
        let pct = s.starve.after_downloaded_percent;
        if !(0.0..=100.0).contains(&pct) {
            bail!("starve.after_downloaded_percent must be within 0-100, not {pct}");
        }
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
        assert_eq!(
            Scenario::parse("").unwrap().starve.orchestrator_stop_secs,
            0
        );
        assert!(Scenario::parse("[starve]\nstop_secs = 3\n").is_err());
        assert!(Scenario::parse("[starve]\nafter_downloaded_percent = 120.0\n").is_err());
    }
}
