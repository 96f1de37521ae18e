//! `aloft-demo bench`: one command that reproduces the scale goals S1–S7 of the 10,000-device
//! work and prints one table (medians of `--runs` runs, and the machine they ran on).
//!
//! Each run makes a fresh lab (fleet CA, operator, release key), enrolls the fleet (S7), runs the
//! orchestrator as a child process with the simulated fleet in this process (S1, S4, S2, S3, S6),
//! starts a second orchestrator from the same initial data for S1c and the bare connect storm,
//! optionally the same storm against Mosquitto, and the store benchmark (S5). A scenario that
//! fails or times out leaves an error in its row; the table is printed anyway.

mod fleet;
pub mod machine;
pub mod mosquitto;
pub mod plot;
mod store;
pub mod storm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use crate::Lab;
use machine::Machine;

/// One row of the table.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Id {
    S1,
    S1c,
    S2,
    S3,
    #[value(skip)]
    S3Resent,
    #[value(skip)]
    S3Rss,
    S4,
    S5,
    /// S5 on the PostgreSQL store (a throwaway cluster); only with `--only s5pg`.
    #[value(name = "s5pg")]
    S5Pg,
    /// S5 through the replicas' inbox (`--intakes` replicas writing it, one applier); only
    /// with `--only s5inbox`.
    #[value(name = "s5inbox")]
    S5Inbox,
    S6,
    S7,
    /// The bare connect storm against Mosquitto.
    #[value(name = "mosquitto")]
    MosquittoStorm,
    /// The same bare storm against the Aloft front.
    #[value(name = "storm")]
    AloftStorm,
}

impl Id {
    fn label(self) -> &'static str {
        match self {
            Id::S1 => "S1",
            Id::S1c => "S1c",
            Id::S2 => "S2",
            Id::S3 => "S3",
            Id::S3Resent => "S3 re-sent",
            Id::S3Rss => "S3 orch. RSS",
            Id::S4 => "S4",
            Id::S5 => "S5",
            Id::S5Pg => "S5 PostgreSQL",
            Id::S5Inbox => "S5 via the inbox",
            Id::S6 => "S6",
            Id::S7 => "S7",
            Id::MosquittoStorm => "S1 Mosquitto",
            Id::AloftStorm => "S1 bare, Aloft",
        }
    }

    /// What is measured, with the fleet size, and the unit of the figure.
    fn scenario(self, n: usize, image_kib: usize) -> (String, &'static str) {
        match self {
            Id::S1 => (
                format!("{n} mTLS devices connect, subscribe, are registered"),
                "s",
            ),
            Id::S1c => (
                format!(
                    "S1 with {} idle sockets + {} half ClientHellos held open",
                    fleet::FLOOD_IDLE,
                    fleet::FLOOD_HALF_HELLOS
                ),
                "s",
            ),
            Id::S2 => (
                format!("campaign for {n} devices created → every job received (device side)"),
                "s",
            ),
            Id::S3 => (
                format!("{image_kib} KiB to {n} devices, campaign wall time"),
                "s",
            ),
            Id::S3Resent => ("chunks re-sent (served ÷ needed − 1)".into(), "%"),
            Id::S3Rss => ("orchestrator peak RSS (VmHWM)".into(), "MiB"),
            Id::S4 => (
                "orchestrator memory per connected idle device".into(),
                "KiB",
            ),
            Id::S5 => (
                format!(
                    "durable transitions/s, batches of {}, flush each",
                    store::BATCH
                ),
                "/s",
            ),
            Id::S5Pg => (
                format!(
                    "durable transitions/s into PostgreSQL, batches of {}, one transaction each",
                    store::BATCH
                ),
                "/s",
            ),
            Id::S5Inbox => (
                "durable transitions/s through the replicas' inbox, one applier".into(),
                "/s",
            ),
            Id::S6 => (
                "simulator memory per device during the campaign".into(),
                "KiB",
            ),
            Id::S7 => (
                "enrollment: device key, CSR, certificate".into(),
                "devices/s",
            ),
            Id::MosquittoStorm => (
                format!("Mosquitto 2: {n} bare mTLS clients connect + subscribe"),
                "s",
            ),
            Id::AloftStorm => (
                format!("Aloft front: the same {n} bare clients connect + subscribe"),
                "s",
            ),
        }
    }

    /// The goal of issue 10 for this row.
    fn goal(self, n: usize) -> String {
        match self {
            Id::S1 => "≤ 5 s at 10,000".into(),
            Id::S1c => "≤ 1.1 × S1".into(),
            Id::S2 => "≤ 2 s at 10,000".into(),
            Id::S3 if n >= 10_000 => "≤ 20 s (1 MiB, 10,000)".into(),
            Id::S3 => "≤ 2 s (1 MiB, 1,000)".into(),
            Id::S3Resent if n >= 10_000 => "≤ 2%".into(),
            Id::S3Resent => "≤ 1%".into(),
            Id::S3Rss => "≤ 1024 MiB at 10,000".into(),
            Id::S4 => "≤ 16 KiB".into(),
            Id::S5 => "≥ 50,000/s".into(),
            Id::S5Pg | Id::S5Inbox => "-".into(),
            Id::S6 => "≤ 32 KiB".into(),
            Id::S7 => "≥ 5,000/s".into(),
            Id::MosquittoStorm | Id::AloftStorm => "-".into(),
        }
    }
}

