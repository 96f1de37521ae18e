//! A campaign's rollout policy (set at creation, stored with the campaign, shown by the CLI) and
//! the wave plan derived from it: which member falls in which wave.
//!
//! Wave membership is a stable hash of (the campaign's release, device): members are ranked by it
//! and each wave takes the next slice of the ranking. Wave sizes only grow with their
//! percentages, so raising a percentage never drops a device already chosen, a restart
//! recomputes the same plan, and a dry run shows exactly the waves the campaign will have (a
//! campaign id does not exist before the campaign does).

use aloft_proto::crypto::sha256;
use aloft_proto::{ArtifactId, DeviceId};
use serde::{Deserialize, Serialize};

/// Most waves a plan may have (an exponential growth from one device to a large fleet needs
/// about log2 of its size).
pub const MAX_WAVES: usize = 64;

/// How a campaign reaches its members. The default is the behaviour of a plain campaign: one
/// wave, no thresholds, no limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutPolicy {
    pub waves: Waves,
    /// After a wave has finished (see `advance_at`), wait this long before the next starts; its
    /// succeeded devices' heartbeats count through this window (success means healthy).
    pub soak_secs: u64,
    /// The fraction of a wave that must be finished (succeeded, failed, rolled back or timed
    /// out) for it to count as finished: below 1.0, a few offline devices cannot hold a rollout.
    pub advance_at: f64,
    /// Crossing this failure ratio in any wave pauses the campaign.
    pub pause_at: Option<Threshold>,
    /// Crossing this failure ratio in any wave aborts the campaign.
    pub abort_at: Option<Threshold>,
    /// A device in `downloading` … `verifying` silent for longer than this (no report, no chunk
    /// request, no heartbeat) is marked `timed_out`. A slow download that keeps asking for
    /// chunks is never timed out by it.
    pub device_timeout_secs: Option<u64>,
    /// A device notified but silent for longer than this is marked `timed_out`. Unset, an
    /// offline device keeps its job until the campaign's deadline.
    pub notified_timeout_secs: Option<u64>,
    /// At most this many devices downloading at once (a notified device that has not started
    /// counts for `notify_grace_secs`, then stops holding a slot but keeps its job).
    pub concurrency: Option<u32>,
    pub notify_grace_secs: u64,
    /// No device is notified before this (Unix seconds).
    pub start_at: Option<u64>,
    /// No device is notified outside this daily window; devices in flight finish.
    pub window: Option<MaintenanceWindow>,
    /// Seconds after creation after which no device starts: silent notified devices are timed
    /// out, their jobs withdrawn, and the campaign ends `expired`.
    pub deadline_secs: Option<u64>,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            waves: Waves::default(),
            soak_secs: 0,
            advance_at: 1.0,
            pause_at: None,
            abort_at: None,
            device_timeout_secs: None,
            notified_timeout_secs: None,
            concurrency: None,
            notify_grace_secs: 60,
            start_at: None,
            window: None,
            deadline_secs: None,
        }
    }
}

/// The wave sizes: a canary, then growth by explicit cumulative percentages or by a factor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Waves {
    /// The first wave. `None`: there is no canary and `growth` starts from nothing.
    #[serde(default)]
    pub canary: Option<Size>,
    #[serde(default)]
    pub growth: Growth,
}

impl Default for Waves {
    fn default() -> Self {
        Waves {
            canary: None,
            growth: Growth::Percent(vec![100.0]),
        }
    }
}

/// A wave's size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Count(u32),
    Percent(f64),
}

/// How waves after the canary grow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Growth {
    /// Cumulative percentages of the membership, increasing; 100 is appended if missing.
    Percent(Vec<f64>),
    /// Each wave's cumulative size is the previous one's times this factor (> 1).
    Exponential(f64),
}

impl Default for Growth {
    fn default() -> Self {
        Growth::Percent(vec![100.0])
    }
}

/// Failed / finished in one wave, judged once at least `min_sample` devices have finished.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// 0.0 to 1.0.
    pub ratio: f64,
    #[serde(default = "one")]
    pub min_sample: u32,
}

fn one() -> u32 {
    1
}

impl Threshold {
    /// Whether `failed` of `finished` crosses the threshold.
    pub fn crossed(&self, failed: u32, finished: u32) -> bool {
        finished >= self.min_sample.max(1)
            && f64::from(failed) >= self.ratio * f64::from(finished)
            && failed > 0
    }
}

/// A daily window in UTC, minutes after midnight; `start > end` wraps past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    pub start_minute: u16,
    pub end_minute: u16,
}

impl MaintenanceWindow {
    /// Parses `HH:MM-HH:MM`.
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError(format!("window {s:?} is not HH:MM-HH:MM"));
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let w = MaintenanceWindow {
            start_minute: minute(a).ok_or_else(bad)?,
            end_minute: minute(b).ok_or_else(bad)?,
        };
        if w.start_minute == w.end_minute {
            return Err(PolicyError(format!("window {s:?} is empty")));
        }
        Ok(w)
    }

    /// Whether `now_ms` (Unix milliseconds) falls inside the window.
    pub fn allows(&self, now_ms: u64) -> bool {
        let minute = ((now_ms / 60_000) % (24 * 60)) as u16;
        if self.start_minute < self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute)
        } else {
            minute >= self.start_minute || minute < self.end_minute
        }
    }
}

