//! `aloft pki revoke | crl | crl-push`: revocation for an operator. `revoke` and `crl` run where
//! the CA key is (they keep `revocations.json` beside it); `crl-push` sends a signed CRL to a
//! running orchestrator, which enforces it at once. `crl` signs with the CA key, sealed as
//! `aloft init` wrote it: it opens like `serve` does (`--unlock-file`, `ALOFT_UNLOCK`, a prompt).

use std::path::PathBuf;

use aloft_certs::revocation::{self, parse_serial_hex, RevocationReason, DEFAULT_NEXT_UPDATE_DAYS};
use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use serde_json::Value;

use super::{print_json, Conn, UnlockArgs};
use crate::admin::client::AdminClient;
use crate::admin::wire::AdminBody;

/// `aloft pki revoke`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("which").required(true).args(["cert", "serial", "device"])))]
pub struct RevokeArgs {
    /// The CA directory (ca.crt; revocations.json and the issuance ledger issued.jsonl are
    /// kept there).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// The certificate to revoke (PEM). For a device certificate, every certificate ever
    /// issued to that device id (renewals included, from the issuance ledger) is revoked.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// The serial number to revoke, hex (colons allowed): that one certificate only.
    #[arg(long)]
    pub serial: Option<String>,
    /// A device id: every certificate the issuance ledger records for it is revoked.
    #[arg(long)]
    pub device: Option<String>,
    /// unspecified, key-compromise, affiliation-changed, superseded, cessation-of-operation.
    #[arg(long, default_value = "unspecified")]
    pub reason: String,
}

/// `aloft pki crl`.
#[derive(Args, Debug)]
pub struct CrlArgs {
    /// The CA directory (ca.crt, the sealed ca.key, revocations.json).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Where to write the signed CRL (PEM); replaced if it exists.
    #[arg(long)]
    pub out: PathBuf,
    /// Days until the CRL's nextUpdate.
    #[arg(long, default_value_t = DEFAULT_NEXT_UPDATE_DAYS)]
    pub next_update_days: u32,
    #[command(flatten)]
    pub unlock: UnlockArgs,
}

/// `aloft pki crl-push`.
#[derive(Args, Debug)]
pub struct CrlPushArgs {
    /// The signed CRL (PEM) from `aloft pki crl`.
    #[arg(long)]
    pub crl: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
}

/// Records a revocation in the CA directory's state (`aloft_certs::revocation` does the work,
/// under the CA directory's lock). Signs nothing: `aloft pki crl` does.
pub fn revoke(args: RevokeArgs) -> Result<()> {
    let reason: RevocationReason = args.reason.parse()?;
    let now = i64::try_from(crate::engine::now_ms() / 1000).unwrap_or(i64::MAX);
    let next = "Sign a new CRL with `aloft pki crl` and push it with `aloft pki crl-push`";
    let (device, serial, subject) = match (&args.cert, &args.serial, &args.device) {
        (Some(path), None, None) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let serial = aloft_certs::cert_serial(&pem)?;
            let identity = aloft_certs::tls::parse_cert(&pem)
                .ok()
                .and_then(|der| aloft_certs::parse_identity(&der).ok());
            let subject = identity
                .as_ref()
                .map(|i| format!("{} {}", i.role.ou(), i.id));
            (identity.and_then(|i| i.device_id()), Some(serial), subject)
        }
        (None, Some(hex), None) => (None, Some(parse_serial_hex(hex)?), None),
        (None, None, Some(id)) => (Some(aloft_proto::DeviceId::new(id.as_str())?), None, None),
        _ => bail!("give exactly one of --cert, --serial and --device"),
    };
    if let Some(device) = device {
        let done =
            revocation::revoke_device(&args.ca_dir, &device, serial.as_deref(), reason, now)?;
        if done.newly.is_empty() && done.already == 0 {
            bail!("the issuance ledger records no certificate for {device}; revoke by --cert or --serial");
        }
        println!(
            "revoked device {device} ({reason}): {} certificates newly revoked [{}], {} already; {} revoked in all. {next}",
            done.newly.len(),
            done.newly.join(", "),
            done.already,
            done.total
        );
        return Ok(());
    }
    let Some(serial) = serial else {
        bail!("nothing to revoke");
    };
    let (added, total) =
        revocation::revoke_serial(&args.ca_dir, &serial, reason, subject.clone(), now)?;
    let serial_hex = hex::encode(&serial);
    if added {
        println!(
            "revoked {serial_hex}{} ({reason}); {total} revoked in all. {next}",
            subject.map(|s| format!(" [{s}]")).unwrap_or_default(),
        );
    } else {
        println!("{serial_hex} was already revoked; nothing changed");
    }
    Ok(())
}

