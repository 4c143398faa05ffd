//! # user-service
//!
//! The demo's user service (`trellis demo`), written with Trellis' public API only:
//!
//! - `POST /users` creates a user (`{"id"?, "name", "email"}`; 201, 409 when the id is
//!   taken) and `PUT /users/{id}` changes it; each write and its `user.created` /
//!   `user.updated` event commit in **one store batch** through the transactional
//!   [`Outbox`]; a relay then publishes the events on the embedded event bus.
//! - `GET /users/{id}` reads one; `GET /users/{id}/with-orders` is the seed's
//!   `getUserWithOrders` (the user, and its orders from order-service through
//!   [`ServiceClient`], found in the registry); `POST /users/with-welcome-order` is
//!   `createUserAndWelcomeOrder` (create, then `POST /orders` a welcome kit).
//! - `GET /discovery`: how many usable instances of order-service this process sees in
//!   the registry (its snapshot of the shared store).
//!
//! It is an example, not a reusable crate.
//!
//! ```
//! use user_service::NewUser;
//! let user: NewUser = serde_json::from_str(r#"{"name": "Ada", "email": "ada@example.com"}"#).unwrap();
//! assert!(user.validate().is_ok());
//! let bad = NewUser { email: "no-at-sign".into(), ..user };
//! assert!(bad.validate().unwrap_err().contains("email"));
//! ```

use trellis::service as env;

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis::client::ServiceClient;
use trellis::events::{EventBus, Message, Outbox, Relay, RelayOptions};
use trellis::health::{ServiceHealthMonitor, StoreCheck};
use trellis::registry::{RegistryOptions, ServiceRegistry};
use trellis::store::{Batch, BatchOutcome, Key, Model, Models, Store};

pub use env::{EnvError, ServiceEnv};

/// The service's default name.
pub const SERVICE: &str = "user-service";
/// The order service it calls.
pub const ORDERS: &str = "order-service";

/// A user (table `users`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// User id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Email.
    pub email: String,
    /// 1 when created, one more at every change; sent with the events so that a consumer
    /// reading `user.created` and `user.updated` (two topics, no order between them) keeps
    /// the latest.
    #[serde(default)]
    pub revision: u64,
}

impl Model for User {
    const TABLE: &'static str = "users";
    fn key(&self) -> Key {
        Key::partition(&self.id)
    }
}

/// `POST /users` and `POST /users/with-welcome-order`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewUser {
    /// User id; a new one when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Display name.
    pub name: String,
    /// Email.
    pub email: String,
}

impl NewUser {
    /// Checks the user; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(id) = &self.id
            && (id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(format!(
                "id: {id:?} must be letters, digits, '-' or '_', not empty"
            ));
        }
        if self.name.trim().is_empty() {
            return Err("name: must not be empty".into());
        }
        if !self.email.contains('@') {
            return Err(format!("email: {:?} is not an email address", self.email));
        }
        Ok(())
    }
}

/// `PUT /users/{id}`: the fields to change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserChange {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New email.
    #[serde(default)]
    pub email: Option<String>,
}

#[derive(Clone)]
struct App {
    registry: ServiceRegistry,
    store: Store,
    users: Models<User>,
    outbox: Outbox,
    orders: ServiceClient,
}

type Reply = (StatusCode, Json<Value>);

fn error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    (status, Json(json!({"error": message.to_string()})))
}

fn event(user: &User) -> Value {
    json!({"user_id": user.id, "email": user.email, "name": user.name, "revision": user.revision})
}

/// A fresh user id.
fn new_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "u-{nanos:x}-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

impl App {
    /// The user row and its `user.created` event, in one batch.
    async fn create(&self, new: NewUser) -> Result<User, Reply> {
        new.validate()
            .map_err(|r| error(StatusCode::BAD_REQUEST, r))?;
        let user = User {
            id: new.id.unwrap_or_else(new_id),
            name: new.name,
            email: new.email,
            revision: 1,
        };
        let internal = |e: &dyn std::fmt::Display| error(StatusCode::INTERNAL_SERVER_ERROR, e);
        let bytes = serde_json::to_vec(&user).map_err(|e| internal(&e))?;
        let mut batch = Batch::new();
        batch.add(
            self.users
                .table()
                .mutation_insert_if_absent(&user.id, "", bytes, None)
                .map_err(|e| internal(&e))?,
        );
        self.outbox
            .stage(
                &mut batch,
                "user.created",
                Message::new(event(&user))
                    .key(user.id.clone())
                    .event_type("user.created"),
            )
            .map_err(|e| internal(&e))?;
        match self.store.batch(batch).await.map_err(|e| internal(&e))? {
            BatchOutcome::Applied { .. } => Ok(user),
            BatchOutcome::Rejected { .. } => Err(error(
                StatusCode::CONFLICT,
                format!("user {:?} exists", user.id),
            )),
        }
    }
}

