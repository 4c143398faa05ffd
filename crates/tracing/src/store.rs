//! The seed's `TracingMiddleware` for the store: a tower layer that wraps every
//! [`StoreRequest`] in a client span named `OPERATION TABLE` (`get users`), with the
//! OpenTelemetry database attributes `db.system.name` (backend), `db.operation.name`,
//! `db.collection.name` and, for batches, `db.operation.batch.size`.
//!
//! By default a span is made only when the operation runs inside a trace (a parent span in
//! the current context): background work such as the registry's change polling would
//! otherwise fill the trace store with one-span traces. Use
//! [`StoreTraceLayer::with_root_spans`] to trace those too. Inside an unsampled trace
//! nothing is made at all (the span would not be recorded either).
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let tracer = trellis_tracing::DistributedTracer::disabled();
//! let store = trellis_store::Store::open(&format!("sqlite://{}/t.db", dir.path().display()))
//!     .await?
//!     .layer(trellis_tracing::StoreTraceLayer::new(tracer));
//! store.ping().await?;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, TraceContextExt};
use trellis_store::{StoreError, StoreRequest, StoreResponse};

use crate::tracer::DistributedTracer;

/// Store middleware that traces every operation (see the module docs).
#[derive(Clone, Debug)]
pub struct StoreTraceLayer {
    tracer: DistributedTracer,
    backend: Option<&'static str>,
    root_spans: bool,
}

impl StoreTraceLayer {
    /// Traces operations with `tracer`.
    pub fn new(tracer: DistributedTracer) -> Self {
        StoreTraceLayer {
            tracer,
            backend: None,
            root_spans: false,
        }
    }

    /// The backend name for `db.system.name` (`sqlite`, `cassandra`: `Store::backend()`).
    /// Defaults to none (attribute left out).
    #[must_use]
    pub fn backend(mut self, backend: &'static str) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Also trace operations that run outside any trace, each as its own root. Defaults
    /// to `false`.
    #[must_use]
    pub fn with_root_spans(mut self, root_spans: bool) -> Self {
        self.root_spans = root_spans;
        self
    }
}

impl<S> tower::Layer<S> for StoreTraceLayer {
    type Service = StoreTraceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        StoreTraceService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`StoreTraceLayer`].
#[derive(Clone, Debug)]
pub struct StoreTraceService<S> {
    inner: S,
    layer: StoreTraceLayer,
}

impl<S> tower::Service<StoreRequest> for StoreTraceService<S>
where
    S: tower::Service<StoreRequest, Response = StoreResponse, Error = StoreError>,
    S::Future: Send + 'static,
{
    type Response = StoreResponse;
    type Error = StoreError;
    type Future = Pin<Box<dyn Future<Output = Result<StoreResponse, StoreError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), StoreError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: StoreRequest) -> Self::Future {
        let layer = &self.layer;
        if !layer.tracer.is_enabled() {
            return Box::pin(self.inner.call(request));
        }
        let parent = Context::current();
        let parent_sc = parent.span().span_context().clone();
        if (!layer.root_spans && !parent_sc.is_valid())
            || (parent_sc.is_valid() && !parent_sc.is_sampled())
        {
            // No parent (background work), or an unsampled one: its child would not be
            // sampled either, so no span, name or tags are made.
            return Box::pin(self.inner.call(request));
        }
        let operation = request.operation();
        let table = request.table().map(str::to_owned);
        let name = match &table {
            Some(table) => format!("{operation} {table}"),
            None => operation.to_owned(),
        };
        let mut start = layer
            .tracer
            .span(name)
            .child_of(&parent)
            .kind(SpanKind::Client)
            .tag("db.operation.name", operation);
        if let Some(backend) = layer.backend {
            start = start.tag("db.system.name", backend);
        }
        if let Some(table) = table {
            start = start.tag("db.collection.name", table);
        }
        if let StoreRequest::Batch(mutations) = &request {
            start = start.tag(
                "db.operation.batch.size",
                i64::try_from(mutations.len()).unwrap_or(i64::MAX),
            );
        }
        let span = start.start();
        let future = self
            .inner
            .call(request)
            .with_context(span.context().clone());
        Box::pin(async move {
            let result = future.await;
            match &result {
                Ok(StoreResponse::Cas(outcome)) => {
                    span.set_tag("trellis.store.applied", outcome.applied());
                }
                Ok(StoreResponse::Batch(outcome)) => {
                    span.set_tag("trellis.store.applied", outcome.applied());
                }
                Ok(_) => {}
                Err(e) => span.set_error(e),
            }
            span.finish();
            result
        })
    }
}
