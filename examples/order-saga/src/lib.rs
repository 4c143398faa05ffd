//! # order-saga
//!
//! The seed's `OrderCreationSaga` with Trellis: reserve inventory, charge the payment,
//! create the order — three services found in the registry and called through
//! [`ServiceClient`] with idempotency keys; on failure, refund and unreserve, in that order.
//!
//! The library holds the parts the binary and the tests share: the services
//! ([`services`]), the saga definition ([`order_saga`]) and its data ([`OrderData`]). It is
//! an example, not a reusable crate.
//!
//! Crash points make the recovery tests possible: with [`SagaConfig::crash_at`] set to
//! `before:STEP`, `after:STEP`, `before-compensation:STEP` or `after-compensation:STEP`
//! the process aborts right before or after that call (the call's answer never reaches the
//! saga log).
//!
//! ```
//! use order_saga::{FailAt, OrderData};
//! let order = OrderData::sample(FailAt::Payment);
//! assert_eq!(order.payment_method, "declined-card");
//! ```

pub mod services;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_client::ServiceClient;
use trellis_registry::ServiceRegistry;
use trellis_saga::{Saga, SagaError, Step, StepContext, StepError};

/// The saga's name.
pub const SAGA_NAME: &str = "order-creation";

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Stock keeping unit.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// The saga data: the order as asked, then what each step returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderData {
    /// Who orders.
    pub customer: String,
    /// What.
    pub items: Vec<Item>,
    /// Total in cents.
    pub total: u64,
    /// How to pay.
    pub payment_method: String,
    /// Set by `reserve-inventory`.
    pub reservation_id: Option<String>,
    /// Set by `charge-payment`.
    pub transaction_id: Option<String>,
    /// Set by `create-order`.
    pub order_id: Option<String>,
}

/// Which step the sample order makes fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailAt {
    /// Every step succeeds.
    None,
    /// The card is declined (402).
    Payment,
    /// The customer is blocked (422) when the order is created.
    Order,
}

impl OrderData {
    /// A sample order that fails at `fail_at`.
    pub fn sample(fail_at: FailAt) -> Self {
        OrderData {
            customer: if fail_at == FailAt::Order {
                "blocked-customer".into()
            } else {
                "c-42".into()
            },
            items: vec![
                Item {
                    sku: "book-1".into(),
                    quantity: 2,
                },
                Item {
                    sku: "pen-7".into(),
                    quantity: 1,
                },
            ],
            total: 4_250,
            payment_method: if fail_at == FailAt::Payment {
                "declined-card".into()
            } else {
                "card-visa".into()
            },
            reservation_id: None,
            transaction_id: None,
            order_id: None,
        }
    }
}

/// How to build the saga.
#[derive(Debug, Clone, Default)]
pub struct SagaConfig {
    /// Abort the process at this call boundary (see the crate docs).
    pub crash_at: Option<String>,
    /// Mark the steps as not safe to repeat, so recovery compensates an interrupted step
    /// instead of running it again. Defaults to false (they send idempotency keys).
    pub unsafe_steps: bool,
}

/// The clients of the three services.
#[derive(Debug, Clone)]
struct Clients {
    inventory: ServiceClient,
    payment: ServiceClient,
    order: ServiceClient,
}

/// A client for the saga's calls: one retry of its own, and no circuit breaker — the
/// orchestrator retries compensations with backoff itself, and an operator's retry right
/// after an outage must reach the service rather than fail fast on a breaker still open.
fn client(service: &str, registry: &ServiceRegistry) -> Result<ServiceClient, SagaError> {
    ServiceClient::builder(service, registry)
        .retries(1)
        .circuit_breaker(false)
        .build()
        .map_err(|e| SagaError::Invalid(format!("client of {service}: {e}")))
}

