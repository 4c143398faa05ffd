//! What can go wrong: building a client ([`BuildError`]) and calling a service
//! ([`ClientError`]).

use std::time::Duration;

use http::StatusCode;
use trellis_core::format_duration;

/// Most bytes of an error response's body kept in [`ClientError::Status`].
pub const MAX_ERROR_BODY: usize = 4096;

/// Most characters of that body shown in the error's message.
const SHOWN_BODY: usize = 512;

/// A call to a service failed. Each variant says exactly what happened, and
/// [`is_retryable`](ClientError::is_retryable) whether trying again may help.
///
/// Retries, when the request allowed them, have already been made: this is the outcome of
/// the last attempt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No answer within the time limit: the client's `timeout`, the caller's deadline
    /// (whichever came first), or the `attempt_timeout` of the last attempt.
    #[error("{service} did not answer within {}", format_duration(*.after))]
    Timeout {
        /// The service called.
        service: String,
        /// The limit that elapsed.
        after: Duration,
    },
    /// The circuit breaker of every instance the balancer offered is open: the request was
    /// refused without touching the network.
    #[error(
        "circuit breaker of {service} instance {instance} is open; failing fast, next probe in {}",
        format_duration(*.retry_in)
    )]
    CircuitOpen {
        /// The service called.
        service: String,
        /// The instance whose breaker opens again soonest.
        instance: String,
        /// How long until that breaker lets a probe through (zero when half-open with its
        /// probes in flight).
        retry_in: Duration,
    },
    /// The registry has no instance of the service that may be called: none registered,
    /// all unhealthy, or all ejected as outliers.
    #[error("no healthy instance of {service} in the registry")]
    NoHealthyInstance {
        /// The service called.
        service: String,
    },
    /// No response arrived: the connection to the instance could not be made, or it failed
    /// before the response head (refused, reset, closed).
    #[error("{service} instance {instance} ({address}): {}", chain(source))]
    Connect {
        /// The service called.
        service: String,
        /// The instance id.
        instance: String,
        /// Its `host:port`.
        address: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The service answered with an error status (400 and above). `body` holds the start
    /// of the response body (at most [`MAX_ERROR_BODY`] bytes, lossy UTF-8).
    #[error("{service} instance {instance} answered {status}{}", shown_body(body))]
    Status {
        /// The service called.
        service: String,
        /// The instance that answered.
        instance: String,
        /// The status.
        status: StatusCode,
        /// The start of the body.
        body: String,
    },
    /// The response head arrived, but reading its body failed (the connection broke).
    #[error(
        "{service} instance {instance}: reading the response body: {}",
        chain(source)
    )]
    Body {
        /// The service called.
        service: String,
        /// The instance that answered.
        instance: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The response body is larger than the client's `max_response_bytes`.
    #[error("{service} instance {instance}: response body is larger than {limit} bytes")]
    ResponseTooLarge {
        /// The service called.
        service: String,
        /// The instance that answered.
        instance: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The response body is not the JSON the caller expected; the message is serde's.
    #[error("{service} instance {instance}: response body is not a valid {target}: {source}")]
    Decode {
        /// The service called.
        service: String,
        /// The instance that answered.
        instance: String,
        /// The Rust type the body was decoded into.
        target: &'static str,
        /// serde's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The request could not be built (a bad path, header, query or body); nothing was sent.
    #[error("invalid request to {service}: {reason}")]
    InvalidRequest {
        /// The service called.
        service: String,
        /// What was wrong.
        reason: String,
    },
}

impl ClientError {
    /// True when another attempt, later or on another instance, may succeed: timeouts,
    /// open breakers, no healthy instance, transport errors, and the statuses 408, 429, 502,
    /// 503 and 504. False for other statuses and for bad requests, bodies and JSON.
    ///
    /// This does not say whether the request is *safe* to send again: that depends on its
    /// method, which the client checks before it retries.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Timeout { .. }
            | ClientError::CircuitOpen { .. }
            | ClientError::NoHealthyInstance { .. }
            | ClientError::Connect { .. }
            | ClientError::Body { .. } => true,
            ClientError::Status { status, .. } => matches!(
                *status,
                StatusCode::REQUEST_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ),
            ClientError::ResponseTooLarge { .. }
            | ClientError::Decode { .. }
            | ClientError::InvalidRequest { .. } => false,
        }
    }

    /// The service the call went to.
    pub fn service(&self) -> &str {
        match self {
            ClientError::Timeout { service, .. }
            | ClientError::CircuitOpen { service, .. }
            | ClientError::NoHealthyInstance { service }
            | ClientError::Connect { service, .. }
            | ClientError::Status { service, .. }
            | ClientError::Body { service, .. }
            | ClientError::ResponseTooLarge { service, .. }
            | ClientError::Decode { service, .. }
            | ClientError::InvalidRequest { service, .. } => service,
        }
    }

    /// The HTTP status, for [`ClientError::Status`].
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn invalid(service: &str, reason: impl Into<String>) -> Self {
        ClientError::InvalidRequest {
            service: service.to_owned(),
            reason: reason.into(),
        }
    }
}

