//! Automatic spans for HTTP: the gateway's server span and the service client's span.
//!
//! Attribute names follow the OpenTelemetry HTTP semantic conventions (`http.route`,
//! `http.response.status_code`, …), plus `trellis.service` and `trellis.upstream.instance`
//! for the gateway's routing decision.

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::Arc;

use http::{HeaderMap, Method};
use opentelemetry::trace::SpanKind;
use opentelemetry::{Context, KeyValue, Value};

use crate::propagation::TraceHeaders;
use crate::tracer::{DistributedTracer, Span};

/// A server span for one incoming request (kind `server`), parented by the trace context
/// in the request headers, or a new root when there is none or it is malformed.
#[derive(Debug)]
pub struct HttpServerSpan {
    span: Span,
    method: Method,
    /// Whether the request carried any trace context header (W3C or B3).
    carried_context: bool,
}

/// A client span for one outgoing request (kind `client`); its context is already in the
/// request headers.
#[derive(Debug)]
pub struct HttpClientSpan {
    span: Span,
}

impl DistributedTracer {
    /// Starts the server span for a request with `method`, `path` and `headers` (the
    /// gateway's automatic span). Set the route and upstream once known, then
    /// [`finish`](HttpServerSpan::finish) with the status.
    pub fn http_server_span(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> HttpServerSpan {
        // Most requests carry no trace headers at all: one pass over the (few) names.
        let carried_context = headers.keys().any(crate::is_trace_header);
        if !self.is_enabled() {
            return HttpServerSpan {
                span: self.span("").start(),
                method: method.clone(),
                carried_context,
            };
        }
        let parent = if carried_context {
            use opentelemetry::propagation::TextMapPropagator as _;
            self.propagator()
                .extract_with_context(&Context::new(), &crate::HeaderExtractor(headers))
        } else {
            Context::new()
        };
        // Tags only when recorded: an unsampled request allocates nothing for them.
        let span = self
            .span(method_name(method))
            .child_of(&parent)
            .kind(SpanKind::Server)
            .start_with_tags(|tags| {
                tags.push(KeyValue::new("http.request.method", method_value(method)));
                tags.push(KeyValue::new("url.path", path.to_owned()));
            });
        HttpServerSpan {
            span,
            method: method.clone(),
            carried_context,
        }
    }

    /// Starts a client span for a request to `url` with `method`, child of the current
    /// context, and writes its trace context into `headers` (the service client's
    /// automatic span): `traceparent`, `tracestate` when not empty, `baggage` when there is
    /// some, and B3 as configured — for an unsampled span only when its trace came in over
    /// B3 (W3C alone carries "not sampled"; a B3 caller gets B3 back).
    pub fn http_client_span(
        &self,
        method: &Method,
        url: &str,
        headers: &mut (impl TraceHeaders + ?Sized),
    ) -> HttpClientSpan {
        self.http_client_span_with_parent(&Context::current(), method, url, headers)
    }

    /// Same as [`http_client_span`](Self::http_client_span) with an explicit parent.
    pub fn http_client_span_with_parent(
        &self,
        parent: &Context,
        method: &Method,
        url: &str,
        headers: &mut (impl TraceHeaders + ?Sized),
    ) -> HttpClientSpan {
        if !self.is_enabled() {
            return HttpClientSpan {
                span: self.span("").start(),
            };
        }
        let span = self.span(method_name(method)).child_of(parent);
        self.client_span(span, method, url, headers, |_| {})
    }

    /// Same as [`http_client_span`](Self::http_client_span) as a child of `parent` (the
    /// gateway's server span): for an unsampled parent no OpenTelemetry context is built.
    pub fn http_client_span_child_of(
        &self,
        parent: &Span,
        method: &Method,
        url: &str,
        headers: &mut (impl TraceHeaders + ?Sized),
    ) -> HttpClientSpan {
        self.http_client_span_child_of_with_tags(parent, method, url, headers, |_| {})
    }

    /// Same as [`http_client_span_child_of`](Self::http_client_span_child_of) with more
    /// tags, which `tags` pushes only when the span is recorded (the gateway's service,
    /// instance and attempt).
    pub fn http_client_span_child_of_with_tags(
        &self,
        parent: &Span,
        method: &Method,
        url: &str,
        headers: &mut (impl TraceHeaders + ?Sized),
        tags: impl FnOnce(&mut Vec<KeyValue>),
    ) -> HttpClientSpan {
        if !self.is_enabled() {
            return HttpClientSpan {
                span: self.span("").start(),
            };
        }
        let span = self.span(method_name(method)).child_of_span(parent);
        self.client_span(span, method, url, headers, tags)
    }

    fn client_span(
        &self,
        start: crate::SpanStart<'_>,
        method: &Method,
        url: &str,
        headers: &mut (impl TraceHeaders + ?Sized),
        tags: impl FnOnce(&mut Vec<KeyValue>),
    ) -> HttpClientSpan {
        let span = start.kind(SpanKind::Client).start_with_tags(|all| {
            all.push(KeyValue::new("http.request.method", method_value(method)));
            all.push(KeyValue::new("url.full", url.to_owned()));
            tags(all);
        });
        if self.is_sdk_only() {
            use opentelemetry::propagation::TextMapPropagator as _;
            self.propagator().inject_context(
                span.context(),
                &mut crate::propagation::SinkInjector(headers),
            );
        } else {
            span.with_parts(|sc, cx| self.propagator().inject_span_headers(sc, cx, headers));
        }
        HttpClientSpan { span }
    }
}

/// Text for a span tag, made an owned value only when the span records it: a `&str` is
/// copied then, an `Arc<str>` (a route's or an instance's name, kept by the caller) only
/// shared.
pub trait TagText {
    /// The tag's value.
    fn into_value(self) -> Value;
}

impl TagText for &str {
    fn into_value(self) -> Value {
        Value::from(self.to_owned())
    }
}

impl TagText for &Arc<str> {
    fn into_value(self) -> Value {
        Value::from(self.clone())
    }
}

impl TagText for Arc<str> {
    fn into_value(self) -> Value {
        Value::from(self)
    }
}

impl TagText for String {
    fn into_value(self) -> Value {
        Value::from(self)
    }
}

/// The `http.request.method` value, without allocating for the standard methods.
fn method_value(method: &Method) -> Value {
    Value::from(method_name(method))
}

/// The span name for `method`, without allocating for the standard methods.
fn method_name(method: &Method) -> Cow<'static, str> {
    match *method {
        Method::GET => Cow::Borrowed("GET"),
        Method::POST => Cow::Borrowed("POST"),
        Method::PUT => Cow::Borrowed("PUT"),
        Method::DELETE => Cow::Borrowed("DELETE"),
        Method::PATCH => Cow::Borrowed("PATCH"),
        Method::HEAD => Cow::Borrowed("HEAD"),
        Method::OPTIONS => Cow::Borrowed("OPTIONS"),
        _ => Cow::Owned(method.as_str().to_owned()),
    }
}

