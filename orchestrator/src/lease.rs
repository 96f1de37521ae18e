//! The leader lease's decisions, sans I/O: when to ask the database for the lease, when to
//! renew it, until when this process may believe it leads, and the fencing token it holds.
//! Time (a monotonic clock in milliseconds, any origin) and the database's answers come in;
//! what to do next comes out. The thread that talks to PostgreSQL is `holder`; the
//! statement it sends is `store::pg_lease`.
//!
//! Design: the database grants the lease until `now() + ttl` on ITS clock, where `now()` is
//! read when the statement runs, which is after this process sent it. So this process believes
//! it leads only until `sent + ttl - margin` on its own clock, `sent` being when it sent the
//! request that was granted, never when the answer arrived: however late the answer, however
//! far apart the two clocks' readings, the belief ends before the database lets anyone else in
//! (both clocks must only run at the same rate, to within `margin` over one ttl). A process
//! paused mid-renewal wakes to a deadline already past. Another process can take the lease
//! only once it has expired in the database, and its token is then higher (it changes only
//! when the holder does). This process keeps the token of its first grant for its whole life:
//! a later grant with another token means someone else held the lease meanwhile and what this
//! process knows may be stale, so it is `Lost`, for good.

pub mod holder;
#[cfg(test)]
mod tests;

/// A fencing token: the lease's generation, raised each time the lease changes hands. Every
/// commit of the holder carries it (`store::pg`), and the database refuses it once a newer
/// one exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub i64);

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The lease's periods, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    /// How long a grant lasts in the database from the moment its statement runs.
    pub ttl_ms: u64,
    /// A holder renews this long after it sent its last granted request (a third of the ttl:
    /// two renewals may fail before the lease runs out).
    pub renew_ms: u64,
    /// The wait after a failed or refused attempt.
    pub retry_ms: u64,
    /// Taken off the belief's end, for clocks that do not run at exactly the same rate.
    pub margin_ms: u64,
}

impl LeaseTimes {
    /// The periods that follow from a ttl: renew at a third, retry at a tenth (at least
    /// 50 ms), and a margin of a hundredth (clocks' rates differ by parts per million; this is
    /// thousands of times that).
    pub fn from_ttl_ms(ttl_ms: u64) -> Self {
        LeaseTimes {
            ttl_ms,
            renew_ms: ttl_ms / 3,
            retry_ms: (ttl_ms / 10).max(50).min(ttl_ms / 3).max(1),
            margin_ms: ttl_ms / 100,
        }
    }
}

/// What the database said to one acquire-or-renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The lease is ours until the database's `now() + ttl`, with this token.
    Granted(Token),
    /// Another holder's lease is live.
    Refused { holder: String, token: Token },
    /// No answer: the database is unreachable, the statement timed out. The request may or
    /// may not have run.
    Failed,
}

/// Why this process may never lead again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// Another holder holds the lease now.
    TakenBy { holder: String, token: Token },
    /// The lease was granted again, but with another token: someone held it meanwhile.
    TokenChanged { mine: Token, now: Token },
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::TakenBy { holder, token } => {
                write!(f, "the lease is held by {holder} (token {token})")
            }
            Lost::TokenChanged { mine, now } => write!(
                f,
                "the lease was granted again with token {now}, not this process's {mine}: \
                 another holder had it meanwhile"
            ),
        }
    }
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send an acquire-or-renew now (the core took `now` as its send time), then report the
    /// answer with [`Lease::answered`].
    Send,
    /// Nothing to do before this time (or before an answer, while one is awaited).
    Sleep(u64),
    /// The lease is lost for good; stop.
    Lost(Lost),
}

/// One process's view of the lease.
#[derive(Debug, Clone)]
pub struct Lease {
    times: LeaseTimes,
    /// The token of the first grant, this process's for its whole life.
    token: Option<Token>,
    /// While the last grant lasts: leader before this time.
    until: Option<u64>,
    /// When the next attempt is due.
    next_at: u64,
    /// The send time of the request awaiting its answer.
    in_flight: Option<u64>,
    lost: Option<Lost>,
}

impl Lease {
    /// A process that has not asked yet: its first attempt is due at once.
    pub fn new(times: LeaseTimes, now: u64) -> Self {
        Lease {
            times,
            token: None,
            until: None,
            next_at: now,
            in_flight: None,
            lost: None,
        }
    }

    pub fn times(&self) -> LeaseTimes {
        self.times
    }

    /// What to do at `now`. `Send` records `now` as the request's send time.
    pub fn poll(&mut self, now: u64) -> Next {
        if let Some(lost) = &self.lost {
            return Next::Lost(lost.clone());
        }
        if self.in_flight.is_some() {
            // The answer is awaited; the belief's end is a time too (`leader` reads it).
            return Next::Sleep(self.until.unwrap_or(u64::MAX));
        }
        if now >= self.next_at {
            self.in_flight = Some(now);
            return Next::Send;
        }
        // Wake at the belief's end too, so the shell can say it no longer leads.
        let wake = match self.until {
            Some(u) if u > now => self.next_at.min(u),
            _ => self.next_at,
        };
        Next::Sleep(wake)
    }

    /// The answer to the request sent last, received at `now`.
    pub fn answered(&mut self, now: u64, answer: Answer) {
        let Some(sent) = self.in_flight.take() else {
            return;
        };
        if self.lost.is_some() {
            return;
        }
        match answer {
            Answer::Granted(token) => match self.token {
                Some(mine) if mine != token => {
                    self.until = None;
                    self.lost = Some(Lost::TokenChanged { mine, now: token });
                }
                _ => {
                    self.token = Some(token);
                    let until = sent
                        .saturating_add(self.times.ttl_ms)
                        .saturating_sub(self.times.margin_ms);
                    // A late answer does not shorten an earlier grant's belief, nor lengthen
                    // this one's.
                    self.until = Some(self.until.map_or(until, |u| u.max(until)));
                    self.next_at = sent.saturating_add(self.times.renew_ms).max(now);
                }
            },
            Answer::Refused { holder, token } => {
                if self.token.is_some() {
                    // This process held the lease once; whoever holds it now may have written
                    // since, so what this process knows may be stale.
                    self.until = None;
                    self.lost = Some(Lost::TakenBy { holder, token });
                } else {
                    // A standby: the holder's lease will run out if it dies.
                    self.next_at = now.saturating_add(self.times.retry_ms);
                }
            }
            Answer::Failed => {
                // The belief keeps its end: nothing is known that would extend or shorten it.
                self.next_at = now.saturating_add(self.times.retry_ms);
            }
        }
    }

    /// The token, if this process leads at `now`.
    pub fn leader(&self, now: u64) -> Option<Token> {
        if self.lost.is_some() {
            return None;
        }
        match (self.until, self.token) {
            (Some(until), Some(token)) if now < until => Some(token),
            _ => None,
        }
    }

    /// The token of the first grant, which fences every commit; `None` before it.
    pub fn token(&self) -> Option<Token> {
        self.token
    }

    pub fn lost(&self) -> Option<&Lost> {
        self.lost.as_ref()
    }

    /// Whether a request is awaiting its answer.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }
}
