//! The rollout side of the command line: `--canary`, `--waves` and the other policy flags (or a
//! policy file) into a [`RolloutPolicy`], and campaign summaries and dry runs as an operator
//! reads them.

use std::path::PathBuf;

use aloft_proto::DeviceId;
use anyhow::{bail, Result};
use clap::Args;

use crate::admin::wire::{CampaignSummary, DryRun};
use crate::rollout::policy::{Growth, MaintenanceWindow, Size, Threshold};
use crate::rollout::RolloutPolicy;

/// A rollout policy from the command line: a TOML file (`--policy`) overridden by flags.
/// Durations take `s`, `m`, `h` or `d` (`90s`, `10m`); ratios take `%`.
#[derive(Args, Debug, Default)]
#[command(about = None, long_about = None)]
pub struct PolicyArgs {
    /// TOML file holding a rollout policy (the fields of PROTOCOL.md §Rollout policy).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The first wave: a device count (`10`) or a percentage (`1%`).
    #[arg(long)]
    canary: Option<String>,
    /// Cumulative percentages of the waves after the canary, e.g. `10,50,100`.
    #[arg(long, value_delimiter = ',', conflicts_with = "growth")]
    waves: Vec<f64>,
    /// Exponential growth: each wave this many times the one before.
    #[arg(long)]
    growth: Option<f64>,
    /// Wait this long after a wave finishes before the next starts.
    #[arg(long)]
    soak: Option<String>,
    /// A wave is finished when this share of it has finished (`95%`).
    #[arg(long)]
    advance_at: Option<String>,
    /// Pause when a wave's failed/finished reaches this: `RATIO%[:MIN_SAMPLE]`, e.g. `20%:5`.
    #[arg(long)]
    pause_at: Option<String>,
    /// Abort when a wave's failed/finished reaches this: `RATIO%[:MIN_SAMPLE]`.
    #[arg(long)]
    abort_at: Option<String>,
    /// A device downloading, installing or verifying that stays silent this long (no report, no
    /// chunk request, no heartbeat) is timed out and its job withdrawn. Silence, not slowness: a
    /// slow download that keeps asking for chunks is never timed out by it. Set it above the
    /// time a window of chunks (8 × 16 KiB by default) takes on the slowest link.
    #[arg(long)]
    device_timeout: Option<String>,
    /// A notified device silent for longer is timed out (unset: it keeps its job).
    #[arg(long)]
    notified_timeout: Option<String>,
    /// At most this many devices downloading at once.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Start no device before this: Unix seconds, or `+DURATION` from now.
    #[arg(long)]
    start_at: Option<String>,
    /// Daily maintenance window in UTC, `HH:MM-HH:MM` (may wrap past midnight).
    #[arg(long)]
    window: Option<String>,
    /// After this long, devices that never started are timed out and the campaign expires.
    #[arg(long)]
    deadline: Option<String>,
}

/// Parses `90`, `90s`, `10m`, `2h`, `1d` into seconds.
pub fn parse_duration(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration like 90s, 10m, 2h or 1d"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => bail!("{s:?}: unknown unit {unit:?} (use s, m, h or d)"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("{s:?} is too long"))
}

/// Parses `20%` or `0.2` into a ratio in [0, 1].
fn parse_ratio(s: &str) -> Result<f64> {
    let r = match s.trim().strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| anyhow::anyhow!("{s:?} is not a ratio like 20% or 0.2"))?;
    if !(0.0..=1.0).contains(&r) {
        bail!("{s:?} is not between 0% and 100%");
    }
    Ok(r)
}

fn parse_threshold(s: &str) -> Result<Threshold> {
    let (ratio, min) = match s.split_once(':') {
        Some((r, m)) => (r, m.trim().parse::<u32>()?),
        None => (s, 1),
    };
    Ok(Threshold {
        ratio: parse_ratio(ratio)?,
        min_sample: min,
    })
}

impl PolicyArgs {
    pub fn to_policy(&self, now_secs: u64) -> Result<RolloutPolicy> {
        let mut p = match &self.policy {
            Some(path) => {
                let text = std::fs::read_to_string(path)?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("policy file {}: {e}", path.display()))?
            }
            None => RolloutPolicy::default(),
        };
        if let Some(c) = &self.canary {
            p.waves.canary = Some(match c.trim().strip_suffix('%') {
                Some(pct) => Size::Percent(pct.trim().parse()?),
                None => Size::Count(c.trim().parse()?),
            });
        }
        if !self.waves.is_empty() {
            p.waves.growth = Growth::Percent(self.waves.clone());
        }
        if let Some(f) = self.growth {
            p.waves.growth = Growth::Exponential(f);
        }
        if let Some(d) = &self.soak {
            p.soak_secs = parse_duration(d)?;
        }
        if let Some(r) = &self.advance_at {
            p.advance_at = parse_ratio(r)?;
        }
        if let Some(t) = &self.pause_at {
            p.pause_at = Some(parse_threshold(t)?);
        }
        if let Some(t) = &self.abort_at {
            p.abort_at = Some(parse_threshold(t)?);
        }
        if let Some(d) = &self.device_timeout {
            p.device_timeout_secs = Some(parse_duration(d)?);
        }
        if let Some(d) = &self.notified_timeout {
            p.notified_timeout_secs = Some(parse_duration(d)?);
        }
        if let Some(k) = self.concurrency {
            p.concurrency = Some(k);
        }
        if let Some(t) = &self.start_at {
            p.start_at = Some(match t.trim().strip_prefix('+') {
                Some(d) => now_secs + parse_duration(d)?,
                None => t.trim().parse()?,
            });
        }
        if let Some(w) = &self.window {
            p.window = Some(MaintenanceWindow::parse(w)?);
        }
        if let Some(d) = &self.deadline {
            p.deadline_secs = Some(parse_duration(d)?);
        }
        p.validate()?;
        Ok(p)
    }
}

