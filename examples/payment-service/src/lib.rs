//! # payment-service
//!
//! The demo's payment service (`trellis demo`): `POST /charge` and `POST /refund` for the
//! order saga, each made safe to repeat by its `Idempotency-Key` — the first call with a key
//! applies the effect and its answer is remembered; a repeat gets the same answer and
//! changes nothing. A charge above [`DECLINE_ABOVE_CENTS`] is declined with 402 (the saga
//! then compensates). `GET /stats` shows the counters and the charges standing;
//! `GET /health` the health report.
//!
//! It is an example written with Trellis' public API only, not a reusable crate: no money
//! moves and the books live in memory.
//!
//! ```
//! use payment_service::Books;
//! use serde_json::json;
//! let books = Books::default();
//! let (status, _) = books.call("charge", Some("k1"), &json!({"saga_id": "s1", "amount": 4250}));
//! assert_eq!(status, 200);
//! let (status, _) = books.call("charge", Some("k2"), &json!({"saga_id": "s2", "amount": 500000}));
//! assert_eq!(status, 402);
//! assert_eq!(books.stats()["charge"]["effects"], 2);
//! assert_eq!(books.stats()["charged"].as_array().unwrap().len(), 1);
//! ```

use trellis::service as env;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use trellis::health::ServiceHealthMonitor;

pub use env::{EnvError, ServiceEnv};

/// The service's default name.
pub const SERVICE: &str = "payment-service";

/// Charges above this amount (in cents) are declined.
pub const DECLINE_ABOVE_CENTS: u64 = 100_000;

#[derive(Debug, Default)]
struct BooksState {
    answers: HashMap<String, (u16, Value)>,
    requests: BTreeMap<String, u64>,
    effects: BTreeMap<String, u64>,
    charged: BTreeSet<String>,
}

/// Charges and the idempotency counters.
#[derive(Debug, Clone, Default)]
pub struct Books {
    state: Arc<Mutex<BooksState>>,
}

impl Books {
    fn lock(&self) -> MutexGuard<'_, BooksState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Handles `action` (`charge`, `refund`) with idempotency key `key`: (status, body).
    /// A call without a key is refused with 400 and changes nothing.
    pub fn call(&self, action: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut state = self.lock();
        *state.requests.entry(action.to_owned()).or_default() += 1;
        let Some(key) = key else {
            return (400, json!({"error": "missing Idempotency-Key header"}));
        };
        let Some(saga) = body["saga_id"].as_str().filter(|s| !s.is_empty()) else {
            return (400, json!({"error": "body needs a non-empty \"saga_id\""}));
        };
        let scoped = format!("{action}/{key}");
        if let Some(answer) = state.answers.get(&scoped) {
            return answer.clone();
        }
        let answer = match action {
            "charge" => {
                let Some(amount) = body["amount"].as_u64() else {
                    return (400, json!({"error": "body needs \"amount\" in cents"}));
                };
                if amount > DECLINE_ABOVE_CENTS {
                    (
                        402,
                        json!({"error": format!("card declined: {amount} cents is above the limit of {DECLINE_ABOVE_CENTS}")}),
                    )
                } else {
                    state.charged.insert(saga.to_owned());
                    (
                        200,
                        json!({"transaction_id": format!("txn-{saga}"), "amount": amount}),
                    )
                }
            }
            "refund" => {
                let refunded = state.charged.remove(saga);
                (200, json!({"refunded": refunded}))
            }
            other => return (404, json!({"error": format!("unknown action {other:?}")})),
        };
        *state.effects.entry(action.to_owned()).or_default() += 1;
        state.answers.insert(scoped, answer.clone());
        answer
    }

    /// Counters per action (`requests`, `effects`) and the charges standing.
    pub fn stats(&self) -> Value {
        let state = self.lock();
        let mut out = serde_json::Map::new();
        for action in ["charge", "refund"] {
            out.insert(
                action.to_owned(),
                json!({
                    "requests": state.requests.get(action).copied().unwrap_or(0),
                    "effects": state.effects.get(action).copied().unwrap_or(0),
                }),
            );
        }
        out.insert("charged".to_owned(), json!(state.charged));
        Value::Object(out)
    }
}

async fn action(
    books: Books,
    action: &'static str,
    headers: HeaderMap,
    body: Value,
) -> (StatusCode, Json<Value>) {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let (status, reply) = books.call(action, key, &body);
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(reply),
    )
}

/// The service's routes over `books`, without tracing.
pub fn router(books: Books, service: &str) -> Router {
    let monitor = ServiceHealthMonitor::builder(service).build();
    let (b1, b2) = (books.clone(), books.clone());
    Router::new()
        .route(
            "/charge",
            post(move |headers: HeaderMap, Json(body): Json<Value>| {
                action(b1.clone(), "charge", headers, body)
            }),
        )
        .route(
            "/refund",
            post(move |headers: HeaderMap, Json(body): Json<Value>| {
                action(b2.clone(), "refund", headers, body)
            }),
        )
        .route(
            "/stats",
            get(|State(books): State<Books>| async move { Json(books.stats()) }),
        )
        .with_state(books)
        .merge(monitor.router())
}

/// Serves the service on 127.0.0.1:`env.port` until `shutdown` resolves.
pub async fn run(
    env: ServiceEnv,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tracer = env.tracer()?;
    let served = env::Served::new(&env, tracer.clone());
    let app = router(Books::default(), &env.service).route_layer(
        axum::middleware::from_fn_with_state(served, env::serve_request),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", env.port)).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tracer.flush();
    Ok(())
}
