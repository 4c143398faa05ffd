//! [`DistributedTracer`] — the seed's tracer — and its [`Span`]s.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::InstrumentationScope;
use opentelemetry::context::{ContextGuard, FutureExt, WithContext};
use opentelemetry::trace::{
    Link, SpanBuilder, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, Key, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanExporter, SpanProcessor,
};

use crate::buffer::{BufferProcessor, TraceBuffer};
use crate::config::{B3Encoding, Protocol, TracingConfig};
use crate::error::{Result, TracingError};
use crate::export::{BatchOptions, BoundedBatchProcessor, ExportStats};
use crate::ids::{self, IdGen, Ratio};
use crate::propagation::Propagator;
use crate::record::{Handle, Recorded, Sinks, Start};

/// Creates spans for one service, samples them, and sends the sampled ones to the
/// in-memory [`TraceBuffer`] and/or an OTLP collector.
///
/// Cheap to clone. [`DistributedTracer::disabled`] makes every span a no-op.
#[derive(Clone)]
pub struct DistributedTracer {
    inner: Option<Arc<Inner>>,
    propagator: Arc<Propagator>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    service: Arc<str>,
    stats: ExportStats,
    exporting: bool,
    /// The root sampling rule (the SDK sampler applies the same one).
    ratio: Ratio,
    /// Every span through the SDK, as before the unsampled fast path (benchmarks).
    sdk_only: bool,
    /// The provider's span processors, for sampled spans recorded by this crate.
    sinks: Sinks,
}

impl fmt::Debug for DistributedTracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistributedTracer")
            .field("service", &self.service_name())
            .field("enabled", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last clone flushes what is queued, within the flush timeout.
        let _ = self.provider.shutdown();
    }
}

impl DistributedTracer {
    /// A builder for service `service_name`.
    pub fn builder(service_name: impl Into<String>) -> TracerBuilder {
        TracerBuilder {
            service: service_name.into(),
            sampling_rate: 1.0,
            buffer: None,
            b3: B3Encoding::Multi,
            options: BatchOptions {
                queue_size: 2048,
                max_batch: 512,
                batch_interval: Duration::from_secs(1),
                flush_timeout: Duration::from_secs(5),
            },
            export_timeout: Duration::from_secs(5),
            exporter: None,
            sdk_only: false,
        }
    }

    /// A tracer from the `[tracing]` table (validated here), keeping spans in `buffer`
    /// when given. A disabled config gives [`DistributedTracer::disabled`].
    pub fn from_config(config: &TracingConfig, buffer: Option<TraceBuffer>) -> Result<Self> {
        let config = config.clone().validate()?;
        if !config.enabled {
            return Ok(DistributedTracer::disabled());
        }
        let mut builder = DistributedTracer::builder(config.service_name.trim())
            .sampling_rate(config.sampling_rate)
            .b3(config.b3)
            .queue_size(config.queue_size)
            .max_batch(config.max_batch)
            .batch_interval(config.batch_interval.get())
            .export_timeout(config.export_timeout.get());
        if let Some(buffer) = buffer {
            builder = builder.buffer(buffer);
        }
        if let Some(endpoint) = &config.endpoint {
            builder = builder.otlp(endpoint, config.protocol)?;
        }
        builder.build()
    }

    /// A tracer that does nothing: spans are no-ops with an empty context, headers are
    /// neither read nor written (a proxy that forwards headers still passes them on).
    pub fn disabled() -> Self {
        DistributedTracer {
            inner: None,
            propagator: Arc::new(Propagator::default()),
        }
    }

    /// Whether spans are recorded (sampling aside).
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The service name spans are reported under (empty when disabled).
    pub fn service_name(&self) -> &str {
        self.inner.as_ref().map_or("", |i| &i.service)
    }

    /// Export counters (all zero without an exporter).
    pub fn stats(&self) -> ExportStats {
        self.inner
            .as_ref()
            .map(|i| i.stats.clone())
            .unwrap_or_default()
    }