pub(super) fn parse_label(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => bail!("label {s:?} is not key=value"),
    }
}

pub(super) fn device_ids(v: Vec<String>) -> Result<Vec<DeviceId>> {
    Ok(v.into_iter().map(DeviceId::new).collect::<Result<_, _>>()?)
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One line for a policy, as the operator set it.
pub fn describe_policy(p: &RolloutPolicy) -> String {
    let mut parts = Vec::new();
    match p.waves.canary {
        Some(Size::Count(n)) => parts.push(format!("canary {n}")),
        Some(Size::Percent(x)) => parts.push(format!("canary {x}%")),
        None => {}
    }
    match &p.waves.growth {
        Growth::Percent(ps) => {
            let ps: Vec<String> = ps.iter().map(|x| format!("{x}%")).collect();
            parts.push(format!("waves {}", ps.join("/")));
        }
        Growth::Exponential(f) => parts.push(format!("growth x{f}")),
    }
    parts.push(format!("soak {}s", p.soak_secs));
    parts.push(format!("advance at {}%", p.advance_at * 100.0));
    let threshold = |t: &Threshold| format!("{}% (min {})", t.ratio * 100.0, t.min_sample);
    if let Some(t) = &p.pause_at {
        parts.push(format!("pause at {}", threshold(t)));
    }
    if let Some(t) = &p.abort_at {
        parts.push(format!("abort at {}", threshold(t)));
    }
    if let Some(s) = p.device_timeout_secs {
        parts.push(format!("device timeout {s}s"));
    }
    if let Some(s) = p.notified_timeout_secs {
        parts.push(format!("notified timeout {s}s"));
    }
    if let Some(k) = p.concurrency {
        parts.push(format!("concurrency {k}"));
    }
    if let Some(t) = p.start_at {
        parts.push(format!("start at {t} (Unix s)"));
    }
    if let Some(w) = p.window {
        parts.push(format!("window {w}"));
    }
    if let Some(s) = p.deadline_secs {
        parts.push(format!("deadline {s}s"));
    }
    parts.join(", ")
}

/// A campaign summary as an operator reads it.
pub fn describe(s: &CampaignSummary) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "campaign {} ({}): {}",
        s.campaign, s.artifact, s.status
    );
    if let Some(r) = &s.reason {
        let _ = writeln!(out, "  why: {r}");
    }
    if let Some(c) = &s.rolls_back {
        let _ = writeln!(out, "  rolls back {c}");
    }
    let _ = writeln!(out, "  policy: {}", describe_policy(&s.policy));
    let counts: Vec<String> = s.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "  {} devices: {}", s.total, counts.join(" "));
    if !s.reasons.is_empty() {
        let reasons: Vec<String> = s.reasons.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "  reasons: {}", reasons.join(" "));
    }
    if s.unhealthy > 0 {
        let _ = writeln!(out, "  unhealthy during the soak: {}", s.unhealthy);
    }
    let at = |ms: Option<u64>| {
        ms.map_or("-".to_owned(), |t| {
            format!("+{:.1}s", t.saturating_sub(s.created_ms) as f64 / 1000.0)
        })
    };
    for w in &s.waves {
        let c = &w.counts;
        let _ = writeln!(
            out,
            "  wave {}: {} devices, opened {}, finished {}: notified {} downloading {} installing {} succeeded {} failed {} unhealthy {}",
            w.wave,
            c.size,
            at(w.opened_ms),
            at(w.finished_ms),
            c.notified,
            c.downloading,
            c.installing,
            c.succeeded,
            c.failed,
            c.unhealthy
        );
    }
    for d in &s.devices {
        let reason = d.reason.map(|r| format!(" ({r})")).unwrap_or_default();
        let sick = if d.unhealthy { " unhealthy" } else { "" };
        let _ = writeln!(
            out,
            "  {} wave {}: {}{reason}{sick}",
            d.device, d.wave, d.state
        );
    }
    out
}

