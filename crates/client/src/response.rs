//! The answer of a successful call, and reading bodies within limits.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::error::{ClientError, MAX_ERROR_BODY};

/// The answer of a call that got a status below 400 (error statuses are
/// [`ClientError::Status`]). Its head has arrived; read the body with
/// [`bytes`](Self::bytes), [`text`](Self::text) or [`json`](Self::json), which are bounded by
/// the call's deadline and the client's `max_response_bytes`.
///
/// No retry happens once this is returned: from here on the body is the caller's.
#[derive(Debug)]
pub struct ServiceResponse {
    response: reqwest::Response,
    service: Arc<str>,
    instance: Arc<str>,
    deadline: Instant,
    limit: Duration,
    max_bytes: usize,
}

impl ServiceResponse {
    pub(crate) fn new(
        response: reqwest::Response,
        service: Arc<str>,
        instance: Arc<str>,
        deadline: Instant,
        limit: Duration,
        max_bytes: usize,
    ) -> Self {
        ServiceResponse {
            response,
            service,
            instance,
            deadline,
            limit,
            max_bytes,
        }
    }

    /// The status (below 400).
    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    /// The response headers.
    pub fn headers(&self) -> &HeaderMap {
        self.response.headers()
    }

    /// The service that answered.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The id of the instance that answered.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Reads the whole body.
    pub async fn bytes(mut self) -> Result<Bytes, ClientError> {
        let read = read_limited(&mut self.response, self.max_bytes);
        match tokio::time::timeout_at(self.deadline, read).await {
            Err(_) => Err(ClientError::Timeout {
                service: self.service.to_string(),
                after: self.limit,
            }),
            Ok(Ok(body)) => Ok(body),
            Ok(Err(ReadError::TooLarge)) => Err(ClientError::ResponseTooLarge {
                service: self.service.to_string(),
                instance: self.instance.to_string(),
                limit: self.max_bytes,
            }),
            Ok(Err(ReadError::Transport(source))) => Err(ClientError::Body {
                service: self.service.to_string(),
                instance: self.instance.to_string(),
                source,
            }),
        }
    }

    /// Reads the whole body as text (invalid UTF-8 replaced by U+FFFD).
    pub async fn text(self) -> Result<String, ClientError> {
        let body = self.bytes().await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Reads the whole body and decodes it as JSON into `T`;
    /// [`ClientError::Decode`] carries serde's message when it does not fit.
    pub async fn json<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        let service = self.service.clone();
        let instance = self.instance.clone();
        let body = self.bytes().await?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
            service: service.to_string(),
            instance: instance.to_string(),
            target: std::any::type_name::<T>(),
            source,
        })
    }

    /// The underlying reqwest response, to stream a large body chunk by chunk. Neither the
    /// deadline nor `max_response_bytes` applies to it any more.
    pub fn into_reqwest(self) -> reqwest::Response {
        self.response
    }
}

#[derive(Debug)]
pub(crate) enum ReadError {
    TooLarge,
    Transport(reqwest::Error),
}

/// Reads a body of at most `limit` bytes; a body of one chunk is returned without a copy.
pub(crate) async fn read_limited(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Bytes, ReadError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    let Some(first) = response.chunk().await.map_err(ReadError::Transport)? else {
        return Ok(Bytes::new());
    };
    if first.len() > limit {
        return Err(ReadError::TooLarge);
    }
    let Some(second) = response.chunk().await.map_err(ReadError::Transport)? else {
        return Ok(first);
    };
    let mut body = BytesMut::with_capacity(first.len() + second.len());
    body.extend_from_slice(&first);
    let mut next = Some(second);
    while let Some(chunk) = next {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
        next = response.chunk().await.map_err(ReadError::Transport)?;
    }
    Ok(body.freeze())
}

/// Reads the start of an error response's body, at most [`MAX_ERROR_BODY`] bytes, as
/// lossy UTF-8 (cut back to a character boundary). A body that cannot be read is empty:
/// the status is what matters.
pub(crate) async fn error_body(response: &mut reqwest::Response, deadline: Instant) -> String {
    let read = async {
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_ERROR_BODY - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
        body
    };
    let body = tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or_default();
    let mut text = String::from_utf8_lossy(&body).into_owned();
    if body.len() == MAX_ERROR_BODY && text.ends_with('\u{FFFD}') {
        // The cut may have split a character.
        text.pop();
    }
    text
}
