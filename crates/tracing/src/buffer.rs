//! The embedded default: recent sampled spans kept in memory, bounded, grouped by trace,
//! and read back as trace lists and waterfall views (see [`admin`](crate::admin)).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry::{Context, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use serde::Serialize;

/// A bounded in-memory store of recent spans, shared by clones (and by several tracers, so
/// one admin view shows every service of the process).
///
/// Holds at most `max_spans` spans; when full, whole traces are evicted oldest first (the
/// oldest spans of a trace go only when that trace alone exceeds the bound).
#[derive(Clone, Debug)]
pub struct TraceBuffer {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    max_spans: usize,
    spans: usize,
    order: VecDeque<TraceId>,
    traces: HashMap<TraceId, VecDeque<Stored>>,
}

#[derive(Debug)]
struct Stored {
    service: Arc<str>,
    data: SpanData,
}

/// Span tags naming the service a request was routed to or called: a trace through the
/// gateway to an untraced `user-service` is still a trace of `user-service`.
const SERVICE_TAGS: [&str; 2] = ["trellis.service", "peer.service"];

impl Stored {
    /// True when the span was recorded by `service` or routed to / called it.
    fn touches(&self, service: &str) -> bool {
        &*self.service == service
            || self
                .data
                .attributes
                .iter()
                .any(|kv| SERVICE_TAGS.contains(&kv.key.as_str()) && kv.value.as_str() == service)
    }
}

impl TraceBuffer {
    /// An empty buffer that holds at most `max_spans` spans (at least 1).
    pub fn new(max_spans: usize) -> Self {
        TraceBuffer {
            inner: Arc::new(Mutex::new(Inner {
                max_spans: max_spans.max(1),
                spans: 0,
                order: VecDeque::new(),
                traces: HashMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spans held now.
    pub fn span_count(&self) -> usize {
        self.lock().spans
    }

    /// Traces held now.
    pub fn trace_count(&self) -> usize {
        self.lock().order.len()
    }

    /// Most spans held.
    pub fn capacity(&self) -> usize {
        self.lock().max_spans
    }

    pub(crate) fn record(&self, service: Arc<str>, data: SpanData) {
        self.lock().record(service, data);
    }

    /// Records every span under one lock (a reader sees all of them or none).
    #[cfg(feature = "receiver")]
    pub(crate) fn record_all(&self, spans: Vec<(Arc<str>, SpanData)>) {
        let mut inner = self.lock();
        for (service, data) in spans {
            inner.record(service, data);
        }
    }
}

impl Inner {
    fn record(&mut self, service: Arc<str>, data: SpanData) {
        let trace_id = data.span_context.trace_id();
        let inner = self;
        match inner.traces.get_mut(&trace_id) {
            Some(spans) => spans.push_back(Stored { service, data }),
            None => {
                // Room for a server span and its client span (a gateway's trace) without
                // growing.
                let mut spans = VecDeque::with_capacity(2);
                spans.push_back(Stored { service, data });
                inner.traces.insert(trace_id, spans);
                inner.order.push_back(trace_id);
            }
        }
        inner.spans += 1;
        while inner.spans > inner.max_spans {
            if inner.order.len() > 1 {
                if let Some(oldest) = inner.order.pop_front()
                    && let Some(spans) = inner.traces.remove(&oldest)
                {
                    inner.spans -= spans.len();
                }
            } else if let Some(spans) = inner.traces.get_mut(&trace_id) {
                spans.pop_front();
                inner.spans -= 1;
            } else {
                break;
            }
        }
    }
}

impl TraceBuffer {
    /// The most recent traces first, at most `limit`, only those with a span of `service`
    /// when given.
    pub fn recent(&self, service: Option<&str>, limit: usize) -> Vec<TraceSummary> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .rev()
            .filter_map(|id| inner.traces.get(id))
            .filter(|spans| service.is_none_or(|s| spans.iter().any(|sp| sp.touches(s))))
            .take(limit)
            .map(summary)
            .collect()
    }

    /// One trace as a waterfall, or `None` when it is not (or no longer) held.
    pub fn trace(&self, trace_id: TraceId) -> Option<TraceView> {
        let inner = self.lock();
        inner
            .traces
            .get(&trace_id)
            .map(|spans| view(trace_id, spans))
    }

    /// Every service name seen in the held spans, sorted.
    pub fn services(&self) -> Vec<String> {
        let inner = self.lock();
        let set: BTreeSet<&str> = inner
            .traces
            .values()
            .flat_map(|spans| spans.iter().map(|s| &*s.service))
            .collect();
        set.into_iter().map(str::to_owned).collect()
    }
}

/// One line of the trace list.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TraceSummary {
    /// 32 hex digits.
    pub trace_id: String,
    /// Name of the root span, or of the earliest span when the root is not held.
    pub root_name: String,
    /// Service of that span.
    pub root_service: String,
    /// Services taking part, sorted.
    pub services: Vec<String>,
    /// Spans held for this trace.
    pub span_count: usize,
    /// Start of the earliest span, microseconds since the Unix epoch.
    pub start_unix_us: u64,
    /// From the earliest start to the latest end, in microseconds.
    pub duration_us: u64,
    /// Whether any span has an error status.
    pub error: bool,
}

/// A trace ready for a waterfall view: spans in start order with parent ids and offsets
/// from the trace start.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TraceView {
    /// 32 hex digits.
    pub trace_id: String,
    /// Start of the earliest span, microseconds since the Unix epoch.
    pub start_unix_us: u64,
    /// From the earliest start to the latest end, in microseconds.
    pub duration_us: u64,
    /// Services taking part, sorted.
    pub services: Vec<String>,
    /// The spans, ordered by start time.
    pub spans: Vec<SpanView>,
}

/// One bar of the waterfall.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SpanView {
    /// 16 hex digits.
    pub span_id: String,
    /// The parent's span id; `None` for a root. The parent may live in another process
    /// (`parent_in_trace` false).
    pub parent_span_id: Option<String>,
    /// Whether the parent span is in this view.
    pub parent_in_trace: bool,
    /// Nesting depth in this view (0 for spans whose parent is not held).
    pub depth: usize,
    /// Service that recorded the span.
    pub service: String,
    /// Span name.
    pub name: String,
    /// `server`, `client`, `producer`, `consumer` or `internal`.
    pub kind: &'static str,
    /// Start, microseconds after the trace start.
    pub start_offset_us: u64,
    /// Duration in microseconds.
    pub duration_us: u64,
    /// Tags.
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// Logs, in order.
    pub events: Vec<EventView>,
    /// Outcome.
    pub status: StatusView,
    /// Linked spans (for example the producer of a consumed event).
    pub links: Vec<LinkView>,
}

/// A span log (OpenTelemetry event).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventView {
    /// Event name or message.
    pub name: String,
    /// Microseconds after the trace start.
    pub offset_us: u64,
    /// Fields.
    pub attributes: BTreeMap<String, serde_json::Value>,
}