    /// Whether sampled spans go to an exporter.
    pub fn is_exporting(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.exporting)
    }

    /// The propagator used by this tracer's helpers.
    pub fn propagator(&self) -> &Propagator {
        &self.propagator
    }

    /// The OpenTelemetry tracer, for `tracing-opentelemetry` or direct use; `None` when
    /// disabled.
    pub fn otel_tracer(&self) -> Option<SdkTracer> {
        self.inner.as_ref().map(|i| i.tracer.clone())
    }

    /// The OpenTelemetry tracer provider; `None` when disabled.
    pub fn provider(&self) -> Option<SdkTracerProvider> {
        self.inner.as_ref().map(|i| i.provider.clone())
    }

    /// Exports everything finished so far and waits for it (at most the flush timeout).
    pub fn flush(&self) {
        if let Some(inner) = &self.inner {
            let _ = inner.provider.force_flush();
        }
    }

    /// Starts a span named `name`, child of the current context (`Context::current()`,
    /// which an entered `tracing` span or [`Span::in_scope`] sets), or a new root.
    pub fn start_span(&self, name: impl Into<Cow<'static, str>>) -> Span {
        self.span(name).start()
    }

    /// Starts a span named `name` as a child of `parent` — the seed's
    /// `startSpan(name, { childOf: parent })`.
    pub fn start_child(&self, name: impl Into<Cow<'static, str>>, parent: &Span) -> Span {
        self.span(name).child_of(parent.context()).start()
    }

    /// A span builder, for a parent context, kind, tags or links.
    pub fn span(&self, name: impl Into<Cow<'static, str>>) -> SpanStart<'_> {
        SpanStart {
            tracer: self,
            name: name.into(),
            kind: None,
            attributes: None,
            links: None,
            parent: Parent::Current,
        }
    }

    /// Whether every span goes through the SDK (see [`TracerBuilder::sdk_only`]).
    pub(crate) fn is_sdk_only(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.sdk_only)
    }

    /// A `tracing-subscriber` layer that turns plain `tracing` spans into spans of this
    /// tracer; `None` when disabled.
    pub fn layer<S>(&self) -> Option<tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        self.otel_tracer()
            .map(|tracer| tracing_opentelemetry::layer().with_tracer(tracer))
    }
}

/// Builds a [`DistributedTracer`].
#[must_use]
pub struct TracerBuilder {
    service: String,
    sampling_rate: f64,
    buffer: Option<TraceBuffer>,
    b3: B3Encoding,
    options: BatchOptions,
    export_timeout: Duration,
    exporter: Option<StartExport>,
    sdk_only: bool,
}

type StartExport =
    Box<dyn FnOnce(Resource, BatchOptions, ExportStats) -> Result<BoundedBatchProcessor> + Send>;

impl fmt::Debug for TracerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracerBuilder")
            .field("service", &self.service)
            .field("sampling_rate", &self.sampling_rate)
            .finish_non_exhaustive()
    }
}

impl TracerBuilder {
    /// Fraction of new traces recorded (0.0–1.0); children follow their parent. Defaults
    /// to 1.0.
    pub fn sampling_rate(mut self, rate: f64) -> Self {
        self.sampling_rate = rate;
        self
    }

    /// Keeps sampled spans in `buffer` (the admin `/v1/traces` view). Defaults to none.
    pub fn buffer(mut self, buffer: TraceBuffer) -> Self {
        self.buffer = Some(buffer);
        self
    }

    /// B3 headers written on outgoing requests. Defaults to [`B3Encoding::Multi`].
    pub fn b3(mut self, b3: B3Encoding) -> Self {
        self.b3 = b3;
        self
    }

    /// Export queue capacity; spans beyond it are dropped and counted. Defaults to 2048.
    pub fn queue_size(mut self, size: usize) -> Self {
        self.options.queue_size = size.max(1);
        self
    }

    /// Most spans per export request. Defaults to 512.
    pub fn max_batch(mut self, size: usize) -> Self {
        self.options.max_batch = size.max(1);
        self
    }

    /// Longest wait to fill a batch. Defaults to 1 s.
    pub fn batch_interval(mut self, interval: Duration) -> Self {
        self.options.batch_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Timeout of one export request, and of flush on shutdown. Defaults to 5 s.
    pub fn export_timeout(mut self, timeout: Duration) -> Self {
        self.export_timeout = timeout;
        self.options.flush_timeout = timeout;
        self
    }

    /// Creates every span through the OpenTelemetry SDK and propagates with its generic
    /// propagators, as this crate did before unsampled spans got their fast path: for
    /// benchmarks that compare the two in one run. Defaults to false.
    #[doc(hidden)]
    pub fn sdk_only(mut self, on: bool) -> Self {
        self.sdk_only = on;
        self
    }

    /// Sends sampled spans to `exporter`, through the bounded batch queue.
    pub fn exporter<E: SpanExporter + Send + 'static>(mut self, exporter: E) -> Self {
        self.exporter = Some(Box::new(move |resource, options, stats| {
            BoundedBatchProcessor::start(move || Ok(exporter), resource, options, stats)
        }));
        self
    }

