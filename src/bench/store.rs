//! S5: durable state transitions per second on the orchestrator's real store, on a real disk,
//! written the way the engine writes them: batches of up to [`BATCH`] progress records,
//! one flush per batch, and a batch counts only once its flush returned (ack after flush).
//! S5pg: the same on the PostgreSQL store, in a throwaway cluster on the same disk (default
//! settings: `fsync` and `synchronous_commit` on, so a flush waits for the WAL on disk).

use std::path::Path;
use std::time::{Duration, Instant};

use aloft_orchestrator::fleet::state::Progress;
use aloft_orchestrator::store::pg_cluster::TempCluster;
use aloft_orchestrator::store::{Store, StoreLocation};
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
