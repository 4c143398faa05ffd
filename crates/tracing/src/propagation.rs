//! Trace context in and out of HTTP headers and event headers: W3C `traceparent`,
//! `tracestate` and `baggage`, plus B3 (single `b3` header and multi `X-B3-*` headers) for
//! Istio, Envoy and Zipkin peers.
//!
//! Extraction never fails: a missing or malformed header yields an empty [`Context`], so
//! the next span starts a new root trace. When both are present, a valid `traceparent` wins
//! over B3, and single-header B3 over multi-header B3.
//!
//! ```
//! use http::HeaderMap;
//! use opentelemetry::trace::TraceContextExt;
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1".parse().unwrap());
//! let cx = trellis_tracing::extract(&headers);
//! assert_eq!(cx.span().span_context().trace_id().to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
//!
//! headers.insert("traceparent", "not-a-traceparent".parse().unwrap());
//! headers.remove("b3");
//! assert!(!trellis_tracing::extract(&headers).has_active_span()); // a new root, no error
//! ```

use std::collections::BTreeMap;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::baggage::BaggageExt as _;
use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};

use crate::config::B3Encoding;

const B3_SINGLE: &str = "b3";
const B3_TRACE_ID: &str = "x-b3-traceid";
const B3_SPAN_ID: &str = "x-b3-spanid";
const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
const B3_SAMPLED: &str = "x-b3-sampled";
const B3_FLAGS: &str = "x-b3-flags";

// Parsed once: looking a header up or inserting it by `&str` parses the name every time.
const TRACEPARENT_NAME: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE_NAME: HeaderName = HeaderName::from_static("tracestate");
const B3_SINGLE_NAME: HeaderName = HeaderName::from_static(B3_SINGLE);
const B3_TRACE_ID_NAME: HeaderName = HeaderName::from_static(B3_TRACE_ID);
const B3_SPAN_ID_NAME: HeaderName = HeaderName::from_static(B3_SPAN_ID);
const B3_SAMPLED_NAME: HeaderName = HeaderName::from_static(B3_SAMPLED);

/// Each byte's two lower-case hex digits.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [HEX[i >> 4], HEX[i & 0x0f]];
        i += 1;
    }
    pairs
};

/// Marks a context whose trace came in over B3 (no valid `traceparent`): unsampled spans of
/// that trace write B3 back; other unsampled spans write W3C only.
#[derive(Debug, Clone, Copy)]
struct CameOverB3;

/// Writes `bytes` as lower-case hex into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

/// Whether `bytes` may stand as a header field value (what `HeaderValue::from_bytes`
/// accepts: visible ASCII, blanks and obs-text). No early exit: the loop vectorizes.
fn is_field_value(bytes: &[u8]) -> bool {
    let mut bad = 0u8;
    for &b in bytes {
        bad |= u8::from((b < b' ') & (b != b'\t')) | u8::from(b == 0x7f);
    }
    bad == 0
}

/// The composite propagator: W3C trace context and baggage, and B3.
///
/// Also a [`TextMapPropagator`], so it can be installed as OpenTelemetry's global one.
#[derive(Debug)]
pub struct Propagator {
    b3: B3Encoding,
    trace_context: TraceContextPropagator,
    baggage: BaggagePropagator,
    fields: Vec<String>,
}

impl Default for Propagator {
    fn default() -> Self {
        Propagator::new(B3Encoding::Multi)
    }
}

/// Whether `name` is a trace context header this crate reads or writes: W3C
/// `traceparent`, `tracestate` and `baggage`, B3 single (`b3`) or multi (`x-b3-*`).
/// Compares the name's text, without hashing: a pass over a request's few header names
/// costs less than looking each of these up.
pub fn is_trace_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    match name.as_bytes().first() {
        Some(b't') => name == "traceparent" || name == "tracestate",
        Some(b'b') => name == "b3" || name == "baggage",
        Some(b'x') => name.starts_with("x-b3-"),
        _ => false,
    }
}

