//! Trellis distributed tracing: one trace across gateway, service clients, events and
//! store, kept in memory for the admin API and exported over OTLP to Jaeger or any
//! OpenTelemetry collector.
//!
//! What it is:
//! - [`DistributedTracer`] — the seed's tracer (`service_name`, `endpoint`,
//!   `sampling_rate`), on the OpenTelemetry SDK. Its [`Span`]s have the seed's API: start,
//!   start as child of another, [`set_tag`](Span::set_tag), [`log`](Span::log),
//!   [`set_error`](Span::set_error), [`finish`](Span::finish) (or drop).
//! - Parent-based ratio sampling: a new trace is kept with probability `sampling_rate`;
//!   children, local or remote, follow their parent's decision.
//! - Propagation ([`extract`], [`inject`], [`Propagator`]): W3C `traceparent`,
//!   `tracestate` and `baggage`, plus B3 single and multi header. Malformed headers start a
//!   new root trace, never an error.
//! - Automatic spans for the other crates: [`DistributedTracer::http_server_span`] (gateway),
//!   [`DistributedTracer::http_client_span`] (service client),
//!   [`DistributedTracer::producer_span`] / [`DistributedTracer::consumer_span`] (event bus)
//!   and [`StoreTraceLayer`] (the seed's `TracingMiddleware` for the store).
//! - [`TraceBuffer`], a bounded in-memory buffer of recent traces, and
//!   [`admin::router`], serving them as JSON ready for a waterfall view.
//! - OTLP/HTTP export (feature `otlp`) through a bounded queue on its own thread; spans that
//!   do not fit are dropped and counted ([`ExportStats`]), so a collector that is down or
//!   slow never slows a request.
//! - [`TracingConfig`] (the `[tracing]` table, with the standard `OTEL_*` variables) and
//!   [`install`] for binaries: global subscriber with the `tracing-opentelemetry` layer, so
//!   plain `tracing` spans are exported too.
//!
//! What it is not: a trace store or query engine (use Jaeger for history and search),
//! a metrics or logs exporter, or an auto-instrumentation agent — the other crates call
//! the helpers above. OTLP over gRPC is not built in yet (configuring it is an error).
//!
//! Costs (`benches/spans.rs`, release build, one span with one tag, measured on a shared
//! 2-core machine under load average ~14, so upper bounds): tracing off 30–75 ns, unsampled
//! ~0.5 µs, sampled 0.8–1.9 µs into the export queue or the buffer alone and ~3.5–5 µs
//! into both. An unsampled gateway request (server span from headers + client span with
//! headers injected) ~4 µs, most of it header parsing and formatting.
//!
//! ```
//! use trellis_tracing::{DistributedTracer, TraceBuffer};
//!
//! let buffer = TraceBuffer::new(1000);
//! let tracer = DistributedTracer::builder("user-service")
//!     .sampling_rate(1.0)
//!     .buffer(buffer.clone())
//!     .build()
//!     .unwrap();
//!
//! let span = tracer.start_span("get_user_profile");
//! span.set_tag("user.id", "u1");
//! let db = tracer.start_child("db_query", &span);
//! db.finish();
//! span.log("profile loaded");
//! let trace_id = span.trace_id();
//! span.finish();
//!
//! let traces = buffer.recent(Some("user-service"), 10);
//! assert_eq!(traces[0].trace_id, trace_id);
//! assert_eq!(traces[0].span_count, 2);
//! assert_eq!(traces[0].root_name, "get_user_profile");
//! ```

pub mod admin;
mod buffer;
mod config;
mod error;
mod events;
mod export;
mod http;
mod install;
mod propagation;
mod store;
mod tracer;

pub use buffer::{EventView, LinkView, SpanView, StatusView, TraceBuffer, TraceSummary, TraceView};
pub use config::{B3Encoding, Protocol, TracingConfig};
pub use error::{Result, TracingError};
pub use export::ExportStats;
pub use http::{HttpClientSpan, HttpServerSpan};
pub use install::{TracingGuard, install, set_global};
pub use propagation::{
    HeaderExtractor, HeaderInjector, Propagator, extract, extract_from_map, inject, inject_into_map,
};
pub use store::{StoreTraceLayer, StoreTraceService};
pub use tracer::{DistributedTracer, Span, SpanStart, TracerBuilder};

/// The OpenTelemetry API this crate is built on (for `Context`, `SpanKind`, `Value`, …).
pub use opentelemetry;