    /// Exports to the OTLP collector at `endpoint` (a base URL such as
    /// `http://127.0.0.1:4318`; `/v1/traces` is appended when it has no path).
    ///
    /// Fails when the endpoint is malformed, the protocol is not built in (gRPC), or this
    /// crate was built without the `otlp` feature.
    pub fn otlp(mut self, endpoint: &str, protocol: Protocol) -> Result<Self> {
        crate::config::check_endpoint(endpoint)?;
        if protocol == Protocol::Grpc {
            return Err(TracingError::FeatureDisabled {
                what: "OTLP over gRPC",
                feature: "otlp-grpc",
            });
        }
        self.exporter = Some(otlp_http(endpoint)?);
        Ok(self)
    }

    /// Builds the tracer; fails on a sampling rate outside 0.0–1.0, an empty service name,
    /// or an exporter that cannot start.
    pub fn build(self) -> Result<DistributedTracer> {
        let service = self.service.trim();
        if service.is_empty() {
            return Err(TracingError::InvalidConfig {
                field: "service_name",
                reason: "must not be empty".into(),
            });
        }
        if !(0.0..=1.0).contains(&self.sampling_rate) {
            return Err(TracingError::InvalidConfig {
                field: "sampling_rate",
                reason: format!("{} is not between 0.0 and 1.0", self.sampling_rate),
            });
        }
        let service: Arc<str> = Arc::from(service);
        let resource = Resource::builder_empty()
            .with_service_name(service.to_string())
            .with_attributes([
                KeyValue::new("telemetry.sdk.language", "rust"),
                KeyValue::new("telemetry.sdk.name", "trellis-tracing"),
            ])
            .build();
        let stats = ExportStats::default();
        let mut processors: Vec<Arc<dyn SpanProcessor>> = Vec::new();
        if let Some(buffer) = self.buffer {
            processors.push(Arc::new(BufferProcessor {
                buffer,
                service: service.clone(),
            }));
        }
        let exporting = self.exporter.is_some();
        if let Some(start) = self.exporter {
            let mut options = self.options;
            options.flush_timeout = self.export_timeout.max(Duration::from_millis(1));
            processors.push(Arc::new(start(resource.clone(), options, stats.clone())?));
        }
        // The provider (SDK spans: `tracing` spans, `sdk_only`) and the spans recorded
        // here feed the same processors.
        let scope = InstrumentationScope::builder(SCOPE).build();
        let (sinks, shared) = Sinks::new(processors, scope.clone());
        let mut provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                self.sampling_rate,
            ))))
            .with_id_generator(IdGen)
            .with_resource(resource);
        for processor in shared {
            provider = provider.with_span_processor(processor);
        }
        let provider = provider.build();
        let tracer = provider.tracer_with_scope(scope);
        Ok(DistributedTracer {
            inner: Some(Arc::new(Inner {
                provider,
                tracer,
                service,
                stats,
                exporting,
                ratio: Ratio::new(self.sampling_rate),
                sdk_only: self.sdk_only,
                sinks,
            })),
            propagator: Arc::new(Propagator::new(self.b3)),
        })
    }
}

#[cfg(feature = "otlp")]
fn otlp_http(endpoint: &str) -> Result<StartExport> {
    use opentelemetry_otlp::WithExportConfig;
    let url = crate::config::traces_url(endpoint);
    Ok(Box::new(move |resource, options, stats| {
        let timeout = options.flush_timeout;
        BoundedBatchProcessor::start(
            move || {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_endpoint(url.clone())
                    .with_timeout(timeout)
                    .build()
                    .map_err(|e| TracingError::Exporter {
                        endpoint: url,
                        reason: e.to_string(),
                    })
            },
            resource,
            options,
            stats,
        )
    }))
}

#[cfg(not(feature = "otlp"))]
fn otlp_http(_endpoint: &str) -> Result<StartExport> {
    Err(TracingError::FeatureDisabled {
        what: "OTLP export",
        feature: "otlp",
    })
}

/// The instrumentation scope of this crate's spans.
const SCOPE: &str = "trellis-tracing";

/// Options for a span about to start; see [`DistributedTracer::span`].
#[must_use = "call .start() to start the span"]
pub struct SpanStart<'a> {
    tracer: &'a DistributedTracer,
    // The SDK's `SpanBuilder` (some 300 bytes) is made only for a span that is recorded:
    // an unsampled span is its ids alone, and these few fields are all it carries until
    // the sampling decision.
    name: Cow<'static, str>,
    kind: Option<SpanKind>,
    /// Tags set at start; none are kept when the tracer is disabled.
    attributes: Option<Vec<KeyValue>>,
    links: Option<Vec<Link>>,
    parent: Parent,
}