/// A span's status.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusView {
    /// `unset`, `ok` or `error`.
    pub code: &'static str,
    /// Error description, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A link to another span.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LinkView {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros()
        .try_into()
        .unwrap_or(u64::MAX)
}

fn micros_between(from: SystemTime, to: SystemTime) -> u64 {
    to.duration_since(from)
        .unwrap_or(Duration::ZERO)
        .as_micros()
        .try_into()
        .unwrap_or(u64::MAX)
}

fn bounds(spans: &VecDeque<Stored>) -> (SystemTime, SystemTime) {
    let start = spans
        .iter()
        .map(|s| s.data.start_time)
        .min()
        .unwrap_or(UNIX_EPOCH);
    let end = spans.iter().map(|s| s.data.end_time).max().unwrap_or(start);
    (start, end)
}

fn services(spans: &VecDeque<Stored>) -> Vec<String> {
    let set: BTreeSet<&str> = spans.iter().map(|s| &*s.service).collect();
    set.into_iter().map(str::to_owned).collect()
}

fn summary(spans: &VecDeque<Stored>) -> TraceSummary {
    let held: std::collections::HashSet<SpanId> = spans
        .iter()
        .map(|s| s.data.span_context.span_id())
        .collect();
    let root = spans
        .iter()
        .filter(|s| !held.contains(&s.data.parent_span_id))
        .min_by_key(|s| s.data.start_time);
    let (start, end) = bounds(spans);
    TraceSummary {
        trace_id: spans
            .front()
            .map(|s| s.data.span_context.trace_id().to_string())
            .unwrap_or_default(),
        root_name: root.map(|s| s.data.name.to_string()).unwrap_or_default(),
        root_service: root.map(|s| s.service.to_string()).unwrap_or_default(),
        services: services(spans),
        span_count: spans.len(),
        start_unix_us: unix_us(start),
        duration_us: micros_between(start, end),
        error: spans
            .iter()
            .any(|s| matches!(s.data.status, Status::Error { .. })),
    }
}

