//! Automatic spans for the event bus: a producer span whose context travels in the event
//! headers (`traceparent`, `tracestate`, `baggage`: the CloudEvents distributed-tracing
//! extension), and a consumer span that is a child of, and linked to, the producer span.

use std::collections::BTreeMap;

use opentelemetry::Context;
use opentelemetry::trace::{SpanKind, TraceContextExt};

use crate::tracer::{DistributedTracer, Span};

impl DistributedTracer {
    /// Starts a producer span for publishing to `topic`, child of the current context,
    /// and writes its trace context into the event `headers`. Finish it once the publish
    /// is acknowledged.
    pub fn producer_span(&self, topic: &str, headers: &mut BTreeMap<String, String>) -> Span {
        self.producer_span_with_parent(&Context::current(), topic, headers)
    }

    /// Same as [`producer_span`](Self::producer_span) with an explicit parent.
    pub fn producer_span_with_parent(
        &self,
        parent: &Context,
        topic: &str,
        headers: &mut BTreeMap<String, String>,
    ) -> Span {
        if !self.is_enabled() {
            return self.span("").start();
        }
        let span = self
            .span(format!("{topic} publish"))
            .child_of(parent)
            .kind(SpanKind::Producer)
            .tag("messaging.system", "trellis")
            .tag("messaging.operation.type", "send")
            .tag("messaging.destination.name", topic.to_owned())
            .start();
        self.propagator().inject_map(span.context(), headers);
        span
    }

    /// Starts a consumer span for handling one event of `topic` in consumer `group`, child
    /// of (and linked to) the producer span found in the event `headers`; a new root when
    /// the headers carry none or a malformed one. Run the handler in
    /// [`Span::in_scope`] and finish the span when it returns.
    pub fn consumer_span(
        &self,
        topic: &str,
        group: &str,
        headers: &BTreeMap<String, String>,
    ) -> Span {
        if !self.is_enabled() {
            return self.span("").start();
        }
        let producer = self.propagator().extract_map(headers);
        let producer_span = producer.span().span_context().clone();
        self.span(format!("{topic} process"))
            .child_of(&producer)
            .kind(SpanKind::Consumer)
            .link(producer_span)
            .tag("messaging.system", "trellis")
            .tag("messaging.operation.type", "process")
            .tag("messaging.destination.name", topic.to_owned())
            .tag("messaging.consumer.group.name", group.to_owned())
            .start()
    }
}