impl std::fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{} UTC", hm(self.start_minute), hm(self.end_minute))
    }
}

/// A policy that cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rollout policy: {0}")]
pub struct PolicyError(pub String);

fn ratio_ok(r: f64) -> bool {
    r.is_finite() && (0.0..=1.0).contains(&r)
}

impl RolloutPolicy {
    /// Checks every field; the orchestrator refuses a campaign whose policy fails this.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let err = |m: &str| Err(PolicyError(m.to_owned()));
        if !(ratio_ok(self.advance_at) && self.advance_at > 0.0) {
            return err("advance_at must be in (0, 1]");
        }
        for t in [self.pause_at, self.abort_at].into_iter().flatten() {
            if !ratio_ok(t.ratio) {
                return err("threshold ratios must be in [0, 1]");
            }
        }
        if self.concurrency == Some(0) {
            return err("concurrency must be at least 1");
        }
        match self.waves.canary {
            Some(Size::Count(0)) => return err("the canary must have at least one device"),
            Some(Size::Percent(p)) if !(p.is_finite() && p > 0.0 && p <= 100.0) => {
                return err("the canary percentage must be in (0, 100]")
            }
            _ => {}
        }
        match &self.waves.growth {
            Growth::Percent(ps) => {
                if ps.len() > MAX_WAVES {
                    return err("too many waves");
                }
                let mut last = 0.0;
                for p in ps {
                    if !(p.is_finite() && *p > last && *p <= 100.0) {
                        return err("wave percentages must increase, each in (0, 100]");
                    }
                    last = *p;
                }
            }
            Growth::Exponential(f) => {
                if !(f.is_finite() && *f > 1.0) {
                    return err("the growth factor must be greater than 1");
                }
                if self.waves.canary.is_none() {
                    return err("exponential growth needs a canary to grow from");
                }
            }
        }
        Ok(())
    }

    /// Cumulative wave ends for `total` members: wave `i` holds ranks `ends[i-1]..ends[i]`.
    /// Strictly increasing, the last is `total`; empty waves are dropped.
    pub fn wave_ends(&self, total: u32) -> Vec<u32> {
        let of = |p: f64| -> u32 {
            ((p / 100.0) * f64::from(total))
                .ceil()
                .min(f64::from(total)) as u32
        };
        let mut ends = Vec::new();
        let canary = match self.waves.canary {
            Some(Size::Count(n)) => Some(n.min(total)),
            Some(Size::Percent(p)) => Some(of(p).max(1).min(total)),
            None => None,
        };
        if let Some(c) = canary {
            ends.push(c);
        }
        match &self.waves.growth {
            Growth::Percent(ps) => {
                for p in ps {
                    ends.push(of(*p));
                }
            }
            Growth::Exponential(f) => {
                let mut n = f64::from(canary.unwrap_or(1).max(1));
                while ends.len() < MAX_WAVES && ends.last().is_none_or(|e| *e < total) {
                    n = (n * f).ceil();
                    ends.push(n.min(f64::from(total)) as u32);
                }
            }
        }
        ends.push(total);
        let mut out: Vec<u32> = Vec::with_capacity(ends.len());
        for e in ends {
            if e > out.last().copied().unwrap_or(0) {
                out.push(e);
            }
        }
        if total > 0 && out.last() != Some(&total) {
            // Only reachable at MAX_WAVES: the last wave takes everyone left.
            out.pop();
            out.push(total);
        }
        out
    }
}

/// A member's place in the ranking: the first eight bytes of SHA-256(artifact ‖ 0 ‖ device).
pub fn rank(artifact: &ArtifactId, device: &DeviceId) -> u64 {
    let mut input = Vec::with_capacity(artifact.as_str().len() + device.as_str().len() + 1);
    input.extend_from_slice(artifact.as_str().as_bytes());
    input.push(0);
    input.extend_from_slice(device.as_str().as_bytes());
    let h = sha256(&input);
    u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

/// Who is in which wave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Members in rank order.
    pub order: Vec<DeviceId>,
    /// Cumulative wave ends into `order`.
    pub ends: Vec<u32>,
}

impl Plan {
    pub fn new(artifact: &ArtifactId, members: &[DeviceId], policy: &RolloutPolicy) -> Plan {
        let mut order: Vec<(u64, DeviceId)> = members
            .iter()
            .map(|d| (rank(artifact, d), d.clone()))
            .collect();
        order.sort();
        order.dedup_by(|a, b| a.1 == b.1);
        let ends = policy.wave_ends(order.len() as u32);
        Plan {
            order: order.into_iter().map(|(_, d)| d).collect(),
            ends,
        }
    }

    pub fn wave_count(&self) -> usize {
        self.ends.len()
    }

