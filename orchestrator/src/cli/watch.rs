//! `aloft campaign status --watch`: one frame per poll of a campaign's summary (a bar and the
//! counts per state for each wave, the reasons of failures so far, and why nothing is moving),
//! the failures that arrived since the last poll, and whether the campaign succeeded. Pure:
//! summaries and `now` in, text out; the loop in `cli.rs` does the polling and the terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use aloft_proto::DeviceState;

use super::human;
use crate::admin::wire::{CampaignSummary, WaveSummary};
use crate::model::CampaignStatus;
use crate::rollout::policy::MaintenanceWindow;

/// Width of a wave's bar, in characters.
const BAR: usize = 30;

/// Why an unfinished campaign is notifying nobody now.
#[derive(Debug, Clone, PartialEq)]
pub enum Waiting {
    /// Paused by an operator or by the pause threshold (`why`); it can be resumed.
    Paused { why: Option<String> },
    /// The policy's start time is ahead (Unix ms).
    StartTime { at_ms: u64 },
    /// Outside the daily maintenance window; it opens at `opens_ms`.
    Window {
        window: MaintenanceWindow,
        opens_ms: u64,
    },
    /// Wave `wave` finished; the next opens after its soak, at `until_ms`.
    Soak { wave: u32, until_ms: u64 },
    /// As many devices are downloading as the policy allows.
    Concurrency { limit: u32 },
}

impl Waiting {
    /// One line, with times relative to `now_ms`.
    pub fn describe(&self, now_ms: u64) -> String {
        match self {
            Waiting::Paused { why } => format!(
                "paused{}; devices in flight finish, nobody new is notified (`aloft campaign resume` continues it)",
                why.as_deref().map(|w| format!(" ({w})")).unwrap_or_default()
            ),
            Waiting::StartTime { at_ms } => format!(
                "for its start time, {}",
                human::time_and_relative(*at_ms, now_ms)
            ),
            Waiting::Window { window, opens_ms } => format!(
                "for the maintenance window {window}, which opens {}",
                human::time_and_relative(*opens_ms, now_ms)
            ),
            Waiting::Soak { wave, until_ms } => format!(
                "wave {wave} is soaking until {}, then the next wave opens",
                human::time_and_relative(*until_ms, now_ms)
            ),
            Waiting::Concurrency { limit } => {
                format!("{limit} devices are downloading, the most the policy allows at once")
            }
        }
    }
}

/// When `window` next opens at or after `now_ms`.
fn next_opening(window: &MaintenanceWindow, now_ms: u64) -> u64 {
    const DAY: u64 = 86_400_000;
    let start = u64::from(window.start_minute) * 60_000;
    let today = now_ms - now_ms % DAY + start;
    if today > now_ms {
        today
    } else {
        today + DAY
    }
}

/// Why `s` notifies nobody at `now_ms`, if it is unfinished and something holds it.
pub fn waiting(s: &CampaignSummary, now_ms: u64) -> Option<Waiting> {
    match s.status {
        CampaignStatus::Paused => {
            return Some(Waiting::Paused {
                why: s.reason.clone(),
            })
        }
        CampaignStatus::Active => {}
        _ => return None,
    }
    let p = &s.policy;
    if let Some(at) = p.start_at.map(|t| t.saturating_mul(1000)) {
        if at > now_ms {
            return Some(Waiting::StartTime { at_ms: at });
        }
    }
    let idle = s.count(DeviceState::Idle);
    if let Some(w) = p.window {
        if !w.allows(now_ms) && idle > 0 {
            return Some(Waiting::Window {
                window: w,
                opens_ms: next_opening(&w, now_ms),
            });
        }
    }
    // The last opened wave finished and the next one has not opened: the soak holds it.
    let opened = s.waves.iter().filter(|w| w.opened_ms.is_some()).count();
    if let (Some(last), Some(_next)) = (
        opened.checked_sub(1).and_then(|i| s.waves.get(i)),
        s.waves.get(opened),
    ) {
        if let Some(finished) = last.finished_ms {
            let until = finished.saturating_add(p.soak_secs.saturating_mul(1000));
            if until > now_ms {
                return Some(Waiting::Soak {
                    wave: last.wave,
                    until_ms: until,
                });
            }
        }
    }
    if let Some(limit) = p.concurrency {
        let notified_idle = s.waves.iter().map(|w| w.counts.notified).sum::<u32>() + idle;
        if s.count(DeviceState::Downloading) >= limit && notified_idle > 0 {
            return Some(Waiting::Concurrency { limit });
        }
    }
    None
}

