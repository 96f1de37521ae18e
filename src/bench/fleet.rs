//! The scenarios that need an orchestrator and a fleet: S1 (connect storm until registered),
//! S4 (orchestrator memory per idle device), S2 (every job delivered), S3 (the campaign, its
//! re-sent chunks and the orchestrator's peak memory), S6 (simulator memory per device), then on
//! a second orchestrator from the same initial data S1c (S1 under a handshake flood) and the bare
//! storm against the Aloft front (the Mosquitto comparison's other side).
//!
//! The orchestrator is a child process (this binary's hidden `orchestrator` role) and the
//! simulated fleet runs in this process, as in the demo. Every wait has a deadline: when the
//! system under test breaks, the scenario records an error and the bench goes on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_device::{DeviceIdentity, Fleet};
use aloft_orchestrator::admin::client::AdminClient;
use aloft_orchestrator::admin::wire::CampaignSummary;
use aloft_orchestrator::rollout::RolloutPolicy;
use aloft_orchestrator::store::{CampaignStatus, Target};
use aloft_proto::{CampaignId, DeviceState};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokio_rustls::TlsConnector;

use super::machine::rss;
use super::plot::Sample;
use super::storm::{self, Flood, StormClient};
use super::{Id, Opts, RunResults};
use crate::{
    create_rollout, scrape, spawn_orchestrator, status, Lab, OrchestratorProcess, ReleaseSpec,
};

/// Idle TCP sockets and half-sent ClientHellos held open during S1c.
pub const FLOOD_IDLE: usize = 200;
pub const FLOOD_HALF_HELLOS: usize = 50;

/// Runs an orchestrator as a child of `exe` on `data_dir`, giving up after `limit`.
async fn spawn(
    lab: &Lab,
    exe: &Path,
    data_dir: &Path,
    limit: Duration,
) -> Result<OrchestratorProcess> {
    let (exe, dir, unlock) = (exe.to_owned(), data_dir.to_owned(), lab.unlock_file.clone());
    // Reading the child's first line blocks: off the runtime, under a deadline.
    let task = tokio::task::spawn_blocking(move || {
        spawn_orchestrator(&exe, &dir, &unlock, SocketAddr::from(([127, 0, 0, 1], 0)))
    });
    tokio::time::timeout(limit, task)
        .await
        .map_err(|_| anyhow!("the orchestrator did not start within {limit:?}"))??
}

/// Waits until the orchestrator has registered `n` devices; polls less often for big fleets so
/// the poll is not what loads the orchestrator. It asks for the count (`device_count`), not the
/// list: above about 3,000 devices the list outgrows the operator link's packet limit, its reply
/// never arrives and the wait failed.
async fn wait_registered(admin: &AdminClient, n: usize, limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let every = Duration::from_millis(if n > 2_000 { 250 } else { 50 });
    let mut last = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let call = admin.call::<Value>(aloft_orchestrator::admin::wire::AdminBody::DeviceCount {});
        match tokio::time::timeout(left, call).await {
            Ok(Ok(count)) => {
                last = count["registered"].as_u64().unwrap_or(0) as usize;
                if last >= n {
                    return Ok(());
                }
            }
            Ok(Err(e)) => bail!("device count failed after {last} of {n} registered: {e}"),
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("only {last} of {n} devices registered within {limit:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// A status call that gives up at `deadline`.
async fn status_until(
    admin: &AdminClient,
    c: &CampaignId,
    deadline: tokio::time::Instant,
) -> Result<CampaignSummary> {
    tokio::time::timeout_at(deadline, status(admin, c, false))
        .await
        .map_err(|_| anyhow!("no campaign status before the deadline"))?
}

/// Copies a directory tree (the orchestrator's data before its first start).
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), &dest)?;
        }
    }
    Ok(())
}