impl Propagator {
    /// A propagator that writes W3C headers and `b3`-style B3 headers.
    pub fn new(b3: B3Encoding) -> Self {
        let fields = [
            "traceparent",
            "tracestate",
            "baggage",
            B3_SINGLE,
            B3_TRACE_ID,
            B3_SPAN_ID,
            B3_PARENT_SPAN_ID,
            B3_SAMPLED,
            B3_FLAGS,
        ]
        .iter()
        .map(|f| (*f).to_owned())
        .collect();
        Propagator {
            b3,
            trace_context: TraceContextPropagator::new(),
            baggage: BaggagePropagator::new(),
            fields,
        }
    }

    /// The trace context carried by `headers`, or an empty context (new root) when there
    /// is none or it is malformed.
    pub fn extract_headers(&self, headers: &HeaderMap) -> Context {
        // Most requests carry no trace headers at all: one pass over the (few) names.
        if !headers.keys().any(is_trace_header) {
            return Context::new();
        }
        self.extract_with_context(&Context::new(), &HeaderExtractor(headers))
    }

    /// Writes `sc` (and the baggage of `cx`) into `headers`, formatted without the generic
    /// propagators (pre-parsed names, ids written into stack buffers). The headers are those
    /// of the [`TextMapPropagator`] with `sc` as the context's span, except that an empty
    /// `tracestate` is left out and an unsampled span writes B3 only when its trace came in
    /// over B3: W3C alone carries the "not sampled" decision, and a B3 peer upstream gets
    /// B3 back.
    pub(crate) fn inject_span_headers<H: TraceHeaders + ?Sized>(
        &self,
        sc: &SpanContext,
        cx: &Context,
        headers: &mut H,
    ) {
        if sc.is_valid() {
            let trace = sc.trace_id().to_bytes();
            let span = sc.span_id().to_bytes();
            let sampled = sc.is_sampled();
            // One growth of the map at most, for traceparent and the three B3 headers.
            headers.reserve(if sampled { 4 } else { 1 });
            // 00-{trace:32}-{span:16}-{flags:2}
            let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
            hex_into(&trace, &mut tp[3..35]);
            hex_into(&span, &mut tp[36..52]);
            if sampled {
                tp[54] = b'1';
            }
            headers.set(&TRACEPARENT_NAME, &tp);
            if *sc.trace_state() != TraceState::NONE {
                headers.set(&TRACESTATE_NAME, sc.trace_state().header().as_bytes());
            }
            let flag: &[u8] = if sampled { b"1" } else { b"0" };
            let b3 = if sampled || cx.get::<CameOverB3>().is_some() {
                self.b3
            } else {
                B3Encoding::None
            };
            match b3 {
                B3Encoding::None => {}
                B3Encoding::Single => {
                    // {trace:32}-{span:16}-{sampled}
                    let mut b3 = *b"00000000000000000000000000000000-0000000000000000-0";
                    hex_into(&trace, &mut b3[..32]);
                    hex_into(&span, &mut b3[33..49]);
                    if sampled {
                        b3[50] = b'1';
                    }
                    headers.set(&B3_SINGLE_NAME, &b3);
                }
                B3Encoding::Multi => {
                    let mut t = [0u8; 32];
                    hex_into(&trace, &mut t);
                    let mut s = [0u8; 16];
                    hex_into(&span, &mut s);
                    headers.set(&B3_TRACE_ID_NAME, &t);
                    headers.set(&B3_SPAN_ID_NAME, &s);
                    headers.set(&B3_SAMPLED_NAME, flag);
                }
            }
        }
        if !cx.baggage().is_empty() {
            self.baggage.inject_context(cx, &mut SinkInjector(headers));
        }
    }

    /// Writes the trace context of `cx` into `headers` (nothing when `cx` has no valid span).
    /// (Every header, as the [`TextMapPropagator`]; the tracer's own HTTP spans write
    /// fewer for unsampled spans, see [`DistributedTracer::http_client_span`].)
    ///
    /// [`DistributedTracer::http_client_span`]: crate::DistributedTracer::http_client_span
    pub fn inject_headers(&self, cx: &Context, headers: &mut HeaderMap) {
        self.inject_context(cx, &mut HeaderInjector(headers));
    }

    /// The trace context carried by event headers (the envelope's `headers` map).
    pub fn extract_map(&self, headers: &BTreeMap<String, String>) -> Context {
        self.extract_with_context(&Context::new(), &MapCarrier(headers))
    }

