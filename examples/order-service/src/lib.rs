//! # order-service
//!
//! The demo's order service (`trellis demo`), written with Trellis' public API only:
//!
//! - `POST /orders` runs the seed's **OrderCreationSaga** — reserve inventory, charge the
//!   payment (both through [`ServiceClient`] with idempotency keys), create the order — and
//!   compensates in reverse when a step fails (a declined payment unreserves the stock).
//!   201 with the order when it completed, 409 with the saga's error when it was
//!   compensated, 500 when it needs attention.
//! - `GET /users/{id}/orders`: a user's orders (what user-service's `getUserWithOrders`
//!   asks for).
//! - It consumes `user.created` and `user.updated` in consumer group `order-service` into
//!   its own `UserProfile` table; `GET /profiles/{id}` reads one.
//! - `GET /discovery`: how many usable instances of inventory-service and payment-service
//!   this process sees in the registry.
//! - A configuration watch flips the `express_shipping` feature flag live; `GET /orders`
//!   shows it with the version and instance (and every response carries
//!   `x-service-version`), so a blue-green switch is visible.
//!
//! It is an example, not a reusable crate.
//!
//! ```
//! use order_service::{Item, NewOrder};
//! let order: NewOrder = serde_json::from_str(
//!     r#"{"user_id": "u1", "items": [{"sku": "book-1", "quantity": 2}], "total": 4250}"#,
//! ).unwrap();
//! assert_eq!(order.kind, "standard");
//! assert!(order.validate().is_ok());
//! let empty = NewOrder { items: Vec::<Item>::new(), ..order };
//! assert!(empty.validate().unwrap_err().contains("items"));
//! ```

use trellis::service as env;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis::client::ServiceClient;
use trellis::config::{ConfigOptions, ConfigurationManager};
use trellis::events::{Event, EventBus, Subscription};
use trellis::health::{ServiceHealthMonitor, StoreCheck};
use trellis::registry::{RegistryOptions, ServiceRegistry};
use trellis::saga::{Saga, SagaOptions, SagaOrchestrator, SagaState, Step, StepError};
use trellis::store::{CasOutcome, Key, Model, Models, Store};

pub use env::{EnvError, ServiceEnv};

/// The service's default name.
pub const SERVICE: &str = "order-service";
/// The inventory service it calls.
pub const INVENTORY: &str = "inventory-service";
/// The payment service it calls.
pub const PAYMENT: &str = "payment-service";
/// The saga's name.
pub const SAGA_NAME: &str = "order-creation";
/// The consumer group reading user events.
pub const GROUP: &str = "order-service";
/// The feature flag the configuration watch flips.
pub const FLAG: &str = "express_shipping";

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Stock keeping unit.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// `POST /orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    /// Who orders.
    pub user_id: String,
    /// `standard` or `welcome`. Defaults to `standard`.
    #[serde(default = "standard")]
    pub kind: String,
    /// What.
    pub items: Vec<Item>,
    /// Total in cents.
    #[serde(default)]
    pub total: u64,
}

fn standard() -> String {
    "standard".to_owned()
}

impl NewOrder {
    /// Checks the order; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.user_id.trim().is_empty() {
            return Err("user_id: must not be empty".into());
        }
        if self.items.is_empty() {
            return Err("items: an order needs at least one item".into());
        }
        if let Some(item) = self.items.iter().find(|i| i.quantity == 0) {
            return Err(format!("items: {:?} has quantity 0", item.sku));
        }
        Ok(())
    }
}

/// A created order (table `orders`, one partition per user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Order id.
    pub order_id: String,
    /// Who ordered.
    pub user_id: String,
    /// `standard` or `welcome`.
    pub kind: String,
    /// What.
    pub items: Vec<Item>,
    /// Total in cents.
    pub total: u64,
    /// The saga that created it.
    pub saga_id: String,
    /// Whether express shipping was on when it was created.
    pub express_shipping: bool,
    /// The order-service version that created it.
    pub created_by: String,
}

impl Model for Order {
    const TABLE: &'static str = "orders";
    fn key(&self) -> Key {
        Key::new(&self.user_id, &self.order_id)
    }
}

/// What order-service knows of a user, from `user.created` / `user.updated` (table
/// `user_profiles`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserProfile {
    /// User id.
    pub user_id: String,
    /// Email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Preferences (empty at first, as in the seed).
    pub preferences: Value,
    /// The type of the last event applied.
    pub last_event: String,
    /// The user's revision that event carried: an older event is not applied.
    #[serde(default)]
    pub revision: u64,
}

