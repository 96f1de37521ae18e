//! `aloft-demo`: the whole system in one command. It creates a fleet CA and an operator, starts
//! `aloft serve` (this same binary, role `orchestrator`) as a child process, enrolls and runs a
//! simulated fleet in this process, builds a signed and encrypted release, runs a campaign to
//! every device and prints one summary line. Exit code 0 only if every device succeeded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aloft_device::Fleet;
use aloft_e2e::{
    create_campaign, finished, peak_rss_of, scrape, status, wait_registered, Lab, ReleaseSpec,
};
use aloft_orchestrator::cli as orch_cli;
use aloft_orchestrator::store::Target;
use aloft_proto::DeviceState;
use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(
    name = "aloft-demo",
    version,
    about = "Runs an orchestrator, a simulated fleet and one campaign to every device"
)]
struct Args {
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Size of the firmware image, KiB.
    #[arg(long, default_value_t = 1024)]
    image_kib: usize,
    /// Chunk size, KiB.
    #[arg(long, default_value_t = 16)]
    chunk_kib: u32,
    /// Chunk requests in flight per device.
    #[arg(long, default_value_t = 8)]
    window: u32,
    /// Devices handshaking at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Working directory (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    // Hidden role: `aloft-demo orchestrator ARGS` is `aloft serve ARGS`, so the demo and the
    // tests can run the real server as a separate process from one binary.
    if argv.get(1).map(String::as_str) == Some("orchestrator") {
        return run_orchestrator(&argv[2..]);
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    let all_succeeded = rt.block_on(demo(args))?;
    std::process::exit(if all_succeeded { 0 } else { 1 });
}

fn run_orchestrator(rest: &[String]) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let argv = ["aloft", "serve"]
        .into_iter()
        .map(String::from)
        .chain(rest.iter().cloned());
    let cli = <orch_cli::Cli as Parser>::parse_from(argv);
    tokio::runtime::Runtime::new()?.block_on(orch_cli::run(cli))
}

async fn demo(args: Args) -> Result<bool> {
    let tmp;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("aloft-demo-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>7.2}s] {what}", t0.elapsed().as_secs_f64());

    let lab = Lab::create(&root).context("creating the lab")?;
    step("fleet CA, server certificate, operator and release key created");
    let exe = std::env::current_exe()?;
    let orch = lab.spawn(&exe, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    step(&format!(
        "orchestrator (pid {}) listening on {}",
        orch.child.id(),
        orch.device_addr
    ));

    let devices = lab.enroll_fleet("dev", args.devices)?;
    step(&format!(
        "{} devices enrolled (device-side keys, CSRs signed by the fleet CA)",
        devices.len()
    ));
    let mut cfg = lab.fleet_config(orch.device_addr);
    cfg.window = args.window;
    cfg.connect_concurrency = args.connect_concurrency;
    cfg.slot_capacity = (args.image_kib as u64 * 1024).max(1024 * 1024) * 2;
    let fleet = Fleet::start(&cfg, devices)?;
    let admin = lab.operator(orch.device_addr).await?;
    let limit = Duration::from_secs(args.timeout_secs);
    wait_registered(&admin, args.devices, limit).await?;
    step(&format!(
        "{} devices connected over mTLS and registered",
        args.devices
    ));

    let mut spec = ReleaseSpec::new("2.0.0", 2, args.image_kib * 1024);
    spec.chunk_bytes = args.chunk_kib * 1024;
    let bundle = lab.build_release(&spec)?;
    let artifact = aloft_orchestrator::ops::upload_bundle(&admin, &bundle, false).await?;
    step(&format!(
        "release {artifact} built, signed, encrypted and uploaded ({} KiB)",
        args.image_kib
    ));

    let campaign = create_campaign(&admin, artifact, Target::All).await?;
    let started = Instant::now();
    step(&format!("campaign {campaign} created for every device"));

    let bar = ProgressBar::new(args.devices as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} succeeded {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let n = args.devices as u32;
    let marks = [50u64, 95, 100];
    let mut reached: Vec<Option<f64>> = vec![None; marks.len()];
    let summary = loop {
        let s = status(&admin, &campaign, false).await?;
        let ok = s.count(DeviceState::Succeeded);
        bar.set_position(u64::from(ok));
        bar.set_message(format!(
            "downloading={} failed={} rolled_back={}",
            s.count(DeviceState::Downloading),
            s.count(DeviceState::Failed),
            s.count(DeviceState::RolledBack)
        ));
        for (i, pct) in marks.iter().enumerate() {
            if reached[i].is_none() && u64::from(ok) * 100 >= pct * u64::from(n) {
                reached[i] = Some(started.elapsed().as_secs_f64());
            }
        }
        if finished(&s) || started.elapsed() > limit {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let metrics_addr = orch.metrics_addr;
    let metric = |name: &'static str| async move {
        match metrics_addr {
            Some(m) => scrape(m, name).await.unwrap_or(0.0),
            None => 0.0,
        }
    };
    let served = metric("aloft_chunk_bytes_served_total").await;
    let dropped = metric("aloft_front{counter=\"direct_dropped\"}").await;
    let views = fleet.views();
    let total = |f: fn(&aloft_device::AgentStats) -> u64| -> u64 {
        views.iter().map(|(_, v)| f(&v.stats)).sum()
    };
    let request_errors = total(|s| s.chunks_rejected);
    let expired = total(|s| s.chunk_requests_expired);
    let duplicates = total(|s| s.chunks_duplicate);
    let sessions = fleet
        .counters
        .sessions_up
        .load(std::sync::atomic::Ordering::Relaxed);
    let orch_rss = orch.peak_rss_bytes().unwrap_or(0);
    let sim_rss = peak_rss_of("/proc/self/status").unwrap_or(0);
    let corrupted = fleet
        .counters
        .chunks_corrupted
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "devices: {sessions} sessions for {} devices, {expired} chunk requests timed out, {duplicates} duplicate chunks received",
        args.devices
    );
    let fmt_mark = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{s:.2}s"));
    eprintln!(
        "time to 50%: {}  95%: {}  100%: {}",
        fmt_mark(reached[0]),
        fmt_mark(reached[1]),
        fmt_mark(reached[2])
    );
    eprintln!(
        "chunk bytes served: {:.1} MiB ({dropped} frames dropped at the front, {request_errors} rejected by devices); peak RSS orchestrator: {:.1} MiB, simulator: {:.1} MiB; chunks corrupted in transit: {corrupted}",
        served / 1_048_576.0,
        orch_rss as f64 / 1_048_576.0,
        sim_rss as f64 / 1_048_576.0,
    );
    admin.disconnect().await;
    fleet.shutdown().await;
    drop(orch);

    let succeeded = summary.count(DeviceState::Succeeded);
    println!(
        "campaign {campaign}: succeeded={succeeded} failed={} rolled_back={} in {secs:.2}s",
        summary.count(DeviceState::Failed),
        summary.count(DeviceState::RolledBack),
    );
    Ok(succeeded as usize == args.devices && summary.total as usize == args.devices)
}