    /// The rank range of wave `w`.
    pub fn wave_range(&self, w: usize) -> std::ops::Range<usize> {
        let start = if w == 0 { 0 } else { self.ends[w - 1] as usize };
        let end = self.ends.get(w).copied().unwrap_or(0) as usize;
        start..end.max(start)
    }

    /// Every wave's members, for `--dry-run`.
    pub fn waves(&self) -> Vec<Vec<DeviceId>> {
        (0..self.wave_count())
            .map(|w| self.order[self.wave_range(w)].to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(canary: Option<Size>, growth: Growth) -> RolloutPolicy {
        RolloutPolicy {
            waves: Waves { canary, growth },
            ..RolloutPolicy::default()
        }
    }

    #[test]
    fn the_issue_example_waves() {
        let p = policy(
            Some(Size::Percent(1.0)),
            Growth::Percent(vec![10.0, 50.0, 100.0]),
        );
        assert_eq!(p.wave_ends(1000), [10, 100, 500, 1000]);
        assert_eq!(p.wave_ends(7), [1, 4, 7]);
        assert_eq!(p.wave_ends(0), Vec::<u32>::new());
        let e = policy(Some(Size::Count(2)), Growth::Exponential(2.0));
        assert_eq!(e.wave_ends(20), [2, 4, 8, 16, 20]);
        assert_eq!(RolloutPolicy::default().wave_ends(5), [5]);
    }

    #[test]
    fn bad_policies_are_refused() {
        for p in [
            policy(Some(Size::Count(0)), Growth::default()),
            policy(None, Growth::Percent(vec![50.0, 40.0])),
            policy(None, Growth::Exponential(2.0)),
            policy(Some(Size::Count(1)), Growth::Exponential(1.0)),
            RolloutPolicy {
                advance_at: 0.0,
                ..RolloutPolicy::default()
            },
            RolloutPolicy {
                concurrency: Some(0),
                ..RolloutPolicy::default()
            },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
        }
        assert!(RolloutPolicy::default().validate().is_ok());
    }

    #[test]
    fn windows_wrap_past_midnight() {
        let w = MaintenanceWindow::parse("22:00-02:30").unwrap();
        let at = |h: u64, m: u64| (h * 60 + m) * 60_000 + 5 * 86_400_000;
        assert!(w.allows(at(23, 0)) && w.allows(at(1, 0)) && !w.allows(at(3, 0)));
        let d = MaintenanceWindow::parse("01:00-05:00").unwrap();
        assert!(d.allows(at(1, 0)) && !d.allows(at(5, 0)) && !d.allows(at(0, 59)));
        for bad in ["", "1-2", "25:00-01:00", "01:00-01:00", "01:60-02:00"] {
            assert!(MaintenanceWindow::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(w.to_string(), "22:00-02:30 UTC");
    }

    #[test]
    fn thresholds_need_their_sample() {
        let t = Threshold {
            ratio: 0.5,
            min_sample: 4,
        };
        assert!(!t.crossed(3, 3));
        assert!(t.crossed(2, 4));
        assert!(!t.crossed(1, 4));
        let zero = Threshold {
            ratio: 0.0,
            min_sample: 1,
        };
        assert!(!zero.crossed(0, 10), "no failure never crosses");
    }

    fn ids(n: usize) -> Vec<DeviceId> {
        (0..n)
            .map(|i| DeviceId::new(format!("dev-{i}")).unwrap())
            .collect()
    }

    proptest! {
        #[test]
        fn wave_ends_are_increasing_and_cover_everyone(
            total in 0u32..5_000,
            canary in proptest::option::of(1u32..50),
            ps in proptest::collection::vec(0.1f64..100.0, 0..6),
        ) {
            let mut ps = ps;
            ps.sort_by(|a, b| a.total_cmp(b));
            ps.dedup();
            let p = policy(canary.map(Size::Count), Growth::Percent(ps));
            let ends = p.wave_ends(total);
            prop_assert!(ends.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(ends.last().copied().unwrap_or(0), total);
        }

        #[test]
        fn raising_a_percentage_never_drops_a_chosen_device(
            n in 1usize..300, low in 1.0f64..99.0, raise in 0.0f64..50.0,
        ) {
            let members = ids(n);
            let c = ArtifactId::new("fw-prop").unwrap();
            let before = Plan::new(&c, &members, &policy(Some(Size::Percent(low)), Growth::default()));
            let high = (low + raise).min(100.0);
            let after = Plan::new(&c, &members, &policy(Some(Size::Percent(high)), Growth::default()));
            let first = |p: &Plan| p.waves()[0].clone();
            for d in first(&before) {
                prop_assert!(first(&after).contains(&d));
            }
        }
    }

    #[test]
    fn the_plan_is_stable_and_order_independent() {
        let c = ArtifactId::new("fw-1").unwrap();
        let mut m = ids(50);
        let p = RolloutPolicy::default();
        let a = Plan::new(&c, &m, &p);
        m.reverse();
        assert_eq!(a, Plan::new(&c, &m, &p));
        let other = Plan::new(&ArtifactId::new("fw-2").unwrap(), &m, &p);
        assert_ne!(a.order, other.order, "another release ranks differently");
    }
}
