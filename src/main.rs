//! `aloft-demo`: the whole system in one command. It creates a fleet CA and an operator, starts
//! `aloft serve` (this same binary, role `orchestrator`) as a child process, enrolls and runs a
//! simulated fleet in this process, builds a signed and encrypted release, runs a campaign to
//! every device and prints one summary line. A scenario file (`--scenario`, see
//! `aloft_e2e::scenario`) sets the fault mix and the rollout policy. Exit code 0 only if the run
//! ended as the scenario expects (by default: every device succeeded).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aloft_device::Fleet;
use std::sync::atomic::Ordering::Relaxed;

use aloft_e2e::origin::Nginx;
use aloft_e2e::scenario::{starve_during_installs, Expect, Scenario};
use aloft_e2e::{create_rollout, peak_rss_of, scrape, status, wait_registered, Lab, ReleaseSpec};
use aloft_orchestrator::admin::wire::AdminBody;
use aloft_orchestrator::cli as orch_cli;
use aloft_orchestrator::store::pg_cluster::TempCluster;
use aloft_orchestrator::store::{CampaignStatus, Target};
use aloft_proto::DeviceState;
use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

/// Certificates per `device_register` request when the demo registers devices held offline
/// (about 700 bytes each: 500 fit well inside an operator's 1 MiB packet limit).
const REGISTER_BATCH: usize = 500;

#[derive(Parser, Debug)]
#[command(
    name = "aloft-demo",
    version,
    about = "Runs an orchestrator, a simulated fleet and one campaign to every device"
)]
struct Args {
    /// A scenario file (TOML): fleet, faults, rollout policy, expected outcome. Flags below
    /// override its fleet settings.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Simulated devices [default: 100].
    #[arg(long)]
    devices: Option<usize>,
    /// Size of the firmware image, KiB [default: 1024].
    #[arg(long)]
    image_kib: Option<usize>,
    /// Chunk size, KiB [default: 16].
    #[arg(long)]
    chunk_kib: Option<u32>,
    /// Chunk requests in flight per device [default: 8].
    #[arg(long)]
    window: Option<u32>,
    /// Devices handshaking at once [default: 64].
    #[arg(long)]
    connect_concurrency: Option<usize>,
    /// Working directory (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// (protocol 1.5) Serve the release from a download origin beside the orchestrator:
    /// `nginx` exports it (`release export`) and starts Debian's nginx on loopback over HTTPS
    /// (a certificate from the fleet CA, which the devices trust for origins); the campaign
    /// names it, and devices fetch chunks there.
    #[arg(long, value_parser = ["nginx"])]
    origin: Option<String>,
    /// Keep the orchestrator (and its console) up this many seconds after the campaign, to
    /// look around in the console.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
    /// Run beside an external broker instead of the front and the embedded one: `mosquitto`
    /// starts Debian's Mosquitto 2 on a free loopback port with the configuration
    /// `aloft broker-config mosquitto` generates, and the orchestrator, the operator and every
    /// device connect to it.
    #[arg(long, value_parser = ["mosquitto"])]
    broker: Option<String>,
    /// With `--broker mosquitto`: kill the broker (SIGKILL) once this percentage of the devices
    /// succeeded, and start it again on the same port; the summary gives its RSS and the
    /// devices' peak reconnect rate.
    #[arg(long, requires = "broker")]
    kill_broker_at: Option<u32>,
    /// With `--broker mosquitto`: run this many `aloft serve` replicas (issue 12) on a
    /// throwaway PostgreSQL cluster (Debian's PostgreSQL, `initdb` in the working directory)
    /// instead of one process on the sled store; the summary gives each replica's share.
    #[arg(long, requires = "broker", value_parser = clap::value_parser!(u32).range(1..=16))]
    replicas: Option<u32>,
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    // Hidden role: `aloft-demo orchestrator ARGS` is `aloft serve ARGS`, so the demo and the
    // tests can run the real server as a separate process from one binary.
    if argv.get(1).map(String::as_str) == Some("orchestrator") {
        return run_orchestrator(&argv[2..]);
    }
    // Everything below runs the simulated fleet in this process.
    fleet_allocator();
    // `aloft-demo bench ARGS`: the scale benchmarks (aloft_e2e::bench).
    if argv.get(1).map(String::as_str) == Some("bench") {
        return aloft_e2e::bench::main(&std::env::current_exe()?, &argv[2..]);
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

/// glibc's allocator, set for a process running thousands of simulated devices (never for the
/// orchestrator child, which keeps glibc's defaults): allocations of 32 KiB and more (rustls'
/// record buffers, which `Vec` doubling takes from 16 to 32 KiB) are mapped apart and given back
/// when freed, rather than left as holes between devices' small allocations. One arena
/// (`M_ARENA_MAX`) was tried too: 3.7 KiB less per device at 1,000 devices, nothing at 5,000,
/// and a single lock for every worker thread of a CPU-bound process, so it is not set. See
/// docs/BENCHMARKS.md, "Simulator memory, third step".
fn fleet_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters, and runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024);
    }
}

