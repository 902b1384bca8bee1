//! Region and service names: the one rule for each, for every place they are named (the CA,
//! configs, policy files, tunnel stream headers, certificate chains), so a name one part accepts
//! is accepted by all. Parse at the edge ([`Region::new`], `FromStr`, serde); pass the typed
//! value inside.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A refused region or service name: what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Too short or too long.
    #[error("{len} bytes, expected 1..={max}")]
    Length {
        /// The name's length in bytes.
        len: usize,
        /// The longest name allowed.
        max: usize,
    },
    /// A byte outside the allowed set.
    #[error("character {found:?} (allowed: {allowed})")]
    Character {
        /// The first offending character.
        found: char,
        /// The allowed characters, for the message.
        allowed: &'static str,
    },
}

fn check(s: &str, max: usize, ok: fn(u8) -> bool, allowed: &'static str) -> Result<(), NameError> {
    if s.is_empty() || s.len() > max {
        return Err(NameError::Length { len: s.len(), max });
    }
    match s.bytes().find(|b| !ok(*b)) {
        Some(b) => Err(NameError::Character {
            found: b as char,
            allowed,
        }),
        None => Ok(()),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $max:expr, $ok:expr, $allowed:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The longest name, in bytes.
            pub const MAX: usize = $max;

            /// Checks `s` against the one rule and wraps it.
            pub fn new(s: &str) -> Result<Self, NameError> {
                check(s, $max, $ok, $allowed)?;
                Ok($name(Arc::from(s)))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $name::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                $name::new(&s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::new(&s).map_err(serde::de::Error::custom)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A region: 1 to 63 of `a-z 0-9 -` (a DNS label's characters, lower case), as the CA puts it
    /// in a regional intermediate's `spiffe://TD/trustline/region/NAME` and a gateway in its ID.
    Region,
    63,
    |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-',
    "a-z 0-9 -"
);

name_type!(
    /// A service name, as sidecar configs, policy files and tunnel stream headers give it:
    /// 1 to 253 of `A-Z a-z 0-9 . _ -`.
    ServiceName,
    253,
    |b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'),
    "A-Z a-z 0-9 . _ -"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_a_lower_case_dns_label() {
        for ok in ["a", "eu-1", "us-east-2", &"x".repeat(63)] {
            assert_eq!(Region::new(ok).unwrap().as_str(), ok);
        }
        assert_eq!(
            Region::new("EU_1").unwrap_err(),
            NameError::Character {
                found: 'E',
                allowed: "a-z 0-9 -"
            }
        );
        for bad in ["", "eu.1", "eu/1", "eu 1", "é", &"x".repeat(64)] {
            assert!(Region::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Region::new("").unwrap_err().to_string(),
            "0 bytes, expected 1..=63"
        );
    }

    #[test]
    fn a_service_name_allows_dots_and_underscores() {
        for ok in ["web", "Web_1.api-v2", &"s".repeat(253)] {
            assert!(ServiceName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "a b", "a/b", "a:b", &"s".repeat(254)] {
            assert!(ServiceName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_deserialize_through_the_same_rule() {
        #[derive(serde::Deserialize)]
        struct T {
            r: Region,
        }
        let ok: T = toml::from_str("r = \"eu-1\"").unwrap();
        assert_eq!(ok.r, "eu-1");
        let e = toml::from_str::<T>("r = \"EU\"").err().unwrap().to_string();
        assert!(e.contains("character 'E'"), "{e}");
    }
}
