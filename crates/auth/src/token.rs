//! Taking a token apart before any key is involved: the `Authorization` header, the length
//! cap, the three base64url segments, and the JOSE header.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{AuthError, Shown};
use crate::keys::JwtAlgorithm;

/// The bearer token of a request: the value of its single `Authorization: Bearer <token>`
/// header (scheme matched case-insensitively).
///
/// ```
/// use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
/// let mut headers = HeaderMap::new();
/// headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer abc.def.ghi"));
/// assert_eq!(trellis_auth::bearer_token(&headers).unwrap(), "abc.def.ghi");
/// headers.clear();
/// assert_eq!(trellis_auth::bearer_token(&headers).unwrap_err().reason(), "missing_token");
/// ```
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::MissingToken);
    };
    if values.next().is_some() {
        return Err(AuthError::Malformed(
            "more than one Authorization header".into(),
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| AuthError::Malformed("Authorization header is not visible ASCII".into()))?
        .trim();
    // Byte scans, not `char` patterns: the text is ASCII, and a token is a few hundred
    // bytes checked on every request.
    let is_blank = |b: &u8| *b == b' ' || *b == b'\t';
    let (scheme, rest) = match text.bytes().position(|b| is_blank(&b)) {
        Some(at) => (&text[..at], &text[at + 1..]),
        None => (text, ""),
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        if scheme.is_empty() {
            return Err(AuthError::MissingToken);
        }
        return Err(AuthError::BadScheme {
            scheme: Shown::new(scheme),
        });
    }
    let token = rest.trim_matches([' ', '\t']);
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    if token.as_bytes().iter().any(is_blank) {
        return Err(AuthError::Malformed(
            "bearer token contains whitespace".into(),
        ));
    }
    Ok(token)
}

/// A token split and its header read; nothing verified yet.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    pub(crate) alg: JwtAlgorithm,
    pub(crate) kid: Option<String>,
    /// `header.payload`, the signed bytes.
    pub(crate) message: &'a str,
    pub(crate) payload: &'a str,
    pub(crate) signature: &'a str,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
    crit: Option<Value>,
}

