//! S5: durable state transitions per second on the orchestrator's real store, on a real disk,
//! written the way the engine writes them: batches of up to [`BATCH`] progress records,
//! one flush per batch, and a batch counts only once its flush returned (ack after flush).
//! S5pg: the same on the PostgreSQL store, in a throwaway cluster on the same disk (default
//! settings: `fsync` and `synchronous_commit` on, so a flush waits for the WAL on disk).
//! S5inbox: the same through the replicas' inbox (issue 12): `intakes` replicas' inbox
//! writers insert status messages as fast as their queues take them, and one applier (the
//! leader's part: the inbox reader, then per row a progress write and the row's deletion, one
//! commit per batch) makes them durable; counted at the applier.

use std::path::Path;
use std::time::{Duration, Instant};

use aloft_orchestrator::fleet::state::Progress;
use aloft_orchestrator::inbound::Inbound;
use aloft_orchestrator::metrics::Metrics;
use aloft_orchestrator::replica::inbox::{InboxReader, InboxWriter};
use aloft_orchestrator::store::pg_cluster::TempCluster;
use aloft_orchestrator::store::{Sharing, Store, StoreLocation};
use aloft_proto::{CampaignId, DeviceId, DeviceState};
use aloft_vault::MasterKey;
use anyhow::Result;

/// Records per flush: the engine's `BATCH_MAX` as of protocol 1.3. A copy rather than an import,
/// so that a rewrite of the engine that renames it does not break the bench.
pub const BATCH: usize = 256;

/// Writes transitions for `devices` devices in batches of [`BATCH`] for about `duration`
/// into a fresh store under `dir`, and returns the transitions made durable per second.
pub fn transitions_per_sec(dir: &Path, devices: usize, duration: Duration) -> Result<f64> {
    let at = StoreLocation::Sled(dir.join("s5-store"));
    transitions_per_sec_at(&at, devices, duration)
}

/// S5pg: [`transitions_per_sec`] into a new database of a throwaway PostgreSQL cluster.
pub fn postgres_transitions_per_sec(devices: usize, duration: Duration) -> Result<f64> {
    let cluster = TempCluster::start()?;
    let at = StoreLocation::Postgres(cluster.create_database("s5")?);
    transitions_per_sec_at(&at, devices, duration)
}

fn transitions_per_sec_at(at: &StoreLocation, devices: usize, duration: Duration) -> Result<f64> {
    let store = Store::create_at(at, MasterKey::generate()?)?;
    let campaign = CampaignId::new("bench-s5")?;
    let ids: Vec<DeviceId> = (0..devices.max(1))
        .map(|n| DeviceId::new(format!("dev-{n:05}")))
        .collect::<Result<_, _>>()?;
    let mut progress = Progress::new(0);
    let start = Instant::now();
    let mut done = 0u64;
    let mut next = 0usize;
    while start.elapsed() < duration {
        for _ in 0..BATCH {
            let id = &ids[next % ids.len()];
            // Each device walks through the states in turn, as a campaign moves it.
            progress.state = DeviceState::ALL[(next / ids.len()) % DeviceState::ALL.len()];
            progress.last_seq = progress.last_seq.wrapping_add(1);
            progress.updated_ms = start.elapsed().as_millis() as u64;
            store.put_progress(&campaign, id, &progress)?;
            next += 1;
        }
        store.flush()?;
        done += BATCH as u64;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// S5inbox: transitions made durable per second through the replicas' inbox, with `intakes`
/// replicas writing it and one applier, for about `duration` (see the module docs).
pub fn inbox_transitions_per_sec(
    intakes: usize,
    devices: usize,
    duration: Duration,
) -> Result<f64> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let cluster = TempCluster::start()?;
    let url = cluster.create_database("s5inbox")?;
    let at = StoreLocation::Postgres(url.clone());
    let key = MasterKey::generate()?;
    drop(Store::create_at(&at, key.clone())?);
    let store = Store::open_sharing(&at, key, Sharing::Replica)?;
    let metrics = Metrics::new(None, None);
    let ids: Vec<DeviceId> = (0..devices.max(1))
        .map(|n| DeviceId::new(format!("dev-{n:05}")))
        .collect::<Result<_, _>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let intakes = intakes.max(1);
    for r in 0..intakes {
        let writer = InboxWriter::start(&url, format!("r{r}"), metrics.clone())?;
        let (stop, ids) = (stop.clone(), ids.clone());
        rt.spawn(async move {
            let payload = bytes::Bytes::from_static(
                br#"{"v":1,"campaign":"bench-s5","seq":1,"state":"downloading"}"#,
            );
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                let topic = aloft_proto::topics::status(&ids[i % ids.len()]);
                if !writer.message(topic, payload.clone()).await {
                    break;
                }
                i += intakes;
            }
        });
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(8192);
    let reader = InboxReader::start(&url, tx, metrics)?;
    let campaign = CampaignId::new("bench-s5")?;
    let mut progress = Progress::new(0);
    progress.state = DeviceState::Downloading;
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < duration {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        for ev in &batch {
            if let Inbound::Inbox(row) = ev {
                store.consume_inbox(row.id)?;
                progress.last_seq = progress.last_seq.wrapping_add(1);
                let id = &ids[row.id.unsigned_abs() as usize % ids.len()];
                store.put_progress(&campaign, id, &progress)?;
            }
        }
        store.flush()?;
        done += batch.len() as u64;
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    drop(reader);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(rate)
}