impl HttpServerSpan {
    /// Whether the request carried a trace context header (`traceparent`, `tracestate`,
    /// `baggage`, `b3` or `x-b3-*`), well-formed or not: a proxy replaces them upstream
    /// with its client span's, and may skip looking for them when there were none.
    pub fn carried_context(&self) -> bool {
        self.carried_context
    }

    /// Records the matched route template (`/users/{id}`) and names the span
    /// `METHOD route`.
    pub fn set_route(&self, route: impl TagText) {
        if self.span.is_recording() {
            let route = route.into_value();
            // Concatenated, not formatted: this runs on sampled requests only, where the
            // formatting machinery's code is as cold as the rest of the path.
            let (method, route_text) = (self.method.as_str(), route.as_str());
            let mut name = String::with_capacity(method.len() + 1 + route_text.len());
            name.push_str(method);
            name.push(' ');
            name.push_str(&route_text);
            self.span.set_name(name);
            self.span.set_tag("http.route", route);
        }
    }

    /// Records the service the request was routed to.
    pub fn set_service(&self, service: impl TagText) {
        if self.span.is_recording() {
            self.span.set_tag("trellis.service", service.into_value());
        }
    }

    /// Records the instance (`host:port` or id) that served the request.
    pub fn set_upstream(&self, instance: impl TagText) {
        if self.span.is_recording() {
            self.span
                .set_tag("trellis.upstream.instance", instance.into_value());
        }
    }

    /// Records the response status (5xx marks the span failed) and ends the span.
    pub fn finish(self, status: u16) {
        self.span
            .set_tag("http.response.status_code", i64::from(status));
        if status >= 500 {
            self.span.set_error(format_args!("HTTP {status}"));
        }
    }

    /// Marks the request failed without a response (`error` names why) and ends the span.
    pub fn fail(self, error: impl std::fmt::Display) {
        self.span.set_error(error);
    }
}

impl HttpClientSpan {
    /// Records the response status (4xx and 5xx mark the span failed) and ends the span.
    pub fn finish(self, status: u16) {
        self.span
            .set_tag("http.response.status_code", i64::from(status));
        if status >= 400 {
            self.span.set_error(format_args!("HTTP {status}"));
        }
    }

    /// Marks the call failed without a response (`error` names why) and ends the span.
    pub fn fail(self, error: impl std::fmt::Display) {
        self.span.set_error(error);
    }
}

impl Deref for HttpServerSpan {
    type Target = Span;
    fn deref(&self) -> &Span {
        &self.span
    }
}

impl Deref for HttpClientSpan {
    type Target = Span;
    fn deref(&self) -> &Span {
        &self.span
    }
}