fn malformed(what: impl Into<String>) -> AuthError {
    AuthError::Malformed(what.into())
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Checks the length, shape and header of `token` and the header's `alg` against `allowed`.
pub(crate) fn parse<'a>(
    token: &'a str,
    max_len: usize,
    allowed: &[JwtAlgorithm],
) -> Result<Parsed<'a>, AuthError> {
    if token.len() > max_len {
        return Err(AuthError::TooLarge {
            len: token.len(),
            max: max_len,
        });
    }
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    if let Some(bad) = token.bytes().find(|b| !is_b64url(*b) && *b != b'.') {
        return Err(malformed(format!(
            "byte 0x{bad:02x} is not base64url or '.'"
        )));
    }
    let dots = token.bytes().filter(|b| *b == b'.').count();
    match dots {
        2 => {}
        4 => {
            return Err(malformed(
                "five segments: an encrypted token (JWE), which is not supported",
            ));
        }
        n => {
            return Err(malformed(format!(
                "{} segments; a signed JWT has three (header.payload.signature)",
                n + 1
            )));
        }
    }
    let (message, signature) = token
        .rsplit_once('.')
        .ok_or_else(|| malformed("no signature"))?;
    let (header, payload) = message
        .split_once('.')
        .ok_or_else(|| malformed("no payload"))?;
    if header.is_empty() || payload.is_empty() {
        return Err(malformed("empty header or payload segment"));
    }
    if signature.is_empty() {
        // An unsigned token; its alg may say anything, it is refused either way.
        return Err(AuthError::AlgNotAllowed {
            alg: Shown::new("none"),
            detail: ": the token has no signature".into(),
        });
    }
    let header_json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| malformed(format!("header is not base64url: {e}")))?;
    let raw: RawHeader = serde_json::from_slice(&header_json)
        .map_err(|e| malformed(format!("header is not a JSON object: {e}")))?;
    let alg = match raw.alg {
        Some(Value::String(alg)) => alg,
        Some(_) => return Err(malformed("header alg is not a string")),
        None => return Err(malformed("header has no alg")),
    };
    let Some(alg) = allowed.iter().copied().find(|a| a.as_str() == alg) else {
        return Err(AuthError::AlgNotAllowed {
            alg: Shown::new(&alg),
            detail: format!(
                "; allowed: {}",
                allowed
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    };
    if raw.crit.is_some() {
        return Err(malformed(
            "header has crit extensions, which this verifier does not understand",
        ));
    }
    let kid = match raw.kid {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid),
        Some(_) => return Err(malformed("header kid is not a string")),
    };
    Ok(Parsed {
        alg,
        kid,
        message,
        payload,
        signature,
    })
}

/// Decodes the payload of a token whose signature verified.
pub(crate) fn decode_payload(payload: &str) -> Result<Map<String, Value>, AuthError> {
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| malformed(format!("payload is not base64url: {e}")))?;
    serde_json::from_slice::<Map<String, Value>>(&json)
        .map_err(|e| malformed(format!("payload is not a JSON object: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    const ALLOWED: &[JwtAlgorithm] = &[JwtAlgorithm::HS256];

    fn reason(token: &str) -> &'static str {
        parse(token, 8192, ALLOWED).unwrap_err().reason()
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_strict() {
        let mut h = HeaderMap::new();
        for (value, want) in [
            ("Bearer a.b.c", Ok("a.b.c")),
            ("BEARER   a.b.c  ", Ok("a.b.c")),
            ("bEaReR\ta.b.c", Ok("a.b.c")),
            ("Bearer", Err("missing_token")),
            ("Bearer   ", Err("missing_token")),
            ("", Err("missing_token")),
            ("Basic dXNlcjpwdw==", Err("bad_scheme")),
            ("Bearer a.b.c d", Err("malformed")),
            ("Bearera.b.c", Err("bad_scheme")),
        ] {
            h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            assert_eq!(bearer_token(&h).map_err(|e| e.reason()), want, "{value:?}");
        }
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer x.y.z"));
        assert_eq!(bearer_token(&h).unwrap_err().reason(), "malformed");
        h.clear();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
        assert_eq!(bearer_token(&h).unwrap_err().reason(), "malformed");
    }

    #[test]
    fn shapes_are_refused_before_any_key() {
        let header = b64(r#"{"alg":"HS256"}"#);
        let payload = b64("{}");
        assert_eq!(reason("abc"), "malformed");
        assert_eq!(reason("a.b"), "malformed");
        assert_eq!(reason("a.b.c.d"), "malformed");
        assert_eq!(reason("a.b.c.d.e"), "malformed");
        assert_eq!(reason(&format!("{header}.{payload}.si g")), "malformed");
        assert_eq!(reason(&format!("{header}.{payload}.sig=")), "malformed");
        assert_eq!(reason(&format!(".{payload}.sig")), "malformed");
        assert_eq!(reason(&format!("{header}..sig")), "malformed");
        assert_eq!(
            reason(&format!("{}.{payload}.sig", b64("not json"))),
            "malformed"
        );
        assert_eq!(
            reason(&format!("{}.{payload}.sig", b64("[1]"))),
            "malformed"
        );
        assert_eq!(
            reason(&format!("{}.{payload}.sig", b64(r#"{"alg":5}"#))),
            "malformed"
        );
        assert_eq!(
            reason(&format!("{}.{payload}.sig", b64(r#"{"typ":"JWT"}"#))),
            "malformed"
        );
        assert_eq!(
            reason(&format!(
                "{}.{payload}.sig",
                b64(r#"{"alg":"HS256","crit":["b64"]}"#)
            )),
            "malformed"
        );
        assert_eq!(reason(&"a".repeat(8193)), "token_too_large");
        assert_eq!(reason(""), "missing_token");
    }

    #[test]
    fn alg_none_and_unlisted_algs_are_refused() {
        let payload = b64(r#"{"sub":"x"}"#);
        for alg in ["none", "None", "NONE", "RS256", "hs256", ""] {
            let header = b64(&format!(r#"{{"alg":"{alg}"}}"#));
            assert_eq!(
                reason(&format!("{header}.{payload}.c2ln")),
                "alg_not_allowed",
                "{alg}"
            );
        }
        // The unsigned form `header.payload.` is refused whatever its alg says.
        let header = b64(r#"{"alg":"HS256"}"#);
        assert_eq!(reason(&format!("{header}.{payload}.")), "alg_not_allowed");
    }

    #[test]
    fn a_good_shape_parses() {
        let header = b64(r#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#);
        let payload = b64(r#"{"sub":"x"}"#);
        let token = format!("{header}.{payload}.c2ln");
        let p = parse(&token, 8192, ALLOWED).unwrap();
        assert_eq!(p.alg, JwtAlgorithm::HS256);
        assert_eq!(p.kid.as_deref(), Some("k1"));
        assert_eq!(p.message, format!("{header}.{payload}"));
        assert_eq!(decode_payload(p.payload).unwrap()["sub"], "x");
        assert_eq!(
            decode_payload(&b64("[]")).unwrap_err().reason(),
            "malformed"
        );
    }
}
