//! An OTLP/HTTP trace receiver (feature `receiver`): `POST /v1/traces` takes what any
//! OpenTelemetry SDK exports — this crate's own exporter included, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` points at the server — and keeps the spans in a
//! [`TraceBuffer`], each under its resource's `service.name`. Several processes exporting to
//! one node therefore show as one trace in [`admin`](crate::admin)'s `/v1/traces/{id}`.
//!
//! Accepted: `Content-Type: application/x-protobuf` (an `ExportTraceServiceRequest`) and
//! `application/json` (the OTLP JSON mapping: hex ids, integer enums). The body is at most
//! [`DEFAULT_MAX_BODY_BYTES`] (or the limit given to [`router_with_limit`]), uncompressed.
//!
//! The whole request is checked before anything is stored: a body that does not decode,
//! a span with a trace id that is not 16 non-zero bytes, an unknown span kind, … is refused
//! with 400 and a message naming the span (`resource_spans[0].scope_spans[0].spans[3]:
//! trace_id is 3 bytes, expected 16`), and the buffer is left as it was. Other answers:
//! 413 (body too large), 415 (other content type or a `Content-Encoding`). Errors are
//! JSON `{"error": "..."}`; success is the empty `ExportTraceServiceResponse` in the
//! request's encoding.
//!
//! What it is not: a collector. Nothing is forwarded or persisted, there is no gRPC
//! endpoint, and metrics and logs are not accepted.
//!
//! ```
//! # async fn demo() {
//! use tower::ServiceExt;
//! let buffer = trellis_tracing::TraceBuffer::new(1000);
//! let app = trellis_tracing::receiver::router(buffer.clone());
//! let body = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name",
//!   "value":{"stringValue":"billing"}}]},"scopeSpans":[{"spans":[{
//!   "traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174",
//!   "name":"charge","kind":2,"startTimeUnixNano":"1700000000000000000",
//!   "endTimeUnixNano":"1700000000001000000"}]}]}]}"#;
//! let request = http::Request::post("/v1/traces")
//!     .header("content-type", "application/json")
//!     .body(axum::body::Body::from(body))
//!     .unwrap();
//! let response = app.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! assert_eq!(buffer.services(), ["billing"]);
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo());
//! ```

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry::trace::{
    Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue as ProtoKeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span as ProtoSpan, span};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prost::Message;

use crate::buffer::TraceBuffer;

/// Largest request body accepted by [`router`]: 4 MiB, the OTLP/gRPC default.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The service name of spans whose resource has no `service.name` (as the SDKs name it).
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// `POST /v1/traces` into `buffer`, bodies up to [`DEFAULT_MAX_BODY_BYTES`].
pub fn router(buffer: TraceBuffer) -> Router {
    router_with_limit(buffer, DEFAULT_MAX_BODY_BYTES)
}

/// `POST /v1/traces` into `buffer`, bodies up to `max_body_bytes`.
pub fn router_with_limit(buffer: TraceBuffer, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/traces", post(receive))
        .with_state(Receiver {
            buffer,
            max_body_bytes,
        })
}

#[derive(Clone, Debug)]
struct Receiver {
    buffer: TraceBuffer,
    max_body_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
enum ReceiveError {
    #[error("{0}")]
    UnsupportedMedia(String),
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the request body: {0}")]
    Body(String),
    #[error("body is not an OTLP ExportTraceServiceRequest in protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("body is not an OTLP ExportTraceServiceRequest in JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{path}: {reason}")]
    Span { path: String, reason: String },
}

impl ReceiveError {
    fn status(&self) -> StatusCode {
        match self {
            ReceiveError::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ReceiveError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for ReceiveError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() });
        (self.status(), axum::Json(body)).into_response()
    }
}

async fn receive(State(receiver): State<Receiver>, request: Request) -> Response {
    match accept(&receiver, request).await {
        Ok((encoding, spans)) => {
            receiver.buffer.record_all(spans);
            match encoding {
                // The empty ExportTraceServiceResponse (no partial success).
                Encoding::Protobuf => (
                    [(header::CONTENT_TYPE, "application/x-protobuf")],
                    Bytes::new(),
                )
                    .into_response(),
                Encoding::Json => {
                    ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
                }
            }
        }
        Err(e) => {
            tracing::debug!(target: "trellis_tracing::receiver", error = %e, "OTLP request refused");
            e.into_response()
        }
    }
}

