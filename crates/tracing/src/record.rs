//! Sampled spans recorded by this crate instead of the OpenTelemetry SDK.
//!
//! Why: the SDK's span is a sampler call, a boxed span behind a mutex in an `Arc`'d
//! context, and a copy into `SpanData` at the end. A sampled gateway request made two of
//! them, and at a 10% sampling rate that path is cold every time it runs. Here a sampled
//! span is its `SpanData` under a mutex from the start, handed to the same span processors
//! (the trace buffer, the OTLP batch queue) when it ends; its context is built only when
//! asked for, with a [`Handle`] in it so that the OpenTelemetry API on
//! `span.context().span()` still records into it.
//!
//! The SDK's default span limits apply (128 attributes, events and links; 128 attributes
//! per event and link), with dropped counts as the SDK keeps them.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event, Link, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceState,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks, SpanProcessor};

/// Most attributes, events and links per span, and attributes per event or link (the
/// SDK's defaults).
const LIMIT: usize = 128;

/// The span processors of a tracer, shared with its SDK provider (which owns
/// [`Shared`] wrappers of the same processors), and whether they were shut down.
#[derive(Debug, Clone)]
pub(crate) struct Sinks {
    processors: Arc<[Arc<dyn SpanProcessor>]>,
    shut_down: Arc<AtomicBool>,
    scope: InstrumentationScope,
}

impl Sinks {
    /// Wraps `processors` for the SDK provider (in the same order) and keeps them for
    /// spans recorded here.
    pub(crate) fn new(
        processors: Vec<Arc<dyn SpanProcessor>>,
        scope: InstrumentationScope,
    ) -> (Sinks, Vec<Shared>) {
        let shut_down = Arc::new(AtomicBool::new(false));
        let shared = processors
            .iter()
            .map(|processor| Shared {
                processor: processor.clone(),
                shut_down: shut_down.clone(),
            })
            .collect();
        (
            Sinks {
                processors: processors.into(),
                shut_down,
                scope,
            },
            shared,
        )
    }

    fn export(&self, data: SpanData) {
        // As the SDK: nothing is exported once the provider is shut down.
        if self.shut_down.load(Ordering::Acquire) {
            return;
        }
        match &*self.processors {
            [] => {}
            [only] => only.on_end(data),
            [rest @ .., last] => {
                for processor in rest {
                    processor.on_end(data.clone());
                }
                last.on_end(data);
            }
        }
    }
}

/// A processor as the SDK provider holds it; the [`Sinks`] hold it too.
#[derive(Debug)]
pub(crate) struct Shared {
    processor: Arc<dyn SpanProcessor>,
    shut_down: Arc<AtomicBool>,
}

impl SpanProcessor for Shared {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.processor.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.processor.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.processor.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.shut_down.store(true, Ordering::Release);
        self.processor.shutdown_with_timeout(timeout)
    }

    // `set_resource` stays a no-op: the processors were given the resource when built.
}

/// A sampled span recorded here: its ids, the context it was started in, and its data
/// until it ends.
#[derive(Debug)]
pub(crate) struct Recorded {
    sc: SpanContext,
    /// The parent's context (baggage, how the trace came in); this span's context is this
    /// with a [`Handle`] as its span.
    base: Context,
    /// `None` once ended.
    data: Mutex<Option<SpanData>>,
    sinks: Sinks,
}

/// The parts of a span about to be recorded.
pub(crate) struct Start<'a> {
    pub(crate) builder: SpanBuilder,
    /// The parent's ids (invalid for a root).
    pub(crate) parent: &'a SpanContext,
    /// The context the span starts in (the parent's).
    pub(crate) base: Context,
    /// This span's trace id (the parent's, or a new root's).
    pub(crate) trace_id: opentelemetry::trace::TraceId,
}

