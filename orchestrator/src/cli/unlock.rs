//! The flags that say where a command gets the secret of sealed files: `--unlock-file` to open
//! existing ones (else `ALOFT_UNLOCK`, else a prompt), and `--no-passphrase` for new ones.

use std::path::PathBuf;

use aloft_vault::{Protection, Unlock};
use anyhow::{Context, Result};
use clap::Args;

use crate::ops::{new_protection, print_recovery_key};

/// Opens existing sealed files.
#[derive(Args, Debug, Clone, Default)]
#[command(about = None, long_about = None)]
pub struct UnlockArgs {
    /// File holding the passphrase or the 64-hex-digit recovery key [else $ALOFT_UNLOCK, else a
    /// prompt on a terminal].
    #[arg(long)]
    pub unlock_file: Option<PathBuf>,
}

impl UnlockArgs {
    pub fn obtain(&self, what: &str) -> Result<Unlock> {
        aloft_vault::obtain(self.unlock_file.as_deref(), what)
            .with_context(|| format!("unlocking {what}"))
    }
}

/// Locks new sealed files: a fresh recovery key, shown once after the files exist, plus a
/// passphrase unless `--no-passphrase`.
#[derive(Args, Debug, Clone, Default)]
#[command(about = None, long_about = None)]
pub struct NewLockArgs {
    /// File holding the new passphrase [else $ALOFT_UNLOCK, else a prompt on a terminal].
    #[arg(long)]
    pub unlock_file: Option<PathBuf>,
    /// No passphrase: the recovery key shown now (on stderr) is the only way to open the files.
    #[arg(long)]
    pub no_passphrase: bool,
}

impl NewLockArgs {
    /// Makes the protection for new files, runs `write` with it, and only when that succeeded
    /// shows the new recovery key (naming what it `opens`).
    pub fn seal_with<T>(
        &self,
        what: &str,
        opens: &str,
        write: impl FnOnce(&Protection) -> Result<T>,
    ) -> Result<T> {
        let (protection, recovery) =
            new_protection(self.unlock_file.as_deref(), self.no_passphrase, what)?;
        let done = write(&protection)?;
        print_recovery_key(&recovery, opens);
        Ok(done)
    }
}