    /// Writes W3C `traceparent`, `tracestate` and `baggage` into event headers (B3 is left
    /// out: events are not read by Zipkin peers).
    pub fn inject_map(&self, cx: &Context, headers: &mut BTreeMap<String, String>) {
        let mut carrier = MapInjector(headers);
        self.trace_context.inject_context(cx, &mut carrier);
        self.baggage.inject_context(cx, &mut carrier);
    }
}

impl TextMapPropagator for Propagator {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        self.trace_context.inject_context(cx, injector);
        self.baggage.inject_context(cx, injector);
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return;
        }
        let sampled = if sc.is_sampled() { "1" } else { "0" };
        match self.b3 {
            B3Encoding::None => {}
            B3Encoding::Single => injector.set(
                B3_SINGLE,
                format!("{}-{}-{sampled}", sc.trace_id(), sc.span_id()),
            ),
            B3Encoding::Multi => {
                injector.set(B3_TRACE_ID, sc.trace_id().to_string());
                injector.set(B3_SPAN_ID, sc.span_id().to_string());
                injector.set(B3_SAMPLED, sampled.to_owned());
            }
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let with_trace = {
            // The SDK's parser accepts some malformed ids (short span ids): check first.
            let w3c = if extractor.get("traceparent").is_some_and(valid_traceparent) {
                self.trace_context.extract_with_context(cx, extractor)
            } else {
                cx.clone()
            };
            if w3c.span().span_context().is_valid() {
                w3c
            } else if let Some(sc) = extract_b3(extractor) {
                cx.with_remote_span_context(sc).with_value(CameOverB3)
            } else {
                cx.clone()
            }
        };
        self.baggage.extract_with_context(&with_trace, extractor)
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&self.fields)
    }
}

/// The trace context in `headers` (see [`Propagator::extract_headers`]), with the default
/// propagator.
pub fn extract(headers: &HeaderMap) -> Context {
    default_propagator().extract_headers(headers)
}

/// Writes the trace context of `cx` into `headers` (see [`Propagator::inject_headers`]),
/// with the default propagator (W3C and multi-header B3).
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    default_propagator().inject_headers(cx, headers);
}

/// The trace context in event headers, with the default propagator.
pub fn extract_from_map(headers: &BTreeMap<String, String>) -> Context {
    default_propagator().extract_map(headers)
}

/// Writes the trace context of `cx` into event headers, with the default propagator.
pub fn inject_into_map(cx: &Context, headers: &mut BTreeMap<String, String>) {
    default_propagator().inject_map(cx, headers);
}

fn default_propagator() -> &'static Propagator {
    static DEFAULT: std::sync::OnceLock<Propagator> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(Propagator::default)
}

/// Reads B3: the single `b3` header first, then the `X-B3-*` headers. `None` when absent or
/// malformed (including the ids-less `b3: 0` "deny" form, which starts a new root).
fn extract_b3(extractor: &dyn Extractor) -> Option<SpanContext> {
    if let Some(single) = extractor.get(B3_SINGLE) {
        return parse_b3_single(single);
    }
    let trace_id = parse_trace_id(extractor.get(B3_TRACE_ID)?.trim())?;
    let span_id = parse_span_id(extractor.get(B3_SPAN_ID)?.trim())?;
    let debug = extractor.get(B3_FLAGS).is_some_and(|f| f.trim() == "1");
    let sampled = match extractor.get(B3_SAMPLED).map(str::trim) {
        Some("1" | "true") => true,
        Some("0" | "false") | None => debug,
        Some(_) => return None,
    };
    Some(remote(trace_id, span_id, sampled))
}

fn parse_b3_single(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let trace_id = parse_trace_id(parts.next()?)?;
    let span_id = parse_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => false,
        Some("1" | "d") => true,
        Some("0") => false,
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        parse_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(remote(trace_id, span_id, sampled))
}