impl Recorded {
    /// Starts recording: the SDK's span limits applied to what `start.builder` carries.
    pub(crate) fn start(start: Start<'_>, sinks: &Sinks) -> Arc<Recorded> {
        let Start {
            builder,
            parent,
            base,
            trace_id,
        } = start;
        // As the SDK's parent-based samplers: a child keeps its parent's flags and trace
        // state; the sampled flag is set.
        let (flags, state) = if parent.is_valid() {
            (parent.trace_flags(), parent.trace_state().clone())
        } else {
            (TraceFlags::default(), TraceState::NONE)
        };
        let sc = SpanContext::new(
            trace_id,
            crate::ids::span_id(),
            flags.with_sampled(true),
            false,
            state,
        );
        let mut attributes = builder.attributes.unwrap_or_default();
        let dropped_attributes_count = attributes.len().saturating_sub(LIMIT);
        attributes.truncate(LIMIT);
        let mut links = SpanLinks::default();
        if let Some(mut given) = builder.links {
            links.dropped_count = count(given.len().saturating_sub(LIMIT));
            given.truncate(LIMIT);
            for link in &mut given {
                link.dropped_attributes_count += count(link.attributes.len().saturating_sub(LIMIT));
                link.attributes.truncate(LIMIT);
            }
            links.links = given;
        }
        let mut events = SpanEvents::default();
        if let Some(mut given) = builder.events {
            events.dropped_count = count(given.len().saturating_sub(LIMIT));
            given.truncate(LIMIT);
            for event in &mut given {
                event.dropped_attributes_count +=
                    count(event.attributes.len().saturating_sub(LIMIT));
                event.attributes.truncate(LIMIT);
            }
            events.events = given;
        }
        let start_time = builder.start_time.unwrap_or_else(opentelemetry::time::now);
        let data = SpanData {
            span_context: sc.clone(),
            parent_span_id: if parent.is_valid() {
                parent.span_id()
            } else {
                SpanId::INVALID
            },
            parent_span_is_remote: parent.is_valid() && parent.is_remote(),
            span_kind: builder.span_kind.unwrap_or(SpanKind::Internal),
            name: builder.name,
            start_time,
            end_time: start_time,
            attributes,
            dropped_attributes_count: count(dropped_attributes_count),
            events,
            links,
            status: Status::Unset,
            instrumentation_scope: sinks.scope.clone(),
        };
        Arc::new(Recorded {
            sc,
            base,
            data: Mutex::new(Some(data)),
            sinks: sinks.clone(),
        })
    }

    pub(crate) fn span_context(&self) -> &SpanContext {
        &self.sc
    }

    pub(crate) fn base(&self) -> &Context {
        &self.base
    }

    fn lock(&self) -> MutexGuard<'_, Option<SpanData>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the data while the span has not ended.
    pub(crate) fn with_data(&self, f: impl FnOnce(&mut SpanData)) {
        if let Some(data) = self.lock().as_mut() {
            f(data);
        }
    }

    pub(crate) fn is_recording(&self) -> bool {
        self.lock().is_some()
    }

    pub(crate) fn set_attribute(&self, attribute: KeyValue) {
        self.with_data(|data| set_attribute(data, attribute));
    }

    pub(crate) fn add_event(
        &self,
        name: Cow<'static, str>,
        time: SystemTime,
        attributes: Vec<KeyValue>,
    ) {
        self.with_data(|data| add_event(data, name, time, attributes));
    }

    pub(crate) fn update_name(&self, name: Cow<'static, str>) {
        self.with_data(|data| data.name = name);
    }

    pub(crate) fn set_status(&self, status: Status) {
        self.with_data(|data| set_status(data, status));
    }

    pub(crate) fn add_link(&self, span_context: SpanContext, attributes: Vec<KeyValue>) {
        self.with_data(|data| {
            if data.links.links.len() < LIMIT {
                let mut attributes = attributes;
                let dropped = count(attributes.len().saturating_sub(LIMIT));
                attributes.truncate(LIMIT);
                data.links
                    .links
                    .push(Link::new(span_context, attributes, dropped));
            } else {
                data.links.dropped_count += 1;
            }
        });
    }