/// Storm clients for `devices`: client id = device id, the device's own subscription filter.
pub fn storm_clients(ca_pem: &str, devices: &[DeviceIdentity]) -> Result<Arc<Vec<StormClient>>> {
    let clients = devices
        .iter()
        .map(|d| {
            let tls = aloft_certs::tls::client_config(ca_pem, &d.cert_pem, &d.key_pem)?;
            Ok(StormClient {
                client_id: d.id.to_string(),
                filter: aloft_proto::topics::device_subscription(&d.id),
                connector: TlsConnector::from(Arc::new(tls)),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(clients))
}

/// What the campaign run leaves for the plot.
pub struct Course {
    pub samples: Vec<Sample>,
}

/// S1, S4, S2, S3, S6 on one orchestrator started from `data_dir`.
pub async fn campaign_scenarios(
    lab: &Lab,
    exe: &Path,
    data_dir: &Path,
    devices: &[DeviceIdentity],
    opts: &Opts,
    out: &mut RunResults,
) -> Option<Course> {
    let ids = [
        Id::S1,
        Id::S4,
        Id::S2,
        Id::S3,
        Id::S3Resent,
        Id::S3Rss,
        Id::S6,
    ];
    match campaign_inner(lab, exe, data_dir, devices, opts, out).await {
        Ok(course) => Some(course),
        Err(e) => {
            // Every scenario the failure cut short carries the error; when the fleet never got
            // registered, the others say they did not run.
            let first = !out.contains_key(&Id::S1);
            out.entry(Id::S1).or_insert_with(|| Err(format!("{e:#}")));
            for id in ids {
                out.entry(id).or_insert_with(|| {
                    Err(if first {
                        "not run: S1 failed".to_owned()
                    } else {
                        format!("{e:#}")
                    })
                });
            }
            None
        }
    }
}

async fn campaign_inner(
    lab: &Lab,
    exe: &Path,
    data_dir: &Path,
    devices: &[DeviceIdentity],
    opts: &Opts,
    out: &mut RunResults,
) -> Result<Course> {
    let n = devices.len();
    let limit = opts.timeout;
    let orch = spawn(lab, exe, data_dir, limit).await?;
    let pid = orch.child.id().to_string();
    let admin = tokio::time::timeout(limit, lab.operator(orch.device_addr))
        .await
        .map_err(|_| anyhow!("operator did not connect within {limit:?}"))??;
    let (orch_before, _) = rss(&pid).context("orchestrator RSS")?;
    let (sim_before, _) = rss("self").context("own RSS")?;

    let mut cfg = lab.fleet_config(orch.device_addr);
    cfg.window = opts.window;
    cfg.slot_capacity = (opts.image_kib as u64 * 1024).max(1024 * 1024) * 2;
    let started = Instant::now();
    let fleet = Fleet::start(&cfg, devices.to_vec())?;
    let registered = wait_registered(&admin, n, limit).await;
    let s1 = started.elapsed().as_secs_f64();
    let mut sim_peak = rss("self").map_or(0, |r| r.0);
    if let Err(e) = registered {
        let _ = tokio::time::timeout(Duration::from_secs(30), fleet.shutdown()).await;
        return Err(e);
    }
    out.insert(Id::S1, Ok(s1));

    // S4: once every session is up and the registrations have settled.
    let deadline = tokio::time::Instant::now() + limit;
    while (fleet.counters.sessions_up.load(Relaxed) as usize) < n
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    match rss(&pid) {
        Some((connected, _)) => {
            let per = connected.saturating_sub(orch_before) as f64 / n as f64 / 1024.0;
            out.insert(Id::S4, Ok(per));
        }
        None => {
            out.insert(Id::S4, Err("orchestrator gone".into()));
        }
    }

    let result = campaign(
        lab,
        &admin,
        &orch,
        &fleet,
        &pid,
        n,
        opts,
        out,
        &mut sim_peak,
    )
    .await;
    sim_peak = sim_peak.max(rss("self").map_or(0, |r| r.0));
    out.insert(
        Id::S6,
        Ok(sim_peak.saturating_sub(sim_before) as f64 / n as f64 / 1024.0),
    );
    admin.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(60), fleet.shutdown())
        .await
        .is_err()
    {
        eprintln!("bench: the fleet did not stop within 60 s");
    }
    drop(orch);
    result
}

#[allow(clippy::too_many_arguments)]
async fn campaign(
    lab: &Lab,
    admin: &AdminClient,
    orch: &OrchestratorProcess,
    fleet: &Fleet,
    pid: &str,
    n: usize,
    opts: &Opts,
    out: &mut RunResults,
    sim_peak: &mut u64,
) -> Result<Course> {
    let limit = opts.timeout;
    let mut spec = ReleaseSpec::new("2.0.0", 2, opts.image_kib * 1024);
    spec.chunk_bytes = opts.chunk_kib * 1024;
    let artifact = tokio::time::timeout(limit, lab.upload(admin, &spec))
        .await
        .map_err(|_| anyhow!("release upload took longer than {limit:?}"))??;
    let chunk_count = (opts.image_kib as u64).div_ceil(u64::from(opts.chunk_kib));
    let needed = chunk_count * n as u64;
    let metrics = orch.metrics_addr;
    let counter = |name: &'static str| async move {
        match metrics {
            Some(m) => scrape(m, name).await.unwrap_or(0.0),
            None => 0.0,
        }
    };
    let served_before = counter("aloft_chunks_served_total").await;
    let bytes_before = counter("aloft_chunk_bytes_served_total").await;

    let jobs_started_before = fleet.counters.jobs_started.load(Relaxed);
    let created = Instant::now();
    // S3 ends when the last device's final report is acknowledged, which the orchestrator does
    // only once it has recorded it. Watched apart from the loop below, whose status samples
    // came 0.25-0.45 s apart under load: S3 was read up to that much late.
    let mut all_acked = {
        let counters = Arc::clone(&fleet.counters);
        let before = counters.finals_acked.load(Relaxed);
        AbortOnDrop(tokio::spawn(async move {
            while counters.finals_acked.load(Relaxed) - before < n as u64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            created.elapsed()
        }))
    };
    let deadline = tokio::time::Instant::now() + limit;
    let campaign = tokio::time::timeout(
        limit,
        create_rollout(admin, artifact, Target::All, RolloutPolicy::default()),
    )
    .await
    .map_err(|_| anyhow!("campaign creation took longer than {limit:?}"))??;

    // S2 on its own, every 20 ms, before anything slower: the loop below waits for an
    // operator's status call and two metric scrapes each time, which under load took up to a
    // second, and S2 was read at that resolution. The fleet's counter of jobs taken up is
    // polled, and every device's view read only once it says all may have theirs: reading
    // 10,000 views every 20 ms was 3% of the CPU while the jobs went out.
    let mut s2_done = false;
    loop {
        let started = fleet.counters.jobs_started.load(Relaxed) - jobs_started_before;
        let got_job = if started >= n as u64 {
            fleet.count(|v| {
                v.current.as_ref().is_some_and(|(c, _)| c == &campaign)
                    || v.last_finished
                        .as_ref()
                        .is_some_and(|(c, ..)| c == &campaign)
            })
        } else {
            0
        };
        if got_job >= n {
            s2_done = true;
            out.insert(Id::S2, Ok(created.elapsed().as_secs_f64()));
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut samples = Vec::new();
    let mut last_bytes = (0.0, bytes_before);
    let mut next_sample = Duration::ZERO;
    let summary = loop {
        *sim_peak = (*sim_peak).max(rss("self").map_or(0, |r| r.0));
        let t = created.elapsed();
        if t >= next_sample {
            next_sample = t + Duration::from_millis(200);
            let s = status_until(admin, &campaign, deadline).await?;
            let served = counter("aloft_chunks_served_total").await - served_before;
            let bytes = counter("aloft_chunk_bytes_served_total").await;
            // Summed in place: cloning 10,000 devices' views five times a second was 1.5% of
            // the simulator's CPU during S3b, the measurement taking from what it measures.
            let kept = fleet.sum(|v| v.stats.chunks_received);
            let secs = t.as_secs_f64();
            let dt = (secs - last_bytes.0).max(1e-3);
            samples.push(Sample {
                t: secs,
                succeeded: f64::from(s.count(DeviceState::Succeeded)) / n as f64,
                bytes_per_sec: (bytes - last_bytes.1).max(0.0) / dt,
                resent_chunks: (served - kept as f64).max(0.0),
            });
            last_bytes = (secs, bytes);
            let in_flight = s.total - s.count(DeviceState::Idle) - s.terminal();
            let settled = match s.status {
                CampaignStatus::Active => s.total > 0 && s.terminal() == s.total,
                _ => in_flight == 0,
            };
            if settled {
                break s;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let s = status_until(admin, &campaign, deadline + Duration::from_secs(10)).await?;
            if !s2_done {
                out.insert(
                    Id::S2,
                    Err(format!("not every device had its job within {limit:?}")),
                );
            }
            bail!(
                "campaign not over within {limit:?}: {} of {n} succeeded, {:?}",
                s.count(DeviceState::Succeeded),
                s.counts
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A device the orchestrator settled without its final report (a timeout) is never
    // acknowledged: then the status sample that saw the end is when it ended.
    let s3 = if all_acked.0.is_finished() {
        (&mut all_acked.0)
            .await
            .unwrap_or_else(|_| created.elapsed())
    } else {
        created.elapsed()
    }
    .as_secs_f64();
    if !s2_done {
        out.insert(
            Id::S2,
            Err("the campaign ended before every device had its job".into()),
        );
    }
    let ok = summary.count(DeviceState::Succeeded) as usize;
    if ok == n {
        out.insert(Id::S3, Ok(s3));
    } else {
        out.insert(
            Id::S3,
            Err(format!(
                "{} after {s3:.1} s: succeeded={ok} failed={} rolled_back={} of {n}",
                summary.status,
                summary.count(DeviceState::Failed),
                summary.count(DeviceState::RolledBack)
            )),
        );
    }
    let served = counter("aloft_chunks_served_total").await - served_before;
    out.insert(
        Id::S3Resent,
        Ok((served - needed as f64).max(0.0) * 100.0 / needed.max(1) as f64),
    );
    match rss(pid) {
        Some((_, hwm)) => out.insert(Id::S3Rss, Ok(hwm as f64 / 1_048_576.0)),
        None => out.insert(Id::S3Rss, Err("orchestrator gone".into())),
    };
    Ok(Course { samples })
}

/// S1c, then the bare storm against the front (M1a), on a fresh orchestrator from `data_dir`.
pub async fn flood_scenarios(
    lab: &Lab,
    exe: &Path,
    data_dir: &Path,
    devices: &[DeviceIdentity],
    opts: &Opts,
    out: &mut RunResults,
) {
    if let Err(e) = flood_inner(lab, exe, data_dir, devices, opts, out).await {
        for id in [Id::S1c, Id::AloftStorm] {
            if opts.wants(id) {
                out.entry(id).or_insert_with(|| Err(format!("{e:#}")));
            }
        }
    }
}

async fn flood_inner(
    lab: &Lab,
    exe: &Path,
    data_dir: &Path,
    devices: &[DeviceIdentity],
    opts: &Opts,
    out: &mut RunResults,
) -> Result<()> {
    let n = devices.len();
    let limit = opts.timeout;
    let orch = spawn(lab, exe, data_dir, limit).await?;
    let addr = orch.device_addr;
    if opts.wants(Id::S1c) {
        let admin = tokio::time::timeout(limit, lab.operator(addr))
            .await
            .map_err(|_| anyhow!("operator did not connect within {limit:?}"))??;
        let tls = aloft_certs::tls::client_config_without_cert(lab.ca.cert_pem())?;
        let flood = Flood::start(
            addr,
            FLOOD_IDLE,
            FLOOD_HALF_HELLOS,
            Arc::new(tls),
            "localhost",
        )
        .await?;
        let mut cfg = lab.fleet_config(addr);
        cfg.window = opts.window;
        let started = Instant::now();
        let fleet = Fleet::start(&cfg, devices.to_vec())?;
        let registered = wait_registered(&admin, n, limit).await;
        let took = started.elapsed().as_secs_f64();
        let reopened = flood.reopened.load(Relaxed);
        drop(flood);
        out.insert(
            Id::S1c,
            registered
                .map(|()| took)
                .map_err(|e| format!("{e:#} (flood sockets re-opened {reopened} times)")),
        );
        admin.disconnect().await;
        if tokio::time::timeout(Duration::from_secs(60), fleet.shutdown())
            .await
            .is_err()
        {
            eprintln!("bench: the fleet did not stop within 60 s");
        }
    }
    if opts.wants(Id::AloftStorm) {
        let clients = storm_clients(lab.ca.cert_pem(), devices)?;
        let r =
            storm::connect_all(clients, addr, "localhost", opts.connect_concurrency, limit).await;
        out.insert(
            Id::AloftStorm,
            r.map(|(d, _)| d.as_secs_f64())
                .map_err(|e| format!("{e:#}")),
        );
    }
    drop(orch);
    Ok(())
}

/// The orchestrator's data directory before its first start, kept so every scenario group
/// starts from the same state.
pub fn pristine(lab: &Lab) -> Result<PathBuf> {
    let dir = lab.root.join("orchestrator-pristine");
    copy_dir(&lab.data_dir, &dir)?;
    Ok(dir)
}

/// A fresh copy of the pristine data for one orchestrator start.
pub fn fresh_copy(pristine: &Path, name: &str) -> Result<PathBuf> {
    let dir = pristine.with_file_name(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    copy_dir(pristine, &dir)?;
    Ok(dir)
}

/// A task stopped when its handle is dropped: the bench's watchers end with the run that
/// started them, whichever way it ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
