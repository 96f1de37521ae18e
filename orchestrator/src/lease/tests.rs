//! The lease core's decisions one by one, then `no_two_processes_lead_at_once`: three
//! processes with random network delays, lost answers, pauses and crashes against a model of
//! the database's one-statement acquire-or-renew, checked at every millisecond of true time.

use proptest::prelude::*;

use super::*;

const TIMES: LeaseTimes = LeaseTimes {
    ttl_ms: 300,
    renew_ms: 100,
    retry_ms: 30,
    margin_ms: 3,
};

fn granted_at(lease: &mut Lease, sent: u64, answered: u64, token: i64) {
    assert_eq!(lease.poll(sent), Next::Send);
    lease.answered(answered, Answer::Granted(Token(token)));
}

#[test]
fn a_new_process_asks_at_once_and_leads_only_once_granted() {
    let mut l = Lease::new(TIMES, 1_000);
    assert_eq!(l.leader(1_000), None);
    assert_eq!(l.poll(1_000), Next::Send);
    assert!(l.in_flight());
    assert_eq!(l.leader(1_001), None, "asked is not granted");
    l.answered(1_010, Answer::Granted(Token(4)));
    assert_eq!(l.leader(1_010), Some(Token(4)));
    assert_eq!(l.token(), Some(Token(4)));
}

#[test]
fn the_belief_ends_a_ttl_after_the_request_was_sent_not_after_the_answer() {
    let mut l = Lease::new(TIMES, 0);
    // The answer took 250 ms: the database's grant started at most 250 ms before it arrived.
    granted_at(&mut l, 0, 250, 1);
    assert_eq!(l.leader(296), Some(Token(1)));
    assert_eq!(l.leader(297), None, "sent + ttl - margin");
    assert_eq!(l.leader(549), None, "never measured from the answer");
}

#[test]
fn a_holder_renews_a_third_of_the_ttl_after_its_last_grant_was_sent() {
    let mut l = Lease::new(TIMES, 0);
    granted_at(&mut l, 0, 20, 1);
    assert_eq!(l.poll(20), Next::Sleep(100));
    assert_eq!(l.poll(99), Next::Sleep(100));
    assert_eq!(l.poll(100), Next::Send);
    l.answered(110, Answer::Granted(Token(1)));
    assert_eq!(l.leader(396), Some(Token(1)), "100 + 300 - 3");
    assert_eq!(l.poll(110), Next::Sleep(200));
}

#[test]
fn failed_renewals_retry_and_the_belief_runs_out_on_time() {
    let mut l = Lease::new(TIMES, 0);
    granted_at(&mut l, 0, 5, 1);
    assert_eq!(l.poll(100), Next::Send);
    l.answered(150, Answer::Failed);
    assert_eq!(l.poll(150), Next::Sleep(180));
    assert_eq!(l.poll(180), Next::Send);
    l.answered(290, Answer::Failed);
    assert_eq!(l.leader(296), Some(Token(1)));
    assert_eq!(l.poll(291), Next::Sleep(297), "wakes when it stops leading");
    assert_eq!(l.leader(297), None);
    // The database comes back and nobody took the lease: the same token, leading again.
    assert_eq!(l.poll(320), Next::Send);
    l.answered(321, Answer::Granted(Token(1)));
    assert_eq!(l.leader(321), Some(Token(1)));
}

#[test]
fn a_request_in_flight_never_extends_the_belief() {
    let mut l = Lease::new(TIMES, 0);
    granted_at(&mut l, 0, 1, 1);
    assert_eq!(l.poll(100), Next::Send);
    // Hung: the belief still ends on time while the shell waits for the answer.
    assert_eq!(l.poll(200), Next::Sleep(297));
    assert_eq!(l.leader(297), None);
    // The answer to the request sent at 100 arrives at 500: it granted until 400 at best.
    l.answered(500, Answer::Granted(Token(1)));
    assert_eq!(l.leader(500), None);
    assert_eq!(l.poll(500), Next::Send, "renews at once");
}

#[test]
fn a_standby_is_refused_and_keeps_asking() {
    let mut l = Lease::new(TIMES, 0);
    assert_eq!(l.poll(0), Next::Send);
    l.answered(
        2,
        Answer::Refused {
            holder: "other".into(),
            token: Token(7),
        },
    );
    assert_eq!(l.leader(2), None);
    assert_eq!(l.lost(), None);
    assert_eq!(l.poll(2), Next::Sleep(32));
    assert_eq!(l.poll(32), Next::Send);
    l.answered(33, Answer::Granted(Token(8)));
    assert_eq!(l.leader(33), Some(Token(8)));
}