/// Where a span about to start takes its parent from.
enum Parent {
    /// `Context::current()`.
    Current,
    /// A context (a span's, or one extracted from headers).
    Context(Context),
    /// A span's ids and the context it started in (an unsampled or recorded span),
    /// without building its context.
    Ids { sc: SpanContext, base: Context },
}

impl fmt::Debug for SpanStart<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanStart").finish_non_exhaustive()
    }
}

impl SpanStart<'_> {
    /// Makes the span a child of `parent` (a [`Span::context`], or an extracted context).
    /// Defaults to the current context.
    pub fn child_of(mut self, parent: &Context) -> Self {
        self.parent = Parent::Context(parent.clone());
        self
    }

    /// Makes the span a child of `parent`; cheaper than
    /// [`child_of`](Self::child_of)`(parent.context())`: the parent's context is not built.
    pub fn child_of_span(mut self, parent: &Span) -> Self {
        self.parent = match &parent.kind {
            SpanKind_::Unsampled { sc, base, .. } => Parent::Ids {
                sc: sc.clone(),
                base: base.clone(),
            },
            SpanKind_::Recorded { rec, .. } => Parent::Ids {
                sc: rec.span_context().clone(),
                base: rec.base().clone(),
            },
            SpanKind_::Sdk(cx) | SpanKind_::Disabled(cx) => Parent::Context(cx.clone()),
        };
        self
    }

    /// Makes the span a root, whatever the current context.
    pub fn root(mut self) -> Self {
        self.parent = Parent::Context(Context::new());
        self
    }

    /// Span kind. Defaults to internal.
    pub fn kind(mut self, kind: SpanKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// A tag set at start (visible to the sampler).
    pub fn tag(mut self, key: impl Into<Key>, value: impl Into<Value>) -> Self {
        if self.tracer.inner.is_some() {
            self.attributes
                .get_or_insert_with(Vec::new)
                .push(KeyValue::new(key, value));
        }
        self
    }

    /// Links the span to another one (for example the producer of an event).
    pub fn link(mut self, span_context: SpanContext) -> Self {
        if self.tracer.inner.is_some() && span_context.is_valid() {
            self.links
                .get_or_insert_with(Vec::new)
                .push(Link::with_context(span_context));
        }
        self
    }

    /// Starts the span.
    ///
    /// The sampling decision is taken first: a span that is not sampled (a root the ratio
    /// drops, or a child of an unsampled parent) is only its ids and flags — enough to
    /// propagate `traceparent` with `sampled=0` and for its children to follow the
    /// decision. A sampled span records its data and hands it to the span processors (the
    /// trace buffer, the OTLP exporter) when it ends, as an SDK span would.
    pub fn start(self) -> Span {
        self.start_with_tags(|_| {})
    }

    /// Starts the span with the tags `tags` pushes, computed only when the span is
    /// recorded: an unsampled span allocates nothing for them, and a recorded one gets
    /// them with its start instead of a locked [`Span::set_tag`] each.
    pub fn start_with_tags(self, tags: impl FnOnce(&mut Vec<KeyValue>)) -> Span {
        let Some(inner) = &self.tracer.inner else {
            return Span::disabled();
        };
        let SpanStart {
            name,
            kind,
            attributes,
            links,
            parent,
            ..
        } = self;
        // The SDK's builder, with room for the tags set later too.
        let builder = move || {
            let mut builder = SpanBuilder::from_name(name);
            builder.span_kind = kind;
            builder.links = links;
            let mut attributes = attributes.unwrap_or_default();
            attributes.reserve(RECORDED_TAGS);
            tags(&mut attributes);
            builder.attributes = Some(attributes);
            builder
        };
        let parent = match parent {
            Parent::Ids { sc, base } if !inner.sdk_only => {
                if !sc.is_sampled() {
                    return Span::unsampled(child_context(&sc), base);
                }
                return Span::recorded(inner, builder(), &sc, sc.trace_id(), base);
            }
            Parent::Ids { sc, base } => base.with_remote_span_context(sc),
            Parent::Context(cx) => cx,
            Parent::Current => Context::current(),
        };
        if inner.sdk_only || parent.is_telemetry_suppressed() {
            return Span::sdk(inner, builder(), parent);
        }
        let span = parent.span();
        let psc = span.span_context();
        if psc.is_valid() {
            if psc.is_sampled() {
                return Span::recorded(inner, builder(), psc, psc.trace_id(), parent.clone());
            }
            // Parent-based: a child of an unsampled span is not sampled either.
            let sc = child_context(psc);
            return Span::unsampled(sc, parent.clone());
        }
        let trace_id = ids::trace_id();
        if inner.ratio.keeps(trace_id) {
            return Span::recorded(inner, builder(), psc, trace_id, parent.clone());
        }
        let sc = SpanContext::new(
            trace_id,
            ids::span_id(),
            TraceFlags::default(),
            false,
            TraceState::NONE,
        );
        Span::unsampled(sc, parent.clone())
    }
}

