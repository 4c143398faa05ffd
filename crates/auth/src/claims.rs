//! Verified claims, and the checks on them: `exp`, `nbf`, `iss`, `aud`, required claims.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::error::{AuthError, Shown};
use crate::keys::JwtAlgorithm;

/// The claims of a token whose signature and validity were checked.
///
/// `roles` come from the configured roles claim (`roles` by default: a list of strings or a
/// single string); `scopes` from `scope` (space-separated, OAuth 2.0), `scp` (a list or a
/// space-separated string) and `scopes` (a list), merged without duplicates.
///
/// Cheap to clone: the claims are shared (a token remembered by the verifier hands out
/// the same claims to each request that repeats it).
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    data: Arc<ClaimsData>,
}

#[derive(Debug, PartialEq)]
struct ClaimsData {
    raw: Map<String, Value>,
    roles: Vec<String>,
    scopes: Vec<String>,
    algorithm: JwtAlgorithm,
    key_id: Option<String>,
}

impl Claims {
    /// `sub`, when it is a string.
    pub fn subject(&self) -> Option<&str> {
        self.data.raw.get("sub").and_then(Value::as_str)
    }

    /// `iss`, when it is a string.
    pub fn issuer(&self) -> Option<&str> {
        self.data.raw.get("iss").and_then(Value::as_str)
    }

    /// `exp` as a time, when present.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.data.raw.get("exp").and_then(numeric_date).map(to_time)
    }

    /// The roles, in token order, without duplicates.
    pub fn roles(&self) -> &[String] {
        &self.data.roles
    }

    /// The scopes, in token order, without duplicates.
    pub fn scopes(&self) -> &[String] {
        &self.data.scopes
    }

    /// Whether the token holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.data.roles.iter().any(|r| r == role)
    }

    /// Whether the token holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.data.scopes.iter().any(|s| s == scope)
    }

    /// One claim, by name.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.data.raw.get(name)
    }

    /// Every claim, as the token carried them.
    pub fn raw(&self) -> &Map<String, Value> {
        &self.data.raw
    }

    /// Every claim, owned.
    pub fn into_raw(self) -> Map<String, Value> {
        match Arc::try_unwrap(self.data) {
            Ok(data) => data.raw,
            Err(shared) => shared.raw.clone(),
        }
    }

    /// The algorithm the token was signed with.
    pub fn algorithm(&self) -> JwtAlgorithm {
        self.data.algorithm
    }

    /// The header's `kid`, when it had one.
    pub fn key_id(&self) -> Option<&str> {
        self.data.key_id.as_deref()
    }
}

/// The claim checks of a verifier.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRules {
    pub(crate) leeway: Duration,
    pub(crate) issuers: Vec<String>,
    pub(crate) audiences: Vec<String>,
    pub(crate) required: Vec<String>,
    pub(crate) roles_path: Vec<String>,
}

/// A JSON NumericDate: seconds since the epoch, an integer or a fraction.
fn numeric_date(value: &Value) -> Option<f64> {
    value.as_f64().filter(|f| f.is_finite())
}

fn to_time(secs: f64) -> SystemTime {
    if secs <= 0.0 {
        return UNIX_EPOCH;
    }
    // Cap far-future dates instead of overflowing SystemTime.
    let secs = secs.min(1.0e11);
    UNIX_EPOCH + Duration::from_secs_f64(secs)
}

fn clamp_i64(secs: f64) -> i64 {
    // `as` saturates for out-of-range floats.
    secs.floor() as i64
}

/// Follows a dotted path: first the whole name as one key (claims may contain dots, as in
/// `https://example.com/roles`), then segment by segment.
pub(crate) fn lookup<'a>(raw: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    if let [one] = path {
        return raw.get(one);
    }
    let whole = path.join(".");
    if let Some(v) = raw.get(&whole) {
        return Some(v);
    }
    let (first, rest) = path.split_first()?;
    let mut value = raw.get(first)?;
    for segment in rest {
        value = value.as_object()?.get(segment)?;
    }
    Some(value)
}

fn push_unique(list: &mut Vec<String>, item: &str) {
    if !item.is_empty() && !list.iter().any(|x| x == item) {
        list.push(item.to_owned());
    }
}

fn strings(list: &mut Vec<String>, value: &Value, split_spaces: bool) {
    match value {
        Value::String(s) if split_spaces => {
            for part in s.split(' ') {
                push_unique(list, part);
            }
        }
        Value::String(s) => push_unique(list, s),
        Value::Array(items) => {
            for item in items {
                if let Value::String(s) = item {
                    push_unique(list, s);
                }
            }
        }
        _ => {}
    }
}

