//! Where a binary gets the secret that opens its sealed files, in this order: an explicit
//! `--unlock-file PATH`, the `ALOFT_UNLOCK` environment variable (same content), a prompt when
//! stdin is a terminal. Anything else is an error that says how to provide it: a service must
//! never start without its keys, nor hang waiting for input nobody can type.

use std::io::IsTerminal;
use std::path::Path;

use zeroize::Zeroizing;

use crate::keys::{Passphrase, Unlock};
use crate::VaultError;

/// The environment variable holding a passphrase or a recovery key.
pub const UNLOCK_ENV: &str = "ALOFT_UNLOCK";

fn from_env() -> Result<Option<Unlock>, VaultError> {
    match std::env::var(UNLOCK_ENV) {
        Ok(v) => {
            let v = Zeroizing::new(v);
            Unlock::parse(&v).map(Some)
        }
        Err(_) => Ok(None),
    }
}

fn prompt(text: &str) -> Result<Zeroizing<String>, VaultError> {
    rpassword::prompt_password(text)
        .map(Zeroizing::new)
        .map_err(VaultError::Prompt)
}

/// The secret that opens `what` (named in the prompt), from the first source that has one.
pub fn obtain(unlock_file: Option<&Path>, what: &str) -> Result<Unlock, VaultError> {
    if let Some(path) = unlock_file {
        return Unlock::from_file(path);
    }
    if let Some(u) = from_env()? {
        return Ok(u);
    }
    if std::io::stdin().is_terminal() {
        let text = prompt(&format!("passphrase or recovery key for {what}: "))?;
        return Unlock::parse(&text);
    }
    Err(VaultError::NoUnlock)
}

/// A passphrase for a new file, from the same sources as [`obtain`]; a terminal asks twice. A
/// source holding a recovery key is refused: new files always get a fresh recovery key.
pub fn new_passphrase(unlock_file: Option<&Path>, what: &str) -> Result<Passphrase, VaultError> {
    let (unlock, source) = if let Some(path) = unlock_file {
        (Unlock::from_file(path)?, path.display().to_string())
    } else if let Some(u) = from_env()? {
        (u, UNLOCK_ENV.to_owned())
    } else if std::io::stdin().is_terminal() {
        let first = prompt(&format!("new passphrase for {what}: "))?;
        let second = prompt("again: ")?;
        if first != second {
            return Err(VaultError::PassphraseMismatch);
        }
        (Unlock::parse(&first)?, "the terminal".to_owned())
    } else {
        return Err(VaultError::NoUnlock);
    };
    match unlock {
        Unlock::Passphrase(p) => {
            p.check_new()?;
            Ok(p)
        }
        Unlock::RecoveryKey(_) => Err(VaultError::RecoveryKeyGiven(source)),
    }
}