/// A W3C `traceparent` per the spec: `VV-TRACE32-SPAN16-FF`, lower-case hex, version not
/// `ff`, ids not all zeros; version `00` has exactly four fields, later versions may add
/// fields after a `-`.
fn valid_traceparent(value: &str) -> bool {
    let value = value.trim();
    let mut parts = value.split('-');
    let (Some(version), Some(trace), Some(span), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let hex = |s: &str, len: usize| s.len() == len && is_lower_hex(s);
    if !hex(version, 2) || version == "ff" || !hex(flags, 2) {
        return false;
    }
    if version == "00" && parts.next().is_some() {
        return false;
    }
    parse_trace_id(trace).is_some_and(|_| trace.len() == 32) && parse_span_id(span).is_some()
}

fn remote(trace_id: TraceId, span_id: SpanId, sampled: bool) -> SpanContext {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(trace_id, span_id, flags, true, TraceState::default())
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A 16- or 32-digit lower-case hex trace id, not all zeros (64-bit ids are left-padded).
fn parse_trace_id(text: &str) -> Option<TraceId> {
    if !(text.len() == 16 || text.len() == 32) || !is_lower_hex(text) {
        return None;
    }
    let id = TraceId::from_hex(text).ok()?;
    (id != TraceId::INVALID).then_some(id)
}

fn parse_span_id(text: &str) -> Option<SpanId> {
    if text.len() != 16 || !is_lower_hex(text) {
        return None;
    }
    let id = SpanId::from_hex(text).ok()?;
    (id != SpanId::INVALID).then_some(id)
}

/// Reads an [`http::HeaderMap`] for OpenTelemetry propagators.
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes into an [`http::HeaderMap`] for OpenTelemetry propagators; values that are not
/// valid header values are skipped.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Where a span's trace context headers are written: a [`HeaderMap`], or the head of an
/// HTTP/1.1 request being encoded ([`HeadLines`]).
pub trait TraceHeaders {
    /// Makes room for `additional` more headers.
    fn reserve(&mut self, additional: usize);

    /// Sets header `name` to `value`: a map replaces its earlier values of that name, head
    /// lines append one. A value that is not a valid field value (control characters) is
    /// skipped.
    fn set(&mut self, name: &HeaderName, value: &[u8]);
}

impl TraceHeaders for HeaderMap {
    fn reserve(&mut self, additional: usize) {
        HeaderMap::reserve(self, additional);
    }

    fn set(&mut self, name: &HeaderName, value: &[u8]) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            self.insert(name.clone(), value);
        }
    }
}

/// Header lines (`name: value\r\n`) appended to an HTTP/1.1 head being written, instead
/// of values allocated and hashed into a request's map (a proxy writing its own heads).
///
/// Lines are only appended: the request's own trace headers are the caller's to leave
/// out ([`HttpServerSpan::carried_context`](crate::HttpServerSpan::carried_context) says
/// whether there are any).
#[derive(Debug)]
pub struct HeadLines<'a>(pub &'a mut Vec<u8>);

impl TraceHeaders for HeadLines<'_> {
    fn reserve(&mut self, additional: usize) {
        // traceparent's line is 68 bytes, the others shorter.
        self.0.reserve(additional * 72);
    }

    fn set(&mut self, name: &HeaderName, value: &[u8]) {
        if !is_field_value(value) {
            return;
        }
        self.0.extend_from_slice(name.as_str().as_bytes());
        self.0.extend_from_slice(b": ");
        self.0.extend_from_slice(value);
        self.0.extend_from_slice(b"\r\n");
    }
}

/// OpenTelemetry's [`Injector`] over any [`TraceHeaders`] (baggage, SDK propagators).
pub(crate) struct SinkInjector<'a, H: ?Sized>(pub(crate) &'a mut H);

impl<H: TraceHeaders + ?Sized> Injector for SinkInjector<'_, H> {
    fn set(&mut self, key: &str, value: String) {
        if let Ok(name) = HeaderName::from_bytes(key.as_bytes()) {
            self.0.set(&name, value.as_bytes());
        }
    }
}

struct MapCarrier<'a>(&'a BTreeMap<String, String>);

