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
/// One rule for every number: a share of devices takes `%` (`5%`), a plain number is a count of
/// devices (`5`). Durations take `s`, `m`, `h` or `d` (`90s`, `10m`).
#[derive(Args, Debug, Default)]
#[command(about = None, long_about = None)]
pub struct PolicyArgs {
    /// TOML file holding a rollout policy (the fields of PROTOCOL.md §Rollout policy).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The first wave: a count of devices (`10`) or a share of the target (`1%`).
    #[arg(long)]
    canary: Option<String>,
    /// The waves after the canary, as cumulative shares of the target: `10%,50%,100%`.
    #[arg(long, value_delimiter = ',', conflicts_with = "growth")]
    waves: Vec<String>,
    /// Exponential growth instead of `--waves`: each wave this many times the one before (`2`).
    #[arg(long)]
    growth: Option<f64>,
    /// Wait this long after a wave finishes before the next starts.
    #[arg(long)]
    soak: Option<String>,
    /// A wave counts as finished when this share of it has finished (`95%`).
    #[arg(long)]
    advance_at: Option<String>,
    /// Pause when this share of a wave's finished devices failed, once at least the count after
    /// the colon have finished: `SHARE%[:COUNT]`, e.g. `20%:5` (the count defaults to 1).
    #[arg(long)]
    pause_at: Option<String>,
    /// Abort when this share of a wave's finished devices failed: `SHARE%[:COUNT]`, like
    /// `--pause-at`.
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
    /// At most this count of devices downloading at once.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Start no device before this: `+DURATION` from now (`+2h`), a UTC time
    /// `YYYY-MM-DDTHH:MM[:SS]Z`, or Unix seconds.
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

/// Parses a share, `20%`, into a percentage in [0, 100]. A plain number is refused with the
/// spelling to use: under the one rule a plain number is a count, and `0.2` or `20` once meant a
/// ratio here (before 1.5), so neither may silently mean something else now.
fn parse_percent(flag: &str, s: &str) -> Result<f64> {
    let t = s.trim();
    let Some(p) = t.strip_suffix('%') else {
        let hint = match t.parse::<f64>() {
            Ok(x) if x > 0.0 && x <= 1.0 && x.fract() != 0.0 => format!("{}%", x * 100.0),
            Ok(x) if (0.0..=100.0).contains(&x) => format!("{x}%"),
            _ => "20%".to_owned(),
        };
        bail!("{flag} {s:?}: a share takes %, e.g. {hint} (a plain number would be a count of devices)");
    };
    let pct = p
        .trim()
        .parse::<f64>()
        .map_err(|_| anyhow::anyhow!("{flag} {s:?} is not a share like 20%"))?;
    if !(0.0..=100.0).contains(&pct) {
        bail!("{flag} {s:?} is not between 0% and 100%");
    }
    Ok(pct)
}

/// Parses a share, `20%`, into a ratio in [0, 1] (see [`parse_percent`]).
fn parse_share(flag: &str, s: &str) -> Result<f64> {
    parse_percent(flag, s).map(|p| p / 100.0)
}

/// Parses a count of devices: a whole number, no `%`.
fn parse_count(flag: &str, s: &str) -> Result<u32> {
    s.trim().parse::<u32>().map_err(|_| {
        anyhow::anyhow!(
            "{flag} {s:?}: a count of devices is a whole number (a share takes %, e.g. 5%)"
        )
    })
}

/// Parses `SHARE%[:COUNT]`: the failure share of a wave's finished devices, and how many must
/// have finished before it counts.
fn parse_threshold(flag: &str, s: &str) -> Result<Threshold> {
    let (ratio, min) = match s.split_once(':') {
        Some((r, m)) => (r, parse_count(flag, m)?),
        None => (s, 1),
    };
    let ratio = parse_share(flag, ratio).map_err(|e| {
        anyhow::anyhow!("{e}; {flag} is SHARE%[:COUNT], e.g. {flag} 20%:5 (pause once 20% of at least 5 finished devices failed)")
    })?;
    Ok(Threshold {
        ratio,
        min_sample: min,
    })
}

/// Parses `--start-at`: `+DURATION`, `YYYY-MM-DDTHH:MM[:SS]Z` (UTC) or Unix seconds.
fn parse_start_at(s: &str, now_secs: u64) -> Result<u64> {
    let t = s.trim();
    if let Some(d) = t.strip_prefix('+') {
        return Ok(now_secs + parse_duration(d)?);
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    let bad = || {
        anyhow::anyhow!(
            "--start-at {s:?} is not +DURATION (+2h), a UTC time like 2026-12-24T01:00Z, or Unix seconds"
        )
    };
    let utc = t.strip_suffix('Z').ok_or_else(bad)?;
    let (date, clock) = utc.split_once('T').ok_or_else(bad)?;
    let num = |x: &str| x.parse::<u32>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let c: Vec<&str> = clock.split(':').collect();
    let ([y, mo, da], 2..=3) = (d.as_slice(), c.len()) else {
        return Err(bad());
    };
    let month =
        time::Month::try_from(u8::try_from(num(mo)?).map_err(|_| bad())?).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(
        i32::try_from(num(y)?).map_err(|_| bad())?,
        month,
        u8::try_from(num(da)?).map_err(|_| bad())?,
    )
    .map_err(|_| bad())?;
    let part = |i: usize| -> Result<u8> {
        c.get(i)
            .map_or(Ok(0), |x| u8::try_from(num(x)?).map_err(|_| bad()))
    };
    let clock = time::Time::from_hms(part(0)?, part(1)?, part(2)?).map_err(|_| bad())?;
    let at = time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .unix_timestamp();
    u64::try_from(at).map_err(|_| bad())
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
                Some(_) => Size::Percent(parse_percent("--canary", c)?),
                None => Size::Count(parse_count("--canary", c)?),
            });
        }
        if !self.waves.is_empty() {
            let shares = self
                .waves
                .iter()
                .map(|w| {
                    parse_percent("--waves", w).map_err(|_| {
                        let spelled: Vec<String> = self
                            .waves
                            .iter()
                            .map(|w| format!("{}%", w.trim().trim_end_matches('%')))
                            .collect();
                        anyhow::anyhow!(
                            "--waves {}: waves are cumulative shares of the target and each takes %: write --waves {} (before 1.5, plain numbers here meant percentages)",
                            self.waves.join(","),
                            spelled.join(",")
                        )
                    })
                })
                .collect::<Result<Vec<f64>>>()?;
            p.waves.growth = Growth::Percent(shares);
        }
        if let Some(f) = self.growth {
            p.waves.growth = Growth::Exponential(f);
        }
        if let Some(d) = &self.soak {
            p.soak_secs = parse_duration(d)?;
        }
        if let Some(r) = &self.advance_at {
            p.advance_at = parse_share("--advance-at", r)?;
        }
        if let Some(t) = &self.pause_at {
            p.pause_at = Some(parse_threshold("--pause-at", t)?);
        }
        if let Some(t) = &self.abort_at {
            p.abort_at = Some(parse_threshold("--abort-at", t)?);
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
            p.start_at = Some(parse_start_at(t, now_secs)?);
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

/// One line for a policy, as the operator set it, in the flags' own spelling (`%` for shares,
/// plain numbers for counts).
pub fn describe_policy(p: &RolloutPolicy) -> String {
    use super::human;
    let mut parts = Vec::new();
    match p.waves.canary {
        Some(Size::Count(n)) => parts.push(format!("canary {n} devices")),
        Some(Size::Percent(x)) => parts.push(format!("canary {x}%")),
        None => {}
    }
    match &p.waves.growth {
        Growth::Percent(ps) => {
            let ps: Vec<String> = ps.iter().map(|x| format!("{x}%")).collect();
            parts.push(format!("waves {}", ps.join(",")));
        }
        Growth::Exponential(f) => parts.push(format!("growth x{f}")),
    }
    parts.push(format!("soak {}", human::duration(p.soak_secs)));
    parts.push(format!("advance at {}%", p.advance_at * 100.0));
    let threshold = |t: &Threshold| {
        format!(
            "{}% failed (once {} finished)",
            t.ratio * 100.0,
            t.min_sample
        )
    };
    if let Some(t) = &p.pause_at {
        parts.push(format!("pause at {}", threshold(t)));
    }
    if let Some(t) = &p.abort_at {
        parts.push(format!("abort at {}", threshold(t)));
    }
    if let Some(s) = p.device_timeout_secs {
        parts.push(format!("device timeout {}", human::duration(s)));
    }
    if let Some(s) = p.notified_timeout_secs {
        parts.push(format!("notified timeout {}", human::duration(s)));
    }
    if let Some(k) = p.concurrency {
        parts.push(format!("at most {k} downloading"));
    }
    if let Some(t) = p.start_at {
        parts.push(format!("start at {}", human::time(t.saturating_mul(1000))));
    }
    if let Some(w) = p.window {
        parts.push(format!("window {w}"));
    }
    if let Some(s) = p.deadline_secs {
        parts.push(format!("deadline {} after creation", human::duration(s)));
    }
    parts.join(", ")
}

/// A campaign summary as an operator reads it, times relative to `now_ms`.
pub fn describe(s: &CampaignSummary, now_ms: u64) -> String {
    use super::human;
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
    if let Some(w) = super::watch::waiting(s, now_ms) {
        let _ = writeln!(out, "  waiting: {}", w.describe(now_ms));
    }
    if let Some(c) = &s.rolls_back {
        let _ = writeln!(out, "  rolls back {c}");
    }
    let _ = writeln!(
        out,
        "  created {}",
        human::time_and_relative(s.created_ms, now_ms)
    );
    if let Some(f) = s.finished_ms {
        let _ = writeln!(out, "  ended {}", human::time_and_relative(f, now_ms));
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
    let at = |ms: Option<u64>| ms.map_or("-".to_owned(), human::clock);
    for w in &s.waves {
        let c = &w.counts;
        let _ = writeln!(
            out,
            "  wave {}: {} devices, opened {}, finished {}: notified {} downloading {} deferred {} installing {} succeeded {} failed {} unhealthy {}",
            w.wave,
            c.size,
            at(w.opened_ms),
            at(w.finished_ms),
            c.notified,
            c.downloading,
            c.deferred,
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

/// A dry run as the operator reads it: the policy as understood, then wave by wave.
pub(super) fn describe_dry_run(d: &DryRun) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dry run: {} would go to {} devices in {} waves",
        d.artifact,
        d.total,
        d.waves.len()
    );
    let _ = writeln!(out, "policy: {}", describe_policy(&d.policy));
    let mut before = 0;
    for (i, w) in d.waves.iter().enumerate() {
        before += w.len();
        let ids: Vec<&str> = w.iter().map(|d| d.as_str()).collect();
        let _ = writeln!(
            out,
            "wave {i}: {} devices (cumulative {before}): {}",
            w.len(),
            ids.join(" ")
        );
    }
    out
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
            "10%,50%,100%",
            "--soak",
            "10m",
            "--advance-at",
            "95%",
            "--pause-at",
            "20%:5",
            "--abort-at",
            "50%:10",
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
        let (policy, _) = create(&["--canary", "2", "--waves", "100%", "--pause-at", "20%:3"]);
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
        let text = describe(&summary, 61_000);
        assert!(text.contains("c-1 (fw-2): paused"), "{text}");
        assert!(text.contains("why: paused by threshold"), "{text}");
        assert!(
            text.contains("policy: canary 2 devices, waves 100%, soak 0s"),
            "{text}"
        );
        assert!(
            text.contains("pause at 20% failed (once 3 finished)"),
            "{text}"
        );
        assert!(
            text.contains("created 1970-01-01 00:00:01 UTC (1m ago)"),
            "{text}"
        );
        assert!(
            text.contains("wave 0: 2 devices, opened 00:00:01 UTC, finished -"),
            "{text}"
        );
        assert!(
            text.contains("waiting: paused (paused by threshold"),
            "{text}"
        );
        assert!(text.contains("reasons: health_check_failed=2"), "{text}");
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_share("--advance-at", "120%").is_err());
        assert!(parse_threshold("--pause-at", "20%:x").is_err());
        let args = PolicyArgs {
            waves: vec!["50%".into(), "20%".into()],
            ..PolicyArgs::default()
        };
        let e = args.to_policy(0).unwrap_err().to_string();
        assert!(e.contains("increase"), "{e}");
    }

    fn refused(args: &[&str]) -> String {
        let argv = ["aloft", "campaign", "create", "--artifact", "fw-2", "--all"]
            .into_iter()
            .chain(args.iter().copied())
            .chain(["--profile", "p"]);
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Campaign(c) = cli.command else {
            panic!("not a campaign command");
        };
        let CampaignCommand::Create { policy, .. } = *c else {
            panic!("not create");
        };
        policy.to_policy(1_000).unwrap_err().to_string()
    }

    #[test]
    fn shares_take_a_percent_sign_and_counts_are_plain_numbers() {
        // Shares: `%` everywhere, and the policy says what it understood in the same spelling.
        let (odd, _) = create(&["--canary", "7%", "--waves", "7%,29%,100%"]);
        assert!(
            describe_policy(&odd).starts_with("canary 7%, waves 7%,29%,100%,"),
            "{}",
            describe_policy(&odd)
        );
        let (p, _) = create(&[
            "--canary",
            "5",
            "--waves",
            "10%,50%,100%",
            "--advance-at",
            "95%",
            "--pause-at",
            "20%:5",
            "--abort-at",
            "50%",
        ]);
        assert_eq!(p.waves.canary, Some(Size::Count(5)));
        assert_eq!(p.abort_at.map(|t| t.min_sample), Some(1));
        assert_eq!(
            describe_policy(&p),
            "canary 5 devices, waves 10%,50%,100%, soak 0s, advance at 95%, pause at 20% failed (once 5 finished), abort at 50% failed (once 1 finished)"
        );
        // The spellings the issue found ambiguous are refused with the one to use.
        let e = refused(&["--pause-at", "1:5"]);
        assert!(e.contains("a share takes %, e.g. 1%"), "{e}");
        assert!(
            e.contains("--pause-at is SHARE%[:COUNT], e.g. --pause-at 20%:5"),
            "{e}"
        );
        let e = refused(&["--pause-at", "20"]);
        assert!(e.contains("a share takes %, e.g. 20%"), "{e}");
        let e = refused(&["--abort-at", "0.5:10"]);
        assert!(e.contains("e.g. 50%"), "{e}");
        let e = refused(&["--waves", "50,100"]);
        assert!(e.contains("write --waves 50%,100%"), "{e}");
        let e = refused(&["--advance-at", "0.95"]);
        assert!(e.contains("e.g. 95%"), "{e}");
        let e = refused(&["--canary", "0.5"]);
        assert!(e.contains("a count of devices is a whole number"), "{e}");
        let e = refused(&["--pause-at", "20%:5%"]);
        assert!(e.contains("a count of devices is a whole number"), "{e}");
    }

    #[test]
    fn start_at_takes_a_utc_time_a_delay_or_unix_seconds() {
        assert_eq!(parse_start_at("+1h", 1_000).unwrap(), 4_600);
        assert_eq!(parse_start_at("1796307603", 0).unwrap(), 1_796_307_603);
        assert_eq!(
            parse_start_at("2026-12-03T14:20:03Z", 0).unwrap(),
            1_796_307_603
        );
        assert_eq!(
            parse_start_at("2026-12-03T14:20Z", 0).unwrap(),
            1_796_307_600
        );
        assert!(parse_start_at("2026-12-03 14:20", 0).is_err());
        assert!(parse_start_at("2026-13-03T14:20Z", 0).is_err());
    }
}
