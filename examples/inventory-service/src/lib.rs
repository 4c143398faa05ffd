//! # inventory-service
//!
//! The demo's inventory service (`trellis demo`): `POST /reserve` and `POST /unreserve` for
//! the order saga, each made safe to repeat by its `Idempotency-Key` — the first call with a
//! key applies the effect and its answer is remembered; a repeat gets the same answer and
//! changes nothing. `GET /stats` shows the counters (requests, effects) and the
//! reservations held; `GET /health` the health report.
//!
//! It is an example written with Trellis' public API only, not a reusable crate: stock is
//! not modelled and the books live in memory.
//!
//! ```
//! use inventory_service::Books;
//! use serde_json::json;
//! let books = Books::default();
//! let (status, reply) = books.call("reserve", Some("k1"), &json!({"saga_id": "s1"}));
//! assert_eq!(status, 200);
//! assert_eq!(books.call("reserve", Some("k1"), &json!({"saga_id": "s1"})), (status, reply));
//! assert_eq!(books.stats()["reserve"]["effects"], 1);
//! assert_eq!(books.stats()["reserve"]["requests"], 2);
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
pub const SERVICE: &str = "inventory-service";

#[derive(Debug, Default)]
struct BooksState {
    answers: HashMap<String, (u16, Value)>,
    requests: BTreeMap<String, u64>,
    effects: BTreeMap<String, u64>,
    reserved: BTreeSet<String>,
}

/// Reservations and the idempotency counters.
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

    /// Handles `action` (`reserve`, `unreserve`) with idempotency key `key`: (status, body).
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
            "reserve" => {
                state.reserved.insert(saga.to_owned());
                (
                    200,
                    json!({"reservation_id": format!("res-{saga}"), "items": body["items"]}),
                )
            }
            "unreserve" => {
                let released = state.reserved.remove(saga);
                (200, json!({"released": released}))
            }
            other => return (404, json!({"error": format!("unknown action {other:?}")})),
        };
        *state.effects.entry(action.to_owned()).or_default() += 1;
        state.answers.insert(scoped, answer.clone());
        answer
    }

    /// Counters per action (`requests`, `effects`) and the reservations held.
    pub fn stats(&self) -> Value {
        let state = self.lock();
        let mut out = serde_json::Map::new();
        for action in ["reserve", "unreserve"] {
            out.insert(
                action.to_owned(),
                json!({
                    "requests": state.requests.get(action).copied().unwrap_or(0),
                    "effects": state.effects.get(action).copied().unwrap_or(0),
                }),
            );
        }
        out.insert("reserved".to_owned(), json!(state.reserved));
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
            "/reserve",
            post(move |headers: HeaderMap, Json(body): Json<Value>| {
                action(b1.clone(), "reserve", headers, body)
            }),
        )
        .route(
            "/unreserve",
            post(move |headers: HeaderMap, Json(body): Json<Value>| {
                action(b2.clone(), "unreserve", headers, body)
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
