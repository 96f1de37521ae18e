//! Identity newtypes shared by every Aloft component, each with a validating constructor.
//!
//! Identities end up inside MQTT topic levels, file names and certificate subjects, so the rule
//! is deliberately narrow: 1 to 64 characters from `[A-Za-z0-9._-]`, not starting with `.` or `-`.
//! That excludes the MQTT separators and wildcards (`/`, `+`, `#`), `$` (reserved topics),
//! whitespace and anything a shell or a path would reinterpret.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest identity accepted anywhere, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {MAX_ID_LEN} bytes")]
    TooLong { kind: &'static str },
    #[error("{kind} contains {found:?}: only letters, digits, '.', '_' and '-' are allowed")]
    BadChar { kind: &'static str, found: char },
    #[error("{kind} must not start with '.' or '-'")]
    BadStart { kind: &'static str },
}

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind });
    }
    if let Some(found) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdError::BadChar { kind, found });
    }
    if s.starts_with(['.', '-']) {
        return Err(IdError::BadStart { kind });
    }
    Ok(())
}

macro_rules! identity {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate($kind, &s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

identity!(
    /// A device's identity: its certificate's subject CN and its MQTT client id.
    DeviceId,
    "device id"
);
identity!(
    /// An operator's identity: the subject CN of an operator certificate.
    OperatorId,
    "operator id"
);
identity!(
    /// A campaign's identity, chosen by the orchestrator when the campaign is created.
    CampaignId,
    "campaign id"
);
identity!(
    /// A release artifact's identity, chosen by the operator CLI when the release is built.
    ArtifactId,
    "artifact id"
);

/// The anti-rollback counter of a release: a device refuses any manifest whose security version
/// is lower than the highest one it has confirmed running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecurityVersion(pub u64);

impl fmt::Display for SecurityVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_separators_and_wildcards_are_refused() {
        for bad in ["a/b", "a+", "#", "$SYS", "a b", "", ".hidden", "-x", "é"] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(DeviceId::new("x".repeat(65)).is_err());
    }

    #[test]
    fn ordinary_ids_are_accepted() {
        for good in ["dev-00001", "sensor_7.eu", "A", &"x".repeat(64)] {
            assert!(DeviceId::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<DeviceId>("\"a/b\"").is_err());
        let id: DeviceId = serde_json::from_str("\"dev-1\"").unwrap();
        assert_eq!(id.as_str(), "dev-1");
    }
}