impl Model for UserProfile {
    const TABLE: &'static str = "user_profiles";
    fn key(&self) -> Key {
        Key::partition(&self.user_id)
    }
}

/// The payload of `user.created` and `user.updated`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEvent {
    /// User id.
    pub user_id: String,
    /// Email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// The user's revision (1 when created, one more at every change).
    #[serde(default)]
    pub revision: u64,
}

/// The saga data: the order as asked, then what each step returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderData {
    /// Id of the order to create.
    pub order_id: String,
    /// The order.
    pub order: NewOrder,
    /// Express shipping when the saga started.
    pub express_shipping: bool,
    /// Version creating it.
    pub version: String,
    /// Set by `reserve-inventory`.
    pub reservation_id: Option<String>,
    /// Set by `charge-payment`.
    pub transaction_id: Option<String>,
}

/// The `OrderCreationSaga`: reserve inventory → charge payment → create order; the
/// compensations unreserve, refund and delete the order.
pub fn order_saga(
    inventory: ServiceClient,
    payment: ServiceClient,
    orders: Models<Order>,
) -> Result<Saga<OrderData>, trellis::saga::SagaError> {
    let (i1, i2, p1, p2, o1, o2) = (
        inventory.clone(),
        inventory,
        payment.clone(),
        payment,
        orders.clone(),
        orders,
    );
    let reserve = Step::new(
        "reserve-inventory",
        move |ctx, mut data: OrderData| {
            let client = i1.clone();
            async move {
                let payload = json!({"saga_id": ctx.saga_id(), "items": data.order.items});
                let reply: Value = ctx.call_service(&client, "reserve", &payload).await?;
                data.reservation_id = reply["reservation_id"].as_str().map(str::to_owned);
                Ok(data)
            }
        },
        move |ctx, _data: OrderData| {
            let client = i2.clone();
            async move {
                let _: Value = ctx
                    .call_service(&client, "unreserve", &json!({"saga_id": ctx.saga_id()}))
                    .await?;
                Ok(())
            }
        },
    );
    let charge = Step::new(
        "charge-payment",
        move |ctx, mut data: OrderData| {
            let client = p1.clone();
            async move {
                let payload = json!({"saga_id": ctx.saga_id(), "amount": data.order.total});
                let reply: Value = ctx.call_service(&client, "charge", &payload).await?;
                data.transaction_id = reply["transaction_id"].as_str().map(str::to_owned);
                Ok(data)
            }
        },
        move |ctx, _data: OrderData| {
            let client = p2.clone();
            async move {
                let _: Value = ctx
                    .call_service(&client, "refund", &json!({"saga_id": ctx.saga_id()}))
                    .await?;
                Ok(())
            }
        },
    );
    let create = Step::new(
        "create-order",
        move |ctx, data: OrderData| {
            let orders = o1.clone();
            async move {
                let order = Order {
                    order_id: data.order_id.clone(),
                    user_id: data.order.user_id.clone(),
                    kind: data.order.kind.clone(),
                    items: data.order.items.clone(),
                    total: data.order.total,
                    saga_id: ctx.saga_id().to_owned(),
                    express_shipping: data.express_shipping,
                    created_by: data.version.clone(),
                };
                orders
                    .save(&order)
                    .await
                    .map_err(|e| StepError::retryable(format!("saving order: {e}")))?;
                Ok(data)
            }
        },
        move |_ctx, data: OrderData| {
            let orders = o2.clone();
            async move {
                orders
                    .delete(&Key::new(&data.order.user_id, &data.order_id))
                    .await
                    .map_err(|e| StepError::retryable(format!("deleting order: {e}")))?;
                Ok(())
            }
        },
    );
    Saga::builder(SAGA_NAME, 1)
        .add_step(reserve.idempotent())
        .add_step(charge.idempotent())
        .add_step(create.idempotent())
        .build()
}

