//! `order-saga`: runs the seed's OrderCreationSaga once and prints, as its last line, one
//! JSON object: `{"saga_id": …, "state": "completed|compensated|needs_attention",
//! "calls": {"inventory.reserve": 1, …}, "requests": N, "error": …}` — for this saga,
//! `calls` counts effects per `service.action` (one per idempotency key), `requests` every
//! call, repeats included.
//!
//! At start-up it first recovers the sagas a previous run left unfinished (one JSON line
//! each, with `"recovered": true`). `--recover` stops there. `--external-services` uses the
//! services registered in the store's registry by another process instead of starting its
//! own; `--crash-at POINT` aborts the process at a call boundary (see the library docs).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use trellis_registry::{RegistryOptions, ServiceRegistry};
use trellis_saga::{SagaOptions, SagaOrchestrator, SagaOutcome};
use trellis_store::Store;

use order_saga::services::{self, LedgerSnapshot};
use order_saga::{FailAt, OrderData, SAGA_NAME, SagaConfig, order_saga};

#[derive(Debug, Parser)]
#[command(version, about = "The seed's OrderCreationSaga on Trellis")]
struct Args {
    /// Which step fails.
    #[arg(long, value_enum, default_value = "none")]
    fail_at: FailAt,
    /// Store URL (`sqlite://PATH` or `cassandra://…`).
    #[arg(long, default_value = "sqlite://./trellis-data/order-saga.db")]
    store: String,
    /// Abort at this call boundary: `before:STEP`, `after:STEP`,
    /// `before-compensation:STEP`, `after-compensation:STEP`.
    #[arg(long, env = "ORDER_SAGA_CRASH_AT")]
    crash_at: Option<String>,
    /// The orchestrator's node id (keep it across restarts to take sagas back at once).
    #[arg(long, default_value = "order-saga")]
    node: String,
    /// Use the services registered in the store by another process.
    #[arg(long)]
    external_services: bool,
    /// Only recover unfinished sagas; run no new one.
    #[arg(long)]
    recover: bool,
    /// Mark the steps as not safe to repeat (recovery then compensates).
    #[arg(long)]
    unsafe_steps: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order-saga: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(point) = &args.crash_at
        && !order_saga::crash_points().contains(point)
    {
        return Err(format!(
            "--crash-at {point:?} is not a crash point; known: {}",
            order_saga::crash_points().join(", ")
        )
        .into());
    }
    let store = Store::open(&args.store).await?;
    let registry = ServiceRegistry::start(&store, RegistryOptions::default()).await?;
    let own = if args.external_services {
        None
    } else {
        Some(services::start(&registry).await?)
    };
    let options = SagaOptions::default()
        .node_id(args.node.clone())
        .compensation_retries(3)
        .backoff(trellis_resilience_backoff()?)
        .step_timeout(Duration::from_secs(10))
        .lease(Duration::from_secs(30));
    let orchestrator = SagaOrchestrator::start(&store, options).await?;
    let config = SagaConfig {
        crash_at: args.crash_at.clone(),
        unsafe_steps: args.unsafe_steps,
    };
    orchestrator.register(order_saga(&registry, config)?)?;

    let report = orchestrator.recover().await?;
    for (id, error) in &report.errors {
        eprintln!("order-saga: recovering saga {id}: {error}");
    }
    let mut last = None;
    for outcome in &report.outcomes {
        let calls = ledger(own.as_ref(), &registry).await?;
        println!("{}", line(outcome, &calls, true));
        last = Some(outcome.clone());
    }
    if !args.recover {
        let outcome = orchestrator
            .run(SAGA_NAME, &OrderData::sample(args.fail_at))
            .await?;
        let calls = ledger(own.as_ref(), &registry).await?;
        println!("{}", line(&outcome, &calls, false));
        last = Some(outcome);
    } else if last.is_none() {
        println!("{}", json!({"recovered": 0}));
    }
    orchestrator.shutdown();
    if let Some(services) = own {
        services.stop().await;
    }
    registry.shutdown().await?;
    if let Some(outcome) = last
        && !outcome.state.is_final()
    {
        eprintln!(
            "order-saga: saga {} needs attention: {}",
            outcome.saga_id,
            outcome.error.unwrap_or_default()
        );
    }
    Ok(())
}

fn trellis_resilience_backoff() -> Result<trellis_resilience::retry::Backoff, String> {
    trellis_resilience::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(1))
        .map_err(|e| e.to_string())
}

/// The ledger: ours, or the external services' (`GET /ledger` on the inventory service).
async fn ledger(
    own: Option<&services::Services>,
    registry: &ServiceRegistry,
) -> Result<LedgerSnapshot, Box<dyn std::error::Error>> {
    match own {
        Some(services) => Ok(services.ledger().snapshot()),
        None => {
            let client = trellis_client::ServiceClient::new(services::INVENTORY, registry)?;
            Ok(client.get_json("/ledger").await?)
        }
    }
}

fn line(outcome: &SagaOutcome, ledger: &LedgerSnapshot, recovered: bool) -> Value {
    let mine = ledger
        .sagas
        .get(&outcome.saga_id)
        .cloned()
        .unwrap_or_default();
    let mut calls = std::collections::BTreeMap::<String, u64>::new();
    for effect in &mine.effects {
        *calls.entry(effect.clone()).or_default() += 1;
    }
    let mut value = json!({
        "saga_id": outcome.saga_id,
        "state": outcome.state,
        "calls": calls,
        "requests": mine.requests,
        "error": outcome.error,
    });
    if recovered {
        value["recovered"] = json!(true);
    }
    value
}