#[test]
fn a_holder_refused_has_lost_the_lease_for_good() {
    let mut l = Lease::new(TIMES, 0);
    granted_at(&mut l, 0, 1, 3);
    assert_eq!(l.poll(100), Next::Send);
    l.answered(
        101,
        Answer::Refused {
            holder: "b".into(),
            token: Token(4),
        },
    );
    let lost = Lost::TakenBy {
        holder: "b".into(),
        token: Token(4),
    };
    assert_eq!(l.leader(101), None, "at once, not at the belief's end");
    assert_eq!(l.poll(500), Next::Lost(lost.clone()));
    assert_eq!(l.lost(), Some(&lost));
    assert!(lost.to_string().contains("held by b"));
}

#[test]
fn a_grant_with_another_token_means_someone_held_the_lease_meanwhile() {
    let mut l = Lease::new(TIMES, 0);
    granted_at(&mut l, 0, 1, 3);
    assert_eq!(l.poll(400), Next::Send);
    l.answered(401, Answer::Granted(Token(5)));
    assert_eq!(l.leader(401), None);
    assert_eq!(
        l.poll(401),
        Next::Lost(Lost::TokenChanged {
            mine: Token(3),
            now: Token(5)
        })
    );
    assert_eq!(
        l.token(),
        Some(Token(3)),
        "the fencing token stays the first"
    );
}

#[test]
fn periods_follow_from_the_ttl() {
    let t = LeaseTimes::from_ttl_ms(15_000);
    assert_eq!(t.renew_ms, 5_000);
    assert_eq!(t.retry_ms, 1_500);
    assert_eq!(t.margin_ms, 150);
    let short = LeaseTimes::from_ttl_ms(90);
    assert!(short.retry_ms <= short.renew_ms && short.retry_ms >= 1);
}

// ---- The model: three processes, one database, true time in milliseconds. ----

/// The database's lease row and its one statement, as `store::pg_lease` runs it.
#[derive(Debug, Default)]
struct ModelDb {
    holder: Option<u64>,
    token: i64,
    expires_at: u64,
}

impl ModelDb {
    /// Acquire-or-renew for `holder` at true time `now` (the database's clock).
    fn acquire(&mut self, holder: u64, now: u64, ttl: u64) -> Answer {
        let mine = self.holder == Some(holder);
        if mine || self.expires_at <= now {
            if !mine {
                self.token += 1;
                self.holder = Some(holder);
            }
            self.expires_at = now + ttl;
            Answer::Granted(Token(self.token))
        } else {
            Answer::Refused {
                holder: format!("{:?}", self.holder),
                token: Token(self.token),
            }
        }
    }
}

/// A request on the wire: it runs at `runs_at` (if it gets there) and its answer reaches the
/// process at `answered_at` (if it is not lost).
#[derive(Debug)]
struct Request {
    runs_at: u64,
    answered_at: u64,
    arrives: bool,
    answer_arrives: bool,
    result: Option<Answer>,
}

#[derive(Debug)]
struct Process {
    /// This incarnation's holder id (a crash and restart is a new one).
    id: u64,
    /// Its monotonic clock reads true time plus this.
    offset: u64,
    lease: Lease,
    request: Option<Request>,
    paused_until: u64,
    down_until: u64,
}

/// Disturbances drawn by proptest: network delays of each request, pauses and crashes.
#[derive(Debug, Clone)]
struct Chaos {
    delays: Vec<(u16, u16, bool, bool)>,
    pauses: Vec<(usize, u16, u16)>,
    crashes: Vec<(usize, u16, u16)>,
    offsets: [u32; 3],
}

fn chaos() -> impl Strategy<Value = Chaos> {
    (
        prop::collection::vec(
            (
                0u16..400,
                0u16..400,
                prop::bool::weighted(0.9),
                prop::bool::weighted(0.85),
            ),
            1..64,
        ),
        prop::collection::vec((0usize..3, 0u16..6_000, 1u16..1_200), 0..10),
        prop::collection::vec((0usize..3, 0u16..6_000, 1u16..1_500), 0..6),
        [0u32..1_000_000, 0u32..1_000_000, 0u32..1_000_000],
    )
        .prop_map(|(delays, pauses, crashes, offsets)| Chaos {
            delays,
            pauses,
            crashes,
            offsets,
        })
}

