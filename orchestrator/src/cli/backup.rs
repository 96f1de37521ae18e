//! `aloft backup create | restore | inspect`: argument parsing and printing around `backup`.
//! Both `create` and `restore` need the orchestrator stopped (`systemctl stop aloft`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::{NewLockArgs, StoreArgs, UnlockArgs};
use crate::backup;

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Write the whole state of a stopped orchestrator (store, keys as sealed, trust files,
    /// CRL) to one encrypted file. Prints the backup's recovery key once.
    Create {
        /// The data directory to back up.
        #[arg(long, env = "ALOFT_DATA_DIR")]
        data_dir: PathBuf,
        /// The backup file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        lock: NewLockArgs,
    },
    /// Restore a backup into a data directory (new or existing; the orchestrator stopped).
    /// Security state (device floors, report sequence numbers, CRL, root metadata, trust files)
    /// never goes down: the higher of the backup's and the surviving one wins.
    Restore {
        /// The backup file.
        #[arg(long = "in")]
        input: PathBuf,
        /// The data directory to restore into.
        #[arg(long, env = "ALOFT_DATA_DIR")]
        data_dir: PathBuf,
        /// The store to restore into (replaced whole; a PostgreSQL database may be empty).
        #[command(flatten)]
        store: StoreArgs,
        /// The backup's recovery key or passphrase (not the data directory's).
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Print a backup's header: sequence number and creation time. Needs no secret.
    Inspect {
        /// The backup file.
        #[arg(long = "in")]
        input: PathBuf,
    },
}

pub fn run(c: BackupCommand) -> Result<()> {
    match c {
        BackupCommand::Create {
            data_dir,
            out,
            store,
            lock,
        } => {
            let at = store.location(&data_dir)?;
            backup::preflight_at(&data_dir, &at, &out)?;
            let s = lock.seal_with("the backup", &format!("{}", out.display()), |p| {
                Ok(backup::create_at(&data_dir, &at, &out, p)?)
            })?;
            println!(
                "backup {} of {} written to {}: {} files, {} store records, {} bytes",
                s.seq,
                data_dir.display(),
                out.display(),
                s.files,
                s.records,
                s.bytes
            );
        }
        BackupCommand::Restore {
            input,
            data_dir,
            store,
            unlock,
        } => {
            let at = store.location(&data_dir)?;
            let unlock = unlock.obtain("the backup")?;
            let r = backup::restore_at(&input, &data_dir, &at, &unlock)?;
            println!(
                "restored backup {} (taken at unix time {}) into {}: {} files, {} store records",
                r.seq,
                r.created_unix_secs,
                data_dir.display(),
                r.files,
                r.records
            );
            let m = &r.merged;
            if m.floors_raised + m.devices_added + m.progress_kept + m.shared_kept > 0
                || !r.kept_surviving.is_empty()
            {
                println!(
                    "kept newer surviving state: {} device floors, {} devices, {} progress records, {} replicas' shared values, files: {}",
                    m.floors_raised,
                    m.devices_added,
                    m.progress_kept,
                    m.shared_kept,
                    if r.kept_surviving.is_empty() {
                        "-".to_owned()
                    } else {
                        r.kept_surviving.join(", ")
                    }
                );
            }
            if let Some(p) = &r.previous {
                println!(
                    "the previous contents are in {}; delete it once the orchestrator runs",
                    p.display()
                );
            }
            if let Some(p) = &r.previous_store {
                println!(
                    "the database's previous records are in {} (a sled store); delete it once the orchestrator runs",
                    p.display()
                );
            }
            println!(
                "start the orchestrator with the data directory's passphrase or recovery key as it was when the backup was taken"
            );
        }
        BackupCommand::Inspect { input } => {
            let h = backup::inspect(&input)?;
            println!(
                "backup {} taken at unix time {} ({} byte segments)",
                h.seq, h.created_unix_secs, h.segment_bytes
            );
        }
    }
    Ok(())
}