async fn accept(
    receiver: &Receiver,
    request: Request,
) -> Result<(Encoding, Vec<(Arc<str>, SpanData)>), ReceiveError> {
    let headers = request.headers();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let encoding = match media.as_str() {
        "application/x-protobuf" | "application/protobuf" => Encoding::Protobuf,
        "application/json" => Encoding::Json,
        _ => {
            return Err(ReceiveError::UnsupportedMedia(format!(
                "content type {content_type:?} is not accepted: send application/x-protobuf or application/json"
            )));
        }
    };
    if let Some(coding) = headers.get(header::CONTENT_ENCODING)
        && coding.as_bytes() != b"identity"
    {
        return Err(ReceiveError::UnsupportedMedia(format!(
            "content encoding {:?} is not accepted: send the body uncompressed",
            String::from_utf8_lossy(coding.as_bytes())
        )));
    }
    let limit = receiver.max_body_bytes;
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > limit as u64
    {
        return Err(ReceiveError::TooLarge { limit });
    }
    let body = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|e| {
            if is_length_limit(&e) {
                ReceiveError::TooLarge { limit }
            } else {
                ReceiveError::Body(e.to_string())
            }
        })?;
    let export = match encoding {
        Encoding::Protobuf => ExportTraceServiceRequest::decode(body)?,
        Encoding::Json => serde_json::from_slice(&body)?,
    };
    Ok((encoding, convert(export)?))
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Every span of `export` with its service name, or the first thing wrong.
fn convert(export: ExportTraceServiceRequest) -> Result<Vec<(Arc<str>, SpanData)>, ReceiveError> {
    let mut out = Vec::new();
    for (r, resource_spans) in export.resource_spans.into_iter().enumerate() {
        let service: Arc<str> = resource_spans
            .resource
            .as_ref()
            .and_then(|res| {
                res.attributes
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        any_value::Value::StringValue(s) if !s.is_empty() => Some(s.as_str()),
                        _ => None,
                    })
            })
            .unwrap_or(UNKNOWN_SERVICE)
            .into();
        for (s, scope_spans) in resource_spans.scope_spans.into_iter().enumerate() {
            let scope = scope_spans.scope.map_or_else(
                || InstrumentationScope::builder("").build(),
                |scope| {
                    let mut builder = InstrumentationScope::builder(scope.name);
                    if !scope.version.is_empty() {
                        builder = builder.with_version(scope.version);
                    }
                    builder.build()
                },
            );
            for (i, span) in scope_spans.spans.into_iter().enumerate() {
                let data = span_data(span, &scope).map_err(|reason| ReceiveError::Span {
                    path: format!("resource_spans[{r}].scope_spans[{s}].spans[{i}]"),
                    reason,
                })?;
                out.push((service.clone(), data));
            }
        }
    }
    Ok(out)
}

fn trace_id(bytes: &[u8], field: &str) -> Result<TraceId, String> {
    let array: [u8; 16] = bytes
        .try_into()
        .map_err(|_| format!("{field} is {} bytes, expected 16", bytes.len()))?;
    let id = TraceId::from_bytes(array);
    if id == TraceId::INVALID {
        return Err(format!("{field} is all zeros"));
    }
    Ok(id)
}

fn span_id(bytes: &[u8], field: &str) -> Result<SpanId, String> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| format!("{field} is {} bytes, expected 8", bytes.len()))?;
    let id = SpanId::from_bytes(array);
    if id == SpanId::INVALID {
        return Err(format!("{field} is all zeros"));
    }
    Ok(id)
}