    /// Ends the span (at `time`, or now) and hands it to the processors; later calls do
    /// nothing.
    pub(crate) fn end(&self, time: Option<SystemTime>) {
        let Some(mut data) = self.lock().take() else {
            return;
        };
        data.end_time = time.unwrap_or_else(opentelemetry::time::now);
        self.sinks.export(data);
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn set_attribute(data: &mut SpanData, attribute: KeyValue) {
    if data.attributes.len() < LIMIT {
        data.attributes.push(attribute);
    } else {
        data.dropped_attributes_count += 1;
    }
}

fn add_event(
    data: &mut SpanData,
    name: Cow<'static, str>,
    time: SystemTime,
    mut attributes: Vec<KeyValue>,
) {
    if data.events.events.len() < LIMIT {
        let dropped = count(attributes.len().saturating_sub(LIMIT));
        attributes.truncate(LIMIT);
        data.events
            .events
            .push(Event::new(name, time, attributes, dropped));
    } else {
        data.events.dropped_count += 1;
    }
}

/// `Ok` > `Error` > `Unset`, as the SDK orders them.
fn set_status(data: &mut SpanData, status: Status) {
    if status > data.status {
        data.status = status;
    }
}

/// A recorded span as an OpenTelemetry [`Span`](opentelemetry::trace::Span), the span of
/// its context: code holding only the context (a `tracing-opentelemetry` layer, a
/// third-party crate) records into the same span. Dropping a handle does not end the span.
#[derive(Debug)]
pub(crate) struct Handle(pub(crate) Arc<Recorded>);

impl opentelemetry::trace::Span for Handle {
    fn add_event_with_timestamp<T>(
        &mut self,
        name: T,
        timestamp: SystemTime,
        attributes: Vec<KeyValue>,
    ) where
        T: Into<Cow<'static, str>>,
    {
        self.0.add_event(name.into(), timestamp, attributes);
    }

    fn span_context(&self) -> &SpanContext {
        &self.0.sc
    }

    fn is_recording(&self) -> bool {
        self.0.is_recording()
    }

    fn set_attribute(&mut self, attribute: KeyValue) {
        self.0.set_attribute(attribute);
    }

    fn set_status(&mut self, status: Status) {
        self.0.set_status(status);
    }

    fn update_name<T>(&mut self, new_name: T)
    where
        T: Into<Cow<'static, str>>,
    {
        self.0.update_name(new_name.into());
    }

    fn add_link(&mut self, span_context: SpanContext, attributes: Vec<KeyValue>) {
        self.0.add_link(span_context, attributes);
    }

    fn end_with_timestamp(&mut self, timestamp: SystemTime) {
        self.0.end(Some(timestamp));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags, TraceId,
    };
    use opentelemetry::{Context, KeyValue, Value};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SpanData, SpanExporter};

    use crate::{DistributedTracer, TraceBuffer};

    /// Keeps what it is given.
    #[derive(Debug, Clone, Default)]
    struct Collect(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collect {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    /// Everything of a span but its ids and times; the parent as the name of a span in
    /// `all`, or `remote <id>`.
    fn normalise(span: &SpanData, all: &[SpanData]) -> String {
        let parent = if span.parent_span_id == SpanId::INVALID {
            "root".to_owned()
        } else if let Some(p) = all
            .iter()
            .find(|p| p.span_context.span_id() == span.parent_span_id)
        {
            format!("child of {}", p.name)
        } else {
            format!("remote {}", span.parent_span_id)
        };
        let events: Vec<_> = span
            .events
            .events
            .iter()
            .map(|e| {
                format!(
                    "{}{:?}/{}",
                    e.name, e.attributes, e.dropped_attributes_count
                )
            })
            .collect();
        let links: Vec<_> = span
            .links
            .links
            .iter()
            .map(|l| (l.span_context.span_id(), l.attributes.len()))
            .collect();
        format!(
            "{} {:?} {parent} parent_remote={} flags={:?} state={:?} remote={} \
             attributes={:?} dropped={} events={events:?} dropped={} links={links:?} \
             dropped={} status={:?} scope={} ended={}",
            span.name,
            span.span_kind,
            span.parent_span_is_remote,
            span.span_context.trace_flags(),
            span.span_context.trace_state().header(),
            span.span_context.is_remote(),
            span.attributes,
            span.dropped_attributes_count,
            span.events.dropped_count,
            span.links.dropped_count,
            span.status,
            span.instrumentation_scope.name(),
            span.end_time >= span.start_time,
        )
    }

    /// The same calls on a tracer, its spans collected by an exporter and a buffer.
    fn scenario(sdk_only: bool) -> (Vec<String>, usize) {
        let collect = Collect::default();
        let buffer = TraceBuffer::new(1_000);
        let tracer = DistributedTracer::builder("svc")
            .sdk_only(sdk_only)
            .buffer(buffer.clone())
            .exporter(collect.clone())
            .build()
            .unwrap();
        let linked = SpanContext::new(
            TraceId::from(7u128),
            SpanId::from(8u64),
            TraceFlags::SAMPLED,
            true,
            Default::default(),
        );
        let root = tracer
            .span("root")
            .kind(SpanKind::Server)
            .tag("at.start", 1)
            .root()
            .start_with_tags(|tags| tags.push(KeyValue::new("pushed", "yes")));
        root.set_tag("later", "x");
        root.set_name("renamed root");
        root.log("hello");
        root.log_fields("fields", [("k", Value::from(1))]);
        // Past the limits: 128 attributes and 128 events are kept, the rest counted.
        for i in 0..130 {
            root.set_tag(format!("many.{i}"), i);
            root.log(format!("log {i}"));
        }
        let child = tracer
            .span("child")
            .kind(SpanKind::Client)
            .child_of_span(&root)
            .link(linked.clone())
            .start();
        child.set_error("boom");
        child.set_ok();
        child.add_link(linked.clone());
        // The OpenTelemetry API on the context's span records into the same span.
        child
            .context()
            .span()
            .set_attribute(KeyValue::new("via.context", true));
        let grandchild = tracer.span("grandchild").child_of(child.context()).start();
        drop(grandchild);
        drop(child);
        // Ended through the context: later tags are not recorded, it is exported once.
        let ended = tracer.span("ended early").child_of_span(&root).start();
        ended.context().span().end();
        ended.set_tag("late", 1);
        assert!(!ended.is_recording());
        drop(ended);
        // A remote parent with a trace state.
        let remote = SpanContext::new(
            TraceId::from(0x42u128),
            SpanId::from(0x43u64),
            TraceFlags::SAMPLED,
            true,
            "vendor=v1".parse().unwrap(),
        );
        let from_remote = tracer
            .span("from remote")
            .child_of(&Context::new().with_remote_span_context(remote))
            .start();
        assert_eq!(
            from_remote.span_context().trace_id(),
            TraceId::from(0x42u128)
        );
        drop(from_remote);
        root.finish();
        tracer.flush();
        let held = buffer.span_count();
        // Nothing is recorded once the tracer is shut down.
        tracer.shutdown();
        drop(tracer.start_span("after shutdown"));
        assert_eq!(buffer.span_count(), held);
        let spans = collect.0.lock().unwrap().clone();
        let mut out: Vec<String> = spans.iter().map(|s| normalise(s, &spans)).collect();
        out.sort();
        (out, held)
    }

    #[test]
    fn recorded_spans_export_what_sdk_spans_export() {
        let (sdk, sdk_held) = scenario(true);
        let (recorded, held) = scenario(false);
        assert_eq!(sdk.len(), 5, "{sdk:#?}");
        assert_eq!((held, sdk_held), (5, 5));
        for (a, b) in sdk.iter().zip(&recorded) {
            assert_eq!(a, b);
        }
        let root = recorded
            .iter()
            .find(|s| s.starts_with("renamed root"))
            .unwrap();
        // 3 + 130 attributes and 2 + 130 events, 128 of each kept.
        assert!(root.contains("dropped=5 events="), "{root}");
        assert!(root.contains("dropped=4 links="), "{root}");
        let child = recorded.iter().find(|s| s.starts_with("child ")).unwrap();
        assert!(
            child.contains("via.context") && child.contains("status=Ok"),
            "{child}"
        );
        let remote = recorded
            .iter()
            .find(|s| s.starts_with("from remote"))
            .unwrap();
        assert!(
            remote.contains("parent_remote=true") && remote.contains("state=\"vendor=v1\""),
            "{remote}"
        );
    }
}
