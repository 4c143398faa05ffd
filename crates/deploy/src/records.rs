//! Deployment records: what each service's latest deployment is doing, kept in the store so
//! that every process sharing it — the admin node's `GET /v1/deployments` (see
//! [`admin_router`](crate::admin_router)), `trellis deploy` in another terminal — can read
//! it.
//!
//! One [`DeploymentRecord`] per service and namespace, in table [`DEPLOYMENTS_TABLE`]
//! (partition `all`, clustering key `{namespace}/{service}`), as JSON. A
//! [`ServiceDeployer`](crate::ServiceDeployer) given a store
//! ([`ServiceDeployerBuilder::store`](crate::ServiceDeployerBuilder::store)) rewrites it
//! at every state change: a deploy (`deploying`, then `deployed` or `failed`), each decision
//! of a blue-green deployment (`deploying` once green is ready, `analysing` from the split
//! on, then `promoted`, `rolled_back` or `held`; `failed` on an error after something was
//! changed) with the traffic split in force and every decision with its figures, and an
//! undeploy (`undeployed`). A blue-green deployment rejected before anything changed (bad
//! options, blue not running) writes nothing.
//!
//! A record is at most one per service, and its decisions are bounded by the analysis
//! (`window / interval` checks plus four), so the table stays small.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use trellis_store::{Row, Store, StoreError};

use crate::bluegreen::{Action, Decision};
use crate::error::DeployError;
use crate::spec::Platform;

/// The store table holding the records.
pub const DEPLOYMENTS_TABLE: &str = "deployments";
/// The one partition of [`DEPLOYMENTS_TABLE`]: the records are few, and listing them all is
/// what the dashboard does.
const PARTITION: &str = "all";

/// How the deployment moves traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// A plain deploy: the version gets all of the traffic once ready.
    Deploy,
    /// Blue-green: green beside blue, split, analysed, promoted or rolled back.
    BlueGreen,
}

/// Where a deployment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Replicas being started (a deploy), or green started and ready (blue-green).
    Deploying,
    /// A deploy finished: every replica ready.
    Deployed,
    /// Blue-green: traffic split, green being judged.
    Analysing,
    /// Blue-green: green has all of the traffic, blue was stopped.
    Promoted,
    /// Blue-green: green was stopped, blue has all of the traffic.
    RolledBack,
    /// Blue-green: the analysis failed with rollback off; both keep the split.
    Held,
    /// The deployment failed with an error (see the record's `error`).
    Failed,
    /// Every version was stopped.
    Undeployed,
}

impl DeploymentState {
    /// The snake_case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Deploying => "deploying",
            DeploymentState::Deployed => "deployed",
            DeploymentState::Analysing => "analysing",
            DeploymentState::Promoted => "promoted",
            DeploymentState::RolledBack => "rolled_back",
            DeploymentState::Held => "held",
            DeploymentState::Failed => "failed",
            DeploymentState::Undeployed => "undeployed",
        }
    }
}

impl fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One version's share of the traffic, in percent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficShare {
    /// The version.
    pub version: String,
    /// Its share, 0 to 100.
    pub weight: u32,
}

impl TrafficShare {
    fn new(version: &str, weight: u32) -> Self {
        TrafficShare {
            version: version.to_owned(),
            weight,
        }
    }
}

/// A [`Decision`] as stored: plain numbers, times in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// When it was taken, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What it did.
    pub action: Action,
    /// The version it is about.
    pub version: String,
    /// Requests green served since the analysis began.
    pub requests: u64,
    /// Of those, 5xx answers.
    pub errors: u64,
    /// `errors / requests`, when there were requests.
    pub error_rate: Option<f64>,
    /// Green's 99th percentile latency in milliseconds, when known.
    pub p99_ms: Option<f64>,
    /// Why, with the thresholds.
    pub reason: String,
}

impl From<&Decision> for DecisionRecord {
    fn from(d: &Decision) -> Self {
        DecisionRecord {
            at_ms: millis(d.at),
            action: d.action,
            version: d.version.clone(),
            requests: d.requests,
            errors: d.errors,
            error_rate: d.error_rate,
            p99_ms: d.p99.map(|p| p.as_secs_f64() * 1000.0),
            reason: d.reason.clone(),
        }
    }
}