/// Prints a dry run as the operator reads it: wave by wave.
pub(super) fn print_dry_run(d: &DryRun) {
    println!(
        "dry run: {} would go to {} devices in {} waves",
        d.artifact,
        d.total,
        d.waves.len()
    );
    let mut before = 0;
    for (i, w) in d.waves.iter().enumerate() {
        before += w.len();
        let ids: Vec<&str> = w.iter().map(|d| d.as_str()).collect();
        println!(
            "wave {i}: {} devices (cumulative {before}): {}",
            w.len(),
            ids.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{CampaignCommand, Cli, Command};
    use clap::Parser;

    fn create(args: &[&str]) -> (RolloutPolicy, bool) {
        let argv = ["aloft", "campaign", "create", "--artifact", "fw-2", "--all"]
            .into_iter()
            .chain(args.iter().copied())
            .chain(["--profile", "p"]);
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Campaign(c) = cli.command else {
            panic!("not a campaign command");
        };
        let CampaignCommand::Create {
            policy, dry_run, ..
        } = *c
        else {
            panic!("not create");
        };
        (policy.to_policy(1_000).unwrap(), dry_run)
    }

    #[test]
    fn policy_flags_become_a_policy() {
        let (p, dry_run) = create(&[
            "--canary",
            "1%",
            "--waves",
            "10,50,100",
            "--soak",
            "10m",
            "--advance-at",
            "95%",
            "--pause-at",
            "20%:5",
            "--abort-at",
            "0.5:10",
            "--device-timeout",
            "30m",
            "--notified-timeout",
            "2h",
            "--concurrency",
            "100",
            "--start-at",
            "+1h",
            "--window",
            "22:00-04:00",
            "--deadline",
            "7d",
            "--dry-run",
        ]);
        assert!(dry_run);
        assert_eq!(p.waves.canary, Some(Size::Percent(1.0)));
        assert_eq!(p.waves.growth, Growth::Percent(vec![10.0, 50.0, 100.0]));
        assert_eq!(p.soak_secs, 600);
        assert_eq!(p.advance_at, 0.95);
        assert_eq!(
            p.pause_at,
            Some(Threshold {
                ratio: 0.2,
                min_sample: 5
            })
        );
        assert_eq!(p.abort_at.map(|t| t.min_sample), Some(10));
        assert_eq!(p.device_timeout_secs, Some(1_800));
        assert_eq!(p.notified_timeout_secs, Some(7_200));
        assert_eq!(p.concurrency, Some(100));
        assert_eq!(p.start_at, Some(1_000 + 3_600));
        assert_eq!(
            p.window.map(|w| w.to_string()).as_deref(),
            Some("22:00-04:00 UTC")
        );
        assert_eq!(p.deadline_secs, Some(7 * 86_400));
        let (e, _) = create(&["--canary", "5", "--growth", "2"]);
        assert_eq!(e.waves.canary, Some(Size::Count(5)));
        assert_eq!(e.waves.growth, Growth::Exponential(2.0));
        assert_eq!(create(&[]).0, RolloutPolicy::default());
    }

    #[test]
    fn a_policy_file_is_the_base_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(
            &file,
            "soak_secs = 30\nconcurrency = 8\n[waves]\ncanary = { count = 3 }\ngrowth = { exponential = 3.0 }\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let (p, _) = create(&["--policy", path, "--concurrency", "16"]);
        assert_eq!(p.soak_secs, 30);
        assert_eq!(p.concurrency, Some(16));
        assert_eq!(p.waves.growth, Growth::Exponential(3.0));
    }

    #[test]
    fn the_status_shows_the_policy_and_the_waves() {
        let (policy, _) = create(&["--canary", "2", "--waves", "100", "--pause-at", "20%:3"]);
        let summary: CampaignSummary = serde_json::from_value(serde_json::json!({
            "campaign": "c-1", "artifact": "fw-2", "status": "paused",
            "reason": "paused by threshold: wave 0 has 2 failed of 2 finished",
            "total": 5, "counts": {"idle": 3, "rolled_back": 2},
            "reasons": {"health_check_failed": 2}, "created_ms": 1000, "finished_ms": null,
            "policy": policy,
            "waves": [
                {"wave": 0, "size": 2, "notified": 0, "downloading": 0, "installing": 0,
                 "succeeded": 0, "unhealthy": 0, "failed": 2, "opened_ms": 1000,
                 "finished_ms": null},
                {"wave": 1, "size": 3, "notified": 0, "downloading": 0, "installing": 0,
                 "succeeded": 0, "unhealthy": 0, "failed": 0, "opened_ms": null,
                 "finished_ms": null}
            ],
            "unhealthy": 0
        }))
        .unwrap();
        let text = describe(&summary);
        assert!(text.contains("c-1 (fw-2): paused"), "{text}");
        assert!(text.contains("why: paused by threshold"), "{text}");
        assert!(
            text.contains("policy: canary 2, waves 100%, soak 0s"),
            "{text}"
        );
        assert!(text.contains("pause at 20% (min 3)"), "{text}");
        assert!(
            text.contains("wave 0: 2 devices, opened +0.0s, finished -"),
            "{text}"
        );
        assert!(text.contains("reasons: health_check_failed=2"), "{text}");
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_ratio("120%").is_err());
        assert!(parse_threshold("20%:x").is_err());
        let args = PolicyArgs {
            waves: vec![50.0, 20.0],
            ..PolicyArgs::default()
        };
        let e = args.to_policy(0).unwrap_err().to_string();
        assert!(e.contains("increase"), "{e}");
    }
}
