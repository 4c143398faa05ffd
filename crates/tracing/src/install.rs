//! Process-wide setup for binaries: the global `tracing` subscriber with the OpenTelemetry
//! layer, the global propagator, and a guard that flushes on shutdown. Libraries never
//! call this; they take a [`DistributedTracer`] as a value.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::buffer::TraceBuffer;
use crate::config::TracingConfig;
use crate::error::{Result, TracingError};
use crate::propagation::Propagator;
use crate::tracer::DistributedTracer;

/// Keeps tracing running; dropping it exports what is queued (within the export timeout)
/// and stops the export thread.
#[derive(Debug)]
#[must_use = "dropping the guard shuts tracing down"]
pub struct TracingGuard {
    tracer: DistributedTracer,
}

impl TracingGuard {
    /// The process's tracer, for the automatic spans of gateway, client, events and store.
    pub fn tracer(&self) -> &DistributedTracer {
        &self.tracer
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        self.tracer.shutdown();
    }
}

/// Makes `tracer` OpenTelemetry's global tracer provider and installs the composite
/// propagator (W3C, baggage, B3) as the global one, for third-party instrumentation.
pub fn set_global(tracer: &DistributedTracer, b3: crate::B3Encoding) {
    opentelemetry::global::set_text_map_propagator(Propagator::new(b3));
    if let Some(provider) = tracer.provider() {
        opentelemetry::global::set_tracer_provider(provider);
    }
}

/// Builds the tracer from `config` (keeping spans in `buffer` when given), installs it
/// globally ([`set_global`]) and sets the global `tracing` subscriber: `RUST_LOG` filter
/// (default `info`), human-readable log lines on stderr, and the OpenTelemetry layer, so
/// plain `tracing` spans are exported too.
///
/// Fails on an invalid config, an exporter that cannot start, or when a global
/// subscriber is already set.
pub fn install(config: &TracingConfig, buffer: Option<TraceBuffer>) -> Result<TracingGuard> {
    let tracer = DistributedTracer::from_config(config, buffer)?;
    set_global(&tracer, config.b3);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(tracer.layer())
        .try_init()
        .map_err(|e| TracingError::AlreadyInstalled(e.to_string()))?;
    Ok(TracingGuard { tracer })
}

impl DistributedTracer {
    /// Exports what is queued (within the export timeout) and stops exporting; spans
    /// started afterwards are not recorded. Called by [`TracingGuard`] on drop.
    pub fn shutdown(&self) {
        if let Some(provider) = self.provider() {
            let _ = provider.shutdown();
        }
    }
}