/// The latest deployment of one service in one namespace — what `GET /v1/deployments`
/// lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// The service.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// Where it runs.
    pub platform: Platform,
    /// How traffic moves.
    pub strategy: Strategy,
    /// Where it stands.
    pub state: DeploymentState,
    /// The version running before (blue), or the version deployed by a plain deploy.
    pub current_version: String,
    /// Blue-green: the version rolled out (green).
    pub new_version: Option<String>,
    /// The traffic split in force, in percent.
    pub traffic: Vec<TrafficShare>,
    /// Blue-green: every decision so far, in order.
    pub decisions: Vec<DecisionRecord>,
    /// Why it failed, when `state` is `failed`.
    pub error: Option<String>,
    /// When the deployment began, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// When the record last changed, milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
}

impl DeploymentRecord {
    /// A plain deploy of `version`, just begun.
    pub(crate) fn deploy(
        service: &str,
        namespace: &str,
        platform: Platform,
        version: &str,
    ) -> Self {
        let now = millis(SystemTime::now());
        DeploymentRecord {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            platform,
            strategy: Strategy::Deploy,
            state: DeploymentState::Deploying,
            current_version: version.to_owned(),
            new_version: None,
            traffic: vec![TrafficShare::new(version, 100)],
            decisions: Vec::new(),
            error: None,
            started_at_ms: now,
            updated_at_ms: now,
        }
    }

    /// A blue-green deployment from `blue` to `green`, just begun: blue has all of the
    /// traffic.
    pub(crate) fn blue_green(
        service: &str,
        namespace: &str,
        platform: Platform,
        blue: &str,
        green: &str,
    ) -> Self {
        DeploymentRecord {
            strategy: Strategy::BlueGreen,
            new_version: Some(green.to_owned()),
            traffic: vec![TrafficShare::new(blue, 100), TrafficShare::new(green, 0)],
            ..Self::deploy(service, namespace, platform, blue)
        }
    }

    /// The record's key in the table: `{namespace}/{service}`.
    pub fn key(&self) -> String {
        key(&self.namespace, &self.service)
    }

    /// Moves to `state`, stamping the time.
    pub(crate) fn set_state(&mut self, state: DeploymentState) {
        self.state = state;
        self.updated_at_ms = millis(SystemTime::now()).max(self.updated_at_ms);
    }

    /// Applies one blue-green decision: appends it, and sets the state and the traffic it
    /// implies (`split` is blue's and green's share during the analysis).
    pub(crate) fn apply(&mut self, decision: &Decision, split: (u32, u32)) {
        let blue = self.current_version.clone();
        let green = self
            .new_version
            .clone()
            .unwrap_or_else(|| decision.version.clone());
        let (state, traffic) = match decision.action {
            Action::Start => (
                DeploymentState::Deploying,
                vec![TrafficShare::new(&blue, 100), TrafficShare::new(&green, 0)],
            ),
            Action::Split | Action::Check => (
                DeploymentState::Analysing,
                vec![
                    TrafficShare::new(&blue, split.0),
                    TrafficShare::new(&green, split.1),
                ],
            ),
            Action::Promote => (
                DeploymentState::Promoted,
                vec![TrafficShare::new(&green, 100)],
            ),
            Action::Rollback => (
                DeploymentState::RolledBack,
                vec![TrafficShare::new(&blue, 100)],
            ),
            Action::Hold => (
                DeploymentState::Held,
                vec![
                    TrafficShare::new(&blue, split.0),
                    TrafficShare::new(&green, split.1),
                ],
            ),
        };
        self.decisions.push(DecisionRecord::from(decision));
        self.traffic = traffic;
        self.set_state(state);
    }
}

fn key(namespace: &str, service: &str) -> String {
    format!("{namespace}/{service}")
}

pub(crate) fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The records in a store: write one, read one, list them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// use trellis_deploy::DeploymentRecords;
/// use trellis_store::Store;
///
/// let store = Store::open(&format!("sqlite://{}/doc.db", dir.path().display())).await?;
/// let records = DeploymentRecords::new(store);
/// assert!(records.list().await?.is_empty());
/// assert!(records.get("default", "user-service").await?.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeploymentRecords {
    store: Store,
}

impl DeploymentRecords {
    /// The records kept in `store`.
    pub fn new(store: Store) -> Self {
        DeploymentRecords { store }
    }

