//! (1.5) The `release build` flags that put device preconditions into the signed manifest.

use anyhow::{bail, Result};
use clap::Args;

use aloft_proto::precondition::{InstallWindow, Preconditions};

/// Device preconditions, signed into the manifest (PROTOCOL.md §4.4). A device that does not
/// meet them reports `deferred` and installs once they hold.
#[derive(Args, Debug, Clone, Default)]
#[command(about = None, long_about = None)]
pub struct PreconditionArgs {
    /// (1.5) Install only at this battery charge in percent (1-100) or above, or on external
    /// power.
    #[arg(long, value_name = "PERCENT")]
    pub min_battery: Option<u8>,
    /// (1.5) Install only while the device is not in active use.
    #[arg(long)]
    pub not_in_use: bool,
    /// (1.5) Install only inside this daily window of the device's local time, `HH:MM-HH:MM`
    /// (it may wrap midnight: `22:00-04:00`).
    #[arg(long, value_name = "HH:MM-HH:MM")]
    pub install_window: Option<String>,
    /// (1.5) Install only with at least this many bytes of free storage.
    #[arg(long, value_name = "BYTES")]
    pub min_free_bytes: Option<u64>,
    /// (1.5) On a metered link, download only if at most this many bytes remain to download;
    /// otherwise wait for an unmetered link.
    #[arg(long, value_name = "BYTES")]
    pub max_metered_bytes: Option<u64>,
    /// (1.5) Check the install conditions before downloading as well, not only before
    /// installing (needs at least one of them).
    #[arg(long)]
    pub check_before_download: bool,
}

impl PreconditionArgs {
    /// The manifest's `preconditions`: `None` when no flag was given, so the manifest stays
    /// byte-for-byte what a 1.4 device reads.
    pub fn to_manifest(&self) -> Result<Option<Preconditions>> {
        let install_window = match &self.install_window {
            Some(w) => Some(InstallWindow::parse(w).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let p = Preconditions {
            min_battery_pct: self.min_battery,
            not_in_use: self.not_in_use,
            install_window,
            min_free_bytes: self.min_free_bytes,
            max_metered_bytes: self.max_metered_bytes,
            check_before_download: self.check_before_download,
        };
        if p.is_empty() {
            if p.check_before_download {
                bail!("--check-before-download needs a precondition to check");
            }
            return Ok(None);
        }
        p.validate().map_err(anyhow::Error::msg)?;
        Ok(Some(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flag_means_no_preconditions_and_bad_values_are_refused() {
        assert_eq!(PreconditionArgs::default().to_manifest().unwrap(), None);
        let args = PreconditionArgs {
            min_battery: Some(30),
            install_window: Some("01:00-05:00".into()),
            check_before_download: true,
            ..Default::default()
        };
        let p = args.to_manifest().unwrap().unwrap();
        assert_eq!(p.min_battery_pct, Some(30));
        assert_eq!(p.install_window.unwrap().to_string(), "01:00-05:00");
        for bad in [
            PreconditionArgs {
                min_battery: Some(101),
                ..Default::default()
            },
            PreconditionArgs {
                install_window: Some("1-5".into()),
                ..Default::default()
            },
            PreconditionArgs {
                check_before_download: true,
                ..Default::default()
            },
        ] {
            assert!(bad.to_manifest().is_err(), "{bad:?}");
        }
    }
}
