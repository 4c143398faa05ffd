//! What travels on a topic: the [`Envelope`] (wire form, CloudEvents attribute names), the
//! [`Message`] a producer builds and the typed [`Event`] a handler receives.
//!
//! The envelope is CloudEvents 1.0 in structured JSON mode, with two Trellis names where the
//! issue fixed them: the event data is under `payload` (CloudEvents: `data`) and the ordering
//! key under `key` (CloudEvents partitioning extension: `partitionkey`). `headers` holds
//! extension attributes such as `traceparent` (CloudEvents distributed-tracing extension).

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::error::{EventError, Result};

/// Header that carries the W3C trace context of the producer.
pub const TRACEPARENT: &str = "traceparent";
/// Header set on a dead letter: why the event could not be handled.
pub const ERROR_HEADER: &str = "trellis-error";
/// Header set on a dead letter: how many times the handler was called (0: never, the
/// payload did not deserialize).
pub const ATTEMPTS_HEADER: &str = "trellis-attempts";
/// Header set on a dead letter: `topic/partition/offset` it came from.
pub const ORIGIN_HEADER: &str = "trellis-origin";
/// Header set on a dead letter: the consumer group that gave up.
pub const GROUP_HEADER: &str = "trellis-group";

/// The CloudEvents spec version every envelope declares.
pub const SPEC_VERSION: &str = "1.0";

/// The stored and transported form of one event (CloudEvents structured mode, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Always `"1.0"`.
    pub specversion: String,
    /// Unique id, a UUID v7 (time-ordered); stays the same through outbox relay and dead
    /// lettering, so consumers can deduplicate by it.
    pub id: Uuid,
    /// Who produced it (CloudEvents `source`); the bus's source unless the message set one.
    pub source: String,
    /// What happened, for example `user.created`; defaults to the topic.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When it was produced (RFC 3339, UTC).
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// The topic it was published to.
    pub topic: String,
    /// Ordering key: events with the same key go to the same partition and are handled in
    /// order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Extension attributes (`traceparent`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The event itself, as JSON.
    pub payload: Box<RawValue>,
    /// Partition it was read from (set on delivery, absent when stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// Offset it was read from (set on delivery, absent when stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.source == other.source
            && self.event_type == other.event_type
            && self.time == other.time
            && self.topic == other.topic
            && self.key == other.key
            && self.headers == other.headers
            && self.payload.get() == other.payload.get()
            && self.partition == other.partition
            && self.offset == other.offset
    }
}

impl Envelope {
    /// Encodes the envelope as JSON bytes (what the log stores).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| EventError::codec(format!("envelope {}", self.id), e))
    }

    /// Decodes an envelope from JSON bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Envelope> {
        serde_json::from_slice(bytes).map_err(|e| EventError::codec("envelope", e))
    }

    /// Deserializes the payload into `T`; the error names the field.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.payload.get())
    }

    /// The producer's trace context, if it sent one.
    pub fn traceparent(&self) -> Option<&str> {
        self.headers.get(TRACEPARENT).map(String::as_str)
    }
}

/// An event to publish: a payload plus optional key, type and headers.
///
/// ```
/// use trellis_events::Message;
/// let m = Message::new(serde_json::json!({"id": "u1"}))
///     .key("u1")
///     .event_type("user.created")
///     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(m.get_key(), Some("u1"));
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Message<T> {
    payload: T,
    key: Option<String>,
    event_type: Option<String>,
    source: Option<String>,
    headers: BTreeMap<String, String>,
}

impl<T> Message<T> {
    /// A message with no key (spread over partitions round robin), the topic as its type
    /// and no headers.
    pub fn new(payload: T) -> Self {
        Message {
            payload,
            key: None,
            event_type: None,
            source: None,
            headers: BTreeMap::new(),
        }
    }

    /// Sets the ordering key: events with one key are handled in publish order.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the CloudEvents `type`. Defaults to the topic.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Sets the CloudEvents `source`. Defaults to the bus's source.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Adds a header (extension attribute), for example `traceparent`.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The key, if set.
    pub fn get_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The payload.
    pub fn payload(&self) -> &T {
        &self.payload
    }
}

