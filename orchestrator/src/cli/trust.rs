//! `aloft trust`: the root of trust, offline. Root keys sign root metadata; release keys sign
//! manifests. Making a new root is three steps any number of people can share: `root-new`
//! writes it unsigned, each key holder runs `sign` on the file, then `install` (before the
//! first `serve`) or `push` (to a running orchestrator) — which refuse it unless the thresholds
//! of the old and the new root both signed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aloft_proto::manifest::ReleasePublicKey;
use aloft_proto::trust::{Role, Root, SignedRoot, ROOT_FORMAT};
use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::{call_and_print, print_json, Conn, NewLockArgs, UnlockArgs};
use crate::admin::wire::AdminBody;
use crate::ops::{install_roots, read_root, read_signing_key, write_signing_key};

#[derive(Subcommand, Debug)]
pub enum TrustCommand {
    /// Generate a signing key for a root or release role (sealed, file mode 0600). Prints its
    /// public key alone on stdout; its key id and the key file's recovery key go to stderr.
    Keygen {
        /// The key file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        lock: NewLockArgs,
    },
    /// Write new root metadata, unsigned. With `--from`, the version is the next one and keys,
    /// roles and revocations are carried over unless given again.
    RootNew {
        /// The root metadata file to write (JSON).
        #[arg(long)]
        out: PathBuf,
        /// The root this one follows.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Root role keys (public, 64 hex digits); repeat. Replaces the inherited set.
        #[arg(long = "root-key")]
        root_keys: Vec<String>,
        /// Root keys that must sign the next root [default: inherited with --from, else 1].
        #[arg(long)]
        root_threshold: Option<u32>,
        /// Release role keys (public); repeat. Replaces the inherited set.
        #[arg(long = "release-key")]
        release_keys: Vec<String>,
        /// Release keys that must sign a release [default: inherited with --from, else 1].
        #[arg(long)]
        release_threshold: Option<u32>,
        /// Keys revoked from now on, for every role (public key or key id); repeat. Revocations
        /// are never undone.
        #[arg(long = "revoke")]
        revoke: Vec<String>,
        /// Days until devices and the orchestrator refuse this root as expired.
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
    },
    /// Add a signature to a root file (in place). Each root key holder runs this in turn.
    Sign {
        /// The root metadata file to sign (in place).
        #[arg(long)]
        root: PathBuf,
        /// Signing key file (from `trust keygen`).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Print a root file's metadata (signatures not checked).
    Show {
        /// The root metadata file.
        root: PathBuf,
    },
    /// Install root metadata into a data directory before `aloft serve` (the first install pins
    /// the lowest version given).
    Install {
        /// The data directory `aloft init` made.
        #[arg(long, env = "ALOFT_DATA_DIR")]
        data_dir: PathBuf,
        /// Root metadata files (signed), in any order.
        roots: Vec<PathBuf>,
    },
    /// Send new root metadata to a running orchestrator.
    Push {
        /// Root metadata files (signed), in any order.
        roots: Vec<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The root a running orchestrator trusts.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
}

fn unix_now() -> u64 {
    super::rollout::unix_now()
}

fn public(hex: &str) -> Result<ReleasePublicKey> {
    ReleasePublicKey::from_hex(hex)
        .map_err(|_| anyhow::anyhow!("{hex:?} is not a 64-hex-digit Ed25519 public key"))
}

/// Builds the next root from `from` (or a first one) and the flags.
#[allow(clippy::too_many_arguments)]
pub fn new_root(
    from: Option<&Root>,
    root_keys: &[String],
    root_threshold: Option<u32>,
    release_keys: &[String],
    release_threshold: Option<u32>,
    revoke: &[String],
    expires_days: u64,
    now: u64,
) -> Result<Root> {
    let role = |keys: &[String],
                threshold: Option<u32>,
                inherited: Option<&Role>|
     -> Result<(Role, Vec<ReleasePublicKey>)> {
        if keys.is_empty() {
            let Some(r) = inherited else {
                bail!("a first root needs --root-key and --release-key");
            };
            let mut r = r.clone();
            if let Some(t) = threshold {
                r.threshold = t;
            }
            return Ok((r, Vec::new()));
        }
        let parsed = keys.iter().map(|k| public(k)).collect::<Result<Vec<_>>>()?;
        let role = Role {
            keyids: parsed.iter().map(ReleasePublicKey::key_id).collect(),
            threshold: threshold.unwrap_or(1),
        };
        Ok((role, parsed))
    };
    let (root_role, root_pub) = role(root_keys, root_threshold, from.map(|r| &r.root))?;
    let (release_role, release_pub) =
        role(release_keys, release_threshold, from.map(|r| &r.release))?;
    let mut revoked = from.map(|r| r.revoked.clone()).unwrap_or_default();
    for k in revoke {
        // A public key (64 hex digits) or its key id (16).
        let id = if k.len() == 64 {
            public(k)?.key_id()
        } else {
            k.clone()
        };
        if !revoked.contains(&id) {
            revoked.push(id);
        }
    }
    // Keys: those the roles use, plus revoked ones still known (so a device can tell a revoked
    // signature from an unknown one).
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    if let Some(prev) = from {
        for id in prev
            .root
            .keyids
            .iter()
            .chain(&prev.release.keyids)
            .chain(&revoked)
        {
            if let Some(hex) = prev.keys.get(id) {
                keys.insert(id.clone(), hex.clone());
            }
        }
    }
    for k in root_pub.iter().chain(&release_pub) {
        keys.insert(k.key_id(), k.to_hex());
    }
    let used: Vec<&String> = root_role
        .keyids
        .iter()
        .chain(&release_role.keyids)
        .collect();
    keys.retain(|id, _| used.contains(&id) || revoked.contains(id));
    let root = Root {
        v: ROOT_FORMAT,
        version: from.map_or(1, |r| r.version + 1),
        issued_at: now,
        expires_at: now + expires_days * 86_400,
        keys,
        root: root_role,
        release: release_role,
        revoked,
    };
    root.validate()?;
    Ok(root)
}

fn write_json(path: &Path, signed: &SignedRoot) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(signed)?;
    aloft_vault::write_atomic(path, &bytes, 0o644, true)
        .with_context(|| format!("writing {}", path.display()))
}

pub async fn run(c: TrustCommand) -> Result<()> {
    match c {
        TrustCommand::Keygen { out, lock } => {
            if out.symlink_metadata().is_ok() {
                bail!("{} already exists", out.display());
            }
            let key = aloft_proto::manifest::ReleaseSigningKey::generate()?;
            lock.seal_with("the root key", &format!("{}", out.display()), |p| {
                write_signing_key(&out, &key, p)
            })?;
            let p = key.public();
            // Only the public key on stdout, so that `$(aloft trust keygen ...)` is the key to
            // name in a root; the recovery key went to stderr.
            println!("{}", p.to_hex());
            eprintln!(
                "signing key {} written to {}; keep it offline",
                p.key_id(),
                out.display()
            );
        }
        TrustCommand::RootNew {
            out,
            from,
            root_keys,
            root_threshold,
            release_keys,
            release_threshold,
            revoke,
            expires_days,
        } => {
            let prev = match &from {
                Some(p) => Some(read_root(p)?.peek_unverified()?),
                None => None,
            };
            let root = new_root(
                prev.as_ref(),
                &root_keys,
                root_threshold,
                &release_keys,
                release_threshold,
                &revoke,
                expires_days,
                unix_now(),
            )?;
            write_json(&out, &SignedRoot::new(&root))?;
            eprintln!(
                "root version {} written unsigned to {}; it needs {} root signature(s) of its own{}",
                root.version,
                out.display(),
                root.root.threshold,
                prev.map(|p| format!(" and {} of version {}", p.root.threshold, p.version))
                    .unwrap_or_default()
            );
        }
        TrustCommand::Sign { root, key, unlock } => {
            let mut signed = read_root(&root)?;
            let key = read_signing_key(&key, &unlock.obtain("the root key")?)?;
            signed.sign(&key)?;
            write_json(&root, &signed)?;
            println!(
                "{} now carries {} signature(s)",
                root.display(),
                signed.signatures.len()
            );
        }
        TrustCommand::Show { root } => {
            print_json(&read_root(&root)?.peek_unverified()?)?;
        }
        TrustCommand::Install { data_dir, roots } => {
            let roots = roots
                .iter()
                .map(|p| read_root(p))
                .collect::<Result<Vec<_>>>()?;
            let v = install_roots(&data_dir, roots)?;
            println!("the orchestrator trusts root version {v} (restart it to apply)");
        }
        TrustCommand::Push { roots, conn } => {
            let roots = roots
                .iter()
                .map(|p| read_root(p))
                .collect::<Result<Vec<_>>>()?;
            call_and_print(&conn, AdminBody::TrustUpdate { roots }).await?;
        }
        TrustCommand::Status { conn } => {
            call_and_print(&conn, AdminBody::TrustStatus {}).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_proto::manifest::ReleaseSigningKey;
    use aloft_proto::trust::TrustedRoot;

    #[test]
    fn a_rotation_made_with_the_cli_functions_walks_forward() {
        let (r1, r2, rel, rel2) = (
            ReleaseSigningKey::generate().unwrap(),
            ReleaseSigningKey::generate().unwrap(),
            ReleaseSigningKey::generate().unwrap(),
            ReleaseSigningKey::generate().unwrap(),
        );
        let hex = |k: &ReleaseSigningKey| k.public().to_hex();
        let v1 = new_root(None, &[hex(&r1)], None, &[hex(&rel)], None, &[], 30, 1_000).unwrap();
        let mut s1 = SignedRoot::new(&v1);
        s1.sign(&r1).unwrap();
        let mut trusted = TrustedRoot::pin(s1).unwrap();
        // Rotate the root key and replace the release key, revoking the old one.
        let v2 = new_root(
            Some(&v1),
            &[hex(&r2)],
            None,
            &[hex(&rel2)],
            None,
            &[rel.public().key_id()],
            30,
            2_000,
        )
        .unwrap();
        assert_eq!(v2.version, 2);
        assert!(
            v2.keys.contains_key(&rel.public().key_id()),
            "revoked keys stay known"
        );
        let mut s2 = SignedRoot::new(&v2);
        s2.sign(&r2).unwrap();
        assert!(
            trusted.clone().update(&[s2.clone()]).is_err(),
            "the old root key must sign too"
        );
        s2.sign(&r1).unwrap();
        assert_eq!(trusted.update(&[s2]).unwrap(), 1);
        // Inheriting keeps the roles and the revocation.
        let v3 = new_root(Some(&v2), &[], Some(1), &[], None, &[], 30, 3_000).unwrap();
        assert_eq!(
            (v3.version, &v3.release, &v3.revoked),
            (3, &v2.release, &v2.revoked)
        );
        assert!(new_root(None, &[], None, &[], None, &[], 30, 0).is_err());
    }
}
