//! The embedded default: recent sampled spans kept in memory, bounded, grouped by trace,
//! and read back as trace lists and waterfall views (see [`admin`](crate::admin)).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use serde::Serialize;

/// A bounded in-memory store of recent spans, shared by clones (and by several tracers, so
/// one admin view shows every service of the process).
///
/// Holds at most `max_spans` spans in the order they ended. When full, the oldest span goes,
/// together with the spans of its trace filed right after it: the spans of one request in
/// one process end together, so a trace is seldom left in part. (A trace larger than the
/// whole buffer keeps its newest spans.) Filing a span is a push onto a ring with no index
/// to maintain, so it costs the same whatever the buffer holds; the views (trace list,
/// waterfall, services) group the spans by trace when they are asked for.
#[derive(Clone, Debug)]
pub struct TraceBuffer {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    max_spans: usize,
    /// Oldest first.
    spans: VecDeque<Stored>,
}

/// One held span. The parts the trace list needs are plain fields; the name, tags, logs,
/// links and error message — read only for a waterfall view or a service filter — are
/// encoded into one block ([`Packed`]). Filing a span therefore makes one allocation and
/// frees the `SpanData`'s many (its tag list, owned tag strings, name) at once, while they
/// are still in cache, instead of keeping them until the span is evicted tens of thousands
/// of requests later; evicting frees one block.
#[derive(Debug)]
struct Stored {
    trace_id: TraceId,
    service: Arc<str>,
    span_id: SpanId,
    parent_span_id: SpanId,
    start_time: SystemTime,
    end_time: SystemTime,
    kind: SpanKind,
    /// `unset`, `ok` or `error`.
    status: &'static str,
    packed: Packed,
}

/// Span tags naming the service a request was routed to or called: a trace through the
/// gateway to an untraced `user-service` is still a trace of `user-service`.
const SERVICE_TAGS: [&str; 2] = ["trellis.service", "peer.service"];

impl Stored {
    fn new(service: Arc<str>, data: SpanData) -> Self {
        Stored {
            trace_id: data.span_context.trace_id(),
            service,
            span_id: data.span_context.span_id(),
            parent_span_id: data.parent_span_id,
            start_time: data.start_time,
            end_time: data.end_time,
            kind: data.span_kind.clone(),
            status: match data.status {
                Status::Unset => "unset",
                Status::Ok => "ok",
                Status::Error { .. } => "error",
            },
            packed: Packed::new(&data),
        }
    }

    /// True when the span was recorded by `service` or routed to / called it.
    fn touches(&self, service: &str) -> bool {
        &*self.service == service
            || self.packed.unpack().attributes.iter().any(|(key, value)| {
                SERVICE_TAGS.contains(key) && matches!(value, Tag::Str(s) if *s == service)
            })
    }
}

/// A span's name, tags, logs, links and error message in one allocation.
///
/// Layout, integers little-endian, strings as a `u32` byte length and UTF-8 bytes: name;
/// error message; tags (`u32` count, then key and tagged value each); logs (`u32` count,
/// then name, time as `u64` seconds and `u32` nanoseconds since the Unix epoch, and tags);
/// links (`u32` count, then 16 bytes of trace id and 8 of span id). A tag value is one byte
/// of type (0 bool, 1 integer, 2 float, 3 text) and a byte, eight bytes or a string.
/// Values of other types (arrays) are kept as their text.
#[derive(Debug)]
struct Packed(Box<[u8]>);

/// A tag value read back from a [`Packed`] block.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tag<'a> {
    Bool(bool),
    I64(i64),
    F64(f64),
    Str(&'a str),
}

/// Tags read back: key and value.
type Tags<'a> = Vec<(&'a str, Tag<'a>)>;

/// The contents of a [`Packed`] block, borrowing its text.
#[derive(Debug, Default, PartialEq)]
struct Unpacked<'a> {
    name: &'a str,
    message: &'a str,
    attributes: Tags<'a>,
    /// Name, time and tags of each log.
    events: Vec<(&'a str, SystemTime, Tags<'a>)>,
    links: Vec<(TraceId, SpanId)>,
}