/// A wave's bar: succeeded `█`, failed (or unhealthy) `x`, in flight `▒`, waiting `░`.
fn bar(w: &WaveSummary) -> String {
    let c = &w.counts;
    let size = c.size.max(1) as usize;
    let cells = |n: u32| (n as usize * BAR).div_ceil(size).min(BAR);
    let ok = cells(c.succeeded);
    let bad = cells(c.failures()).min(BAR - ok);
    let busy = cells(c.downloading + c.installing + c.deferred).min(BAR - ok - bad);
    format!(
        "{}{}{}{}",
        "█".repeat(ok),
        "x".repeat(bad),
        "▒".repeat(busy),
        "░".repeat(BAR - ok - bad - busy)
    )
}

/// The counts of one wave that are not zero, in the order devices go through them.
fn wave_counts(w: &WaveSummary) -> String {
    let c = &w.counts;
    let waiting = c
        .size
        .saturating_sub(c.notified + c.downloading + c.installing + c.deferred + c.finished());
    let parts: Vec<String> = [
        ("waiting", waiting),
        ("notified", c.notified),
        ("downloading", c.downloading),
        ("deferred", c.deferred),
        ("installing", c.installing),
        ("succeeded", c.succeeded),
        ("failed", c.failed),
        ("unhealthy", c.unhealthy),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| format!("{k}={n}"))
    .collect();
    parts.join(" ")
}

/// One frame of the watch: the campaign's state, why it waits, each wave's bar and counts, and
/// the failures by reason so far.
pub fn frame(s: &CampaignSummary, now_ms: u64) -> String {
    let mut out = String::new();
    let succeeded = s.count(DeviceState::Succeeded);
    let _ = writeln!(
        out,
        "campaign {} ({}): {}, {succeeded} of {} succeeded, {} failed",
        s.campaign,
        s.artifact,
        s.status,
        s.total,
        s.terminal().saturating_sub(succeeded)
    );
    if s.status.is_final() {
        if let Some(r) = &s.reason {
            let _ = writeln!(out, "  why: {r}");
        }
    }
    match waiting(s, now_ms) {
        Some(w) => {
            let _ = writeln!(out, "  waiting: {}", w.describe(now_ms));
        }
        None if s.status == CampaignStatus::Active => {
            let _ = writeln!(out, "  moving");
        }
        None => {}
    }
    let counts: Vec<String> = s.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "  all {}: {}", s.total, counts.join(" "));
    for w in &s.waves {
        let c = &w.counts;
        let when = match (w.opened_ms, w.finished_ms) {
            (None, _) => "not opened".to_owned(),
            (Some(o), None) => format!("opened {}", human::clock(o)),
            (Some(o), Some(f)) => {
                format!("opened {}, finished {}", human::clock(o), human::clock(f))
            }
        };
        let _ = writeln!(
            out,
            "  wave {:>2} {} {:>5}/{:<5} {} ({when})",
            w.wave,
            bar(w),
            c.succeeded,
            c.size,
            wave_counts(w)
        );
    }
    if !s.reasons.is_empty() {
        let reasons: Vec<String> = s.reasons.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "  failures by reason: {}", reasons.join(" "));
    }
    if s.unhealthy > 0 {
        let _ = writeln!(out, "  unhealthy during the soak: {}", s.unhealthy);
    }
    out
}

/// A line per reason whose count rose since `before` (`None`: the first poll, which reports
/// every reason so far).
pub fn new_failures(before: Option<&CampaignSummary>, now: &CampaignSummary) -> Vec<String> {
    let empty = BTreeMap::new();
    let old = before.map_or(&empty, |b| &b.reasons);
    let mut lines: Vec<String> = now
        .reasons
        .iter()
        .filter_map(|(reason, n)| {
            let was = old.get(reason).copied().unwrap_or(0);
            (*n > was).then(|| format!("{} more failed: {reason} ({n} so far)", n - was))
        })
        .collect();
    let was = before.map_or(0, |b| b.unhealthy);
    if now.unhealthy > was {
        lines.push(format!(
            "{} more reported themselves unhealthy during the soak ({} so far)",
            now.unhealthy - was,
            now.unhealthy
        ));
    }
    lines
}