/// Signs a CRL of every revocation so far, numbered one above the last, and writes it.
pub fn crl(args: CrlArgs) -> Result<()> {
    let ca = crate::ops::load_ca(&args.ca_dir, &args.unlock.obtain("the fleet CA key")?)?;
    // Under the CA directory's lock, so a concurrent `pki revoke` or renewal is not lost; the
    // number is spent once the state says so, and a CRL is written only after that, so two
    // CRLs never share a number.
    let (pem, state) = aloft_certs::revocation::sign_next_crl(
        &args.ca_dir,
        &ca,
        args.next_update_days,
        time::OffsetDateTime::now_utc(),
    )?;
    aloft_certs::revocation::write_file_atomically(&args.out, pem.as_bytes(), 0o644)?;
    println!(
        "crl number {} ({} revoked, next update in {} days) written to {}",
        state.crl_number,
        state.revoked.len(),
        args.next_update_days,
        args.out.display()
    );
    Ok(())
}

/// Sends a CRL to the orchestrator, which verifies and enforces it.
pub async fn crl_push(args: CrlPushArgs) -> Result<()> {
    let crl = std::fs::read_to_string(&args.crl)
        .with_context(|| format!("reading {}", args.crl.display()))?;
    let client = AdminClient::connect(&args.conn.profile, &args.conn.server).await?;
    let v: Value = client.call(AdminBody::CrlUpdate { crl }).await?;
    print_json(&v)?;
    client.disconnect().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use clap::Parser;

    use super::super::{Cli, Command, PkiCommand, UnlockArgs};

    #[test]
    fn revoke_takes_a_certificate_or_a_serial_but_not_both_or_neither() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(["aloft", "pki", "revoke"].iter().chain(args));
        let ok = parse(&[
            "--ca-dir",
            "ca",
            "--serial",
            "4a01",
            "--reason",
            "key-compromise",
        ])
        .unwrap();
        let Command::Pki(PkiCommand::Revoke(a)) = ok.command else {
            panic!("not a revoke");
        };
        assert_eq!(a.serial.as_deref(), Some("4a01"));
        assert!(parse(&["--ca-dir", "ca", "--cert", "a.crt"]).is_ok());
        assert!(parse(&["--ca-dir", "ca"]).is_err());
        assert!(parse(&["--ca-dir", "ca", "--cert", "a.crt", "--serial", "01"]).is_err());
    }

    #[test]
    fn crl_takes_the_secret_of_the_sealed_ca_key() {
        let parse = |args: &[&str]| Cli::try_parse_from(["aloft", "pki", "crl"].iter().chain(args));
        let ok = parse(&["--ca-dir", "ca", "--out", "crl.pem", "--unlock-file", "u"]).unwrap();
        let Command::Pki(PkiCommand::Crl(a)) = ok.command else {
            panic!("not a crl");
        };
        assert_eq!(a.unlock.unlock_file.as_deref(), Some(Path::new("u")));
    }

    /// The CA directory `aloft init` writes: the key sealed, the secret in an unlock file.
    fn sealed_ca_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let recovery = aloft_vault::RecoveryKey::generate().unwrap();
        crate::ops::init(
            &dir.path().join("data"),
            "t",
            &[],
            &aloft_vault::Protection::recovery_key(recovery.clone()),
        )
        .unwrap();
        let unlock = dir.path().join("unlock");
        std::fs::write(&unlock, recovery.to_hex().as_bytes()).unwrap();
        (dir, unlock)
    }

    #[test]
    fn revoke_then_crl_on_an_initialized_data_directory_writes_crls_with_growing_numbers() {
        let (tmp, unlock) = sealed_ca_dir();
        let dir = tmp.path().join("data").join("pki");
        let ca_pem = std::fs::read_to_string(dir.join(aloft_certs::CA_CERT_FILE)).unwrap();
        let out = tmp.path().join("crl.pem");
        let crl = |n: u32| super::CrlArgs {
            ca_dir: dir.clone(),
            out: out.clone(),
            next_update_days: n,
            unlock: UnlockArgs {
                unlock_file: Some(unlock.clone()),
            },
        };
        super::revoke(super::RevokeArgs {
            ca_dir: dir.clone(),
            cert: None,
            serial: Some("4a:01".into()),
            device: None,
            reason: "key-compromise".into(),
        })
        .unwrap();
        super::crl(crl(7)).unwrap();
        let first = std::fs::read_to_string(&out).unwrap();
        let first = aloft_certs::revocation::VerifiedCrl::parse(&first, &ca_pem).unwrap();
        super::crl(crl(7)).unwrap();
        let second = std::fs::read_to_string(&out).unwrap();
        let second = aloft_certs::revocation::VerifiedCrl::parse(&second, &ca_pem).unwrap();
        assert_eq!((first.number, second.number), (1, 2));
        assert!(second.is_revoked(&[0x4a, 0x01]));
        assert!(super::revoke(super::RevokeArgs {
            ca_dir: dir.clone(),
            cert: None,
            serial: Some("01".into()),
            device: None,
            reason: "stolen".into(),
        })
        .is_err());
    }
}