/// Tags a recorded span has room for from its start (the HTTP spans set about eight).
const RECORDED_TAGS: usize = 8;

/// The context of an unsampled child of `parent`: same trace, new span id, not sampled.
fn child_context(parent: &SpanContext) -> SpanContext {
    SpanContext::new(
        parent.trace_id(),
        ids::span_id(),
        parent.trace_flags().with_sampled(false),
        false,
        parent.trace_state().clone(),
    )
}

/// A unit of work in a trace. Ends when [`finish`](Span::finish)ed or dropped.
///
/// All setters are no-ops on spans that are not sampled or come from a disabled tracer.
pub struct Span {
    kind: SpanKind_,
}

enum SpanKind_ {
    /// From a disabled tracer: an empty context.
    Disabled(Context),
    /// An SDK span (every span with `sdk_only`, or under suppressed telemetry), in its
    /// context.
    Sdk(Context),
    /// Sampled and recorded by this crate. `cx` (the parent's context with a [`Handle`]
    /// to this span in it) is built on first use of [`Span::context`].
    Recorded {
        rec: Arc<Recorded>,
        cx: OnceLock<Context>,
    },
    /// Not sampled: ids and flags only. `cx` (the parent's context with this span context
    /// in it) is built on first use of [`Span::context`].
    Unsampled {
        sc: SpanContext,
        base: Context,
        cx: OnceLock<Context>,
    },
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_span_context(|sc| {
            f.debug_struct("Span")
                .field("trace_id", &sc.trace_id())
                .field("span_id", &sc.span_id())
                .field("sampled", &sc.is_sampled())
                .finish()
        })
    }
}

impl Span {
    fn disabled() -> Span {
        Span {
            kind: SpanKind_::Disabled(Context::new()),
        }
    }

    fn sdk(inner: &Inner, builder: SpanBuilder, parent: Context) -> Span {
        let span = inner.tracer.build_with_context(builder, &parent);
        Span {
            kind: SpanKind_::Sdk(parent.with_span(span)),
        }
    }

    fn recorded(
        inner: &Inner,
        builder: SpanBuilder,
        parent: &SpanContext,
        trace_id: opentelemetry::trace::TraceId,
        base: Context,
    ) -> Span {
        let start = Start {
            builder,
            parent,
            base,
            trace_id,
        };
        Span {
            kind: SpanKind_::Recorded {
                rec: Recorded::start(start, &inner.sinks),
                cx: OnceLock::new(),
            },
        }
    }

    fn unsampled(sc: SpanContext, base: Context) -> Span {
        Span {
            kind: SpanKind_::Unsampled {
                sc,
                base,
                cx: OnceLock::new(),
            },
        }
    }

    fn with_span_context<T>(&self, f: impl FnOnce(&SpanContext) -> T) -> T {
        match &self.kind {
            SpanKind_::Disabled(cx) | SpanKind_::Sdk(cx) => f(cx.span().span_context()),
            SpanKind_::Recorded { rec, .. } => f(rec.span_context()),
            SpanKind_::Unsampled { sc, .. } => f(sc),
        }
    }

