//! The wall clock in Unix milliseconds, for the shells (the engine's, the link's, the console's,
//! the admin client's); decision-making code takes `now` as an argument instead.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now; 0 for a clock set before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