fn json_value(value: &Value) -> serde_json::Value {
    match value {
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::I64(i) => serde_json::Value::from(*i),
        Value::F64(f) => serde_json::Number::from_f64(*f).map_or_else(
            || serde_json::Value::String(f.to_string()),
            serde_json::Value::Number,
        ),
        Value::String(s) => serde_json::Value::String(s.to_string()),
        other => serde_json::Value::String(other.to_string()),
    }
}

fn attributes<'a>(
    kvs: impl IntoIterator<Item = &'a opentelemetry::KeyValue>,
) -> BTreeMap<String, serde_json::Value> {
    kvs.into_iter()
        .map(|kv| (kv.key.to_string(), json_value(&kv.value)))
        .collect()
}

fn kind_name(kind: &SpanKind) -> &'static str {
    match kind {
        SpanKind::Server => "server",
        SpanKind::Client => "client",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
        SpanKind::Internal => "internal",
    }
}

fn view(trace_id: TraceId, spans: &VecDeque<Stored>) -> TraceView {
    let (start, end) = bounds(spans);
    let all_services = services(spans);
    let parents: HashMap<SpanId, SpanId> = spans
        .iter()
        .map(|s| (s.data.span_context.span_id(), s.data.parent_span_id))
        .collect();
    let depth = |mut id: SpanId| {
        let mut depth = 0;
        while let Some(parent) = parents.get(&id) {
            if !parents.contains_key(parent) || depth > parents.len() {
                break;
            }
            depth += 1;
            id = *parent;
        }
        depth
    };
    let mut ordered: Vec<&Stored> = spans.iter().collect();
    ordered.sort_by_key(|s| s.data.start_time);
    let spans: Vec<SpanView> = ordered
        .into_iter()
        .map(|s| {
            let d = &s.data;
            let parent = (d.parent_span_id != SpanId::INVALID).then_some(d.parent_span_id);
            SpanView {
                span_id: d.span_context.span_id().to_string(),
                parent_span_id: parent.map(|p| p.to_string()),
                parent_in_trace: parent.is_some_and(|p| parents.contains_key(&p)),
                depth: depth(d.span_context.span_id()),
                service: s.service.to_string(),
                name: d.name.to_string(),
                kind: kind_name(&d.span_kind),
                start_offset_us: micros_between(start, d.start_time),
                duration_us: micros_between(d.start_time, d.end_time),
                attributes: attributes(&d.attributes),
                events: d
                    .events
                    .iter()
                    .map(|e| EventView {
                        name: e.name.to_string(),
                        offset_us: micros_between(start, e.timestamp),
                        attributes: attributes(&e.attributes),
                    })
                    .collect(),
                status: match &d.status {
                    Status::Unset => StatusView {
                        code: "unset",
                        message: None,
                    },
                    Status::Ok => StatusView {
                        code: "ok",
                        message: None,
                    },
                    Status::Error { description } => StatusView {
                        code: "error",
                        message: (!description.is_empty()).then(|| description.to_string()),
                    },
                },
                links: d
                    .links
                    .iter()
                    .map(|l| LinkView {
                        trace_id: l.span_context.trace_id().to_string(),
                        span_id: l.span_context.span_id().to_string(),
                    })
                    .collect(),
            }
        })
        .collect();
    TraceView {
        trace_id: trace_id.to_string(),
        start_unix_us: unix_us(start),
        duration_us: micros_between(start, end),
        services: all_services,
        spans,
    }
}

/// Feeds a [`TraceBuffer`] with one tracer's sampled spans.
#[derive(Debug)]
pub(crate) struct BufferProcessor {
    pub(crate) buffer: TraceBuffer,
    pub(crate) service: Arc<str>,
}

impl SpanProcessor for BufferProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            self.buffer.record(self.service.clone(), span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::{DistributedTracer, TraceBuffer};

    #[test]
    fn the_service_filter_also_finds_spans_routed_to_or_calling_the_service() {
        let buffer = TraceBuffer::new(100);
        let tracer = DistributedTracer::builder("gateway")
            .buffer(buffer.clone())
            .build()
            .unwrap();
        let routed = tracer.start_span("GET /api/users/*");
        routed.set_tag("trellis.service", "user-service");
        routed.finish();
        let called = tracer.start_span("POST /charge");
        called.set_tag("peer.service", "payment-service");
        called.finish();
        tracer.start_span("alone").finish();
        assert_eq!(buffer.recent(None, 10).len(), 3);
        assert_eq!(buffer.recent(Some("gateway"), 10).len(), 3);
        assert_eq!(buffer.recent(Some("user-service"), 10).len(), 1);
        assert_eq!(buffer.recent(Some("payment-service"), 10).len(), 1);
        assert!(buffer.recent(Some("order-service"), 10).is_empty());
    }
}
