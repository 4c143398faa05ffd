//! Kubernetes resource quantities (`"500m"`, `"1Gi"`, `"1.5"`, `"1e3"`), parsed exactly and
//! written in the canonical form the API server stores, so an applied object reads back
//! equal to what was rendered.

use std::fmt;

/// How the value was written, which decides how it is written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantityFormat {
    /// Powers of 1024: `Ki`, `Mi`, `Gi`, `Ti`, `Pi`, `Ei`.
    BinarySi,
    /// Powers of 1000: `m`, (none), `k`, `M`, `G`, `T`, `P`, `E`.
    DecimalSi,
    /// Scientific: `1e3`, `5E-3`.
    DecimalExponent,
}

/// A parsed quantity, held exactly in thousandths of its unit (cores or bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    milli: i128,
    format: QuantityFormat,
}

const MAX_MILLI: i128 = (i64::MAX as i128) * 1000;

impl Quantity {
    /// Parses Kubernetes' quantity grammar: an optionally signed decimal number
    /// followed by a binary suffix, a decimal suffix or an exponent. Values finer than one
    /// thousandth (`"0.0001"`) are rejected, as are values beyond 2⁶³.
    pub fn parse(text: &str) -> Result<Quantity, String> {
        let bad = |why: &str| {
            format!(
                "{text:?} is not a quantity ({why}); write a number with an optional suffix, \
                 such as \"500m\", \"2\", \"512Mi\" or \"1Gi\""
            )
        };
        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            Some(_) => (false, text),
            None => return Err(bad("empty")),
        };
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(bad("no digits"));
        }
        if fraction.contains('.') {
            return Err(bad("two decimal points"));
        }
        let digits = format!("{whole}{fraction}");
        let digits = digits.trim_start_matches('0');
        if digits.len() > 30 {
            return Err(bad("too many digits"));
        }
        let mantissa: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().map_err(|_| bad("not a number"))?
        };
        // value = mantissa × 10^(−fraction digits) × base; held in milli-units.
        let scale = i32::try_from(fraction.len()).map_err(|_| bad("too many digits"))?;
        let (format, decimal_exp, binary_exp) = match suffix {
            "" => (QuantityFormat::DecimalSi, 0, 0),
            "m" => (QuantityFormat::DecimalSi, -3, 0),
            "k" => (QuantityFormat::DecimalSi, 3, 0),
            "M" => (QuantityFormat::DecimalSi, 6, 0),
            "G" => (QuantityFormat::DecimalSi, 9, 0),
            "T" => (QuantityFormat::DecimalSi, 12, 0),
            "P" => (QuantityFormat::DecimalSi, 15, 0),
            "E" => (QuantityFormat::DecimalSi, 18, 0),
            "Ki" => (QuantityFormat::BinarySi, 0, 1),
            "Mi" => (QuantityFormat::BinarySi, 0, 2),
            "Gi" => (QuantityFormat::BinarySi, 0, 3),
            "Ti" => (QuantityFormat::BinarySi, 0, 4),
            "Pi" => (QuantityFormat::BinarySi, 0, 5),
            "Ei" => (QuantityFormat::BinarySi, 0, 6),
            s if s.starts_with(['e', 'E']) => {
                let exp: i32 = s[1..]
                    .parse()
                    .map_err(|_| bad(&format!("unknown suffix {s:?}")))?;
                if !(-30..=30).contains(&exp) {
                    return Err(bad("exponent out of range"));
                }
                (QuantityFormat::DecimalExponent, exp, 0)
            }
            s => {
                return Err(bad(&format!(
                    "unknown suffix {s:?}; use m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi or Ei"
                )));
            }
        };
        let too_large = || bad("too large");
        let mut value = mantissa;
        for _ in 0..binary_exp {
            value = value.checked_mul(1024).ok_or_else(too_large)?;
        }
        let exp = decimal_exp + 3 - scale;
        if exp >= 0 {
            for _ in 0..exp {
                value = value.checked_mul(10).ok_or_else(too_large)?;
            }
        } else {
            let divisor = 10i128
                .checked_pow(exp.unsigned_abs())
                .ok_or_else(|| bad("finer than one thousandth"))?;
            if value % divisor != 0 {
                return Err(bad("finer than one thousandth"));
            }
            value /= divisor;
        }
        if value > MAX_MILLI {
            return Err(too_large());
        }
        Ok(Quantity {
            milli: if negative { -value } else { value },
            format,
        })
    }

    /// The value in thousandths (millicores for CPU, millibytes for memory).
    pub fn milli_value(&self) -> i128 {
        self.milli
    }

    /// How the value was written.
    pub fn format(&self) -> QuantityFormat {
        self.format
    }
}