    /// Where setters write: the SDK span or the recorded data; `None` for the others.
    fn sink(&self) -> Option<Sink<'_>> {
        match &self.kind {
            SpanKind_::Sdk(cx) => Some(Sink::Sdk(cx.span())),
            SpanKind_::Recorded { rec, .. } => Some(Sink::Recorded(rec)),
            SpanKind_::Disabled(_) | SpanKind_::Unsampled { .. } => None,
        }
    }

    /// The span's ids and the context (baggage, …) it was started in, without building a
    /// context for an unsampled span: what propagation needs.
    pub(crate) fn with_parts<T>(&self, f: impl FnOnce(&SpanContext, &Context) -> T) -> T {
        match &self.kind {
            SpanKind_::Unsampled { sc, base, .. } => f(sc, base),
            SpanKind_::Recorded { rec, .. } => f(rec.span_context(), rec.base()),
            SpanKind_::Disabled(cx) | SpanKind_::Sdk(cx) => f(cx.span().span_context(), cx),
        }
    }

    /// The context holding this span: the parent for children and what gets injected into
    /// outgoing headers.
    pub fn context(&self) -> &Context {
        match &self.kind {
            SpanKind_::Disabled(cx) | SpanKind_::Sdk(cx) => cx,
            SpanKind_::Recorded { rec, cx } => {
                cx.get_or_init(|| rec.base().with_span(Handle(rec.clone())))
            }
            SpanKind_::Unsampled { sc, base, cx } => {
                cx.get_or_init(|| base.with_remote_span_context(sc.clone()))
            }
        }
    }

    /// The span's ids and sampling flag.
    pub fn span_context(&self) -> SpanContext {
        self.with_span_context(SpanContext::clone)
    }

    /// The trace id as 32 hex digits (all zeros when there is no trace).
    pub fn trace_id(&self) -> String {
        self.with_span_context(|sc| sc.trace_id().to_string())
    }

    /// The span id as 16 hex digits.
    pub fn span_id(&self) -> String {
        self.with_span_context(|sc| sc.span_id().to_string())
    }

    /// Whether the span will be exported.
    pub fn is_sampled(&self) -> bool {
        match &self.kind {
            SpanKind_::Sdk(cx) => cx.span().span_context().is_sampled(),
            SpanKind_::Recorded { .. } => true,
            SpanKind_::Disabled(_) | SpanKind_::Unsampled { .. } => false,
        }
    }

    /// Whether setters record anything (sampled and not finished).
    pub fn is_recording(&self) -> bool {
        self.sink().is_some_and(|sink| sink.is_recording())
    }

    /// Sets a tag — the seed's `setTag`.
    pub fn set_tag(&self, key: impl Into<Key>, value: impl Into<Value>) {
        if let Some(sink) = self.sink() {
            sink.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Renames the span (for example once the route is known).
    pub fn set_name(&self, name: impl Into<Cow<'static, str>>) {
        if let Some(sink) = self.sink() {
            sink.update_name(name.into());
        }
    }

    /// Adds a log line — the seed's `log`.
    pub fn log(&self, message: impl Into<Cow<'static, str>>) {
        if let Some(sink) = self.sink() {
            sink.add_event(message.into(), Vec::new());
        }
    }

    /// Adds a log with fields — the seed's `log({ error: … })`.
    pub fn log_fields(
        &self,
        name: impl Into<Cow<'static, str>>,
        fields: impl IntoIterator<Item = (&'static str, Value)>,
    ) {
        if let Some(sink) = self.sink().filter(Sink::is_recording) {
            let fields = fields
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v))
                .collect();
            sink.add_event(name.into(), fields);
        }
    }

    /// Marks the span failed: tag `error=true`, an `exception` log with the message, and
    /// an error status — the seed's `setTag('error', true); log({ error })`.
    pub fn set_error(&self, message: impl fmt::Display) {
        let Some(sink) = self.sink().filter(Sink::is_recording) else {
            return;
        };
        let message = message.to_string();
        sink.set_attribute(KeyValue::new("error", true));
        sink.add_event(
            "exception".into(),
            vec![KeyValue::new("exception.message", message.clone())],
        );
        sink.set_status(Status::error(message));
    }

    /// Marks the span successful (overrides an earlier error status).
    pub fn set_ok(&self) {
        if let Some(sink) = self.sink() {
            sink.set_status(Status::Ok);
        }
    }

    /// Links this span to another one.
    pub fn add_link(&self, span_context: SpanContext) {
        if let Some(sink) = self.sink()
            && span_context.is_valid()
        {
            sink.add_link(span_context);
        }
    }

    /// Ends the span now — the seed's `finish`. Dropping it does the same.
    pub fn finish(self) {
        drop(self);
    }

    /// Makes this span the current context until the guard drops (synchronous code).
    pub fn enter(&self) -> ContextGuard {
        self.context().clone().attach()
    }

    /// Runs `future` with this span as its current context, so spans started inside (store
    /// operations, client calls, `tracing` spans) become its children.
    pub fn in_scope<F: Future>(&self, future: F) -> WithContext<F> {
        future.with_context(self.context().clone())
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        match &self.kind {
            SpanKind_::Sdk(cx) => cx.span().end(),
            SpanKind_::Recorded { rec, .. } => rec.end(None),
            SpanKind_::Disabled(_) | SpanKind_::Unsampled { .. } => {}
        }
    }
}

