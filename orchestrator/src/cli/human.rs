//! Times and durations as an operator reads them: a wall-clock time in UTC with its offset
//! written out (`2026-12-03 14:20:03 UTC`), how far it is from now (`in 2h 5m`, `40s ago`), and
//! durations in the units the flags take (`10m`, `1h 30m`). Pure: `now` is a parameter.

/// A Unix-milliseconds time as `YYYY-MM-DD HH:MM:SS UTC` (`-` for 0, "never").
pub fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{secs} (Unix s)"),
    }
}

/// Only the clock of a Unix-milliseconds time, `HH:MM:SS UTC`: for times of the same day.
pub fn clock(ms: u64) -> String {
    let full = time(ms);
    full.split_once(' ')
        .map_or(full.clone(), |(_, c)| c.to_owned())
}

/// A span of seconds in at most two units: `45s`, `10m`, `1h 30m`, `2d 3h`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    let parts: Vec<String> = [(d, "d"), (h, "h"), (m, "m"), (s, "s")]
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    if parts.is_empty() {
        "0s".to_owned()
    } else {
        parts.join(" ")
    }
}

/// How far `at_ms` is from `now_ms`: `in 5m`, `5m ago`, or `now`.
pub fn relative(at_ms: u64, now_ms: u64) -> String {
    if at_ms.abs_diff(now_ms) < 1000 {
        "now".to_owned()
    } else if at_ms > now_ms {
        format!("in {}", duration((at_ms - now_ms) / 1000))
    } else {
        format!("{} ago", duration((now_ms - at_ms) / 1000))
    }
}

/// A time and how far it is from now: `2026-12-03 14:20:03 UTC (in 5m)`.
pub fn time_and_relative(at_ms: u64, now_ms: u64) -> String {
    format!("{} ({})", time(at_ms), relative(at_ms, now_ms))
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_in_utc_with_the_offset_named() {
        // 2026-12-03 14:20:03 UTC
        let t = 1_796_307_603_000;
        assert_eq!(time(t), "2026-12-03 14:20:03 UTC");
        assert_eq!(clock(t), "14:20:03 UTC");
        assert_eq!(time(0), "-");
        assert_eq!(
            time_and_relative(t, t - 300_000),
            "2026-12-03 14:20:03 UTC (in 5m)"
        );
    }

    #[test]
    fn durations_take_at_most_two_units() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(600), "10m");
        assert_eq!(duration(5400), "1h 30m");
        assert_eq!(duration(86_400 * 2 + 3 * 3600 + 59), "2d 3h");
        assert_eq!(duration(3601), "1h");
        assert_eq!(relative(10_000, 70_000), "1m ago");
        assert_eq!(relative(70_000, 70_400), "now");
    }
}