fn time(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// Span flags bits 8 and 9 (OTLP `SpanFlags`): whether the parent is known to be remote.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

fn span_data(span: ProtoSpan, scope: &InstrumentationScope) -> Result<SpanData, String> {
    let trace = trace_id(&span.trace_id, "trace_id")?;
    let id = span_id(&span.span_id, "span_id")?;
    let parent = if span.parent_span_id.is_empty() {
        SpanId::INVALID
    } else {
        span_id(&span.parent_span_id, "parent_span_id")?
    };
    let span_kind = match span::SpanKind::try_from(span.kind) {
        Ok(span::SpanKind::Unspecified | span::SpanKind::Internal) => SpanKind::Internal,
        Ok(span::SpanKind::Server) => SpanKind::Server,
        Ok(span::SpanKind::Client) => SpanKind::Client,
        Ok(span::SpanKind::Producer) => SpanKind::Producer,
        Ok(span::SpanKind::Consumer) => SpanKind::Consumer,
        Err(_) => return Err(format!("kind {} is not a span kind (0-5)", span.kind)),
    };
    if span.start_time_unix_nano == 0 {
        return Err("start_time_unix_nano is missing".into());
    }
    if span.end_time_unix_nano < span.start_time_unix_nano {
        return Err(format!(
            "end_time_unix_nano {} is before start_time_unix_nano {}",
            span.end_time_unix_nano, span.start_time_unix_nano
        ));
    }
    let status = match span.status {
        None => Status::Unset,
        Some(status) => match status.code {
            0 => Status::Unset,
            1 => Status::Ok,
            2 => Status::error(status.message),
            code => return Err(format!("status code {code} is not a status (0-2)")),
        },
    };
    let events = span
        .events
        .into_iter()
        .map(|e| {
            Event::new(
                e.name,
                time(e.time_unix_nano),
                attributes(e.attributes),
                e.dropped_attributes_count,
            )
        })
        .collect();
    let links = span
        .links
        .into_iter()
        .enumerate()
        .map(|(n, link)| {
            let context = SpanContext::new(
                trace_id(&link.trace_id, &format!("links[{n}].trace_id"))?,
                span_id(&link.span_id, &format!("links[{n}].span_id"))?,
                TraceFlags::new((link.flags & 0xff) as u8),
                link.flags & (HAS_IS_REMOTE | IS_REMOTE) == HAS_IS_REMOTE | IS_REMOTE,
                link.trace_state.parse().unwrap_or_default(),
            );
            Ok(Link::new(
                context,
                attributes(link.attributes),
                link.dropped_attributes_count,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let trace_state: TraceState = span.trace_state.parse().unwrap_or_default();
    let mut span_events = SpanEvents::default();
    span_events.events = events;
    span_events.dropped_count = span.dropped_events_count;
    let mut span_links = SpanLinks::default();
    span_links.links = links;
    span_links.dropped_count = span.dropped_links_count;
    Ok(SpanData {
        // Whatever the sender's flags say, a span that was exported was recorded.
        span_context: SpanContext::new(trace, id, TraceFlags::SAMPLED, false, trace_state),
        parent_span_id: parent,
        parent_span_is_remote: span.flags & (HAS_IS_REMOTE | IS_REMOTE)
            == HAS_IS_REMOTE | IS_REMOTE,
        span_kind,
        name: Cow::Owned(span.name),
        start_time: time(span.start_time_unix_nano),
        end_time: time(span.end_time_unix_nano),
        attributes: attributes(span.attributes),
        dropped_attributes_count: span.dropped_attributes_count,
        events: span_events,
        links: span_links,
        status,
        instrumentation_scope: scope.clone(),
    })
}

fn attributes(kvs: Vec<ProtoKeyValue>) -> Vec<KeyValue> {
    kvs.into_iter()
        .map(|kv| KeyValue::new(kv.key, value(kv.value)))
        .collect()
}

/// An OTLP value as an OpenTelemetry one; what the API has no type for (maps, bytes, mixed
/// arrays) becomes its JSON-like text.
fn value(any: Option<AnyValue>) -> Value {
    match any.and_then(|a| a.value) {
        None => Value::String(StringValue::from("")),
        Some(any_value::Value::StringValue(s)) => Value::String(s.into()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(b),
        Some(any_value::Value::IntValue(i)) => Value::I64(i),
        Some(any_value::Value::DoubleValue(f)) => Value::F64(f),
        Some(any_value::Value::ArrayValue(array)) => {
            let items: Vec<Option<any_value::Value>> =
                array.values.into_iter().map(|v| v.value).collect();
            if let Some(b) = items
                .iter()
                .map(|v| match v {
                    Some(any_value::Value::BoolValue(b)) => Some(*b),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
            {
                Value::Array(Array::Bool(b))
            } else if let Some(i) = items
                .iter()
                .map(|v| match v {
                    Some(any_value::Value::IntValue(i)) => Some(*i),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
            {
                Value::Array(Array::I64(i))
            } else if let Some(f) = items
                .iter()
                .map(|v| match v {
                    Some(any_value::Value::DoubleValue(f)) => Some(*f),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
            {
                Value::Array(Array::F64(f))
            } else {
                Value::Array(Array::String(
                    items
                        .into_iter()
                        .map(|v| StringValue::from(text(v)))
                        .collect(),
                ))
            }
        }
        Some(other) => Value::String(text(Some(other)).into()),
    }
}

fn text(value: Option<any_value::Value>) -> String {
    match value {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s,
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(f)) => f.to_string(),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.into_iter().map(|v| text(v.value)).collect();
            format!("[{}]", items.join(", "))
        }
        Some(any_value::Value::KvlistValue(list)) => {
            let items: Vec<String> = list
                .values
                .into_iter()
                .map(|kv| format!("{}: {}", kv.key, text(kv.value.and_then(|v| v.value))))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Some(any_value::Value::BytesValue(bytes)) => {
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
        Some(any_value::Value::StringValueStrindex(i)) => format!("#{i}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    const SPAN: &str = r#"{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"charge","kind":KIND,"startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000001000000","attributes":[{"key":"ids","value":{"arrayValue":{"values":[{"intValue":"1"},{"intValue":"2"}]}}}]}"#;

    fn body(kind: &str) -> String {
        format!(
            r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"billing"}}}}]}},"scopeSpans":[{{"spans":[{}]}}]}}]}}"#,
            SPAN.replace("KIND", kind)
        )
    }

    async fn send(app: Router, content_type: &str, body: Body) -> (StatusCode, String) {
        let request = http::Request::post("/v1/traces")
            .header("content-type", content_type)
            .body(body)
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn json_spans_are_kept_with_their_kind_and_typed_attributes() {
        let buffer = TraceBuffer::new(10);
        let (status, text) = send(
            router(buffer.clone()),
            "application/json; charset=utf-8",
            Body::from(body("3")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert_eq!(text, "{}");
        let id = TraceId::from_hex("5b8efff798038103d269b633813fc60c").unwrap();
        let view = buffer.trace(id).unwrap();
        assert_eq!(view.spans[0].kind, "client");
        assert_eq!(view.spans[0].service, "billing");
        assert_eq!(view.spans[0].duration_us, 1000);
        assert_eq!(
            view.spans[0].attributes["ids"],
            serde_json::Value::String("[1,2]".into())
        );
    }

    #[tokio::test]
    async fn an_unknown_kind_is_named_and_nothing_is_kept() {
        let buffer = TraceBuffer::new(10);
        let (status, text) = send(
            router(buffer.clone()),
            "application/json",
            Body::from(body("9")),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            text.contains("spans[0]: kind 9 is not a span kind"),
            "{text}"
        );
        assert_eq!(buffer.span_count(), 0);
    }

    #[tokio::test]
    async fn a_streamed_body_over_the_limit_is_413_and_a_compressed_one_415() {
        let buffer = TraceBuffer::new(10);
        // No Content-Length: the limit is enforced while reading.
        let chunks = futures_util_stream(body("2"));
        let (status, text) = send(
            router_with_limit(buffer.clone(), 64),
            "application/json",
            chunks,
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
        assert!(text.contains("larger than 64 bytes"), "{text}");

        let request = http::Request::post("/v1/traces")
            .header("content-type", "application/x-protobuf")
            .header("content-encoding", "gzip")
            .body(Body::from(vec![1, 2, 3]))
            .unwrap();
        let response = router(buffer.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(buffer.span_count(), 0);
    }

    /// A body without a length, as a chunked upload.
    fn futures_util_stream(text: String) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> = text
            .into_bytes()
            .chunks(16)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Body::from_stream(futures_util::stream::iter(chunks))
    }
}
