//! Names of services, instances and environments.

use std::fmt;

/// What a name names; each kind has its own length limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A service name (`user-service`), at most 63 bytes (a DNS label).
    Service,
    /// An instance id (`user-service-1`), at most 128 bytes.
    Instance,
    /// An environment (`production`), at most 63 bytes.
    Environment,
}

impl NameKind {
    /// Longest accepted name, in bytes.
    pub fn max_len(self) -> usize {
        match self {
            NameKind::Service | NameKind::Environment => 63,
            NameKind::Instance => 128,
        }
    }
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Service => "service name",
            NameKind::Instance => "instance id",
            NameKind::Environment => "environment",
        })
    }
}

/// Why a name was rejected; the message names the kind and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty.
    #[error("{0} is empty")]
    Empty(NameKind),
    /// Too long.
    #[error("{kind} is {len} bytes long; at most {max} allowed")]
    TooLong {
        /// Which name.
        kind: NameKind,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A character outside the allowed set.
    #[error(
        "{kind} {name:?} contains {found:?}; allowed are letters, digits, '.', '_' and '-', starting with a letter or digit"
    )]
    BadCharacter {
        /// Which name.
        kind: NameKind,
        /// The name (cut to 64 characters).
        name: String,
        /// The first offending character.
        found: char,
    },
}

/// Checks a name: 1 to `kind.max_len()` bytes of ASCII letters, digits, `.`, `_`, `-`,
/// starting with a letter or digit. No `/`, `:` or spaces, so names are safe in URLs, keys
/// and DNS.
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty(kind));
    }
    if name.len() > kind.max_len() {
        return Err(NameError::TooLong {
            kind,
            len: name.len(),
            max: kind.max_len(),
        });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let bad = name
        .char_indices()
        .find(|&(i, c)| !allowed(c) || (i == 0 && !c.is_ascii_alphanumeric()));
    if let Some((_, found)) = bad {
        return Err(NameError::BadCharacter {
            kind,
            name: name.chars().take(64).collect(),
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["user-service", "a", "v1.2_x", "9lives"] {
            assert_eq!(validate_name(NameKind::Service, ok), Ok(()));
        }
        assert_eq!(
            validate_name(NameKind::Service, ""),
            Err(NameError::Empty(NameKind::Service))
        );
        let long = "a".repeat(1 << 20);
        let err = validate_name(NameKind::Service, &long)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "service name is 1048576 bytes long; at most 63 allowed"
        );
        let err = validate_name(NameKind::Instance, "a/b")
            .unwrap_err()
            .to_string();
        assert!(err.contains("instance id \"a/b\" contains '/'"), "{err}");
        assert!(validate_name(NameKind::Service, "-x").is_err());
        assert!(validate_name(NameKind::Service, "a b").is_err());
        assert!(validate_name(NameKind::Service, "ä").is_err());
        assert!(validate_name(NameKind::Instance, &"i".repeat(128)).is_ok());
    }
}