/// Waits until the replica `p` leads (`aloft_leader` 1 on its `/metrics`).
async fn wait_leading(p: &aloft_e2e::OrchestratorProcess, limit: Duration) -> Result<()> {
    let metrics = p.metrics_addr.context("the replica serves /metrics")?;
    let deadline = Instant::now() + limit;
    while scrape(metrics, "aloft_leader").await != Some(1.0) {
        if Instant::now() > deadline {
            anyhow::bail!("the first replica did not lead within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
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

/// The scenario with the command line's overrides applied.
fn scenario(args: &Args) -> Result<Scenario> {
    let mut sc = match &args.scenario {
        Some(p) => Scenario::load(p)?,
        None => Scenario::default(),
    };
    let f = &mut sc.fleet;
    f.devices = args.devices.unwrap_or(f.devices);
    f.image_kib = args.image_kib.unwrap_or(f.image_kib);
    f.chunk_kib = args.chunk_kib.unwrap_or(f.chunk_kib);
    f.window = args.window.unwrap_or(f.window);
    f.connect_concurrency = args.connect_concurrency.unwrap_or(f.connect_concurrency);
    Ok(sc)
}

async fn demo(args: Args) -> Result<bool> {
    let sc = scenario(&args)?;
    let (root, _tmp) = aloft_e2e::work_dir(args.dir.as_deref(), "aloft-demo-")?;
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>7.2}s] {what}", t0.elapsed().as_secs_f64());
    let n_devices = sc.fleet.devices;

    let lab = Lab::create(&root).context("creating the lab")?;
    step("fleet CA, server certificate, operator and release key created");
    let exe = std::env::current_exe()?;
    let mut mosquitto = match args.broker.as_deref() {
        Some(_) => {
            let m = lab.start_mosquitto().await?;
            step(&format!(
                "mosquitto (pid {}) listening on {} with the generated configuration ({})",
                m.pid,
                m.addr,
                aloft_e2e::bench::mosquitto::Mosquitto::version().unwrap_or_default()
            ));
            Some(m)
        }
        None => None,
    };
    // Replicas: the store moves into a throwaway PostgreSQL cluster, and every replica but the
    // first (which leads: it starts first) is kept in `others`.
    // Kept until the end: dropping it stops the database.
    let mut _cluster = None;
    let mut others = Vec::new();
    let orch = match (&mosquitto, args.replicas) {
        (None, _) => lab.spawn(&exe, SocketAddr::from(([127, 0, 0, 1], 0)))?,
        (Some(m), None) => lab.spawn_external(&exe, m.addr)?,
        (Some(m), Some(n)) => {
            let pg = tokio::task::block_in_place(TempCluster::start)?;
            let url = pg.create_database("aloft")?;
            lab.move_store_to_postgres(&url)?;
            step("store moved into a throwaway PostgreSQL cluster");
            let first = lab.spawn_replica(&exe, m.addr, &url, "r0", 15)?;
            wait_leading(&first, Duration::from_secs(args.timeout_secs)).await?;
            for i in 1..n {
                others.push(lab.spawn_replica(&exe, m.addr, &url, &format!("r{i}"), 15)?);
            }
            step(&format!("{n} replicas started; r0 leads"));
            _cluster = Some(pg);
            first
        }
    };
    step(&format!(
        "orchestrator (pid {}) {} {}",
        orch.child.id(),
        if mosquitto.is_some() {
            "connected to the broker at"
        } else {
            "listening on"
        },
        orch.device_addr
    ));
    if let Some(console) = orch.console_addr {
        // The link carries a viewer token (read-only, as long as the demo may run).
        let ttl = args.timeout_secs.saturating_add(args.hold_secs);
        let token = lab.console_token(ttl.clamp(600, aloft_orchestrator::console::MAX_TTL_SECS))?;
        step(&format!(
            "console (read-only): https://{console}/login?token={token}  \
             (the server certificate is from the demo's own CA: your browser will warn)"
        ));
    }

    let devices = lab.enroll_fleet("dev", n_devices)?;
    step(&format!(
        "{} devices enrolled (device-side keys, CSRs signed by the fleet CA)",
        devices.len()
    ));
    let mut cfg = lab.fleet_config(orch.device_addr);
    cfg.window = sc.fleet.window;
    cfg.connect_concurrency = sc.fleet.connect_concurrency;
    cfg.slot_capacity = (sc.fleet.image_kib as u64 * 1024).max(1024 * 1024) * 2;
    cfg.faults = sc.faults.clone();
    cfg.conditions = sc.conditions.clone();
    if args.origin.is_some() {
        cfg.origin_ca_pem = Some(lab.ca.cert_pem().to_owned());
    }
    let certs: Vec<String> = devices.iter().map(|d| d.cert_pem.clone()).collect();
    let mut admin = lab.operator(orch.device_addr).await?;
    let limit = Duration::from_secs(args.timeout_secs);
    if mosquitto.is_some() {
        // The orchestrator never sees a device's handshake beside an external broker: every
        // device is registered from its certificate first.
        lab.register(&admin, &devices).await?;
        step(&format!(
            "{n_devices} devices registered from their certificates"
        ));
    }
    let connecting = Instant::now();
    let fleet = Fleet::start(&cfg, devices)?;
    // Devices the scenario keeps offline at first are registered by their certificates later.
    let expected_online = n_devices - fleet.counters.offline_devices.load(Relaxed) as usize;
    wait_registered(&admin, expected_online, limit).await?;
    if mosquitto.is_some() {
        wait_connected(&fleet, expected_online, limit).await?;
        step(&format!(
            "{expected_online} devices connected to mosquitto over mTLS in {:.2}s",
            connecting.elapsed().as_secs_f64()
        ));
    } else {
        step(&format!(
            "{expected_online} devices connected over mTLS and registered"
        ));
    }
    if expected_online < n_devices && mosquitto.is_none() {
        // In batches: 10,000 certificates in one request outgrow an operator's packet limit
        // (about 1 MiB), and the front closes a connection that sends a larger packet.
        for batch in certs.chunks(REGISTER_BATCH) {
            let _: serde_json::Value = admin
                .call(AdminBody::DeviceRegister {
                    certs: batch.to_vec(),
                    groups: Vec::new(),
                })
                .await?;
        }
        step(&format!(
            "{} offline devices registered from their certificates",
            n_devices - expected_online
        ));
    }

    let mut spec = ReleaseSpec::new(
        &sc.release.version,
        sc.release.security_version,
        sc.fleet.image_kib * 1024,
    );
    spec.chunk_bytes = sc.fleet.chunk_kib * 1024;
    spec.preconditions = sc.release.preconditions.clone();
    let bundle = lab.build_release(&spec)?;
    let artifact = aloft_orchestrator::ops::upload_bundle(&admin, &bundle, false).await?;
    let nginx = match args.origin {
        Some(_) => {
            let export = root.join("export");
            aloft_orchestrator::ops::export::export_bundle(&bundle, &export)?;
            let server = lab
                .ca
                .issue_server(&["127.0.0.1".into()], aloft_certs::Validity::days(1))?;
            let n = Nginx::start(
                &root.join("nginx"),
                &export,
                &server.cert_pem,
                &server.key_pem,
            )?;
            step(&format!(
                "release exported; nginx serving it at {}",
                n.url()
            ));
            Some(n)
        }
        None => None,
    };
    let chunk_count = (sc.fleet.image_kib as u64).div_ceil(u64::from(sc.fleet.chunk_kib));
    step(&format!(
        "release {artifact} built, signed, encrypted and uploaded ({} KiB)",
        sc.fleet.image_kib
    ));

    let campaign = match &nginx {
        None => create_rollout(&admin, artifact, Target::All, sc.policy.clone()).await?,
        Some(n) => {
            let v: serde_json::Value = admin
                .call(AdminBody::CampaignCreate {
                    artifact,
                    target: Target::All,
                    include: Vec::new(),
                    exclude: Vec::new(),
                    policy: sc.policy.clone(),
                    dry_run: false,
                    origin: Some(n.url()),
                })
                .await?;
            let id = v.get("campaign").and_then(serde_json::Value::as_str);
            aloft_proto::CampaignId::new(id.context("campaign id in reply")?)?
        }
    };
    let started = Instant::now();
    let first = status(&admin, &campaign, false).await?;
    step(&format!(
        "campaign {campaign} created for every device: {} waves of {:?}",
        first.waves.len(),
        first
            .waves
            .iter()
            .map(|w| w.counts.size)
            .collect::<Vec<_>>()
    ));

    if sc.starve.orchestrator_stop_secs > 0 {
        // The status polls below would wait on the stopped process: the fleet is watched
        // in-process instead.
        let s = starve_during_installs(&fleet, orch.child.id(), &sc.starve, limit).await?;
        step(&format!(
            "orchestrator stopped (SIGSTOP) for {:.1}s during the installs, {} ms past the devices' confirm deadline: {} devices were installing when it stopped; while it was stopped {} confirmed and {} rolled back",
            s.stopped_for.as_secs_f64(),
            (s.stopped_for.as_millis() as u64).saturating_sub(cfg.confirm_deadline_ms),
            s.installing_at_stop,
            s.confirmed_while_stopped,
            s.rolled_back_while_stopped
        ));
    }

    let bar = ProgressBar::new(n_devices as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} succeeded {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let n = n_devices as u32;
    let marks = [50u64, 95, 100];
    let mut reached: Vec<Option<f64>> = vec![None; marks.len()];
    let mut touched_at_pause: Option<u32> = None;
    let mut broker_kill: Option<BrokerKill> = None;
    let summary = loop {
        let s = status(&admin, &campaign, false).await?;
        let ok = s.count(DeviceState::Succeeded);
        if let (Some(pct), Some(m), None) = (args.kill_broker_at, &mut mosquitto, &broker_kill) {
            if u64::from(ok) * 100 >= u64::from(pct) * u64::from(n) {
                bar.suspend(|| {
                    step(&format!(
                        "{ok} devices succeeded: mosquitto killed (SIGKILL)"
                    ))
                });
                let mut k =
                    kill_and_restart_broker(&lab, m, &fleet, &orch, expected_online, limit).await?;
                *m = k.restarted.take().context("the restarted broker")?;
                // The operator's connection went with the broker; a new one.
                admin = lab.operator(orch.device_addr).await?;
                bar.suspend(|| {
                    step(&format!(
                        "mosquitto restarted; orchestrator link back after {:.2}s, all {expected_online} devices after {:.2}s, peak {} reconnects/s",
                        k.link_back.as_secs_f64(),
                        k.devices_back.as_secs_f64(),
                        k.peak_per_sec
                    ))
                });
                broker_kill = Some(k);
                continue;
            }
        }
        let idle = s.count(DeviceState::Idle);
        let in_flight = s.total - idle - s.terminal();
        bar.set_position(u64::from(ok));
        bar.set_message(format!(
            "{} wave {} in flight={in_flight} failed={} rolled_back={}",
            s.status,
            s.waves.iter().filter(|w| w.opened_ms.is_some()).count(),
            s.count(DeviceState::Failed),
            s.count(DeviceState::RolledBack)
        ));
        for (i, pct) in marks.iter().enumerate() {
            if reached[i].is_none() && u64::from(ok) * 100 >= pct * u64::from(n) {
                reached[i] = Some(started.elapsed().as_secs_f64());
            }
        }
        if s.status == CampaignStatus::Paused && touched_at_pause.is_none() {
            touched_at_pause = Some(s.total - idle);
        }
        let settled = match s.status {
            CampaignStatus::Active => false,
            // Devices in flight when it paused or stopped finish on their own.
            _ => in_flight == 0,
        };
        if settled || started.elapsed() > limit {
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
    let mut served = metric("aloft_chunk_bytes_served_total").await;
    let mut chunks_served = metric("aloft_chunks_served_total").await as u64;
    if !others.is_empty() {
        let all: Vec<&aloft_e2e::OrchestratorProcess> =
            std::iter::once(&orch).chain(others.iter()).collect();
        for (i, r) in all.iter().enumerate() {
            let Some(m) = r.metrics_addr else { continue };
            let get = |name: &'static str| async move { scrape(m, name).await.unwrap_or(0.0) };
            let chunks = get("aloft_chunks_served_total").await;
            let bytes = get("aloft_chunk_bytes_served_total").await;
            let written = get("aloft_inbox_rows_total{op=\"written\"}").await;
            let read = get("aloft_inbox_rows_total{op=\"read\"}").await;
            let applied = get("aloft_reports_total{outcome=\"applied\"}").await;
            let leads = get("aloft_leader").await == 1.0;
            eprintln!(
                "replica r{i}{}: {chunks} chunks served, {written} inbox rows written{}",
                if leads { " (leader)" } else { "" },
                if read > 0.0 {
                    format!(
                        ", {read} read and {applied} reports applied ({:.0} transitions/s over the campaign)",
                        applied / secs
                    )
                } else {
                    String::new()
                }
            );
            if i > 0 {
                chunks_served += chunks as u64;
                served += bytes;
            }
        }
    }
    let dropped = metric("aloft_front_direct_packets_total{outcome=\"dropped\"}").await;
    let views = fleet.views();
    let total = |f: fn(&aloft_device::AgentStats) -> u64| -> u64 {
        views.iter().map(|(_, v)| f(&v.stats)).sum()
    };
    let request_errors = total(|s| s.chunks_rejected);
    let expired = total(|s| s.chunk_requests_expired);
    let duplicates = total(|s| s.chunks_duplicate);
    let c = &fleet.counters;
    let sessions = c.sessions_up.load(Relaxed);
    let orch_rss = orch.peak_rss_bytes().unwrap_or(0);
    let sim_rss = peak_rss_of("/proc/self/status").unwrap_or(0);
    if let Some(m) = &mosquitto {
        let rss = peak_rss_of(&format!("/proc/{}/status", m.pid)).unwrap_or(0);
        match &broker_kill {
            None => eprintln!("peak RSS mosquitto: {:.1} MiB", rss as f64 / 1_048_576.0),
            Some(k) => eprintln!(
                "peak RSS mosquitto: {:.1} MiB before the kill, {:.1} MiB after the restart; reconnects: peak {}/s, orchestrator link back in {:.2}s, all devices in {:.2}s",
                k.rss_before as f64 / 1_048_576.0,
                rss as f64 / 1_048_576.0,
                k.peak_per_sec,
                k.link_back.as_secs_f64(),
                k.devices_back.as_secs_f64()
            ),
        }
    }
    eprintln!(
        "devices: {sessions} sessions for {n_devices} devices, {expired} chunk requests timed out, {duplicates} duplicate chunks received"
    );
    eprintln!(
        "faults injected: {} link drops, {} power losses, {} chunks corrupted, {} slow links, {} offline at start, {} boot hangs, {} unhealthy after confirm",
        c.link_drops.load(Relaxed),
        c.power_losses.load(Relaxed),
        c.chunks_corrupted.load(Relaxed),
        c.slow_devices.load(Relaxed),
        c.offline_devices.load(Relaxed),
        c.boot_hangs.load(Relaxed),
        c.unhealthy_devices.load(Relaxed),
    );
    let deferred_devices = views.iter().filter(|(_, v)| v.stats.deferrals > 0).count();
    if deferred_devices > 0 || c.constrained_devices.load(Relaxed) > 0 {
        eprintln!(
            "preconditions (1.5): {} devices started constrained, {deferred_devices} deferred at least once ({} deferred reports)",
            c.constrained_devices.load(Relaxed),
            total(|s| s.deferrals),
        );
    }
    let downloaded = u64::from(summary.total - summary.count(DeviceState::Idle));
    let needed = downloaded * chunk_count;
    eprintln!(
        "chunks served: {chunks_served} for {downloaded} devices that needed {needed}: {} re-sent ({:.1}%)",
        chunks_served.saturating_sub(needed),
        chunks_served.saturating_sub(needed) as f64 * 100.0 / needed.max(1) as f64
    );
    for w in &summary.waves {
        let at = |ms: Option<u64>| {
            ms.map_or("-".to_owned(), |t| {
                format!(
                    "{:.2}s",
                    t.saturating_sub(summary.created_ms) as f64 / 1000.0
                )
            })
        };
        eprintln!(
            "wave {}: {} devices, opened {} finished {} (succeeded {}, failed {}, unhealthy {})",
            w.wave,
            w.counts.size,
            at(w.opened_ms),
            at(w.finished_ms),
            w.counts.succeeded,
            w.counts.failed,
            w.counts.unhealthy
        );
    }
    let fmt_mark = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{s:.2}s"));
    eprintln!(
        "time to 50%: {}  95%: {}  100%: {}",
        fmt_mark(reached[0]),
        fmt_mark(reached[1]),
        fmt_mark(reached[2])
    );
    if let Some(t) = touched_at_pause {
        eprintln!(
            "paused by itself: {}; {t} devices notified when it paused, {} in the end",
            summary.reason.as_deref().unwrap_or(""),
            summary.total - summary.count(DeviceState::Idle)
        );
    }
    eprintln!(
        "chunk bytes served: {:.1} MiB ({dropped} frames dropped at the front, {request_errors} rejected by devices, {} device publishes dropped over the in-flight cap); peak RSS orchestrator: {:.1} MiB, simulator: {:.1} MiB",
        served / 1_048_576.0,
        fleet.counters.publishes_dropped.load(Relaxed),
        orch_rss as f64 / 1_048_576.0,
        sim_rss as f64 / 1_048_576.0,
    );
    if let Some(n) = &nginx {
        eprintln!(
            "origin: {} chunks from nginx ({} requests logged), {} refused by hash, {} fetches failed, {} downloads gave it up",
            total(|s| s.origin_chunks),
            n.requests(),
            total(|s| s.origin_refused),
            total(|s| s.origin_failed),
            total(|s| s.origin_abandoned),
        );
    }
    if args.hold_secs > 0 {
        if let Some(console) = orch.console_addr {
            step(&format!(
                "holding for {}s: the console is still at https://{console}/",
                args.hold_secs
            ));
        }
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    }
    admin.disconnect().await;
    fleet.shutdown().await;
    drop(orch);
    drop(nginx);
    drop(mosquitto);

    let succeeded = summary.count(DeviceState::Succeeded);
    println!(
        "campaign {campaign}: {} succeeded={succeeded} failed={} rolled_back={} in {secs:.2}s",
        summary.status,
        summary.count(DeviceState::Failed),
        summary.count(DeviceState::RolledBack),
    );
    Ok(match sc.expect {
        Expect::Finished => {
            summary.status == CampaignStatus::Finished
                && succeeded as usize == n_devices
                && summary.total as usize == n_devices
        }
        Expect::Paused => {
            let canary = summary.waves.first().map_or(0, |w| w.counts.size);
            summary.status == CampaignStatus::Paused
                && summary.total - summary.count(DeviceState::Idle) <= canary
        }
    })
}

/// Waits until `n` devices of `fleet` are connected (beside an external broker "registered"
/// says nothing about that).
async fn wait_connected(fleet: &Fleet, n: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let up = fleet.views().iter().filter(|(_, v)| v.connected).count();
        if up >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {up} of {n} devices connected within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What killing the broker mid-campaign showed.
struct BrokerKill {
    /// Mosquitto's peak RSS before the kill.
    rss_before: u64,
    /// From the restart until the orchestrator's link was up again.
    link_back: Duration,
    /// From the restart until every online device was connected again.
    devices_back: Duration,
    /// The most device sessions established within any one second after the restart.
    peak_per_sec: u64,
    restarted: Option<aloft_e2e::bench::mosquitto::Mosquitto>,
}

/// SIGKILLs `m`, starts Mosquitto again on its port, and measures the reconnection: the
/// orchestrator's link (its `aloft_broker_link_up`), and the devices' sessions sampled every
/// 50 ms for the peak rate over a sliding second.
async fn kill_and_restart_broker(
    lab: &Lab,
    m: &mut aloft_e2e::bench::mosquitto::Mosquitto,
    fleet: &Fleet,
    orch: &aloft_e2e::OrchestratorProcess,
    online: usize,
    limit: Duration,
) -> Result<BrokerKill> {
    let rss_before = peak_rss_of(&format!("/proc/{}/status", m.pid)).unwrap_or(0);
    let addr = m.addr;
    m.kill9()?;
    // Every device notices the loss before the broker is back, as after a real crash.
    let deadline = Instant::now() + limit;
    while fleet.views().iter().any(|(_, v)| v.connected) {
        if Instant::now() > deadline {
            anyhow::bail!("devices still connected to a killed broker");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restarted = lab.restart_mosquitto(addr).await?;
    let t0 = Instant::now();
    let base = fleet.counters.sessions_up.load(Relaxed);
    let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let mut peak_per_sec = 0;
    let mut link_back = None;
    let devices_back = loop {
        let now = Instant::now();
        let up = fleet.counters.sessions_up.load(Relaxed) - base;
        samples.push_back((now, up));
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(1))
        {
            samples.pop_front();
        }
        if let Some((_, first)) = samples.front() {
            peak_per_sec = peak_per_sec.max(up - first);
        }
        if link_back.is_none() {
            if let Some(metrics) = orch.metrics_addr {
                if aloft_e2e::scrape(metrics, "aloft_broker_link_up").await == Some(1.0) {
                    link_back = Some(t0.elapsed());
                }
            }
        }
        let connected = fleet.views().iter().filter(|(_, v)| v.connected).count();
        if connected >= online && link_back.is_some() {
            break t0.elapsed();
        }
        if t0.elapsed() > limit {
            anyhow::bail!("only {connected} of {online} devices back within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok(BrokerKill {
        rss_before,
        link_back: link_back.unwrap_or(devices_back),
        devices_back,
        peak_per_sec,
        restarted: Some(restarted),
    })
}
