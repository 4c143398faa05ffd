//! Human-readable durations.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a duration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The text was empty.
    #[error(
        "empty duration; use a number of milliseconds or a string such as \"500ms\", \"10s\", \"1m\", \"1h\""
    )]
    Empty,
    /// A minus sign.
    #[error("{0:?} is negative; durations must be zero or more")]
    Negative(String),
    /// Not a number followed by a known unit.
    #[error(
        "{0:?} is not a duration; use a number of milliseconds or a string such as \"500ms\", \"10s\", \"1m\", \"1h\""
    )]
    Malformed(String),
    /// Larger than Trellis accepts.
    #[error("{0:?} is too long; at most 365 days")]
    TooLong(String),
}

const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `"250ms"`, `"10s"`, `"1m"`, `"1h"`, `"2d"`, or a bare number of milliseconds
/// (`"250"`). Fractions are allowed (`"1.5s"`).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.starts_with('-') {
        return Err(DurationError::Negative(text.to_owned()));
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let malformed = || DurationError::Malformed(text.to_owned());
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(malformed());
    }
    let value: f64 = number.parse().map_err(|_| malformed())?;
    let millis_per_unit = match unit.trim() {
        "" | "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return Err(malformed()),
    };
    let millis = value * millis_per_unit;
    if !millis.is_finite() || millis > MAX.as_millis() as f64 {
        return Err(DurationError::TooLong(text.to_owned()));
    }
    Ok(Duration::from_micros((millis * 1_000.0).round() as u64))
}

/// Formats with the largest unit that keeps it exact: `1h`, `90s`, `250ms`.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms == 0 && !duration.is_zero() {
        return format!("{}us", duration.as_micros());
    }
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// A [`Duration`] read from config and JSON the way the seed writes them: a number is
/// milliseconds, a string carries a unit. Serializes as a string such as `"30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        HumanDuration(d)
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Self {
        d.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl FromStr for HumanDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(HumanDuration)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: a number of milliseconds or a string such as \"500ms\", \"10s\", \"1m\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                let d = Duration::from_millis(v);
                if d > MAX {
                    return Err(E::custom(DurationError::TooLong(v.to_string())));
                }
                Ok(HumanDuration(d))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                if v < 0 {
                    return Err(E::custom(DurationError::Negative(v.to_string())));
                }
                self.visit_u64(v as u64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<HumanDuration, E> {
                if v < 0.0 {
                    return Err(E::custom(DurationError::Negative(v.to_string())));
                }
                parse_duration(&v.to_string())
                    .map(HumanDuration)
                    .map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_forms() {
        let ok = [
            ("500ms", 500),
            ("10s", 10_000),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("250", 250),
            ("1.5s", 1_500),
            (" 2s ", 2_000),
        ];
        for (text, ms) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_with_a_reason() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("-1s"),
            Err(DurationError::Negative(_))
        ));
        for bad in ["soon", "10x", "1.s", ".5s", "1..2s", "s", "1 2s"] {
            assert!(
                matches!(parse_duration(bad), Err(DurationError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_duration("400d"),
            Err(DurationError::TooLong(_))
        ));
        assert!(
            parse_duration("-5")
                .unwrap_err()
                .to_string()
                .contains("negative")
        );
    }

    #[test]
    fn formats_round_trip() {
        for ms in [
            0u64, 1, 999, 1_000, 1_500, 60_000, 90_000, 3_600_000, 86_400_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{ms}");
        }
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
    }

    #[test]
    fn serde_number_is_milliseconds_and_string_has_a_unit() {
        let d: HumanDuration = serde_json::from_str("30000").unwrap();
        assert_eq!(d.get(), Duration::from_secs(30));
        let d: HumanDuration = serde_json::from_str("\"1m\"").unwrap();
        assert_eq!(d.get(), Duration::from_secs(60));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m\"");
        let err = serde_json::from_str::<HumanDuration>("-5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("negative"), "{err}");
        let err = serde_json::from_str::<HumanDuration>("\"later\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a duration"), "{err}");
        let err = serde_json::from_str::<HumanDuration>("true")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a duration"), "{err}");
    }
}