impl Packed {
    fn new(data: &SpanData) -> Self {
        let message = match &data.status {
            Status::Error { description } => description.as_ref(),
            _ => "",
        };
        let size = 4
            + data.name.len()
            + 4
            + message.len()
            + tags_size(&data.attributes)
            + 4
            + data
                .events
                .iter()
                .map(|e| 4 + e.name.len() + 12 + tags_size(&e.attributes))
                .sum::<usize>()
            + 4
            + data.links.len() * 24;
        let mut out = Vec::with_capacity(size);
        put_str(&mut out, &data.name);
        put_str(&mut out, message);
        put_tags(&mut out, &data.attributes);
        put_len(&mut out, data.events.len());
        for event in data.events.iter() {
            put_str(&mut out, &event.name);
            let since = event
                .timestamp
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            out.extend_from_slice(&since.as_secs().to_le_bytes());
            out.extend_from_slice(&since.subsec_nanos().to_le_bytes());
            put_tags(&mut out, &event.attributes);
        }
        put_len(&mut out, data.links.len());
        for link in data.links.iter() {
            out.extend_from_slice(&link.span_context.trace_id().to_bytes());
            out.extend_from_slice(&link.span_context.span_id().to_bytes());
        }
        Packed(out.into_boxed_slice())
    }

    /// Reads the block back. A block this module wrote always reads whole; were one
    /// truncated, what precedes the damage is returned.
    fn unpack(&self) -> Unpacked<'_> {
        let mut out = Unpacked::default();
        let _complete = out.read(&mut Reader(&self.0));
        out
    }
}

impl<'a> Unpacked<'a> {
    fn read(&mut self, r: &mut Reader<'a>) -> Option<()> {
        self.name = r.str()?;
        self.message = r.str()?;
        r.tags(&mut self.attributes)?;
        for _ in 0..r.u32()? {
            let name = r.str()?;
            let secs = u64::from_le_bytes(r.array()?);
            let nanos = u32::from_le_bytes(r.array()?);
            let at = Duration::from_secs(secs)
                .checked_add(Duration::from_nanos(nanos.into()))
                .and_then(|since| UNIX_EPOCH.checked_add(since))?;
            let mut tags = Vec::new();
            r.tags(&mut tags)?;
            self.events.push((name, at, tags));
        }
        for _ in 0..r.u32()? {
            let trace_id = TraceId::from_bytes(r.array()?);
            let span_id = SpanId::from_bytes(r.array()?);
            self.links.push((trace_id, span_id));
        }
        Some(())
    }
}

fn tags_size(tags: &[KeyValue]) -> usize {
    4 + tags
        .iter()
        .map(|kv| {
            4 + kv.key.as_str().len()
                + 1
                + match &kv.value {
                    Value::Bool(_) => 1,
                    Value::I64(_) | Value::F64(_) => 8,
                    Value::String(s) => 4 + s.as_str().len(),
                    // Arrays: their text, measured when written.
                    _ => 4,
                }
        })
        .sum::<usize>()
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Text beyond 4 GiB is cut at a character boundary (never reached: tags are small).
    let mut end = s.len().min(u32::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_len(out, end);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

fn put_tags(out: &mut Vec<u8>, tags: &[KeyValue]) {
    put_len(out, tags.len());
    for kv in tags {
        put_str(out, kv.key.as_str());
        match &kv.value {
            Value::Bool(b) => out.extend_from_slice(&[0, u8::from(*b)]),
            Value::I64(i) => {
                out.push(1);
                out.extend_from_slice(&i.to_le_bytes());
            }
            Value::F64(f) => {
                out.push(2);
                out.extend_from_slice(&f.to_le_bytes());
            }
            Value::String(s) => {
                out.push(3);
                put_str(out, s.as_str());
            }
            other => {
                out.push(3);
                put_str(out, &other.to_string());
            }
        }
    }
}

/// A cursor over a [`Packed`] block.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        std::str::from_utf8(self.bytes(len)?).ok()
    }

    fn tags(&mut self, into: &mut Tags<'a>) -> Option<()> {
        for _ in 0..self.u32()? {
            let key = self.str()?;
            let value = match self.array::<1>()?[0] {
                0 => Tag::Bool(self.array::<1>()?[0] != 0),
                1 => Tag::I64(i64::from_le_bytes(self.array()?)),
                2 => Tag::F64(f64::from_le_bytes(self.array()?)),
                _ => Tag::Str(self.str()?),
            };
            into.push((key, value));
        }
        Some(())
    }
}

