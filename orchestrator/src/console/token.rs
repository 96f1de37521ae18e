//! Viewer tokens for the console: minted by `aloft console token` from the data directory,
//! checked by `aloft serve`. A token reads the console and nothing else: it is accepted by no
//! other interface and names no role but viewer.
//!
//! Form: `v1.<expires, Unix s>.<nonce, 32 hex>.<HMAC-SHA256, 64 hex>` over
//! `aloft-console-token-v1|viewer|<expires>|<nonce>`, keyed with HMAC(master key,
//! `aloft-console-token-key-v1`): the keystore's master key, which only the holder of the data
//! directory's unlock secret can open, never leaves the machine and is not derivable from the
//! token. A token carries nothing but its expiry and a random nonce. It lives at most
//! [`MAX_TTL_SECS`]; there is no revocation list, so short lifetimes are the revocation.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// The longest lifetime a token may have (and `aloft console token --ttl` may ask for).
pub const MAX_TTL_SECS: u64 = 24 * 3600;
/// `aloft console token`'s default lifetime.
pub const DEFAULT_TTL_SECS: u64 = 3600;
/// Longer strings are refused before any parsing.
const MAX_TOKEN_LEN: usize = 160;

/// The key tokens are MAC'd with, derived from the store's master key.
#[derive(Clone)]
pub struct TokenKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length: this cannot fail.
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts any key length"),
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

impl TokenKey {
    pub fn derive(master: &aloft_vault::MasterKey) -> Self {
        let k = master.to_bytes();
        Self(Zeroizing::new(mac(
            &k[..],
            &[b"aloft-console-token-key-v1"],
        )))
    }

    #[cfg(test)]
    fn from_bytes(b: [u8; 32]) -> Self {
        Self(Zeroizing::new(b))
    }

    fn tag(&self, expires: u64, nonce: &str) -> [u8; 32] {
        mac(
            &self.0[..],
            &[
                b"aloft-console-token-v1|viewer|",
                expires.to_string().as_bytes(),
                b"|",
                nonce.as_bytes(),
            ],
        )
    }

    /// A viewer token valid until `now + ttl` (ttl capped at [`MAX_TTL_SECS`]).
    pub fn mint(&self, now: u64, ttl_secs: u64) -> Result<String, getrandom::Error> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce)?;
        let nonce = hex::encode(nonce);
        let expires = now.saturating_add(ttl_secs.min(MAX_TTL_SECS));
        let tag = hex::encode(self.tag(expires, &nonce));
        Ok(format!("v1.{expires}.{nonce}.{tag}"))
    }

    /// The token's expiry (Unix s) if it is ours, unexpired, and not longer-lived than any
    /// token we mint; else why not.
    pub fn check(&self, token: &str, now: u64) -> Result<u64, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some("v1"), Some(expires), Some(nonce), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Malformed);
        }
        let tag = hex::decode(tag).map_err(|_| TokenError::Malformed)?;
        let want = self.tag(expires, nonce);
        if !bool::from(want.as_slice().ct_eq(tag.as_slice())) {
            return Err(TokenError::BadSignature);
        }
        if expires <= now {
            return Err(TokenError::Expired);
        }
        if expires > now.saturating_add(MAX_TTL_SECS) {
            return Err(TokenError::TooLong);
        }
        Ok(expires)
    }
}

/// Why a token was refused (counted by reason; the client is told only "unauthorized").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    BadSignature,
    Expired,
    TooLong,
}

impl TokenError {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenError::Malformed => "token_malformed",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired => "token_expired",
            TokenError::TooLong => "token_too_long",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_checks_until_it_expires() {
        let k = TokenKey::from_bytes([7; 32]);
        let t = k.mint(1_000, 60).unwrap();
        assert_eq!(k.check(&t, 1_000), Ok(1_060));
        assert_eq!(k.check(&t, 1_059), Ok(1_060));
        assert_eq!(k.check(&t, 1_060), Err(TokenError::Expired));
    }

    #[test]
    fn the_lifetime_is_capped() {
        let k = TokenKey::from_bytes([7; 32]);
        let t = k.mint(0, u64::MAX).unwrap();
        assert_eq!(k.check(&t, 0), Ok(MAX_TTL_SECS));
    }

    #[test]
    fn another_key_a_changed_expiry_or_garbage_is_refused() {
        let k = TokenKey::from_bytes([7; 32]);
        let other = TokenKey::from_bytes([8; 32]);
        let t = k.mint(1_000, 60).unwrap();
        assert_eq!(other.check(&t, 1_000), Err(TokenError::BadSignature));
        let stretched = t.replacen(".1060.", ".9000.", 1);
        assert_eq!(k.check(&stretched, 1_000), Err(TokenError::BadSignature));
        for bad in [
            "",
            "v1",
            "v2.1060.x.y",
            "v1.1060.00.00",
            "v1.a.b.c.d",
            &"v".repeat(500),
        ] {
            assert_eq!(k.check(bad, 1_000), Err(TokenError::Malformed), "{bad}");
        }
        // A token whose tag is right but whose lifetime no `mint` gives: refused.
        let far = {
            let nonce = "0".repeat(32);
            let expires = 1_000 + MAX_TTL_SECS + 1;
            format!(
                "v1.{expires}.{nonce}.{}",
                hex::encode(k.tag(expires, &nonce))
            )
        };
        assert_eq!(k.check(&far, 1_000), Err(TokenError::TooLong));
    }

    #[test]
    fn the_token_key_depends_on_the_master_key_and_is_not_it() {
        let m = aloft_vault::MasterKey::generate().unwrap();
        let a = TokenKey::derive(&m);
        assert_ne!(&a.0[..], &m.to_bytes()[..]);
        let b = TokenKey::derive(&aloft_vault::MasterKey::generate().unwrap());
        assert_ne!(&a.0[..], &b.0[..]);
        let t = a.mint(0, 60).unwrap();
        assert!(!t.contains(&hex::encode(&m.to_bytes()[..])));
    }
}
