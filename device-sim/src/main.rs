//! `device-sim`: enrolls a simulated fleet (keys and CSRs generated here, certificates issued by
//! the fleet CA), provisions it with a root of trust, and runs it against an orchestrator.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aloft_certs::{FleetCa, Validity};
use aloft_device::identity;
use aloft_device::{Faults, Fleet, FleetConfig};
use aloft_proto::trust::{SignedRoot, TrustedRoot};
use aloft_proto::{DeviceState, SecurityVersion};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "device-sim",
    version,
    about = "Runs N simulated Aloft devices in one process",
    long_about = "Runs N simulated Aloft devices in one process.\n\n\
        Devices trust releases through a root of trust (a JSON SignedRoot, version 1 as a rule) \
        pinned at provisioning: `enroll --root FILE` copies it into the fleet directory, and \
        `run` reads it from there or from `run --root FILE`. Newer roots reach devices inside \
        jobs; each device keeps the newest it accepted in its record."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate keys and CSRs for devices PREFIX-00000 … (the keys never leave DIR).
    Enroll {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value = "dev")]
        prefix: String,
        /// The root of trust to provision (JSON SignedRoot); copied to DIR/root.json once it
        /// verifies, so `run` finds it there.
        #[arg(long, value_name = "FILE")]
        root: Option<PathBuf>,
    },
    /// Lab shortcut: sign every CSR in DIR with the fleet CA in CA_DIR (what `aloft pki
    /// issue-devices` does) and store the CA certificate in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// File holding the passphrase or recovery key of the sealed `ca.key` [else
        /// $ALOFT_UNLOCK, else a prompt on a terminal].
        #[arg(long)]
        unlock_file: Option<PathBuf>,
    },
    /// Run every enrolled device until interrupted.
    Run {
        #[arg(long)]
        dir: PathBuf,
        /// The orchestrator's device listener, or the external broker's; repeat for the nodes
        /// of a broker cluster: devices are spread over them in turn (the n-th enrolled device
        /// on the (n mod count)-th server).
        #[arg(long = "server", default_value = "127.0.0.1:8883")]
        servers: Vec<String>,
        /// The root of trust the devices were provisioned with (JSON SignedRoot): it names the
        /// release keys they accept [default: DIR/root.json, written by `enroll --root`].
        #[arg(long, value_name = "FILE")]
        root: Option<PathBuf>,
        #[arg(long, default_value = "sim-v1")]
        hardware_model: String,
        #[arg(long, default_value = "1.0.0")]
        initial_version: String,
        #[arg(long, default_value_t = 1)]
        initial_security_version: u64,
        #[arg(long, default_value_t = 8)]
        window: u32,
        #[arg(long, default_value_t = 64)]
        connect_concurrency: usize,
        /// A TOML file of faults to inject: a `[faults]` table (as in a scenario file) or the
        /// fields of one at the top level. The flags below override it.
        #[arg(long)]
        faults: Option<PathBuf>,
        #[arg(long)]
        corrupt_chunk_probability: Option<f64>,
        #[arg(long)]
        health_check_failure_probability: Option<f64>,
        /// Seed of every fault draw [default: 1, or the file's].
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    aloft_certs::tls::install_crypto_provider();
    match Cli::parse().command {
        Command::Enroll {
            dir,
            count,
            prefix,
            root,
        } => {
            if let Some(path) = root {
                let (signed, version) = read_root(&path)?;
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let to = dir.join(identity::ROOT_FILE);
                std::fs::write(&to, serde_json::to_vec_pretty(&signed)?)
                    .with_context(|| format!("writing {}", to.display()))?;
                println!("root of trust version {version} pinned in {}", to.display());
            }
            let csrs = identity::enroll(&dir, &prefix, count)?;
            println!(
                "{} devices enrolled; CSRs in {}",
                csrs.len(),
                dir.join(identity::DEVICES_DIR).display()
            );
        }
        Command::Issue {
            dir,
            ca_dir,
            days,
            unlock_file,
        } => {
            // The CA key is sealed (aloft-vault), as `aloft init` writes it.
            let unlock = aloft_vault::obtain(unlock_file.as_deref(), "the fleet CA key")?;
            let key_path = ca_dir.join(aloft_certs::CA_KEY_FILE);
            let key = aloft_vault::open_file(&key_path, &unlock)
                .with_context(|| format!("unsealing {}", key_path.display()))?;
            let cert = std::fs::read_to_string(ca_dir.join(aloft_certs::CA_CERT_FILE))?;
            let ca = FleetCa::from_pem(cert, std::str::from_utf8(&key)?)?;
            let n = identity::issue_all_recorded(&dir, &ca, Validity::days(days), Some(&ca_dir))?;
            println!("issued {n} device certificates");
        }
        Command::Run {
            dir,
            servers,
            root,
            hardware_model,
            initial_version,
            initial_security_version,
            window,
            connect_concurrency,
            faults,
            corrupt_chunk_probability,
            health_check_failure_probability,
            seed,
        } => {
            let mut faults = match &faults {
                Some(path) => read_faults(path)?,
                None => Faults {
                    seed: 1,
                    ..Faults::default()
                },
            };
            if let Some(p) = corrupt_chunk_probability {
                faults.corrupt_chunk_probability = p;
            }
            if let Some(p) = health_check_failure_probability {
                faults.health_check_failure_probability = p;
            }
            if let Some(s) = seed {
                faults.seed = s;
            }
            faults.validate()?;
            let mut addrs = servers
                .iter()
                .map(|server| {
                    server
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                        .with_context(|| format!("--server {server}: expected host:port"))
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter();
            let (host, port) = addrs.next().context("no --server")?;
            let root_path = root.unwrap_or_else(|| dir.join(identity::ROOT_FILE));
            if !root_path.exists() {
                bail!(
                    "no root of trust at {}: pass --root FILE, or enroll with --root",
                    root_path.display()
                );
            }
            let (root, _) = read_root(&root_path)?;
            let (ca_pem, devices) = identity::load(&dir)?;
            if devices.is_empty() {
                bail!("no enrolled devices with certificates in {}", dir.display());
            }
            let mut cfg = FleetConfig::new(host, port, ca_pem, dir);
            cfg.more_servers = addrs.collect();
            cfg.root = Some(root);
            cfg.hardware_model = hardware_model;
            cfg.initial_version = initial_version;
            cfg.initial_security_version = SecurityVersion(initial_security_version);
            cfg.window = window;
            cfg.connect_concurrency = connect_concurrency;
            cfg.faults = faults;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let fleet = Fleet::start(&cfg, devices)?;
                eprintln!(
                    "running {} devices against {}",
                    fleet.len(),
                    servers.join(", ")
                );
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => break,
                        _ = every.tick() => report(&fleet),
                    }
                }
                fleet.shutdown().await;
                anyhow::Ok(())
            })?;
        }
    }
    Ok(())
}