impl ClaimRules {
    /// `exp` and `nbf` against `now`, with the leeway (the checks a cached verification
    /// repeats).
    pub(crate) fn check_times(
        &self,
        raw: &Map<String, Value>,
        now: SystemTime,
    ) -> Result<(), AuthError> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let leeway = self.leeway.as_secs_f64();
        let date = |name: &str| -> Result<Option<f64>, AuthError> {
            match raw.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => numeric_date(v)
                    .map(Some)
                    .ok_or_else(|| AuthError::BadClaim {
                        claim: Shown::new(name),
                        problem: "is not a number of seconds since 1970 (NumericDate)".into(),
                    }),
            }
        };
        if let Some(exp) = date("exp")?
            && now >= exp + leeway
        {
            return Err(AuthError::Expired {
                exp: clamp_i64(exp),
                now: clamp_i64(now),
                leeway_secs: self.leeway.as_secs(),
            });
        }
        if let Some(nbf) = date("nbf")?
            && now + leeway < nbf
        {
            return Err(AuthError::NotYetValid {
                nbf: clamp_i64(nbf),
                now: clamp_i64(now),
                leeway_secs: self.leeway.as_secs(),
            });
        }
        Ok(())
    }

    /// Checks the claims of a token whose signature verified, at `now`.
    pub(crate) fn check(
        &self,
        raw: Map<String, Value>,
        algorithm: JwtAlgorithm,
        key_id: Option<String>,
        now: SystemTime,
    ) -> Result<Claims, AuthError> {
        for name in &self.required {
            if raw.get(name).is_none_or(Value::is_null) {
                return Err(AuthError::MissingClaim(Shown::new(name)));
            }
        }
        self.check_times(&raw, now)?;
        if !self.issuers.is_empty() {
            match raw.get("iss") {
                Some(Value::String(iss)) if self.issuers.iter().any(|i| i == iss) => {}
                Some(Value::String(iss)) => {
                    return Err(AuthError::BadIssuer(Some(Shown::new(iss))));
                }
                Some(other) => {
                    return Err(AuthError::BadIssuer(Some(Shown::new(&other.to_string()))));
                }
                None => return Err(AuthError::BadIssuer(None)),
            }
        }
        if !self.audiences.is_empty() {
            let ok = match raw.get("aud") {
                Some(Value::String(aud)) => self.audiences.iter().any(|a| a == aud),
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|aud| self.audiences.iter().any(|a| a == aud)),
                _ => false,
            };
            if !ok {
                return Err(AuthError::BadAudience(raw.get("aud").map(|v| match v {
                    Value::String(s) => Shown::new(s),
                    other => Shown::new(&other.to_string()),
                })));
            }
        }
        if let Some(sub) = raw.get("sub")
            && !sub.is_string()
        {
            return Err(AuthError::BadClaim {
                claim: Shown::new("sub"),
                problem: "is not a string".into(),
            });
        }
        let mut roles = Vec::new();
        if let Some(v) = lookup(&raw, &self.roles_path) {
            strings(&mut roles, v, false);
        }
        let mut scopes = Vec::new();
        if let Some(v) = raw.get("scope") {
            strings(&mut scopes, v, true);
        }
        if let Some(v) = raw.get("scp") {
            strings(&mut scopes, v, true);
        }
        if let Some(v) = raw.get("scopes") {
            strings(&mut scopes, v, true);
        }
        Ok(Claims {
            data: Arc::new(ClaimsData {
                raw,
                roles,
                scopes,
                algorithm,
                key_id,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> ClaimRules {
        ClaimRules {
            leeway: Duration::from_secs(30),
            issuers: vec![],
            audiences: vec![],
            required: vec!["exp".into()],
            roles_path: vec!["roles".into()],
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn check(r: &ClaimRules, v: Value, now: u64) -> Result<Claims, AuthError> {
        let Value::Object(map) = v else { panic!() };
        r.check(map, JwtAlgorithm::HS256, None, at(now))
    }

    #[test]
    fn leeway_boundaries_on_exp_and_nbf() {
        let r = rules();
        // exp = 1000: valid until 1000 + 30 (exclusive).
        assert!(check(&r, json!({"exp": 1000}), 1029).is_ok());
        let e = check(&r, json!({"exp": 1000}), 1030).unwrap_err();
        assert_eq!(e.reason(), "expired");
        // nbf = 1000: valid from 1000 - 30 on.
        assert!(check(&r, json!({"exp": 5000, "nbf": 1000}), 970).is_ok());
        let e = check(&r, json!({"exp": 5000, "nbf": 1000}), 969).unwrap_err();
        assert_eq!(e.reason(), "not_yet_valid");
        // Fractions are NumericDates too.
        assert!(check(&r, json!({"exp": 1000.5}), 1030).is_ok());
    }

    #[test]
    fn bad_dates_and_required_claims() {
        let r = rules();
        assert_eq!(
            check(&r, json!({}), 0).unwrap_err().reason(),
            "missing_claim"
        );
        assert_eq!(
            check(&r, json!({"exp": null}), 0).unwrap_err().reason(),
            "missing_claim"
        );
        assert_eq!(
            check(&r, json!({"exp": "soon"}), 0).unwrap_err().reason(),
            "bad_claim"
        );
        assert_eq!(
            check(&r, json!({"exp": 9e18, "nbf": [1]}), 0)
                .unwrap_err()
                .reason(),
            "bad_claim"
        );
        assert_eq!(
            check(&r, json!({"exp": -5}), 100).unwrap_err().reason(),
            "expired"
        );
        assert_eq!(
            check(&r, json!({"exp": 5000, "sub": 7}), 0)
                .unwrap_err()
                .reason(),
            "bad_claim"
        );
        let mut none = rules();
        none.required.clear();
        assert!(check(&none, json!({}), 0).is_ok());
    }

    #[test]
    fn issuer_and_audience() {
        let mut r = rules();
        r.issuers = vec!["https://idp".into()];
        r.audiences = vec!["api".into(), "web".into()];
        let ok = json!({"exp": 5000, "iss": "https://idp", "aud": ["other", "web"]});
        assert!(check(&r, ok, 0).is_ok());
        let ok = json!({"exp": 5000, "iss": "https://idp", "aud": "api"});
        assert!(check(&r, ok, 0).is_ok());
        for bad_iss in [json!("https://evil"), json!(null), json!(["https://idp"])] {
            let v = json!({"exp": 5000, "iss": bad_iss, "aud": "api"});
            assert_eq!(check(&r, v, 0).unwrap_err().reason(), "bad_issuer");
        }
        let v = json!({"exp": 5000, "aud": "api"});
        assert_eq!(check(&r, v, 0).unwrap_err().reason(), "bad_issuer");
        for bad_aud in [json!("other"), json!([]), json!(5)] {
            let v = json!({"exp": 5000, "iss": "https://idp", "aud": bad_aud});
            assert_eq!(check(&r, v, 0).unwrap_err().reason(), "bad_audience");
        }
        let v = json!({"exp": 5000, "iss": "https://idp"});
        assert_eq!(check(&r, v, 0).unwrap_err().reason(), "bad_audience");
    }

    #[test]
    fn roles_and_scopes_from_every_usual_place() {
        let r = rules();
        let c = check(
            &r,
            json!({"exp": 5000, "roles": ["admin", "ops", "admin", 3],
                   "scope": "orders:read orders:write", "scp": ["a"], "scopes": ["orders:read", "b"]}),
            0,
        )
        .unwrap();
        assert_eq!(c.roles(), ["admin", "ops"]);
        assert_eq!(c.scopes(), ["orders:read", "orders:write", "a", "b"]);
        assert!(c.has_role("ops") && !c.has_role("root"));
        assert!(c.has_scope("b"));
        let c = check(&r, json!({"exp": 5000, "roles": "admin", "scp": "x y"}), 0).unwrap();
        assert_eq!(c.roles(), ["admin"]);
        assert_eq!(c.scopes(), ["x", "y"]);
        let mut nested = rules();
        nested.roles_path = vec!["realm_access".into(), "roles".into()];
        let c = check(
            &nested,
            json!({"exp": 5000, "realm_access": {"roles": ["r1"]}}),
            0,
        )
        .unwrap();
        assert_eq!(c.roles(), ["r1"]);
    }

    #[test]
    fn lookup_prefers_the_whole_dotted_name() {
        let Value::Object(m) = json!({"a.b": 1, "a": {"b": 2}}) else {
            panic!()
        };
        assert_eq!(lookup(&m, &["a".into(), "b".into()]), Some(&json!(1)));
        let Value::Object(m) = json!({"a": {"b": 2}}) else {
            panic!()
        };
        assert_eq!(lookup(&m, &["a".into(), "b".into()]), Some(&json!(2)));
        assert_eq!(lookup(&m, &["a".into(), "c".into()]), None);
    }
}
