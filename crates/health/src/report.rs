//! The values a health evaluation produces: [`HealthStatus`], one [`CheckResult`] per check
//! and the [`HealthReport`] that `GET /health` returns as JSON.

use serde::{Deserialize, Serialize};

/// The health of one check or of a whole service.
///
/// Serialized in lowercase: `"healthy"`, `"degraded"`, `"unhealthy"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Every check passed.
    Healthy,
    /// Only non-critical checks failed: the service still serves, with less.
    Degraded,
    /// At least one critical check failed: the service should not receive traffic.
    Unhealthy,
}

impl HealthStatus {
    /// True when the service can take traffic: [`Healthy`](Self::Healthy) or
    /// [`Degraded`](Self::Degraded).
    pub fn is_serving(self) -> bool {
        matches!(self, HealthStatus::Healthy | HealthStatus::Degraded)
    }

    /// The lowercase name used on the wire: `healthy`, `degraded` or `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }

    /// The aggregate status of a set of check results.
    ///
    /// All healthy (or no results at all) gives [`Healthy`](Self::Healthy); failures of
    /// non-critical checks only give [`Degraded`](Self::Degraded); any failing critical check
    /// gives [`Unhealthy`](Self::Unhealthy).
    pub fn aggregate<'a>(results: impl IntoIterator<Item = &'a CheckResult>) -> HealthStatus {
        let mut status = HealthStatus::Healthy;
        for result in results {
            if result.status == HealthStatus::Healthy {
                continue;
            }
            if result.critical {
                return HealthStatus::Unhealthy;
            }
            status = HealthStatus::Degraded;
        }
        status
    }
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one named check in one evaluation.
///
/// `status` is [`HealthStatus::Healthy`] or [`HealthStatus::Unhealthy`] — a single check is
/// never degraded; degradation is a property of the aggregate. `error` is set exactly when the
/// check failed, and says why (the check's own message, a timeout, or a panic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The name the check was registered under.
    pub name: String,
    /// [`HealthStatus::Healthy`] or [`HealthStatus::Unhealthy`].
    pub status: HealthStatus,
    /// Whether a failure of this check makes the whole service unhealthy (otherwise degraded).
    pub critical: bool,
    /// How long the check ran, in milliseconds (at most its timeout, plus scheduling).
    pub duration_ms: f64,
    /// Why the check failed; absent when it passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The result of running every check of a service once: the body of `GET /health`.
///
/// Invariant: `status` is [`HealthStatus::aggregate`] of `checks`, which are listed in the
/// order they were registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The service the report is about.
    pub service: String,
    /// The aggregate status.
    pub status: HealthStatus,
    /// One result per registered check, in registration order.
    pub checks: Vec<CheckResult>,
    /// When the evaluation finished, in milliseconds since the Unix epoch.
    pub checked_at_ms: u64,
}

impl HealthReport {
    /// The results of the checks that failed.
    pub fn failing(&self) -> impl Iterator<Item = &CheckResult> {
        self.checks
            .iter()
            .filter(|c| c.status != HealthStatus::Healthy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: HealthStatus, critical: bool) -> CheckResult {
        CheckResult {
            name: "c".into(),
            status,
            critical,
            duration_ms: 0.0,
            error: None,
        }
    }

    #[test]
    fn aggregate_follows_criticality() {
        use HealthStatus::*;
        assert_eq!(HealthStatus::aggregate(&[]), Healthy);
        assert_eq!(
            HealthStatus::aggregate(&[result(Healthy, true), result(Healthy, false)]),
            Healthy
        );
        assert_eq!(
            HealthStatus::aggregate(&[result(Healthy, true), result(Unhealthy, false)]),
            Degraded
        );
        assert_eq!(
            HealthStatus::aggregate(&[result(Unhealthy, false), result(Unhealthy, true)]),
            Unhealthy
        );
    }

    #[test]
    fn status_serializes_lowercase_and_serving() {
        assert_eq!(
            serde_json::to_string(&HealthStatus::Degraded).unwrap(),
            "\"degraded\""
        );
        assert!(HealthStatus::Healthy.is_serving());
        assert!(HealthStatus::Degraded.is_serving());
        assert!(!HealthStatus::Unhealthy.is_serving());
        assert_eq!(HealthStatus::Unhealthy.to_string(), "unhealthy");
    }

    #[test]
    fn error_is_omitted_when_absent() {
        let json = serde_json::to_value(result(HealthStatus::Healthy, true)).unwrap();
        assert!(json.get("error").is_none());
        let back: CheckResult = serde_json::from_value(json).unwrap();
        assert_eq!(back.error, None);
    }
}