impl Extractor for MapCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // Event headers are written lower-case by us, but other producers may not.
        self.0.get(key).map(String::as_str).or_else(|| {
            self.0
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_str())
        })
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;
    use opentelemetry::baggage::BaggageExt;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn hex_and_field_value_checks_agree_with_the_standard_ones() {
        let all: Vec<u8> = (0..=255).collect();
        let mut hex = vec![0u8; 512];
        hex_into(&all, &mut hex);
        let expected: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(String::from_utf8_lossy(&hex), expected);
        for b in 0..=255u8 {
            let value = [b'a', b, b'z'];
            assert_eq!(
                is_field_value(&value),
                HeaderValue::from_bytes(&value).is_ok(),
                "byte {b:#04x}"
            );
        }
    }

    #[test]
    fn head_lines_skip_values_that_are_not_field_values() {
        let mut out = Vec::new();
        let mut lines = HeadLines(&mut out);
        lines.set(&TRACESTATE_NAME, b"a=1\r\nx-injected: 1");
        lines.set(&TRACESTATE_NAME, b"a=\x7f");
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        HeadLines(&mut out).set(&TRACESTATE_NAME, b"a=1,\tb=2");
        assert_eq!(out, b"tracestate: a=1,\tb=2\r\n");
    }

    #[test]
    fn trace_headers_are_told_from_others_by_name() {
        for name in [
            "traceparent",
            "tracestate",
            "baggage",
            "b3",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "x-b3-flags",
        ] {
            assert!(is_trace_header(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "te",
            "trailer",
            "b3x",
            "x-forwarded-for",
            "x-b3",
            "host",
            "tracer",
        ] {
            assert!(!is_trace_header(&HeaderName::from_static(name)), "{name}");
        }
        // A request whose only trace header is B3's sampled flag still gets the full
        // extraction (a decision without ids: a new root).
        let cx = Propagator::default().extract_headers(&headers(&[("x-b3-sampled", "1")]));
        assert!(!cx.span().span_context().is_valid());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn trace_of(cx: &Context) -> Option<(String, String, bool)> {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| {
            (
                sc.trace_id().to_string(),
                sc.span_id().to_string(),
                sc.is_sampled(),
            )
        })
    }

    #[test]
    fn w3c_round_trip_with_state_and_baggage() {
        let incoming = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "vendor=abc"),
            ("baggage", "user=u1"),
        ]);
        let cx = extract(&incoming);
        assert_eq!(trace_of(&cx), Some((TRACE.into(), SPAN.into(), true)));
        assert_eq!(
            cx.baggage().get("user").map(|v| v.to_string()),
            Some("u1".into())
        );
        assert!(cx.span().span_context().is_remote());

        let mut out = HeaderMap::new();
        inject(&cx, &mut out);
        assert_eq!(out["traceparent"], format!("00-{TRACE}-{SPAN}-01").as_str());
        assert_eq!(out["tracestate"], "vendor=abc");
        assert_eq!(out["baggage"], "user=u1");
        assert_eq!(out["x-b3-traceid"], TRACE);
        assert_eq!(out["x-b3-spanid"], SPAN);
        assert_eq!(out["x-b3-sampled"], "1");
    }

    #[test]
    fn b3_single_and_multi_are_read() {
        let cx = extract(&headers(&[(
            "b3",
            &format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90"),
        )]));
        assert_eq!(trace_of(&cx), Some((TRACE.into(), SPAN.into(), true)));
        let cx = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-0"))]));
        assert_eq!(trace_of(&cx), Some((TRACE.into(), SPAN.into(), false)));
        let cx = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}"))]));
        assert_eq!(trace_of(&cx), Some((TRACE.into(), SPAN.into(), false)));
        // 64-bit trace ids are left-padded.
        let cx = extract(&headers(&[("b3", &format!("a3ce929d0e0e4736-{SPAN}-d"))]));
        assert_eq!(
            trace_of(&cx),
            Some(("0000000000000000a3ce929d0e0e4736".into(), SPAN.into(), true))
        );
        let cx = extract(&headers(&[
            ("X-B3-TraceId", TRACE),
            ("X-B3-SpanId", SPAN),
            ("X-B3-Sampled", "1"),
        ]));
        assert_eq!(trace_of(&cx), Some((TRACE.into(), SPAN.into(), true)));
        let cx = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]));
        assert_eq!(trace_of(&cx), Some((TRACE.into(), SPAN.into(), true)));
    }

    #[test]
    fn traceparent_wins_over_b3_and_b3_is_the_fallback_when_it_is_malformed() {
        let other = "11111111111111111111111111111111";
        let cx = extract(&headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("b3", &format!("{other}-{SPAN}-1")),
        ]));
        assert_eq!(trace_of(&cx).unwrap().0, TRACE);
        let cx = extract(&headers(&[
            ("traceparent", "00-zz-yy-01"),
            ("b3", &format!("{other}-{SPAN}-1")),
        ]));
        assert_eq!(trace_of(&cx).unwrap().0, other);
    }

    #[test]
    fn malformed_headers_start_a_new_root() {
        let zero_trace = format!("00-{}-{SPAN}-01", "0".repeat(32));
        let zero_span = format!("00-{TRACE}-{}-01", "0".repeat(16));
        let upper = format!("00-{}-{SPAN}-01", TRACE.to_uppercase());
        let short = format!("00-{}-{SPAN}-01", &TRACE[..30]);
        let short_span = format!("00-{TRACE}-{}-01", &SPAN[..14]);
        let extra = format!("00-{TRACE}-{SPAN}-01-extra");
        let bad_flags = format!("00-{TRACE}-{SPAN}-1");
        let b3_bad_sampled = format!("{TRACE}-{SPAN}-7");
        let b3_bad_parent = format!("{TRACE}-{SPAN}-1-notanid");
        let b3_extra = format!("{TRACE}-{SPAN}-1-{SPAN}-extra");
        let b3_zero = format!("{}-{SPAN}-1", "0".repeat(32));
        let version_ff = format!("ff-{TRACE}-{SPAN}-01");
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![],
            vec![("traceparent", "")],
            vec![("traceparent", "garbage")],
            vec![("traceparent", &zero_trace)],
            vec![("traceparent", &zero_span)],
            vec![("traceparent", &upper)],
            vec![("traceparent", &short)],
            vec![("traceparent", &short_span)],
            vec![("traceparent", &extra)],
            vec![("traceparent", &bad_flags)],
            vec![("traceparent", &version_ff)],
            vec![("b3", "0")],
            vec![("b3", "1")],
            vec![("b3", "xyz-abc-1")],
            vec![("b3", &b3_bad_sampled)],
            vec![("b3", &b3_bad_parent)],
            vec![("b3", &b3_extra)],
            vec![("b3", &b3_zero)],
            vec![("x-b3-traceid", TRACE)],
            vec![("x-b3-traceid", TRACE), ("x-b3-spanid", "123")],
            vec![
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-sampled", "yes"),
            ],
            vec![("x-b3-traceid", "short"), ("x-b3-spanid", SPAN)],
        ];
        for case in cases {
            let cx = extract(&headers(&case));
            assert_eq!(trace_of(&cx), None, "{case:?} should give a new root");
        }
    }

    #[test]
    fn event_headers_carry_w3c_only() {
        let sc = remote(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex(SPAN).unwrap(),
            true,
        );
        let cx = Context::new()
            .with_remote_span_context(sc)
            .with_baggage(vec![KeyValue::new("tenant", "t1")]);
        let mut map = BTreeMap::new();
        inject_into_map(&cx, &mut map);
        assert_eq!(map["traceparent"], format!("00-{TRACE}-{SPAN}-01"));
        assert_eq!(map["baggage"], "tenant=t1");
        assert!(!map.contains_key("x-b3-traceid"));
        let back = extract_from_map(&map);
        assert_eq!(trace_of(&back), Some((TRACE.into(), SPAN.into(), true)));
        // Header names from other producers may be capitalised.
        let mut upper = BTreeMap::new();
        upper.insert("Traceparent".to_owned(), map["traceparent"].clone());
        assert_eq!(trace_of(&extract_from_map(&upper)).unwrap().0, TRACE);
    }

    #[test]
    fn b3_single_encoding_and_nothing_for_an_empty_context() {
        let p = Propagator::new(B3Encoding::Single);
        let cx = p.extract_headers(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-00"),
        )]));
        let mut out = HeaderMap::new();
        p.inject_headers(&cx, &mut out);
        assert_eq!(out["b3"], format!("{TRACE}-{SPAN}-0").as_str());
        assert!(out.get("x-b3-traceid").is_none());
        let mut out = HeaderMap::new();
        p.inject_headers(&Context::new(), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }
}