/// The running service's state.
#[derive(Clone)]
struct App {
    registry: ServiceRegistry,
    version: String,
    instance: String,
    express: Arc<AtomicBool>,
    orders: Models<Order>,
    profiles: Models<UserProfile>,
    orchestrator: SagaOrchestrator,
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> (StatusCode, Json<Value>) {
    (status, Json(json!({"error": message.to_string()})))
}

async fn info(State(app): State<App>) -> Json<Value> {
    Json(json!({
        "service": SERVICE,
        "version": app.version,
        "instance": app.instance,
        FLAG: app.express.load(Ordering::Relaxed),
    }))
}

async fn create_order(
    State(app): State<App>,
    body: Result<Json<NewOrder>, axum::extract::rejection::JsonRejection>,
) -> (StatusCode, Json<Value>) {
    let order = match body {
        Ok(Json(order)) => order,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if let Err(reason) = order.validate() {
        return error(StatusCode::BAD_REQUEST, reason);
    }
    let express = app.express.load(Ordering::Relaxed);
    let data = OrderData {
        order_id: format!("ord-{}", uuid_like()),
        order,
        express_shipping: express,
        version: app.version.clone(),
        reservation_id: None,
        transaction_id: None,
    };
    let outcome = match app.orchestrator.run(SAGA_NAME, &data).await {
        Ok(outcome) => outcome,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let status = match outcome.state {
        SagaState::Completed => StatusCode::CREATED,
        SagaState::Compensated => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        Json(json!({
            "order_id": (outcome.state == SagaState::Completed).then_some(&data.order_id),
            "saga_id": outcome.saga_id,
            "state": outcome.state,
            "error": outcome.error,
            "total": data.order.total,
            FLAG: express,
            "version": app.version,
        })),
    )
}

/// A unique enough id: time in ns and a process-wide counter.
fn uuid_like() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{nanos:x}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn user_orders(
    State(app): State<App>,
    Path(user): Path<String>,
) -> Result<Json<Vec<Order>>, (StatusCode, Json<Value>)> {
    let orders = app
        .orders
        .find_all(&user)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(orders.into_iter().map(|v| v.value).collect()))
}

async fn profile(
    State(app): State<App>,
    Path(user): Path<String>,
) -> Result<Json<UserProfile>, (StatusCode, Json<Value>)> {
    match app.profiles.find_one(&Key::partition(&user)).await {
        Ok(Some(found)) => Ok(Json(found.value)),
        Ok(None) => Err(error(
            StatusCode::NOT_FOUND,
            format!("no profile for user {user:?} (yet)"),
        )),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

/// Applies a user event to the profile table (upsert; preferences kept). The two topics
/// have no order between them and their handlers run concurrently, so the write is a
/// compare-and-set on the row, and an event older than the profile (by the user's
/// revision) changes nothing: `user.updated` may well arrive before `user.created`.
async fn apply_user_event(
    profiles: Models<UserProfile>,
    event_type: String,
    user: UserEvent,
) -> Result<(), String> {
    let key = Key::partition(&user.user_id);
    for _ in 0..16 {
        let existing = profiles.find_one(&key).await.map_err(|e| e.to_string())?;
        let mut profile = UserProfile {
            user_id: user.user_id.clone(),
            email: user.email.clone(),
            name: user.name.clone(),
            preferences: json!({}),
            last_event: event_type.clone(),
            revision: user.revision,
        };
        match existing {
            None => match profiles.create(&profile).await {
                Ok(_) => return Ok(()),
                Err(trellis::store::StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.to_string()),
            },
            Some(found) if found.value.revision >= user.revision => return Ok(()),
            Some(found) => {
                profile.preferences = found.value.preferences;
                let bytes = serde_json::to_vec(&profile).map_err(|e| e.to_string())?;
                match profiles
                    .table()
                    .update_if_version(&key.partition, &key.clustering, found.version, bytes, None)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    CasOutcome::Applied { .. } => return Ok(()),
                    CasOutcome::Rejected { .. } => continue,
                }
            }
        }
    }
    Err(format!(
        "profile {:?} kept changing; the event will be retried",
        user.user_id
    ))
}

/// Instances of `service` a client would use (healthy, or not checked yet).
fn usable(registry: &ServiceRegistry, service: &str) -> usize {
    registry
        .discover(service)
        .iter()
        .filter(|r| r.status != trellis::registry::InstanceStatus::Unhealthy)
        .count()
}

/// The parts with a shutdown.
struct Running {
    subscriptions: Vec<Subscription>,
    orchestrator: SagaOrchestrator,
    registry: ServiceRegistry,
    _watch: trellis::config::WatchHandle,
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
    let client = |service: &str| {
        ServiceClient::builder(service, &registry)
            .retries(1)
            .circuit_breaker(false)
            .tracer(tracer.clone())
            .build()
    };
    let orders = Models::<Order>::new(&store)?;
    let profiles = Models::<UserProfile>::new(&store)?;
    let bus = EventBus::embedded(&store)?.with_tracer(tracer.clone());
    let orchestrator = SagaOrchestrator::start(
        &store,
        SagaOptions::default()
            .node_id(env.instance_id.clone())
            .step_timeout(Duration::from_secs(10)),
    )
    .await?;
    orchestrator.register(order_saga(
        client(INVENTORY)?,
        client(PAYMENT)?,
        orders.clone(),
    )?)?;

    // The feature flag: read once, then follow every new version.
    let config = ConfigurationManager::new(
        &store,
        ConfigOptions {
            refresh_interval: Duration::from_millis(200),
            ..ConfigOptions::default()
        },
    )?;
    let current: Value = config
        .get_config(&env.service, json!({FLAG: false}))
        .await?;
    let express = Arc::new(AtomicBool::new(current[FLAG].as_bool().unwrap_or(false)));
    let flag = express.clone();
    let watch = config.watch_with(&env.service, move |version| {
        flag.store(
            version.config[FLAG].as_bool().unwrap_or(false),
            Ordering::Relaxed,
        );
    });

    let mut subscriptions = Vec::new();
    for topic in ["user.created", "user.updated"] {
        let profiles = profiles.clone();
        subscriptions.push(
            bus.subscribe(topic, GROUP, move |event: Event<UserEvent>| {
                apply_user_event(profiles.clone(), event.event_type, event.payload)
            })
            .await?,
        );
    }

    let app = App {
        registry: registry.clone(),
        version: env.version.clone(),
        instance: env.instance_id.clone(),
        express,
        orders,
        profiles,
        orchestrator: orchestrator.clone(),
    };
    let monitor = ServiceHealthMonitor::builder(&env.service)
        .check("store", StoreCheck::new(store.clone()))
        .build();
    let router = Router::new()
        .route("/orders", get(info).post(create_order))
        .route("/users/{id}/orders", get(user_orders))
        .route("/profiles/{id}", get(profile))
        .route(
            "/discovery",
            get(|State(app): State<App>| async move {
                Json(json!({
                    INVENTORY: usable(&app.registry, INVENTORY),
                    PAYMENT: usable(&app.registry, PAYMENT),
                }))
            }),
        )
        .with_state(app)
        .merge(monitor.router())
        .route_layer(axum::middleware::from_fn_with_state(
            env::Served::new(&env, tracer.clone()),
            env::serve_request,
        ));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", env.port)).await?;
    let running = Running {
        subscriptions,
        orchestrator,
        registry,
        _watch: watch,
    };
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    for subscription in running.subscriptions {
        let _ = subscription.shutdown().await;
    }
    running.orchestrator.shutdown();
    let _ = running.registry.shutdown().await;
    tracer.flush();
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(email: &str, revision: u64) -> UserEvent {
        UserEvent {
            user_id: "u1".into(),
            email: email.into(),
            name: "Ada".into(),
            revision,
        }
    }

    #[tokio::test]
    async fn an_update_read_before_the_creation_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display()))
            .await
            .unwrap();
        let profiles = Models::<UserProfile>::new(&store).unwrap();
        apply_user_event(
            profiles.clone(),
            "user.updated".into(),
            event("new@x.org", 2),
        )
        .await
        .unwrap();
        apply_user_event(
            profiles.clone(),
            "user.created".into(),
            event("old@x.org", 1),
        )
        .await
        .unwrap();
        let profile = profiles
            .find_one(&Key::partition("u1"))
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(profile.email, "new@x.org");
        assert_eq!(profile.last_event, "user.updated");
        assert_eq!(profile.revision, 2);
        // A newer update still applies.
        apply_user_event(
            profiles.clone(),
            "user.updated".into(),
            event("newer@x.org", 3),
        )
        .await
        .unwrap();
        let profile = profiles
            .find_one(&Key::partition("u1"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(profile.value.email, "newer@x.org");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creation_and_update_handled_at_once_keep_the_update() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display()))
            .await
            .unwrap();
        let profiles = Models::<UserProfile>::new(&store).unwrap();
        for round in 0..20 {
            let user = format!("u{round}");
            let at = |email: &str, revision| UserEvent {
                user_id: user.clone(),
                email: email.into(),
                name: "Ada".into(),
                revision,
            };
            let created = tokio::spawn(apply_user_event(
                profiles.clone(),
                "user.created".into(),
                at("old@x.org", 1),
            ));
            let updated = tokio::spawn(apply_user_event(
                profiles.clone(),
                "user.updated".into(),
                at("new@x.org", 2),
            ));
            created.await.unwrap().unwrap();
            updated.await.unwrap().unwrap();
            let profile = profiles
                .find_one(&Key::partition(&user))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(profile.value.email, "new@x.org", "round {round}");
            assert_eq!(profile.value.revision, 2);
        }
    }
}