fn crash_if(config: &SagaConfig, point: &str) {
    if config.crash_at.as_deref() == Some(point) {
        eprintln!("order-saga: crash point {point}: SIGKILL");
        // SIGKILL, as an operator's `kill -9` or the OOM killer would: no destructor, no
        // flush, no signal handler runs. abort() stays as the fallback if the kill fails.
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
}

/// One call with the crash points around it.
async fn call(
    config: &SagaConfig,
    ctx: &StepContext,
    client: &ServiceClient,
    action: &str,
    payload: Value,
) -> Result<Value, StepError> {
    let (before, after) = match ctx.phase() {
        trellis_saga::Phase::Action => ("before", "after"),
        trellis_saga::Phase::Compensation => ("before-compensation", "after-compensation"),
    };
    crash_if(config, &format!("{before}:{}", ctx.step()));
    let result = ctx.call_service(client, action, &payload).await;
    crash_if(config, &format!("{after}:{}", ctx.step()));
    result
}

/// The crash points, in the order a run passes them.
pub fn crash_points() -> Vec<String> {
    let steps = ["reserve-inventory", "charge-payment", "create-order"];
    let mut points = Vec::new();
    for step in steps {
        points.push(format!("before:{step}"));
        points.push(format!("after:{step}"));
    }
    for step in steps.iter().rev() {
        points.push(format!("before-compensation:{step}"));
        points.push(format!("after-compensation:{step}"));
    }
    points
}

/// The `OrderCreationSaga`: reserve inventory → charge payment → create order; the
/// compensations unreserve, refund and cancel.
pub fn order_saga(
    registry: &ServiceRegistry,
    config: SagaConfig,
) -> Result<Saga<OrderData>, SagaError> {
    let clients = Clients {
        inventory: client(services::INVENTORY, registry)?,
        payment: client(services::PAYMENT, registry)?,
        order: client(services::ORDER, registry)?,
    };
    let (c1, c2, c3, c4, c5, c6) = (
        clients.clone(),
        clients.clone(),
        clients.clone(),
        clients.clone(),
        clients.clone(),
        clients,
    );
    let (k1, k2, k3, k4, k5, k6) = (
        config.clone(),
        config.clone(),
        config.clone(),
        config.clone(),
        config.clone(),
        config.clone(),
    );
    let reserve = Step::new(
        "reserve-inventory",
        move |ctx, mut order: OrderData| {
            let (c, k) = (c1.clone(), k1.clone());
            async move {
                let payload = json!({"saga_id": ctx.saga_id(), "items": order.items});
                let reply = call(&k, &ctx, &c.inventory, "reserve", payload).await?;
                order.reservation_id = reply["reservation_id"].as_str().map(str::to_owned);
                Ok(order)
            }
        },
        move |ctx, _order: OrderData| {
            let (c, k) = (c2.clone(), k2.clone());
            async move {
                let payload = json!({"saga_id": ctx.saga_id()});
                call(&k, &ctx, &c.inventory, "unreserve", payload).await?;
                Ok(())
            }
        },
    );
    let charge = Step::new(
        "charge-payment",
        move |ctx, mut order: OrderData| {
            let (c, k) = (c3.clone(), k3.clone());
            async move {
                let payload = json!({"saga_id": ctx.saga_id(), "amount": order.total,
                    "payment_method": order.payment_method});
                let reply = call(&k, &ctx, &c.payment, "charge", payload).await?;
                order.transaction_id = reply["transaction_id"].as_str().map(str::to_owned);
                Ok(order)
            }
        },
        move |ctx, _order: OrderData| {
            let (c, k) = (c4.clone(), k4.clone());
            async move {
                let payload = json!({"saga_id": ctx.saga_id()});
                call(&k, &ctx, &c.payment, "refund", payload).await?;
                Ok(())
            }
        },
    );
    let create = Step::new(
        "create-order",
        move |ctx, mut order: OrderData| {
            let (c, k) = (c5.clone(), k5.clone());
            async move {
                let payload = json!({"saga_id": ctx.saga_id(), "customer": order.customer,
                    "items": order.items, "total": order.total,
                    "inventory_reservation": order.reservation_id,
                    "payment_transaction": order.transaction_id});
                let reply = call(&k, &ctx, &c.order, "create", payload).await?;
                order.order_id = reply["order_id"].as_str().map(str::to_owned);
                Ok(order)
            }
        },
        move |ctx, _order: OrderData| {
            let (c, k) = (c6.clone(), k6.clone());
            async move {
                let payload = json!({"saga_id": ctx.saga_id()});
                call(&k, &ctx, &c.order, "cancel", payload).await?;
                Ok(())
            }
        },
    );
    let steps = [reserve, charge, create];
    let mut builder = Saga::builder(SAGA_NAME, 1);
    for step in steps {
        builder = builder.add_step(if config.unsafe_steps {
            step
        } else {
            step.idempotent()
        });
    }
    builder.build()
}