/// Which broker the connect storm runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Broker {
    /// S1–S7 against Aloft.
    Aloft,
    /// Only the bare connect storm, against Mosquitto 2 and against the Aloft front.
    Mosquitto,
    /// Both.
    All,
}

#[derive(Parser, Debug)]
#[command(
    name = "aloft-demo bench",
    about = "Measures the scale goals S1–S7 and prints one table"
)]
pub struct BenchArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 1_000)]
    devices: usize,
    /// Runs; the table shows the median of each figure.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Firmware image size, KiB.
    #[arg(long, default_value_t = 1024)]
    image_kib: usize,
    /// Chunk size, KiB.
    #[arg(long, default_value_t = 16)]
    chunk_kib: u32,
    /// Chunk requests in flight per device.
    #[arg(long, default_value_t = 8)]
    window: u32,
    /// Clients handshaking at once in the bare storms (the simulator's default gate).
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// What to run against.
    #[arg(long, value_enum, default_value_t = Broker::Aloft)]
    broker: Broker,
    /// Only these scenarios (S1, S2, S3, S4 and S6 always run together).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Id>,
    /// How long S5 writes, seconds.
    #[arg(long, default_value_t = 5)]
    store_secs: u64,
    /// S5inbox: how many replicas write the inbox.
    #[arg(long, default_value_t = 3)]
    intakes: usize,
    /// Every wait gives up after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout_secs: u64,
    /// Where the campaign plot goes (`campaign-<N>.svg`).
    #[arg(long, default_value = "docs/img")]
    plot_dir: PathBuf,
    /// Draw no plot.
    #[arg(long)]
    no_plot: bool,
    /// Internal: run once in this process, rooted at this directory, and print the results as
    /// JSON (the parent runs each run in a fresh process).
    #[arg(long, hide = true)]
    child_run: Option<PathBuf>,
    /// Working directory for the labs and the store (default: a temporary one on /tmp's disk).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The settings the scenarios read.
pub struct Opts {
    pub image_kib: usize,
    pub chunk_kib: u32,
    pub window: u32,
    pub connect_concurrency: usize,
    pub timeout: Duration,
    broker: Broker,
    only: Vec<Id>,
}

impl Opts {
    /// Whether scenario `id` is part of this bench.
    pub fn wants(&self, id: Id) -> bool {
        let by_broker = match id {
            Id::MosquittoStorm => self.broker != Broker::Aloft,
            Id::AloftStorm => true,
            _ => self.broker != Broker::Mosquitto,
        };
        let group = |i: Id| match i {
            Id::S1 | Id::S2 | Id::S3 | Id::S3Resent | Id::S3Rss | Id::S4 | Id::S6 => Id::S1,
            other => other,
        };
        if id == Id::S5Pg || id == Id::S5Inbox {
            // They need PostgreSQL installed: asked for by name only.
            return self.only.contains(&id);
        }
        by_broker && (self.only.is_empty() || self.only.iter().any(|o| group(*o) == group(id)))
    }
}

/// The figures of one run, by row.
pub type RunResults = BTreeMap<Id, Result<f64, String>>;