    fn table(&self) -> Result<trellis_store::Table, StoreError> {
        self.store.table(DEPLOYMENTS_TABLE)
    }

    /// Writes `record`, replacing the one of the same service and namespace.
    pub async fn put(&self, record: &DeploymentRecord) -> Result<(), DeployError> {
        let key = record.key();
        let fail = |reason: String| DeployError::Record {
            key: key.clone(),
            reason,
        };
        let value = serde_json::to_vec(record).map_err(|e| fail(format!("cannot encode: {e}")))?;
        self.table()
            .map_err(|e| fail(format!("store: {e}")))?
            .put(PARTITION, &key, value, None)
            .await
            .map_err(|e| fail(format!("store: {e}")))?;
        Ok(())
    }

    /// The record of `service` in `namespace`, if any. A stored value that is not a
    /// record is an error naming it.
    pub async fn get(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Option<DeploymentRecord>, DeployError> {
        let key = key(namespace, service);
        let row = self
            .table()
            .map_err(|e| store_error(&key, &e))?
            .get(PARTITION, &key)
            .await
            .map_err(|e| store_error(&key, &e))?;
        row.as_ref().map(decode).transpose()
    }

    /// Every record, in key order (`namespace/service`). One stored value that is not a
    /// record fails the list with an error naming it.
    pub async fn list(&self) -> Result<Vec<DeploymentRecord>, DeployError> {
        self.rows()
            .await
            .map_err(|e| store_error("*", &e))?
            .iter()
            .map(decode)
            .collect()
    }

    /// The stored rows, undecoded.
    pub(crate) async fn rows(&self) -> Result<Vec<Row>, StoreError> {
        self.table()?.scan_all(PARTITION, None).await
    }
}

fn store_error(key: &str, error: &StoreError) -> DeployError {
    DeployError::Record {
        key: key.to_owned(),
        reason: format!("store: {error}"),
    }
}

/// Reads one stored row as a record; an error names its key and what is wrong.
pub(crate) fn decode(row: &Row) -> Result<DeploymentRecord, DeployError> {
    serde_json::from_slice(&row.value).map_err(|e| DeployError::Record {
        key: row.clustering.clone(),
        reason: format!(
            "the stored value ({} bytes) is not a deployment record: {e}",
            row.value.len()
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn decision(action: Action) -> Decision {
        Decision {
            at: SystemTime::now(),
            action,
            version: "2.0.0".into(),
            requests: 40,
            errors: 1,
            error_rate: Some(0.025),
            p99: Some(Duration::from_millis(12)),
            reason: "why".into(),
        }
    }

    #[test]
    fn decisions_set_state_and_traffic() {
        let mut r =
            DeploymentRecord::blue_green("users", "prod", Platform::Local, "1.0.0", "2.0.0");
        assert_eq!(r.traffic[0], TrafficShare::new("1.0.0", 100));
        r.apply(&decision(Action::Start), (90, 10));
        assert_eq!(r.state, DeploymentState::Deploying);
        r.apply(&decision(Action::Split), (90, 10));
        assert_eq!(r.state, DeploymentState::Analysing);
        assert_eq!(
            r.traffic,
            [
                TrafficShare::new("1.0.0", 90),
                TrafficShare::new("2.0.0", 10)
            ]
        );
        r.apply(&decision(Action::Promote), (90, 10));
        assert_eq!(r.state, DeploymentState::Promoted);
        assert_eq!(r.traffic, [TrafficShare::new("2.0.0", 100)]);
        assert_eq!(r.decisions.len(), 3);
        assert_eq!(r.decisions[2].p99_ms, Some(12.0));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["state"], "promoted");
        assert_eq!(json["strategy"], "blue_green");
        assert_eq!(json["decisions"][0]["action"], "start");
        let back: DeploymentRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_bad_value_is_named() {
        let row = Row {
            partition: PARTITION.into(),
            clustering: "prod/users".into(),
            value: br#"{"service":"users"}"#.to_vec(),
            version: 1,
            expires_at: None,
        };
        let err = decode(&row).unwrap_err().to_string();
        assert!(err.starts_with("deployment record prod/users: "), "{err}");
        assert!(err.contains("missing field"), "{err}");
    }
}