/// What a span's setters write to.
enum Sink<'a> {
    Sdk(opentelemetry::trace::SpanRef<'a>),
    Recorded(&'a Recorded),
}

impl Sink<'_> {
    fn is_recording(&self) -> bool {
        match self {
            Sink::Sdk(span) => span.is_recording(),
            Sink::Recorded(rec) => rec.is_recording(),
        }
    }

    fn set_attribute(&self, attribute: KeyValue) {
        match self {
            Sink::Sdk(span) => span.set_attribute(attribute),
            Sink::Recorded(rec) => rec.set_attribute(attribute),
        }
    }

    fn update_name(&self, name: Cow<'static, str>) {
        match self {
            Sink::Sdk(span) => span.update_name(name),
            Sink::Recorded(rec) => rec.update_name(name),
        }
    }

    fn add_event(&self, name: Cow<'static, str>, fields: Vec<KeyValue>) {
        match self {
            Sink::Sdk(span) => span.add_event(name, fields),
            Sink::Recorded(rec) => rec.add_event(name, opentelemetry::time::now(), fields),
        }
    }

    fn set_status(&self, status: Status) {
        match self {
            Sink::Sdk(span) => span.set_status(status),
            Sink::Recorded(rec) => rec.set_status(status),
        }
    }

    fn add_link(&self, span_context: SpanContext) {
        match self {
            Sink::Sdk(span) => span.add_link(span_context, Vec::new()),
            Sink::Recorded(rec) => rec.add_link(span_context, Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_export_settings_are_refused_by_name() {
        let err = DistributedTracer::builder("x")
            .otlp("http://127.0.0.1:4317", Protocol::Grpc)
            .err()
            .unwrap();
        assert!(err.to_string().contains("otlp-grpc"), "{err}");
        let err = DistributedTracer::builder("x")
            .otlp("localhost:4318", Protocol::HttpProtobuf)
            .err()
            .unwrap();
        assert!(err.to_string().contains("endpoint"), "{err}");
        let result =
            DistributedTracer::builder("x").otlp("http://127.0.0.1:4318", Protocol::HttpProtobuf);
        if cfg!(feature = "otlp") {
            assert!(result.is_ok());
        } else {
            let err = result.err().unwrap();
            assert!(err.to_string().contains("`otlp` feature"), "{err}");
        }
        let err = DistributedTracer::builder(" ").build().unwrap_err();
        assert!(err.to_string().contains("service_name"), "{err}");
    }

    #[test]
    fn from_config_disabled_gives_a_noop_tracer() {
        let config = TracingConfig {
            enabled: false,
            ..TracingConfig::default()
        };
        let tracer = DistributedTracer::from_config(&config, Some(TraceBuffer::new(10))).unwrap();
        assert!(!tracer.is_enabled());
        let span = tracer.start_span("x");
        span.set_tag("k", "v");
        assert!(!span.is_sampled());
    }

    #[test]
    fn an_unsampled_root_and_its_children_are_ids_only_and_follow_the_decision() {
        let buffer = TraceBuffer::new(100);
        let tracer = DistributedTracer::builder("svc")
            .sampling_rate(0.0)
            .buffer(buffer.clone())
            .build()
            .unwrap();
        let root = tracer.start_span("root");
        assert!(matches!(root.kind, SpanKind_::Unsampled { .. }));
        let sc = root.span_context();
        assert!(sc.is_valid() && !sc.is_sampled());
        let child = tracer.span("child").child_of_span(&root).start();
        let grandchild = tracer.span("grandchild").child_of(child.context()).start();
        for span in [&child, &grandchild] {
            let csc = span.span_context();
            assert_eq!(csc.trace_id(), sc.trace_id(), "children keep the trace");
            assert_ne!(csc.span_id(), sc.span_id());
            assert!(!csc.is_sampled() && !span.is_recording());
        }
        // A span started in an unsampled span's scope follows it too.
        let scoped = {
            let _guard = root.enter();
            tracer.start_span("scoped")
        };
        assert_eq!(scoped.span_context().trace_id(), sc.trace_id());
        assert!(!scoped.is_sampled());
        drop((root, child, grandchild, scoped));
        assert_eq!(buffer.span_count(), 0);
    }

    #[test]
    fn kept_roots_are_recorded_with_the_trace_id_the_decision_was_made_on() {
        let buffer = TraceBuffer::new(100_000);
        let tracer = DistributedTracer::builder("svc")
            .sampling_rate(0.5)
            .buffer(buffer.clone())
            .build()
            .unwrap();
        let ratio = Ratio::new(0.5);
        let mut kept = 0;
        for _ in 0..2_000 {
            let span = tracer.start_span("root");
            let sc = span.span_context();
            // Exactly the roots the ratio keeps are recorded, on the id it judged.
            assert_eq!(sc.is_sampled(), ratio.keeps(sc.trace_id()));
            assert_eq!(span.is_recording(), sc.is_sampled());
            if sc.is_sampled() {
                kept += 1;
                let child = tracer.start_child("child", &span);
                assert!(child.is_sampled(), "children of sampled spans are sampled");
            }
        }
        assert!((850..=1150).contains(&kept), "kept {kept} of 2000 at 0.5");
        assert_eq!(buffer.span_count(), 2 * kept);
    }

    #[test]
    fn the_fast_header_writer_writes_what_the_generic_propagator_writes_but_less_for_unsampled_spans()
     {
        use opentelemetry::baggage::BaggageExt as _;
        use opentelemetry::propagation::TextMapPropagator as _;
        use opentelemetry::trace::{SpanId, TraceId};

        let base = Context::new().with_baggage([KeyValue::new("user", "u 1")]);
        for b3 in [B3Encoding::Multi, B3Encoding::Single, B3Encoding::None] {
            let propagator = Propagator::new(b3);
            for (sampled, state) in [(true, ""), (false, ""), (false, "congo=t61,rojo=00f0")] {
                let sc = SpanContext::new(
                    TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                    SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                    if sampled {
                        TraceFlags::SAMPLED
                    } else {
                        TraceFlags::default()
                    },
                    false,
                    state.parse().unwrap(),
                );
                for cx in [Context::new(), base.clone()] {
                    let mut generic = http::HeaderMap::new();
                    propagator.inject_context(
                        &cx.with_remote_span_context(sc.clone()),
                        &mut crate::HeaderInjector(&mut generic),
                    );
                    // The fast writer leaves an empty tracestate out, and B3 for an
                    // unsampled span whose trace did not come in over B3.
                    if state.is_empty() {
                        generic.remove("tracestate");
                    }
                    let mut without_b3 = generic.clone();
                    for name in ["b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"] {
                        without_b3.remove(name);
                    }
                    let mut fast = http::HeaderMap::new();
                    propagator.inject_span_headers(&sc, &cx, &mut fast);
                    let expected = if sampled { &generic } else { &without_b3 };
                    assert_eq!(&fast, expected, "{b3:?} sampled={sampled} state={state:?}");
                    // Written as head lines: the same headers, in the same order.
                    let mut lines = Vec::new();
                    propagator.inject_span_headers(&sc, &cx, &mut crate::HeadLines(&mut lines));
                    let mut from_map = Vec::new();
                    for (name, value) in &fast {
                        from_map.extend_from_slice(name.as_str().as_bytes());
                        from_map.extend_from_slice(b": ");
                        from_map.extend_from_slice(value.as_bytes());
                        from_map.extend_from_slice(b"\r\n");
                    }
                    assert_eq!(
                        String::from_utf8_lossy(&lines),
                        String::from_utf8_lossy(&from_map),
                        "{b3:?} sampled={sampled} state={state:?}"
                    );
                }
                // A trace that came in over B3 gets B3 back, sampled or not.
                let mut incoming = http::HeaderMap::new();
                incoming.insert(
                    "b3",
                    format!(
                        "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{}",
                        u8::from(sampled)
                    )
                    .parse()
                    .unwrap(),
                );
                let extracted = propagator.extract_headers(&incoming);
                let mut generic = http::HeaderMap::new();
                propagator.inject_context(
                    &extracted.with_remote_span_context(sc.clone()),
                    &mut crate::HeaderInjector(&mut generic),
                );
                if state.is_empty() {
                    generic.remove("tracestate");
                }
                let mut fast = http::HeaderMap::new();
                propagator.inject_span_headers(&sc, &extracted, &mut fast);
                assert_eq!(fast, generic, "over B3: {b3:?} sampled={sampled}");
            }
        }
        assert!(
            Propagator::default()
                .extract_headers(&http::HeaderMap::new())
                .span()
                .span_context()
                .trace_id()
                == TraceId::INVALID
        );
    }
}
