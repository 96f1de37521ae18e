//! Untrusted download origins (protocol 1.5): where a release's sealed chunks live when they are
//! exported as static files, and the origin URL a job may carry. The layout is shared by the
//! exporter (`aloft release export`), which writes it, and the device, which fetches from it,
//! so both derive paths from the same function.
//!
//! Nothing here is trusted: an origin can serve anything, and a device checks every chunk
//! against the signed manifest's digest before it decrypts it (PROTOCOL.md §9.3). TLS to the
//! origin only keeps the bytes private in transit; it says nothing about their integrity.

use crate::ids::ArtifactId;

/// Longest origin URL a job may carry.
pub const MAX_ORIGIN_LEN: usize = 512;

/// Why an origin URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("origin URL must start with https://")]
    NotHttps,
    #[error("origin URL is longer than {MAX_ORIGIN_LEN} bytes")]
    TooLong,
    #[error("origin URL has no host")]
    NoHost,
    #[error(
        "origin URL may not carry a query, a fragment, user info, spaces or control characters"
    )]
    BadChar,
}

/// Checks an origin URL: `https://host[:port][/path]`, printable ASCII, no query, fragment or
/// user info (a chunk's path is appended to it, so those would change its meaning).
pub fn validate_origin(url: &str) -> Result<(), OriginError> {
    if url.len() > MAX_ORIGIN_LEN {
        return Err(OriginError::TooLong);
    }
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(OriginError::NotHttps);
    };
    if url
        .chars()
        .any(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#' | '@' | '\\'))
    {
        return Err(OriginError::BadChar);
    }
    let host = rest.split('/').next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    if host.is_empty() {
        return Err(OriginError::NoHost);
    }
    Ok(())
}

/// The path of chunk `index` of `artifact` inside an export: `<artifact>/chunks/<index>`
/// (decimal). `None` for an artifact id that would leave the directory (`.` or `..`).
pub fn chunk_path(artifact: &ArtifactId, index: u32) -> Option<String> {
    let a = artifact.as_str();
    if a.chars().all(|c| c == '.') {
        return None;
    }
    Some(format!("{a}/chunks/{index}"))
}

/// The path of the signed manifest inside an export: `<artifact>/manifest.json`.
pub fn manifest_path(artifact: &ArtifactId) -> Option<String> {
    let a = artifact.as_str();
    if a.chars().all(|c| c == '.') {
        return None;
    }
    Some(format!("{a}/manifest.json"))
}

/// The URL of chunk `index` of `artifact` at `origin` (one slash between them).
pub fn chunk_url(origin: &str, artifact: &ArtifactId, index: u32) -> Option<String> {
    let path = chunk_path(artifact, index)?;
    Some(format!("{}/{path}", origin.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_https_with_a_host_and_nothing_that_changes_a_path() {
        assert!(validate_origin("https://cdn.example.com").is_ok());
        assert!(validate_origin("https://127.0.0.1:8443/fw/").is_ok());
        assert_eq!(
            validate_origin("http://cdn.example.com"),
            Err(OriginError::NotHttps)
        );
        assert_eq!(validate_origin("https://"), Err(OriginError::NoHost));
        assert_eq!(validate_origin("https://:443/x"), Err(OriginError::NoHost));
        for bad in [
            "https://a/b?c",
            "https://a/b#c",
            "https://u@a/",
            "https://a/ b",
            "https://a/\n",
        ] {
            assert_eq!(validate_origin(bad), Err(OriginError::BadChar), "{bad}");
        }
        let long = format!("https://a/{}", "x".repeat(MAX_ORIGIN_LEN));
        assert_eq!(validate_origin(&long), Err(OriginError::TooLong));
    }

    #[test]
    fn chunk_urls_follow_the_export_layout() {
        let a = ArtifactId::new("fw-2.0.0").unwrap();
        assert_eq!(chunk_path(&a, 7).unwrap(), "fw-2.0.0/chunks/7");
        assert_eq!(
            chunk_url("https://cdn.example/fw/", &a, 0).unwrap(),
            "https://cdn.example/fw/fw-2.0.0/chunks/0"
        );
        assert_eq!(manifest_path(&a).unwrap(), "fw-2.0.0/manifest.json");
        // An id that could climb out of the export cannot be made (ids never start with a dot);
        // `chunk_path` refuses such names anyway, should the rule ever loosen.
        assert!(ArtifactId::new("..").is_err());
    }
}