impl<T: Serialize> Message<T> {
    /// Builds the envelope: a fresh UUID v7 id, the time now.
    pub fn into_envelope(self, topic: &str, default_source: &str) -> Result<Envelope> {
        crate::error::validate_name("topic", topic)?;
        for name in self.headers.keys() {
            validate_header(name)?;
        }
        let payload = serde_json::value::to_raw_value(&self.payload)
            .map_err(|e| EventError::codec(format!("payload for topic {topic}"), e))?;
        Ok(Envelope {
            specversion: SPEC_VERSION.to_owned(),
            id: Uuid::now_v7(),
            source: self.source.unwrap_or_else(|| default_source.to_owned()),
            event_type: self.event_type.unwrap_or_else(|| topic.to_owned()),
            time: now_micros(),
            topic: topic.to_owned(),
            key: self.key,
            headers: self.headers,
            datacontenttype: "application/json".to_owned(),
            payload,
            partition: None,
            offset: None,
        })
    }
}

/// The time now, cut to whole microseconds: what the envelope's `time` can carry, so an
/// envelope equals itself after a round trip.
fn now_micros() -> SystemTime {
    let now = SystemTime::now();
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => std::time::UNIX_EPOCH + std::time::Duration::from_micros(d.as_micros() as u64),
        Err(_) => now,
    }
}

fn validate_header(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 256
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(EventError::InvalidName {
            what: "header name",
            value: name.to_owned(),
            reason: "use 1 to 256 letters, digits, '-', '_' or '.'".to_owned(),
        });
    }
    Ok(())
}

/// A delivered event, its payload deserialized into the handler's type.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event<T> {
    /// Unique id (UUID v7); deduplicate by it.
    pub id: Uuid,
    /// Topic it was read from.
    pub topic: String,
    /// Ordering key, if any.
    pub key: Option<String>,
    /// CloudEvents `type`.
    pub event_type: String,
    /// CloudEvents `source`.
    pub source: String,
    /// When it was produced.
    pub time: SystemTime,
    /// Extension attributes (`traceparent`, …).
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub payload: T,
    /// Partition it was read from.
    pub partition: u32,
    /// Offset in that partition.
    pub offset: u64,
    /// Which attempt this is, starting at 1.
    pub attempt: u32,
}

impl<T> Event<T> {
    /// The producer's trace context, if it sent one.
    pub fn traceparent(&self) -> Option<&str> {
        self.headers.get(TRACEPARENT).map(String::as_str)
    }

    pub(crate) fn from_envelope(
        envelope: &Envelope,
        payload: T,
        partition: u32,
        offset: u64,
        attempt: u32,
    ) -> Self {
        Event {
            id: envelope.id,
            topic: envelope.topic.clone(),
            key: envelope.key.clone(),
            event_type: envelope.event_type.clone(),
            source: envelope.source.clone(),
            time: envelope.time,
            headers: envelope.headers.clone(),
            payload,
            partition,
            offset,
            attempt,
        }
    }
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(*time))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "time {text:?} is not RFC 3339 UTC (like 2026-01-31T12:00:00.000000Z): {e}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_with_cloudevents_names() {
        let env = Message::new(serde_json::json!({"email": "a@example.com"}))
            .key("u1")
            .event_type("user.created")
            .header(
                TRACEPARENT,
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .into_envelope("users", "svc")
            .unwrap();
        let bytes = env.to_bytes().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "user.created");
        assert_eq!(json["source"], "svc");
        assert_eq!(json["payload"]["email"], "a@example.com");
        assert!(json["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(env.id.get_version_num(), 7);
        let back = Envelope::from_bytes(&bytes).unwrap();
        // Microsecond precision survives the round trip.
        assert_eq!(back, env);
        assert_eq!(back.traceparent(), env.traceparent());
        assert_eq!(back.key.as_deref(), Some("u1"));
    }

    #[test]
    fn bad_headers_and_times_are_named() {
        let err = Message::new(1)
            .header("bad name", "x")
            .into_envelope("t", "s")
            .unwrap_err();
        assert!(err.to_string().contains("header name"), "{err}");
        let bad = br#"{"specversion":"1.0","id":"0190b6d8-0000-7000-8000-000000000000","source":"s","type":"t","time":"yesterday","topic":"t","datacontenttype":"application/json","payload":1}"#;
        let err = Envelope::from_bytes(bad).unwrap_err().to_string();
        assert!(err.contains("yesterday"), "{err}");
    }
}