/// The canonical form the API server writes back: the largest suffix of the same kind that
/// keeps the number whole (`"1024Mi"` → `"1Gi"`, `"0.5"` → `"500m"`, `"1000m"` → `"1"`).
impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.milli == 0 {
            return f.write_str("0");
        }
        let sign = if self.milli < 0 { "-" } else { "" };
        let magnitude = self.milli.abs();
        if self.format == QuantityFormat::BinarySi && magnitude % 1000 == 0 {
            let mut whole = magnitude / 1000;
            let mut suffix = "";
            for next in ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"] {
                if whole % 1024 != 0 {
                    break;
                }
                whole /= 1024;
                suffix = next;
            }
            return write!(f, "{sign}{whole}{suffix}");
        }
        let mut mantissa = magnitude;
        let mut exp = -3;
        while mantissa % 1000 == 0 && exp < 18 {
            mantissa /= 1000;
            exp += 3;
        }
        let suffix = match (self.format, exp) {
            (QuantityFormat::DecimalExponent, 0) => String::new(),
            (QuantityFormat::DecimalExponent, e) => format!("e{e}"),
            (_, -3) => "m".to_owned(),
            (_, 0) => String::new(),
            (_, 3) => "k".to_owned(),
            (_, 6) => "M".to_owned(),
            (_, 9) => "G".to_owned(),
            (_, 12) => "T".to_owned(),
            (_, 15) => "P".to_owned(),
            _ => "E".to_owned(),
        };
        write!(f, "{sign}{mantissa}{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        let cases = [
            ("500m", "500m"),
            ("1Gi", "1Gi"),
            ("1024Mi", "1Gi"),
            ("1536Mi", "1536Mi"),
            ("1.5Gi", "1536Mi"),
            ("0.5Ki", "512"),
            ("0.5", "500m"),
            ("1000m", "1"),
            ("1.5", "1500m"),
            ("2000k", "2M"),
            ("1000", "1k"),
            ("1e3", "1e3"),
            ("1500", "1500"),
            ("5E-3", "5e-3"),
            ("+2", "2"),
            ("0", "0"),
            ("0.000", "0"),
            (".5", "500m"),
            ("2.", "2"),
            ("-1", "-1"),
            ("128974848", "128974848"),
            ("129e6", "129e6"),
            ("123Mi", "123Mi"),
        ];
        for (input, canonical) in cases {
            let q = Quantity::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(q.to_string(), canonical, "{input}");
            // Canonical forms are fixed points.
            let again = Quantity::parse(canonical).unwrap();
            assert_eq!(again.milli_value(), q.milli_value(), "{input}");
            assert_eq!(again.to_string(), canonical, "{input}");
        }
        assert_eq!(Quantity::parse("500m").unwrap().milli_value(), 500);
        assert_eq!(
            Quantity::parse("1Gi").unwrap().milli_value(),
            1024 * 1024 * 1024 * 1000
        );
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "1Gx",
            "Gi",
            "1 Gi",
            "1..2",
            "1.2.3",
            "0.0001",
            "1e",
            "1e400",
            "abc",
            "--1",
            "1i",
            "99999999999999999999999999999999",
            "10E",
        ] {
            assert!(Quantity::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Quantity::parse("1E").unwrap().to_string(), "1E");
        let err = Quantity::parse("1Gx").unwrap_err();
        assert!(err.contains("unknown suffix \"Gx\""), "{err}");
    }
}