/// Reads a root of trust and checks that it verifies by its own root keys, as a device pinning it
/// would; returns it and its version.
fn read_root(path: &Path) -> Result<(SignedRoot, u64)> {
    // A signed root is its payload (at most 16 KiB, base64) and a few signatures.
    const MAX_FILE_BYTES: u64 = 64 * 1024;
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_FILE_BYTES {
        bail!("{}: {len} bytes is too large for a root", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let signed: SignedRoot = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a signed root (JSON)", path.display()))?;
    let trusted = TrustedRoot::pin(signed.clone())
        .with_context(|| format!("{}: the root does not verify", path.display()))?;
    Ok((signed, trusted.version()))
}

/// Reads a [`Faults`] table from a TOML file: under `[faults]`, or at the top level.
fn read_faults(path: &Path) -> Result<Faults> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let table = match doc.get("faults") {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => doc,
    };
    table
        .try_into()
        .with_context(|| format!("the faults in {}", path.display()))
}

fn report(fleet: &Fleet) {
    let views = fleet.views();
    let connected = views.iter().filter(|(_, v)| v.connected).count();
    let mut by_state = std::collections::BTreeMap::<&str, usize>::new();
    for (_, v) in &views {
        let s = match (&v.current, &v.last_finished) {
            (Some((_, s)), _) => s.as_str(),
            (None, Some((_, s, _, _))) => s.as_str(),
            (None, None) => DeviceState::Idle.as_str(),
        };
        *by_state.entry(s).or_default() += 1;
    }
    eprintln!("connected={connected}/{} {by_state:?}", views.len());
    let c = &fleet.counters;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let faults = [
        ("chunks_corrupted", n(&c.chunks_corrupted)),
        ("link_drops", n(&c.link_drops)),
        ("power_losses", n(&c.power_losses)),
        ("boot_hangs", n(&c.boot_hangs)),
        ("health_check_failures", n(&c.health_check_failures)),
        ("slow_devices", n(&c.slow_devices)),
        ("offline_devices", n(&c.offline_devices)),
        ("unhealthy_devices", n(&c.unhealthy_devices)),
    ];
    if faults.iter().any(|(_, v)| *v > 0) {
        let list: Vec<String> = faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!("faults injected: {}", list.join(" "));
    }
}
