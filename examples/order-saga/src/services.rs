//! Three small HTTP services the saga calls — inventory (`reserve`, `unreserve`), payment
//! (`charge`, `refund`) and order (`create`, `cancel`) — each on its own 127.0.0.1 port and
//! registered in the registry.
//!
//! Every call must carry an `Idempotency-Key`. The first call with a key applies the effect
//! and its answer is remembered; a repeated key gets the same answer and changes nothing.
//! The [`Ledger`] counts both: `requests` (every call) and `calls` (effects, one per key),
//! and holds the net state (active reservations, charges not refunded, orders).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_registry::{Instance, Registration, ServiceRegistry};

/// The services' names in the registry.
pub const INVENTORY: &str = "inventory-service";
/// Payment service name.
pub const PAYMENT: &str = "payment-service";
/// Order service name.
pub const ORDER: &str = "order-service";

/// What the services did, as counted by their idempotency keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    /// Effects per `service.action` (`inventory.reserve`): calls with a new key.
    pub calls: BTreeMap<String, u64>,
    /// Every request per `service.action`, repeats included.
    pub requests: BTreeMap<String, u64>,
    /// Reservations not released.
    pub reserved: u64,
    /// Charges not refunded.
    pub charged: u64,
    /// Orders not cancelled.
    pub orders: u64,
    /// Per saga id: its effects in the order they happened, and what it holds now.
    pub sagas: BTreeMap<String, SagaLedger>,
}

/// What the services did for one saga.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaLedger {
    /// Effects (`service.action`), in order; a repeated key adds nothing.
    pub effects: Vec<String>,
    /// Every request for this saga, repeats included.
    pub requests: u64,
    /// Whether its reservation is held.
    pub reserved: bool,
    /// Whether its charge stands.
    pub charged: bool,
    /// Whether its order exists.
    pub ordered: bool,
}

#[derive(Default)]
struct LedgerState {
    answers: HashMap<String, (u16, Value)>,
    snapshot: LedgerSnapshot,
    reservations: HashSet<String>,
    charges: HashSet<String>,
    orders: HashSet<String>,
    outages: HashSet<String>,
}

/// The services' shared books.
#[derive(Clone, Default)]
pub struct Ledger {
    state: Arc<Mutex<LedgerState>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, LedgerState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The counters and the net state now.
    pub fn snapshot(&self) -> LedgerSnapshot {
        self.lock().snapshot.clone()
    }

    /// Makes `action` (`payment.refund`) answer 503 while `down`, applying nothing.
    pub fn set_outage(&self, action: &str, down: bool) {
        let mut state = self.lock();
        if down {
            state.outages.insert(action.to_owned());
        } else {
            state.outages.remove(action);
        }
    }

    /// Handles one call: dedup by key, outage, then the business rule.
    fn call(&self, action: &str, headers: &HeaderMap, body: &Value) -> (StatusCode, Json<Value>) {
        let mut state = self.lock();
        *state
            .snapshot
            .requests
            .entry(action.to_owned())
            .or_default() += 1;
        let Some(key) = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            return answer(400, json!({"error": "missing Idempotency-Key header"}));
        };
        let saga = body["saga_id"].as_str().unwrap_or_default().to_owned();
        state
            .snapshot
            .sagas
            .entry(saga.clone())
            .or_default()
            .requests += 1;
        if state.outages.contains(action) {
            return answer(503, json!({"error": format!("{action} is down")}));
        }
        let scoped = format!("{action}/{key}");
        if let Some((status, body)) = state.answers.get(&scoped) {
            return answer(*status, body.clone());
        }
        *state.snapshot.calls.entry(action.to_owned()).or_default() += 1;
        let (status, reply) = apply(&mut state, action, &saga, body);
        let holds = (
            state.reservations.contains(&saga),
            state.charges.contains(&saga),
            state.orders.contains(&saga),
        );
        let entry = state.snapshot.sagas.entry(saga).or_default();
        entry.effects.push(action.to_owned());
        (entry.reserved, entry.charged, entry.ordered) = holds;
        state.answers.insert(scoped, (status, reply.clone()));
        let (reserved, charged, orders) = (
            state.reservations.len() as u64,
            state.charges.len() as u64,
            state.orders.len() as u64,
        );
        state.snapshot.reserved = reserved;
        state.snapshot.charged = charged;
        state.snapshot.orders = orders;
        answer(status, reply)
    }
}

fn answer(status: u16, body: Value) -> (StatusCode, Json<Value>) {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
}

fn apply(state: &mut LedgerState, action: &str, saga: &str, body: &Value) -> (u16, Value) {
    match action {
        "inventory.reserve" => {
            state.reservations.insert(saga.to_owned());
            (200, json!({"reservation_id": format!("res-{saga}")}))
        }
        "inventory.unreserve" => {
            let released = state.reservations.remove(saga);
            (200, json!({"released": released}))
        }
        "payment.charge" => {
            if body["payment_method"] == "declined-card" {
                return (402, json!({"error": "card declined"}));
            }
            state.charges.insert(saga.to_owned());
            (200, json!({"transaction_id": format!("txn-{saga}")}))
        }
        "payment.refund" => {
            let refunded = state.charges.remove(saga);
            (200, json!({"refunded": refunded}))
        }
        "order.create" => {
            if body["customer"] == "blocked-customer" {
                return (422, json!({"error": "customer is blocked"}));
            }
            state.orders.insert(saga.to_owned());
            (200, json!({"order_id": format!("ord-{saga}")}))
        }
        "order.cancel" => {
            let cancelled = state.orders.remove(saga);
            (200, json!({"cancelled": cancelled}))
        }
        other => (404, json!({"error": format!("unknown action {other}")})),
    }
}

/// The three services, running.
#[derive(Debug)]
pub struct Services {
    ledger: Ledger,
    registrations: Vec<Registration>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Services {
    /// The shared books.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Deregisters the services and stops their servers.
    pub async fn stop(self) {
        for registration in self.registrations {
            // Best effort: the lease expires anyway.
            let _ = registration.deregister().await;
        }
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Starts the three services on 127.0.0.1 and registers them in `registry`.
pub async fn start(registry: &ServiceRegistry) -> Result<Services, Box<dyn std::error::Error>> {
    let ledger = Ledger::default();
    let mut registrations = Vec::new();
    let mut tasks = Vec::new();
    let suffix = std::process::id();
    for (service, prefix, actions) in [
        (INVENTORY, "inventory", ["reserve", "unreserve"]),
        (PAYMENT, "payment", ["charge", "refund"]),
        (ORDER, "order", ["create", "cancel"]),
    ] {
        let mut app = Router::new().route(
            "/ledger",
            get(|State(ledger): State<Ledger>| async move { Json(ledger.snapshot()) }),
        );
        for action in actions {
            let name = format!("{prefix}.{action}");
            app = app.route(
                &format!("/{action}"),
                post(
                    move |State(ledger): State<Ledger>,
                          headers: HeaderMap,
                          Json(body): Json<Value>| async move {
                        ledger.call(&name, &headers, &body)
                    },
                ),
            );
        }
        let app = app.with_state(ledger.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        let instance = Instance::new(format!("{prefix}-{suffix}-{port}"), "127.0.0.1", port);
        registrations.push(registry.register(service, instance).await?);
    }
    Ok(Services {
        ledger,
        registrations,
        tasks,
    })
}
