//! When a device certificate may be renewed: the window the device agent asks in and the
//! orchestrator grants in (PROTOCOL.md §5.9). Both sides take it from here, so they agree.

/// A certificate is due for renewal once it expires within this many seconds (30 days)...
pub const RENEWAL_WINDOW_SECS: i64 = 30 * 86_400;

/// ...or within this fraction of its lifetime (one third), whichever is sooner, so that a
/// short-lived certificate is not renewed the moment it is issued.
pub const RENEWAL_WINDOW_FRACTION: f64 = 1.0 / 3.0;

/// How much earlier than the window the orchestrator still grants a renewal: a device whose
/// clock runs ahead by up to a day is not refused.
pub const RENEWAL_CLOCK_SLACK_SECS: i64 = 86_400;

/// Seconds before `not_after` at which a certificate valid from `not_before` to `not_after`
/// becomes due, given the window in seconds and as a fraction of the lifetime.
pub fn window_secs(not_before: i64, not_after: i64, window_secs: i64, fraction: f64) -> i64 {
    let lifetime = not_after.saturating_sub(not_before).max(0) as f64;
    let by_fraction = (lifetime * fraction.clamp(0.0, 1.0)) as i64;
    window_secs.min(by_fraction)
}

/// Is a certificate valid from `not_before` to `not_after` (Unix seconds) due for renewal at
/// `now`, by the reference window?
pub fn due(now: i64, not_before: i64, not_after: i64) -> bool {
    let window = window_secs(
        not_before,
        not_after,
        RENEWAL_WINDOW_SECS,
        RENEWAL_WINDOW_FRACTION,
    );
    not_after.saturating_sub(now) <= window
}

/// Does the orchestrator grant a renewal of that certificate at `now` without an operator's
/// leave: due by the reference window, give or take [`RENEWAL_CLOCK_SLACK_SECS`].
pub fn grantable(now: i64, not_before: i64, not_after: i64) -> bool {
    due(
        now.saturating_add(RENEWAL_CLOCK_SLACK_SECS),
        not_before,
        not_after,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn a_certificate_is_due_within_thirty_days_or_its_last_third_whichever_is_sooner() {
        assert!(!due(0, 0, 825 * DAY));
        assert!(!due(794 * DAY, 0, 825 * DAY));
        assert!(due(796 * DAY, 0, 825 * DAY));
        assert!(!due(DAY, 0, 30 * DAY));
        assert!(due(21 * DAY, 0, 30 * DAY));
        assert!(due(31 * DAY, 0, 30 * DAY));
    }

    #[test]
    fn the_orchestrator_grants_a_day_early_and_no_earlier() {
        assert!(grantable(794 * DAY + 1, 0, 825 * DAY));
        assert!(!grantable(793 * DAY, 0, 825 * DAY));
        assert!(!grantable(0, 0, 825 * DAY));
    }
}