fn run(chaos: &Chaos, times: LeaseTimes) -> Result<usize, TestCaseError> {
    const END: u64 = 8_000;
    let mut db = ModelDb::default();
    let mut next_id = 0u64;
    let mut delay = 0usize;
    let mut procs: Vec<Process> = (0..3)
        .map(|i| {
            next_id += 1;
            let offset = u64::from(chaos.offsets[i]);
            Process {
                id: next_id,
                offset,
                lease: Lease::new(times, offset),
                request: None,
                paused_until: 0,
                down_until: 0,
            }
        })
        .collect();
    let mut last_leader_token: Option<i64> = None;
    let mut led_ms = 0;
    // Requests of crashed incarnations: still on the wire, and the database runs them.
    let mut orphans: Vec<(u64, Request)> = Vec::new();
    for t in 0..END {
        for (id, r) in &mut orphans {
            if r.arrives && r.result.is_none() && r.runs_at <= t {
                r.result = Some(db.acquire(*id, t, times.ttl_ms));
            }
        }
        for (i, p) in procs.iter_mut().enumerate() {
            // Crashes: the process is gone (with its request's answer); it comes back as a
            // new incarnation with a new lease.
            for &(who, at, len) in &chaos.crashes {
                if who == i && u64::from(at) == t {
                    p.down_until = t + u64::from(len);
                    if let Some(r) = p.request.take() {
                        orphans.push((p.id, r));
                    }
                }
            }
            if p.down_until > 0 && t == p.down_until {
                next_id += 1;
                p.id = next_id;
                p.lease = Lease::new(times, t + p.offset);
                p.down_until = 0;
            }
            if p.down_until > t {
                continue;
            }
            for &(who, at, len) in &chaos.pauses {
                if who == i && u64::from(at) == t {
                    p.paused_until = p.paused_until.max(t + u64::from(len));
                }
            }
            // The database runs a request when it arrives, paused process or not.
            if let Some(r) = &mut p.request {
                if r.arrives && r.result.is_none() && r.runs_at <= t {
                    r.result = Some(db.acquire(p.id, t, times.ttl_ms));
                }
            }
            if p.paused_until > t {
                continue;
            }
            let now = t + p.offset;
            // An answer is read when it has arrived and the process runs.
            if let Some(r) = &p.request {
                if r.answered_at <= t && (r.result.is_some() || !r.arrives) {
                    let answer = match (&r.result, r.answer_arrives) {
                        (Some(a), true) => a.clone(),
                        _ => Answer::Failed,
                    };
                    p.request = None;
                    p.lease.answered(now, answer);
                }
            }
            if p.request.is_none() {
                if let Next::Send = p.lease.poll(now) {
                    let (d1, d2, arrives, answer_arrives) =
                        chaos.delays[delay % chaos.delays.len()];
                    delay += 1;
                    p.request = Some(Request {
                        runs_at: t + u64::from(d1),
                        answered_at: t + u64::from(d1) + u64::from(d2),
                        arrives,
                        answer_arrives,
                        result: None,
                    });
                }
            }
        }
        // Honest time: at this instant, who believes it leads (paused or not; a crashed
        // process believes nothing).
        let leaders: Vec<(u64, Token)> = procs
            .iter()
            .filter(|p| p.down_until <= t)
            .filter_map(|p| Some((p.id, p.lease.leader(t + p.offset)?)))
            .collect();
        prop_assert!(leaders.len() <= 1, "two leaders at {t} ms: {leaders:?}");
        if let Some(&(id, token)) = leaders.first() {
            led_ms += 1;
            prop_assert_eq!(
                db.holder,
                Some(id),
                "the leader at {} ms is not the database's holder",
                t
            );
            prop_assert_eq!(
                token.0,
                db.token,
                "the leader's token at {} ms is not the current one",
                t
            );
            prop_assert!(
                last_leader_token.is_none_or(|l| l <= token.0),
                "a token went backwards"
            );
            last_leader_token = Some(token.0);
        }
    }
    Ok(led_ms)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// The lease's safety: at no instant of true time do two processes believe they lead,
    /// whatever the delays, lost answers, pauses and crashes, and whoever leads is the
    /// database's holder with its current token. The margin is zero here: measuring the
    /// belief from the send time is what makes it safe.
    #[test]
    fn no_two_processes_lead_at_once(chaos in chaos()) {
        let times = LeaseTimes { ttl_ms: 300, renew_ms: 100, retry_ms: 30, margin_ms: 0 };
        run(&chaos, times)?;
    }
}

#[test]
fn without_disturbance_someone_leads_nearly_all_the_time() {
    // Liveness, so that the property above is not met by nobody ever leading.
    let calm = Chaos {
        delays: vec![(2, 2, true, true)],
        pauses: vec![],
        crashes: vec![],
        offsets: [0, 17, 123_456],
    };
    let led = run(&calm, TIMES).unwrap();
    assert!(led > 7_900, "led {led} ms of 8000");
}

#[test]
fn measured_from_the_answer_the_belief_would_overlap_another_leader() {
    // The counter-example the core avoids: a grant whose answer took 250 ms, believed for a
    // ttl from its arrival, outlives the database's lease by 250 ms, and another process
    // takes the lease in that time.
    let mut db = ModelDb::default();
    assert_eq!(db.acquire(1, 0, 300), Answer::Granted(Token(1)));
    let wrong_until = 250 + 300;
    assert_eq!(db.acquire(2, 300, 300), Answer::Granted(Token(2)));
    assert!(wrong_until > 300);
    let mut l = Lease::new(TIMES, 0);
    granted_at(&mut l, 0, 250, 1);
    assert_eq!(l.leader(300), None, "the core stopped believing before 300");
}
