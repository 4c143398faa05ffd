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
//! - [`receiver::router`] (feature `receiver`): `POST /v1/traces` taking OTLP/HTTP from
//!   other processes into a [`TraceBuffer`], so one node shows a trace across all of them.
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
//! Costs (`benches/spans.rs`, release build, shared 2-core machine under load, so upper
//! bounds; "SDK path" is the same tracer with every span an OpenTelemetry SDK span,
//! measured in the same run): one span with one tag — unsampled 27 ns (SDK path 176 ns),
//! sampled 0.5 µs into the buffer, 0.6 µs into the export queue, 1.4 µs into both. A
//! gateway request's server + client span with its headers written, no incoming trace
//! headers: 183 ns at rate 0 (SDK path 1.2 µs), 349 ns on average at rate 0.1 (SDK path
//! 1.5 µs). Callgrind, user-space instructions per request of a whole `trellis up` node
//! proxying to nginx: tracing off 26.0k, rate 0 28.1k, rate 0.1 29.2k, rate 1.0 38.1k.
//! In the gateway benchmark (README, performance section), each traced node measured side
//! by side with an untraced one on the same core, rate 0.1 costs 3.0–4.2% of the requests
//! per second and 3.5–4.7% of the requests per CPU second (five runs, medians of 8–12
//! rounds; an untraced node beside an untraced one: within 0.6%), rate 0 0.9–2.3%, rate
//! 1.0 10.9–14.1%; 0.5–0.6 µs of user time per request at 0.1.
//!
//! The trace buffer keeps spans in one ring in the order they ended, each as a few plain
//! fields and one encoded block (name, tags, logs, links); filing a span is a push with no
//! index to update, and the views group and decode spans only when asked.
//!
//! Why spans are cheap: the sampling decision comes first. A root the ratio drops, or a
//! child of an unsampled parent, is no OpenTelemetry span — only its ids (from a
//! per-thread wyrand generator) and flags, enough to write `traceparent` with `sampled=0`
//! and for its children to follow; its context is built only if asked for
//! ([`Span::context`]). A sampled span is recorded by this crate, not by the SDK's span:
//! its `SpanData` from the start, handed to the span processors (buffer, OTLP queue) when
//! it ends; its context, built on demand, holds a handle that records into the same data.
//! Spans of the `tracing-opentelemetry` layer go through the SDK to the same processors.
//! Headers are written from stack buffers under pre-parsed names.
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
mod ids;
mod install;
mod propagation;
#[cfg(feature = "receiver")]
pub mod receiver;
mod record;
mod store;
mod tracer;

pub use buffer::{EventView, LinkView, SpanView, StatusView, TraceBuffer, TraceSummary, TraceView};
pub use config::{B3Encoding, Protocol, TracingConfig};
pub use error::{Result, TracingError};
pub use export::ExportStats;
pub use http::{HttpClientSpan, HttpServerSpan, TagText};
pub use install::{TracingGuard, install, set_global};
pub use propagation::{
    HeadLines, HeaderExtractor, HeaderInjector, Propagator, TraceHeaders, extract,
    extract_from_map, inject, inject_into_map, is_trace_header,
};
pub use store::{StoreTraceLayer, StoreTraceService};
pub use tracer::{DistributedTracer, Span, SpanStart, TracerBuilder};

/// The OpenTelemetry API this crate is built on (for `Context`, `SpanKind`, `Value`, …).
pub use opentelemetry;