/// Whether the watch is over: the campaign can change no more. A paused campaign can be
/// resumed, so it is not.
pub fn is_over(s: &CampaignSummary) -> bool {
    s.status.is_final()
}

/// `Ok` if the campaign finished with every member succeeded (and healthy); otherwise what went
/// wrong, for the exit status.
pub fn outcome(s: &CampaignSummary) -> Result<(), String> {
    let succeeded = s.count(DeviceState::Succeeded);
    if s.status == CampaignStatus::Finished && succeeded == s.total && s.unhealthy == 0 {
        return Ok(());
    }
    let mut why = format!(
        "campaign {} ended {} with {} of {} devices succeeded",
        s.campaign, s.status, succeeded, s.total
    );
    if s.unhealthy > 0 {
        let _ = write!(why, " ({} unhealthy during the soak)", s.unhealthy);
    }
    if let Some(r) = &s.reason {
        let _ = write!(why, ": {r}");
    }
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A summary of 60 devices in waves of 3, 27 and 30, with the given counts per wave
    /// (`[notified, downloading, installing, succeeded, failed]`).
    fn summary(status: &str, waves: [[u32; 5]; 3], policy: serde_json::Value) -> CampaignSummary {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        let sizes = [3, 27, 30];
        let mut wave_json = Vec::new();
        for (i, (w, size)) in waves.iter().zip(sizes).enumerate() {
            let [n, d, inst, ok, bad] = *w;
            for (k, v) in [
                ("notified", n),
                ("downloading", d),
                ("installing", inst),
                ("succeeded", ok),
                ("failed", bad),
                ("idle", size - n - d - inst - ok - bad),
            ] {
                if v > 0 {
                    *counts.entry(k.into()).or_default() += v;
                }
            }
            let opened = n + d + inst + ok + bad > 0 || i == 0;
            wave_json.push(serde_json::json!({
                "wave": i, "size": size, "notified": n, "downloading": d, "installing": inst,
                "succeeded": ok, "unhealthy": 0, "failed": bad,
                "opened_ms": opened.then_some(1_000_000),
                "finished_ms": (ok + bad == size).then_some(1_060_000),
            }));
        }
        let failed: u32 = waves.iter().map(|w| w[4]).sum();
        serde_json::from_value(serde_json::json!({
            "campaign": "c-1", "artifact": "fw-2", "status": status,
            "reason": (status == "paused").then_some("paused by an operator"),
            "total": 60, "counts": counts,
            "reasons": if failed > 0 { serde_json::json!({"health_check_failed": failed}) } else { serde_json::json!({}) },
            "created_ms": 1_000_000, "finished_ms": null,
            "policy": policy, "waves": wave_json, "unhealthy": 0
        }))
        .unwrap()
    }

    #[test]
    fn a_paused_campaign_with_nothing_done_draws_empty_bars_and_says_it_can_resume() {
        let s = summary("paused", [[0; 5]; 3], serde_json::json!({}));
        let text = frame(&s, 2_000_000);
        assert!(
            text.contains("paused, 0 of 60 succeeded, 0 failed"),
            "{text}"
        );
        assert!(!text.contains('█'), "{text}");
        assert!(
            text.contains(&format!("wave  0 {}", "░".repeat(BAR))),
            "{text}"
        );
        assert!(
            text.contains("waiting: paused (paused by an operator)") && text.contains("resume"),
            "{text}"
        );
        assert!(
            !is_over(&s),
            "a paused campaign can be resumed: the watch goes on"
        );
        assert!(outcome(&s).is_err());
    }

    #[test]
    fn each_wave_shows_its_bar_and_counts_per_state_with_succeeded_apart_from_failed() {
        let s = summary(
            "active",
            [[0, 0, 0, 2, 1], [4, 8, 3, 6, 0], [0; 5]],
            serde_json::json!({}),
        );
        let text = frame(&s, 2_000_000);
        assert!(
            text.contains("active, 8 of 60 succeeded, 1 failed"),
            "{text}"
        );
        let wave0 = text.lines().find(|l| l.contains("wave  0")).unwrap();
        assert!(
            wave0.contains(&format!("{}{}", "█".repeat(20), "x".repeat(10))),
            "{wave0}"
        );
        assert!(wave0.contains("2/3"), "{wave0}");
        assert!(wave0.contains("succeeded=2 failed=1"), "{wave0}");
        assert!(
            wave0.contains("opened 00:16:40 UTC, finished 00:17:40 UTC"),
            "{wave0}"
        );
        let wave1 = text.lines().find(|l| l.contains("wave  1")).unwrap();
        assert!(
            wave1.contains("waiting=6 notified=4 downloading=8 installing=3 succeeded=6"),
            "{wave1}"
        );
        assert!(
            text.contains("wave  2") && text.contains("(not opened)"),
            "{text}"
        );
        assert!(
            text.contains("failures by reason: health_check_failed=1"),
            "{text}"
        );
    }

    #[test]
    fn the_reason_for_waiting_is_named_with_its_time() {
        // 1970-01-01 00:33:20 UTC: before a 01:00-05:00 window.
        let now = 2_000_000;
        let s = summary(
            "active",
            [[0; 5]; 3],
            serde_json::json!({"window": {"start_minute": 60, "end_minute": 300}}),
        );
        let w = waiting(&s, now).unwrap();
        assert_eq!(
            w.describe(now),
            "for the maintenance window 01:00-05:00 UTC, which opens 1970-01-01 01:00:00 UTC (in 26m 40s)"
        );
        let s = summary("active", [[0; 5]; 3], serde_json::json!({"start_at": 3600}));
        assert_eq!(
            waiting(&s, now).unwrap().describe(now),
            "for its start time, 1970-01-01 01:00:00 UTC (in 26m 40s)"
        );
        // Wave 0 finished at 1,060,000 ms; a ten-minute soak holds wave 1 until 1,660,000.
        let s = summary(
            "active",
            [[0, 0, 0, 3, 0], [0; 5], [0; 5]],
            serde_json::json!({"soak_secs": 600}),
        );
        assert_eq!(
            waiting(&s, 1_100_000),
            Some(Waiting::Soak {
                wave: 0,
                until_ms: 1_660_000
            })
        );
        assert_eq!(waiting(&s, 1_700_000), None);
        let s = summary(
            "active",
            [[0, 0, 0, 1, 0], [0, 2, 0, 0, 0], [0; 5]],
            serde_json::json!({"concurrency": 2}),
        );
        assert_eq!(waiting(&s, now), Some(Waiting::Concurrency { limit: 2 }));
        assert!(frame(&s, now).contains("waiting: 2 devices are downloading"));
    }

    #[test]
    fn failures_are_reported_as_they_come_and_the_exit_says_whether_it_succeeded() {
        let before = summary(
            "active",
            [[0, 0, 0, 2, 1], [0; 5], [0; 5]],
            serde_json::json!({}),
        );
        let after = summary(
            "active",
            [[0, 0, 0, 2, 1], [0, 0, 0, 0, 3], [0; 5]],
            serde_json::json!({}),
        );
        assert_eq!(
            new_failures(Some(&before), &after),
            vec!["3 more failed: health_check_failed (4 so far)"]
        );
        assert!(new_failures(Some(&after), &after).is_empty());
        assert_eq!(new_failures(None, &before).len(), 1);
        let failed = summary(
            "finished",
            [[0, 0, 0, 0, 3], [0, 0, 0, 0, 27], [0, 0, 0, 0, 30]],
            serde_json::json!({}),
        );
        assert!(is_over(&failed));
        let e = outcome(&failed).unwrap_err();
        assert_eq!(
            e,
            "campaign c-1 ended finished with 0 of 60 devices succeeded"
        );
        let ok = summary(
            "finished",
            [[0, 0, 0, 3, 0], [0, 0, 0, 27, 0], [0, 0, 0, 30, 0]],
            serde_json::json!({}),
        );
        assert_eq!(outcome(&ok), Ok(()));
    }
}