async fn create_user(State(app): State<App>, body: Result<Json<NewUser>, JsonRejection>) -> Reply {
    let new = match body {
        Ok(Json(new)) => new,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match app.create(new).await {
        Ok(user) => (StatusCode::CREATED, Json(json!(user))),
        Err(reply) => reply,
    }
}

async fn update_user(
    State(app): State<App>,
    Path(id): Path<String>,
    body: Result<Json<UserChange>, JsonRejection>,
) -> Reply {
    let change = match body {
        Ok(Json(change)) => change,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let internal = |e: &dyn std::fmt::Display| error(StatusCode::INTERNAL_SERVER_ERROR, e);
    // Optimistic concurrency: a concurrent write rejects the batch; try again a few times.
    for _ in 0..8 {
        let found = match app.users.find_one(&Key::partition(&id)).await {
            Ok(Some(found)) => found,
            Ok(None) => return error(StatusCode::NOT_FOUND, format!("no user {id:?}")),
            Err(e) => return internal(&e),
        };
        let mut user = found.value;
        if let Some(name) = &change.name {
            user.name = name.clone();
        }
        if let Some(email) = &change.email {
            user.email = email.clone();
        }
        user.revision += 1;
        let check = NewUser {
            id: Some(user.id.clone()),
            name: user.name.clone(),
            email: user.email.clone(),
        };
        if let Err(reason) = check.validate() {
            return error(StatusCode::BAD_REQUEST, reason);
        }
        let bytes = match serde_json::to_vec(&user) {
            Ok(bytes) => bytes,
            Err(e) => return internal(&e),
        };
        let mut batch = Batch::new();
        match app
            .users
            .table()
            .mutation_update_if_version(&id, "", found.version, bytes, None)
        {
            Ok(mutation) => batch.add(mutation),
            Err(e) => return internal(&e),
        }
        let message = Message::new(event(&user))
            .key(user.id.clone())
            .event_type("user.updated");
        if let Err(e) = app.outbox.stage(&mut batch, "user.updated", message) {
            return internal(&e);
        }
        match app.store.batch(batch).await {
            Ok(BatchOutcome::Applied { .. }) => return (StatusCode::OK, Json(json!(user))),
            Ok(BatchOutcome::Rejected { .. }) => continue,
            Err(e) => return internal(&e),
        }
    }
    error(
        StatusCode::CONFLICT,
        format!("user {id:?} kept changing; try again"),
    )
}

async fn get_user(State(app): State<App>, Path(id): Path<String>) -> Reply {
    match app.users.find_one(&Key::partition(&id)).await {
        Ok(Some(found)) => (StatusCode::OK, Json(json!(found.value))),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no user {id:?}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The seed's `getUserWithOrders`.
async fn user_with_orders(State(app): State<App>, Path(id): Path<String>) -> Reply {
    let user = match app.users.find_one(&Key::partition(&id)).await {
        Ok(Some(found)) => found.value,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no user {id:?}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    match app
        .orders
        .get_json::<Value>(&format!("/users/{id}/orders"))
        .await
    {
        Ok(orders) => {
            let mut body = json!(user);
            body["orders"] = orders;
            (StatusCode::OK, Json(body))
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("order-service: {e}")),
    }
}

/// The seed's `createUserAndWelcomeOrder`.
async fn user_with_welcome_order(
    State(app): State<App>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Reply {
    let new = match body {
        Ok(Json(new)) => new,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let user = match app.create(new).await {
        Ok(user) => user,
        Err(reply) => return reply,
    };
    let order = json!({
        "user_id": user.id,
        "kind": "welcome",
        "items": [{"sku": "welcome-kit", "quantity": 1}],
        "total": 0,
    });
    match app.orders.post_json::<_, Value>("/orders", &order).await {
        Ok(welcome) => (
            StatusCode::CREATED,
            Json(json!({"user": user, "welcome_order": welcome})),
        ),
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            format!(
                "user {:?} created, welcome order failed: order-service: {e}",
                user.id
            ),
        ),
    }
}

/// Instances of `service` a client would use (healthy, or not checked yet).
fn usable(registry: &ServiceRegistry, service: &str) -> usize {
    registry
        .discover(service)
        .iter()
        .filter(|r| r.status != trellis::registry::InstanceStatus::Unhealthy)
        .count()
}

/// Serves the service on 127.0.0.1:`env.port` until `shutdown` resolves.
pub async fn run(
    env: ServiceEnv,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tracer = env.tracer()?;
    let store = Store::open(&env.store_url).await?;
    let registry = ServiceRegistry::start(
        &store,
        RegistryOptions {
            refresh_interval: Duration::from_millis(200),
            ..RegistryOptions::default()
        },
    )
    .await?;
    let orders = ServiceClient::builder(ORDERS, &registry)
        .retries(1)
        .tracer(tracer.clone())
        .build()?;
    let bus = EventBus::embedded(&store)?.with_tracer(tracer.clone());
    let outbox = Outbox::new(&store)?
        .source(env.service.clone())
        .tracer(tracer.clone());
    let relay = Relay::spawn(outbox.clone(), bus, RelayOptions::default());
    let app = App {
        registry: registry.clone(),
        store: store.clone(),
        users: Models::new(&store)?,
        outbox,
        orders,
    };
    let monitor = ServiceHealthMonitor::builder(&env.service)
        .check("store", StoreCheck::new(store.clone()))
        .build();
    let router = Router::new()
        .route("/users", post(create_user))
        .route("/users/with-welcome-order", post(user_with_welcome_order))
        .route("/users/{id}", get(get_user).put(update_user))
        .route("/users/{id}/with-orders", get(user_with_orders))
        .route(
            "/discovery",
            get(|State(app): State<App>| async move {
                Json(json!({ORDERS: usable(&app.registry, ORDERS)}))
            }),
        )
        .with_state(app)
        .merge(monitor.router())
        .route_layer(axum::middleware::from_fn_with_state(
            env::Served::new(&env, tracer.clone()),
            env::serve_request,
        ));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", env.port)).await?;
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    relay.shutdown().await;
    let _ = registry.shutdown().await;
    tracer.flush();
    served?;
    Ok(())
}
