//! What a call carries from the request being served: trace context and a deadline.
//!
//! A service handling a request calls other services on its behalf. Those calls should
//! join the same trace (W3C `traceparent`, `tracestate`, `baggage`) and should give up when
//! the original caller has given up (the deadline). A [`CallContext`] holds both; give it to
//! a call with [`RequestBuilder::context`](crate::RequestBuilder::context), or to every call
//! made inside a future with [`CallContext::scope`] (a tokio task-local).
//!
//! The deadline travels between services as the header [`DEADLINE_HEADER`]
//! (`x-trellis-deadline-ms`): the milliseconds the caller will still wait. It is relative,
//! so clocks of different machines need not agree. [`CallContext::from_headers`] reads all
//! four headers of an incoming request.
//!
//! This module generates nothing: no trace ids, no spans. It only passes on what it was
//! given. A client built with a [`tracer`](crate::ServiceClientBuilder::tracer) starts a
//! client span per attempt, child of this context, and sends that span's context instead.

use std::future::Future;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

/// W3C Trace Context `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C Trace Context `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// W3C `baggage`.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// Milliseconds the caller will still wait for the answer (a relative deadline).
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-trellis-deadline-ms");

/// Longest `tracestate` or `baggage` passed on, in bytes (W3C: 512 entries of
/// `tracestate`, 8192 bytes of `baggage`).
const MAX_PROPAGATED: usize = 8192;

/// Longest deadline read from a header: a day. Larger values are taken as a day.
const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

tokio::task_local! {
    static CURRENT: CallContext;
}

/// The trace context and deadline of the request being served, passed on to the services
/// it calls.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use http::{HeaderMap, HeaderValue};
/// use trellis_client::CallContext;
///
/// // What an incoming request carried:
/// let mut incoming = HeaderMap::new();
/// incoming.insert("traceparent", HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
/// incoming.insert("x-trellis-deadline-ms", HeaderValue::from_static("1500"));
/// let ctx = CallContext::from_headers(&incoming);
/// assert!(ctx.remaining().unwrap() <= Duration::from_millis(1500));
///
/// // Every ServiceClient call inside the scope carries it.
/// let seen = ctx.scope(async { CallContext::current() }).await;
/// assert_eq!(seen.unwrap().traceparent(), incoming.get("traceparent"));
/// assert!(CallContext::current().is_none());
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    traceparent: Option<HeaderValue>,
    tracestate: Option<HeaderValue>,
    baggage: Option<HeaderValue>,
    deadline: Option<Instant>,
}