impl trellis_resilience::retry::RetryableError for ClientError {
    fn is_retryable(&self) -> bool {
        ClientError::is_retryable(self)
    }
}

/// An error and its sources, joined by `": "` (reqwest's own message is terse).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

fn shown_body(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        return String::new();
    }
    match body.char_indices().nth(SHOWN_BODY) {
        Some((cut, _)) => format!(": {}…", &body[..cut]),
        None => format!(": {body}"),
    }
}

/// A [`ServiceClient`](crate::ServiceClient) could not be built; the message names the
/// setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The service name was rejected.
    #[error(transparent)]
    Name(#[from] trellis_core::NameError),
    /// A breaker, balancer or retry-budget setting was rejected.
    #[error(transparent)]
    Resilience(#[from] trellis_resilience::ConfigError),
    /// Another setting was rejected.
    #[error("{setting}: {reason}")]
    Invalid {
        /// The setting (`timeout`, `default_headers`, …).
        setting: &'static str,
        /// Why.
        reason: String,
    },
    /// The HTTP client could not be created.
    #[error("HTTP client: {0}")]
    Http(#[source] reqwest::Error),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn messages_name_what_happened() {
        let timeout = ClientError::Timeout {
            service: "order-service".into(),
            after: Duration::from_millis(250),
        };
        assert_eq!(
            timeout.to_string(),
            "order-service did not answer within 250ms"
        );
        assert!(timeout.is_retryable());
        let open = ClientError::CircuitOpen {
            service: "order-service".into(),
            instance: "order-1".into(),
            retry_in: Duration::from_secs(60),
        };
        assert_eq!(
            open.to_string(),
            "circuit breaker of order-service instance order-1 is open; failing fast, next probe in 1m"
        );
        let status = |code: u16, body: &str| ClientError::Status {
            service: "order-service".into(),
            instance: "order-1".into(),
            status: StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT),
            body: body.into(),
        };
        assert_eq!(
            status(404, "no such order\n").to_string(),
            "order-service instance order-1 answered 404 Not Found: no such order"
        );
        assert_eq!(
            status(500, "").to_string(),
            "order-service instance order-1 answered 500 Internal Server Error"
        );
        let long = "x".repeat(2000);
        assert_eq!(
            status(500, &long).to_string().len(),
            "order-service instance order-1 answered 500 Internal Server Error: ".len()
                + SHOWN_BODY
                + '…'.len_utf8()
        );
        assert!(!status(404, "").is_retryable());
        assert!(!status(500, "").is_retryable());
        assert!(status(503, "").is_retryable());
        assert!(status(429, "").is_retryable());
        assert_eq!(status(404, "").status(), Some(StatusCode::NOT_FOUND));
        let invalid = ClientError::invalid("order-service", "path \"x\" must start with '/'");
        assert!(!invalid.is_retryable());
        assert_eq!(invalid.service(), "order-service");
        assert_eq!(
            ClientError::NoHealthyInstance {
                service: "order-service".into()
            }
            .to_string(),
            "no healthy instance of order-service in the registry"
        );
    }

    #[test]
    fn decode_error_carries_serde_message() {
        let source = serde_json::from_str::<Vec<u32>>("[1, \"two\"]").unwrap_err();
        let err = ClientError::Decode {
            service: "order-service".into(),
            instance: "order-1".into(),
            target: "alloc::vec::Vec<u32>",
            source,
        };
        assert_eq!(
            err.to_string(),
            "order-service instance order-1: response body is not a valid alloc::vec::Vec<u32>: \
             invalid type: string \"two\", expected u32 at line 1 column 9"
        );
        assert!(!err.is_retryable());
    }
}