impl TraceBuffer {
    /// An empty buffer that holds at most `max_spans` spans (at least 1).
    pub fn new(max_spans: usize) -> Self {
        TraceBuffer {
            inner: Arc::new(Mutex::new(Inner {
                max_spans: max_spans.max(1),
                spans: VecDeque::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spans held now.
    pub fn span_count(&self) -> usize {
        self.lock().spans.len()
    }

    /// Traces held now.
    pub fn trace_count(&self) -> usize {
        let inner = self.lock();
        let ids: HashSet<TraceId> = inner.spans.iter().map(|s| s.trace_id).collect();
        ids.len()
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
        let stored = Stored::new(service, data);
        if self.spans.len() >= self.max_spans
            && let Some(oldest) = self.spans.pop_front()
            // A trace larger than the whole buffer keeps its newest spans.
            && oldest.trace_id != stored.trace_id
        {
            while self
                .spans
                .front()
                .is_some_and(|next| next.trace_id == oldest.trace_id)
            {
                self.spans.pop_front();
            }
        }
        self.spans.push_back(stored);
    }

    /// The held spans grouped by trace, the trace with the latest filed span first.
    fn traces(&self) -> Vec<(TraceId, Vec<&Stored>)> {
        let mut index: HashMap<TraceId, usize> = HashMap::new();
        let mut traces: Vec<(TraceId, Vec<&Stored>)> = Vec::new();
        for span in self.spans.iter().rev() {
            let at = *index.entry(span.trace_id).or_insert_with(|| {
                traces.push((span.trace_id, Vec::new()));
                traces.len() - 1
            });
            if let Some((_, spans)) = traces.get_mut(at) {
                spans.push(span);
            }
        }
        traces
    }
}

impl TraceBuffer {
    /// The most recent traces first, at most `limit`, only those with a span of `service`
    /// when given. A trace is as recent as the last of its spans to end.
    pub fn recent(&self, service: Option<&str>, limit: usize) -> Vec<TraceSummary> {
        let inner = self.lock();
        inner
            .traces()
            .into_iter()
            .filter(|(_, spans)| service.is_none_or(|s| spans.iter().any(|sp| sp.touches(s))))
            .take(limit)
            .map(|(id, spans)| summary(id, &spans))
            .collect()
    }

    /// One trace as a waterfall, or `None` when it is not (or no longer) held.
    pub fn trace(&self, trace_id: TraceId) -> Option<TraceView> {
        let inner = self.lock();
        let spans: Vec<&Stored> = inner
            .spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        (!spans.is_empty()).then(|| view(trace_id, &spans))
    }

    /// Every service name seen in the held spans, sorted.
    pub fn services(&self) -> Vec<String> {
        let inner = self.lock();
        let set: BTreeSet<&str> = inner.spans.iter().map(|s| &*s.service).collect();
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

fn bounds(spans: &[&Stored]) -> (SystemTime, SystemTime) {
    let start = spans
        .iter()
        .map(|s| s.start_time)
        .min()
        .unwrap_or(UNIX_EPOCH);
    let end = spans.iter().map(|s| s.end_time).max().unwrap_or(start);
    (start, end)
}

fn services(spans: &[&Stored]) -> Vec<String> {
    let set: BTreeSet<&str> = spans.iter().map(|s| &*s.service).collect();
    set.into_iter().map(str::to_owned).collect()
}

fn summary(trace_id: TraceId, spans: &[&Stored]) -> TraceSummary {
    let held: HashSet<SpanId> = spans.iter().map(|s| s.span_id).collect();
    let root = spans
        .iter()
        .filter(|s| !held.contains(&s.parent_span_id))
        .min_by_key(|s| s.start_time);
    let (start, end) = bounds(spans);
    TraceSummary {
        trace_id: trace_id.to_string(),
        root_name: root
            .map(|s| s.packed.unpack().name.to_owned())
            .unwrap_or_default(),
        root_service: root.map(|s| s.service.to_string()).unwrap_or_default(),
        services: services(spans),
        span_count: spans.len(),
        start_unix_us: unix_us(start),
        duration_us: micros_between(start, end),
        error: spans.iter().any(|s| s.status == "error"),
    }
}

fn json_value(value: Tag<'_>) -> serde_json::Value {
    match value {
        Tag::Bool(b) => serde_json::Value::Bool(b),
        Tag::I64(i) => serde_json::Value::from(i),
        Tag::F64(f) => serde_json::Number::from_f64(f).map_or_else(
            || serde_json::Value::String(f.to_string()),
            serde_json::Value::Number,
        ),
        Tag::Str(s) => serde_json::Value::String(s.to_owned()),
    }
}

fn attributes(tags: &[(&str, Tag<'_>)]) -> BTreeMap<String, serde_json::Value> {
    tags.iter()
        .map(|(key, value)| ((*key).to_owned(), json_value(*value)))
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

fn view(trace_id: TraceId, spans: &[&Stored]) -> TraceView {
    let (start, end) = bounds(spans);
    let all_services = services(spans);
    let parents: HashMap<SpanId, SpanId> = spans
        .iter()
        .map(|s| (s.span_id, s.parent_span_id))
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
    let mut ordered: Vec<&Stored> = spans.to_vec();
    ordered.sort_by_key(|s| s.start_time);
    let spans: Vec<SpanView> = ordered
        .into_iter()
        .map(|s| {
            let d = s.packed.unpack();
            let parent = (s.parent_span_id != SpanId::INVALID).then_some(s.parent_span_id);
            SpanView {
                span_id: s.span_id.to_string(),
                parent_span_id: parent.map(|p| p.to_string()),
                parent_in_trace: parent.is_some_and(|p| parents.contains_key(&p)),
                depth: depth(s.span_id),
                service: s.service.to_string(),
                name: d.name.to_owned(),
                kind: kind_name(&s.kind),
                start_offset_us: micros_between(start, s.start_time),
                duration_us: micros_between(s.start_time, s.end_time),
                attributes: attributes(&d.attributes),
                events: d
                    .events
                    .iter()
                    .map(|(name, at, tags)| EventView {
                        name: (*name).to_owned(),
                        offset_us: micros_between(start, *at),
                        attributes: attributes(tags),
                    })
                    .collect(),
                status: StatusView {
                    code: s.status,
                    message: (!d.message.is_empty()).then(|| d.message.to_owned()),
                },
                links: d
                    .links
                    .iter()
                    .map(|(trace_id, span_id)| LinkView {
                        trace_id: trace_id.to_string(),
                        span_id: span_id.to_string(),
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

    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId};
    use opentelemetry::{Array, Value};
    use serde_json::json;

    use super::Packed;
    use crate::{DistributedTracer, TraceBuffer};

    #[test]
    fn a_held_span_reads_back_every_part_of_its_view() {
        let buffer = TraceBuffer::new(100);
        let tracer = DistributedTracer::builder("svc")
            .buffer(buffer.clone())
            .build()
            .unwrap();
        let linked = SpanContext::new(
            TraceId::from(7u128),
            SpanId::from(8u64),
            TraceFlags::SAMPLED,
            true,
            Default::default(),
        );
        let span = tracer.span("naïve ✓").link(linked).start();
        span.set_tag("flag", true);
        span.set_tag("count", -42i64);
        span.set_tag("ratio", 0.25);
        span.set_tag("text", "héllo");
        span.set_tag("empty", "");
        span.set_tag("list", Value::Array(Array::I64(vec![1, 2])));
        span.log("plain");
        span.log_fields(
            "with fields",
            [("k", Value::from(1)), ("s", Value::from("v"))],
        );
        span.set_error("it broke");
        let trace_id = span.span_context().trace_id();
        span.finish();
        let view = buffer.trace(trace_id).unwrap();
        let s = &view.spans[0];
        assert_eq!(s.name, "naïve ✓");
        assert_eq!(s.status.code, "error");
        assert_eq!(s.status.message.as_deref(), Some("it broke"));
        let tags = serde_json::to_value(&s.attributes).unwrap();
        assert_eq!(
            tags,
            json!({"flag": true, "count": -42, "ratio": 0.25, "text": "héllo", "empty": "",
                   "list": "[1,2]", "error": true})
        );
        let events: Vec<_> = s
            .events
            .iter()
            .map(|e| {
                (
                    e.name.as_str(),
                    serde_json::to_value(&e.attributes).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            events,
            [
                ("plain", json!({})),
                ("with fields", json!({"k": 1, "s": "v"})),
                ("exception", json!({"exception.message": "it broke"}))
            ]
        );
        assert!(s.events.iter().all(|e| e.offset_us <= view.duration_us));
        assert_eq!(
            (s.links[0].trace_id.as_str(), s.links[0].span_id.as_str()),
            ("00000000000000000000000000000007", "0000000000000008")
        );
        let summary = &buffer.recent(None, 1)[0];
        assert_eq!(
            (summary.root_name.as_str(), summary.error),
            ("naïve ✓", true)
        );
    }

    #[test]
    fn a_damaged_block_reads_back_what_precedes_the_damage() {
        let buffer = TraceBuffer::new(10);
        let tracer = DistributedTracer::builder("svc")
            .buffer(buffer.clone())
            .build()
            .unwrap();
        let span = tracer.start_span("name");
        span.set_tag("a", "b");
        span.log("event");
        span.finish();
        let inner = buffer.lock();
        let stored = inner.spans.front().unwrap();
        let whole = stored.packed.unpack();
        assert_eq!(
            (whole.name, whole.attributes.len(), whole.events.len()),
            ("name", 1, 1)
        );
        // The last four bytes count the (no) links: a cut there loses nothing.
        for cut in 0..stored.packed.0.len() - 4 {
            let damaged = Packed(stored.packed.0[..cut].into());
            let part = damaged.unpack();
            assert!(
                part.attributes.len() <= 1 && part.events.len() <= 1,
                "{cut}"
            );
            assert_ne!(part, whole, "{cut}");
        }
    }

    #[test]
    fn the_oldest_trace_goes_whole_and_interleaved_traces_are_grouped() {
        let buffer = TraceBuffer::new(5);
        let tracer = DistributedTracer::builder("svc")
            .buffer(buffer.clone())
            .build()
            .unwrap();
        // Two spans per trace, child ended first, as a request's spans end.
        let trace = |name: &str| {
            let root = tracer.start_span(format!("{name} root"));
            tracer.start_child(format!("{name} child"), &root).finish();
            let id = root.span_context().trace_id();
            root.finish();
            id
        };
        let a = trace("a");
        let b = trace("b");
        assert_eq!((buffer.span_count(), buffer.trace_count()), (4, 2));
        // Full at c's second span: both of a's go, not just its first.
        let c = trace("c");
        assert_eq!((buffer.span_count(), buffer.trace_count()), (4, 2));
        assert!(buffer.trace(a).is_none());
        let names: Vec<_> = buffer
            .recent(None, 10)
            .into_iter()
            .map(|t| t.root_name)
            .collect();
        assert_eq!(names, ["c root", "b root"]);
        assert_eq!(buffer.trace(c).unwrap().spans.len(), 2);
        assert_eq!(buffer.trace(b).unwrap().spans[1].depth, 1);

        // Spans of two traces ending in turn: each view holds its own; the trace whose
        // span ended last is listed first.
        let buffer = TraceBuffer::new(10);
        let tracer = DistributedTracer::builder("svc")
            .buffer(buffer.clone())
            .build()
            .unwrap();
        let x = tracer.start_span("x root");
        let y = tracer.start_span("y root");
        let (x_id, y_id) = (x.span_context().trace_id(), y.span_context().trace_id());
        tracer.start_child("x child", &x).finish();
        y.finish();
        x.finish();
        let names: Vec<_> = buffer
            .recent(None, 10)
            .into_iter()
            .map(|t| (t.root_name, t.span_count))
            .collect();
        assert_eq!(names, [("x root".to_owned(), 2), ("y root".to_owned(), 1)]);
        assert_eq!(buffer.trace(x_id).unwrap().spans.len(), 2);
        assert_eq!(buffer.trace(y_id).unwrap().spans.len(), 1);
        assert_eq!(buffer.recent(None, 1).len(), 1);
    }

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