impl CallContext {
    /// An empty context: no trace, no deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// The context of an incoming request: its `traceparent` (when it has the W3C shape),
    /// its `tracestate` (only with a valid `traceparent`), its `baggage`, and a deadline
    /// [`DEADLINE_HEADER`] milliseconds from now. Malformed or oversized values are left
    /// out, not passed on.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let traceparent = headers
            .get(TRACEPARENT)
            .filter(|v| is_valid_traceparent(v.as_bytes()))
            .cloned();
        let tracestate = traceparent
            .as_ref()
            .and(headers.get(TRACESTATE))
            .filter(|v| v.len() <= MAX_PROPAGATED)
            .cloned();
        let baggage = headers
            .get(BAGGAGE)
            .filter(|v| v.len() <= MAX_PROPAGATED)
            .cloned();
        let deadline = headers
            .get(DEADLINE_HEADER)
            .and_then(|v| parse_millis(v.as_bytes()))
            .map(|remaining| Instant::now() + remaining);
        CallContext {
            traceparent,
            tracestate,
            baggage,
            deadline,
        }
    }

    /// Sets the `traceparent` passed on (as given; [`from_headers`](Self::from_headers)
    /// is the one that checks untrusted input).
    #[must_use]
    pub fn with_traceparent(mut self, value: HeaderValue) -> Self {
        self.traceparent = Some(value);
        self
    }

    /// Sets the `tracestate` passed on.
    #[must_use]
    pub fn with_tracestate(mut self, value: HeaderValue) -> Self {
        self.tracestate = Some(value);
        self
    }

    /// Sets the `baggage` passed on.
    #[must_use]
    pub fn with_baggage(mut self, value: HeaderValue) -> Self {
        self.baggage = Some(value);
        self
    }

    /// Sets the deadline: calls give up then, and tell the callee how long is left.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets the deadline `timeout` from now, or keeps the current one if it is earlier.
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> Self {
        let deadline = Instant::now() + timeout;
        match self.deadline {
            Some(current) if current <= deadline => self,
            _ => self.with_deadline(deadline),
        }
    }

    /// The `traceparent` passed on.
    pub fn traceparent(&self) -> Option<&HeaderValue> {
        self.traceparent.as_ref()
    }

    /// The `tracestate` passed on.
    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.tracestate.as_ref()
    }

    /// The `baggage` passed on.
    pub fn baggage(&self) -> Option<&HeaderValue> {
        self.baggage.as_ref()
    }

    /// The deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left until the deadline (zero once it has passed); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Writes the trace headers (`traceparent`, `tracestate`, `baggage`) into `headers`,
    /// replacing any there. The deadline header is written by the client for each attempt.
    pub fn inject(&self, headers: &mut HeaderMap) {
        for (name, value) in [
            (TRACEPARENT, &self.traceparent),
            (TRACESTATE, &self.tracestate),
            (BAGGAGE, &self.baggage),
        ] {
            if let Some(value) = value {
                headers.insert(name, value.clone());
            }
        }
    }

    /// Runs `future` with this context as [`CallContext::current`]: every
    /// [`ServiceClient`](crate::ServiceClient) call made inside it (and not given a context
    /// of its own) carries it. Spawned tasks do not inherit it.
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }

    /// The context set by the enclosing [`CallContext::scope`], if any.
    pub fn current() -> Option<CallContext> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Writes the current context's trace headers into `headers` and returns its
    /// deadline; does nothing outside a [`scope`](Self::scope).
    pub(crate) fn inject_current(headers: &mut HeaderMap) -> Option<Instant> {
        CURRENT
            .try_with(|ctx| {
                ctx.inject(headers);
                ctx.deadline
            })
            .ok()
            .flatten()
    }
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`: version `ff` is invalid, an
/// all-zero trace or parent id is invalid, and later versions may append fields.
fn is_valid_traceparent(value: &[u8]) -> bool {
    if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
        return false;
    }
    let hex = |range: std::ops::Range<usize>| {
        value[range]
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |range: std::ops::Range<usize>| value[range].iter().any(|&b| b != b'0');
    hex(0..2)
        && &value[0..2] != b"ff"
        && (value.len() == 55 || &value[0..2] != b"00")
        && value[2] == b'-'
        && hex(3..35)
        && nonzero(3..35)
        && value[35] == b'-'
        && hex(36..52)
        && nonzero(36..52)
        && value[52] == b'-'
        && hex(53..55)
}

/// A non-negative integer of milliseconds, capped at [`MAX_DEADLINE`].
fn parse_millis(value: &[u8]) -> Option<Duration> {
    if value.is_empty() || value.len() > 12 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ms = value
        .iter()
        .fold(0u64, |acc, &b| acc * 10 + u64::from(b - b'0'));
    Some(Duration::from_millis(ms).min(MAX_DEADLINE))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_shape() {
        assert!(is_valid_traceparent(VALID.as_bytes()));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid_traceparent(bad.as_bytes()), "{bad}");
        }
        // A later version may carry more fields.
        assert!(is_valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn from_headers_keeps_valid_values_only() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        headers.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        headers.insert(BAGGAGE, HeaderValue::from_static("userId=alice"));
        headers.insert(DEADLINE_HEADER, HeaderValue::from_static("1500"));
        let ctx = CallContext::from_headers(&headers);
        assert_eq!(ctx.traceparent().unwrap(), VALID);
        assert_eq!(ctx.tracestate().unwrap(), "congo=t61rcWkgMzE");
        assert_eq!(ctx.baggage().unwrap(), "userId=alice");
        assert_eq!(ctx.remaining(), Some(Duration::from_millis(1500)));
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(ctx.remaining(), Some(Duration::from_millis(1100)));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(ctx.remaining(), Some(Duration::ZERO));

        // A bad traceparent takes its tracestate with it; bad deadlines are ignored.
        headers.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        headers.insert(DEADLINE_HEADER, HeaderValue::from_static("-5"));
        let ctx = CallContext::from_headers(&headers);
        assert_eq!(ctx.traceparent(), None);
        assert_eq!(ctx.tracestate(), None);
        assert_eq!(ctx.baggage().unwrap(), "userId=alice");
        assert_eq!(ctx.deadline(), None);

        headers.insert(DEADLINE_HEADER, HeaderValue::from_static("999999999999"));
        let ctx = CallContext::from_headers(&headers);
        assert_eq!(ctx.remaining(), Some(MAX_DEADLINE));
        let huge = HeaderValue::from_str(&"a".repeat(MAX_PROPAGATED + 1)).unwrap();
        headers.insert(BAGGAGE, huge);
        assert_eq!(CallContext::from_headers(&headers).baggage(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn with_timeout_keeps_the_earlier_deadline() {
        let ctx = CallContext::new().with_timeout(Duration::from_secs(1));
        let later = ctx.clone().with_timeout(Duration::from_secs(5));
        assert_eq!(later.remaining(), Some(Duration::from_secs(1)));
        let sooner = ctx.with_timeout(Duration::from_millis(200));
        assert_eq!(sooner.remaining(), Some(Duration::from_millis(200)));
    }

    #[tokio::test]
    async fn scope_sets_current_and_inject_writes_headers() {
        let ctx = CallContext::new()
            .with_traceparent(HeaderValue::from_static(VALID))
            .with_baggage(HeaderValue::from_static("k=v"));
        let (inner, deadline) = ctx
            .with_timeout(Duration::from_secs(3))
            .scope(async {
                let mut headers = HeaderMap::new();
                let deadline = CallContext::inject_current(&mut headers);
                (headers, deadline)
            })
            .await;
        assert_eq!(inner[TRACEPARENT], VALID);
        assert_eq!(inner[BAGGAGE], "k=v");
        assert!(!inner.contains_key(TRACESTATE));
        assert!(deadline.is_some());
        let mut outside = HeaderMap::new();
        assert_eq!(CallContext::inject_current(&mut outside), None);
        assert!(outside.is_empty());
    }
}