/// `aloft-demo bench ARGS`: runs the bench, prints the table to stdout. Exit code 0 only if
/// every scenario produced a figure in every run.
pub fn main(exe: &Path, argv: &[String]) -> Result<()> {
    let args = BenchArgs::parse_from(
        std::iter::once("aloft-demo bench".to_owned()).chain(argv.iter().cloned()),
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    if let Some(root) = &args.child_run {
        let results = rt.block_on(single(exe, root, &args));
        let list: Vec<(Id, Result<f64, String>)> = results.into_iter().collect();
        println!("{RESULT_MARK}{}", serde_json::to_string(&list)?);
        return Ok(());
    }
    let ok = rt.block_on(run(exe, argv, &args))?;
    std::process::exit(if ok { 0 } else { 1 });
}

/// Starts a line of a run's child process that carries its results (JSON).
const RESULT_MARK: &str = "BENCH-RESULT ";

fn opts(args: &BenchArgs) -> Opts {
    Opts {
        image_kib: args.image_kib,
        chunk_kib: args.chunk_kib,
        window: args.window,
        connect_concurrency: args.connect_concurrency,
        timeout: Duration::from_secs(args.timeout_secs),
        broker: args.broker,
        only: args.only.clone(),
    }
}

/// Runs every run in a fresh child process (`--child-run`), so that no run inherits the
/// allocator's pages, tasks or sockets of the one before (S6 measures this process's memory),
/// and prints the table of medians.
async fn run(exe: &Path, argv: &[String], args: &BenchArgs) -> Result<bool> {
    let machine = Machine::read();
    let (work, _tmp) = crate::work_dir(args.dir.as_deref(), "aloft-bench-")?;
    let started = Instant::now();
    // A run is a sequence of scenarios, each bounded by the timeout; past this it is stuck.
    let run_limit = Duration::from_secs(args.timeout_secs * 8 + 120);
    let mut runs = Vec::new();
    for r in 0..args.runs.max(1) {
        eprintln!(
            "[{:>7.1}s] run {} of {}",
            started.elapsed().as_secs_f64(),
            r + 1,
            args.runs
        );
        let root = work.join(format!("run-{r}"));
        let child = tokio::process::Command::new(exe)
            .arg("bench")
            .args(argv)
            .arg("--child-run")
            .arg(&root)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output();
        let results = match tokio::time::timeout(run_limit, child).await {
            Ok(Ok(out)) => {
                parse_child(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|| {
                    failed_run(args, &format!("run ended without results ({})", out.status))
                })
            }
            Ok(Err(e)) => failed_run(args, &format!("starting the run: {e}")),
            Err(_) => failed_run(args, &format!("run did not end within {run_limit:?}")),
        };
        if args.dir.is_none() || r + 1 < args.runs {
            let _ = std::fs::remove_dir_all(&root);
        }
        runs.push(results);
    }
    let table = Table::new(args.devices, args.image_kib, &runs);
    println!("{}", table.render(&machine, args));
    Ok(table.errors == 0)
}

fn parse_child(stdout: &str) -> Option<RunResults> {
    let line = stdout.lines().find_map(|l| l.strip_prefix(RESULT_MARK))?;
    let list: Vec<(Id, Result<f64, String>)> = serde_json::from_str(line).ok()?;
    Some(list.into_iter().collect())
}

/// Every wanted row of a run that produced nothing, with `why`.
fn failed_run(args: &BenchArgs, why: &str) -> RunResults {
    let o = opts(args);
    all_ids()
        .into_iter()
        .filter(|id| o.wants(*id))
        .map(|id| (id, Err(why.to_owned())))
        .collect()
}

/// One run in this process, rooted at `root`; draws the campaign plot.
async fn single(exe: &Path, root: &Path, args: &BenchArgs) -> RunResults {
    aloft_certs::tls::install_crypto_provider();
    let opts = opts(args);
    let (results, course) = run_once(exe, root, args, &opts).await;
    for (id, v) in &results {
        match v {
            Ok(x) => eprintln!("  {}: {x:.3}", id.label()),
            Err(e) => eprintln!("  {}: error: {e}", id.label()),
        }
    }
    if let Some(c) = course {
        if !c.samples.is_empty() && !args.no_plot {
            let path = args.plot_dir.join(format!("campaign-{}.svg", args.devices));
            let title = format!(
                "{} KiB to {} devices, {} KiB chunks, window {}",
                args.image_kib, args.devices, args.chunk_kib, args.window
            );
            match plot::draw(&path, &title, &c.samples) {
                Ok(()) => eprintln!("  plot: {}", path.display()),
                Err(e) => eprintln!("  plot: error: {e:#}"),
            }
        }
    }
    results
}

/// One run: a fresh lab, every wanted scenario.
async fn run_once(
    exe: &Path,
    root: &Path,
    args: &BenchArgs,
    opts: &Opts,
) -> (RunResults, Option<fleet::Course>) {
    let mut out = RunResults::new();
    let course = match run_inner(exe, root, args, opts, &mut out).await {
        Ok(c) => c,
        Err(e) => {
            for id in all_ids() {
                if opts.wants(id) {
                    out.entry(id).or_insert_with(|| Err(format!("{e:#}")));
                }
            }
            None
        }
    };
    (out, course)
}

fn all_ids() -> [Id; 14] {
    [
        Id::S1,
        Id::S1c,
        Id::S2,
        Id::S3,
        Id::S3Resent,
        Id::S3Rss,
        Id::S4,
        Id::S5,
        Id::S5Pg,
        Id::S5Inbox,
        Id::S6,
        Id::S7,
        Id::MosquittoStorm,
        Id::AloftStorm,
    ]
}

async fn run_inner(
    exe: &Path,
    root: &Path,
    args: &BenchArgs,
    opts: &Opts,
    out: &mut RunResults,
) -> Result<Option<fleet::Course>> {
    std::fs::create_dir_all(root)?;
    let lab = {
        let root = root.to_owned();
        tokio::task::spawn_blocking(move || Lab::create(&root)).await??
    };
    let pristine = fleet::pristine(&lab)?;
    let n = args.devices;
    let t = Instant::now();
    let (lab, devices) = tokio::task::spawn_blocking(move || {
        let devices = lab.enroll_fleet("dev", n);
        (lab, devices)
    })
    .await?;
    let devices = devices.context("enrolling the fleet")?;
    out.insert(Id::S7, Ok(n as f64 / t.elapsed().as_secs_f64()));

    let mut course = None;
    if opts.wants(Id::S1) {
        let dir = fleet::fresh_copy(&pristine, "orchestrator-a")?;
        course = fleet::campaign_scenarios(&lab, exe, &dir, &devices, opts, out).await;
    }
    if opts.wants(Id::S1c) || opts.wants(Id::AloftStorm) {
        let dir = fleet::fresh_copy(&pristine, "orchestrator-b")?;
        fleet::flood_scenarios(&lab, exe, &dir, &devices, opts, out).await;
    }
    if opts.wants(Id::MosquittoStorm) {
        let r = mosquitto_storm(&lab, root, &devices, opts).await;
        out.insert(Id::MosquittoStorm, r.map_err(|e| format!("{e:#}")));
    }
    if opts.wants(Id::S5) {
        let dir = root.to_owned();
        let secs = Duration::from_secs(args.store_secs);
        let r =
            tokio::task::spawn_blocking(move || store::transitions_per_sec(&dir, n, secs)).await?;
        out.insert(Id::S5, r.map_err(|e| format!("{e:#}")));
    }
    if opts.wants(Id::S5Pg) {
        let secs = Duration::from_secs(args.store_secs);
        let r = tokio::task::spawn_blocking(move || store::postgres_transitions_per_sec(n, secs))
            .await?;
        out.insert(Id::S5Pg, r.map_err(|e| format!("{e:#}")));
    }
    if opts.wants(Id::S5Inbox) {
        let secs = Duration::from_secs(args.store_secs);
        let intakes = args.intakes;
        let r =
            tokio::task::spawn_blocking(move || store::inbox_transitions_per_sec(intakes, n, secs))
                .await?;
        out.insert(Id::S5Inbox, r.map_err(|e| format!("{e:#}")));
    }
    Ok(course)
}

async fn mosquitto_storm(
    lab: &Lab,
    root: &Path,
    devices: &[aloft_device::DeviceIdentity],
    opts: &Opts,
) -> Result<f64> {
    let broker = mosquitto::Mosquitto::start(&root.join("mosquitto"), &lab.ca).await?;
    let clients = fleet::storm_clients(lab.ca.cert_pem(), devices)?;
    let (took, sessions) = storm::connect_all(
        clients,
        broker.addr,
        "localhost",
        opts.connect_concurrency,
        opts.timeout,
    )
    .await?;
    drop(sessions);
    eprintln!(
        "  mosquitto (pid {}): {}",
        broker.pid,
        mosquitto::Mosquitto::version().unwrap_or_default()
    );
    Ok(took.as_secs_f64())
}

/// A row: its id, the median, each run's figure as shown, the distinct errors.
type Row = (Id, Option<f64>, Vec<String>, Vec<String>);

/// The medians of every row over the runs.
struct Table {
    devices: usize,
    image_kib: usize,
    rows: Vec<Row>,
    errors: usize,
}

/// The median of `v` (the mean of the middle two for an even count); `None` if empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn fmt_value(x: f64, unit: &str) -> String {
    match unit {
        "/s" | "devices/s" => format!("{:.0}", x),
        "%" => format!("{x:.1}"),
        "s" => format!("{x:.2}"),
        _ => format!("{x:.1}"),
    }
}

impl Table {
    fn new(devices: usize, image_kib: usize, runs: &[RunResults]) -> Table {
        let mut rows = Vec::new();
        let mut errors = 0;
        for id in all_ids() {
            let (_, unit) = id.scenario(devices, image_kib);
            let mut values = Vec::new();
            let mut shown = Vec::new();
            let mut errs = Vec::new();
            for r in runs {
                match r.get(&id) {
                    Some(Ok(x)) => {
                        values.push(*x);
                        shown.push(fmt_value(*x, unit));
                    }
                    Some(Err(e)) => {
                        errors += 1;
                        shown.push("error".into());
                        errs.push(e.clone());
                    }
                    None => {}
                }
            }
            if shown.is_empty() {
                continue;
            }
            errs.dedup();
            rows.push((id, median(values), shown, errs));
        }
        Table {
            devices,
            image_kib,
            rows,
            errors,
        }
    }

    fn render(&self, machine: &Machine, args: &BenchArgs) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "aloft bench: {} devices, {} KiB image, {} KiB chunks, window {}, {} run(s), medians\n",
            self.devices, self.image_kib, args.chunk_kib, args.window, args.runs
        ));
        s.push_str(&format!("machine: {machine}\n\n"));
        s.push_str("| id | scenario | goal | median | unit | runs |\n|---|---|---|---|---|---|\n");
        let s1 = self.rows.iter().find(|r| r.0 == Id::S1).and_then(|r| r.1);
        for (id, med, shown, _) in &self.rows {
            let (what, unit) = id.scenario(self.devices, self.image_kib);
            let mut m = med.map_or_else(|| "error".to_owned(), |x| fmt_value(x, unit));
            if let (Id::S1c, Some(c), Some(base)) = (id, med, s1) {
                m.push_str(&format!(" ({:.2} × S1)", c / base));
            }
            s.push_str(&format!(
                "| {} | {what} | {} | {m} | {unit} | {} |\n",
                id.label(),
                id.goal(self.devices),
                shown.join(", ")
            ));
        }
        for (id, _, _, errs) in &self.rows {
            for e in errs {
                s.push_str(&format!("error {}: {e}\n", id.label()));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_odd_count_is_the_middle_value_and_of_an_even_count_the_mean_of_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn a_scenario_that_failed_in_one_run_shows_its_error_and_the_median_of_the_others() {
        let mut a = RunResults::new();
        a.insert(Id::S1, Ok(2.0));
        let mut b = RunResults::new();
        b.insert(Id::S1, Err("only 3 of 5 devices registered".into()));
        let mut c = RunResults::new();
        c.insert(Id::S1, Ok(4.0));
        let t = Table::new(5, 1024, &[a, b, c]);
        assert_eq!(t.errors, 1);
        let (id, med, shown, errs) = &t.rows[0];
        assert_eq!(*id, Id::S1);
        assert_eq!(*med, Some(3.0));
        assert_eq!(shown, &["2.00", "error", "4.00"]);
        assert_eq!(errs, &["only 3 of 5 devices registered"]);
    }

    #[test]
    fn only_s2_still_runs_the_campaign_group_and_the_mosquitto_broker_runs_only_storms() {
        let mut o = Opts {
            image_kib: 1,
            chunk_kib: 1,
            window: 1,
            connect_concurrency: 1,
            timeout: Duration::from_secs(1),
            broker: Broker::Aloft,
            only: vec![Id::S2],
        };
        assert!(o.wants(Id::S1) && o.wants(Id::S6));
        assert!(!o.wants(Id::S5) && !o.wants(Id::MosquittoStorm));
        o.only.clear();
        // S5pg needs PostgreSQL installed: only when named.
        assert!(!o.wants(Id::S5Pg));
        o.only = vec![Id::S5Pg];
        assert!(o.wants(Id::S5Pg) && !o.wants(Id::S5));
        o.only.clear();
        o.broker = Broker::Mosquitto;
        assert!(o.wants(Id::MosquittoStorm) && o.wants(Id::AloftStorm));
        assert!(!o.wants(Id::S1) && !o.wants(Id::S5));
    }
}
