//! What `trellis events publish` and `trellis events consume` call.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;

use crate::bus::{EventBus, Published, StopSignal, SubscribeOptions};
use crate::envelope::{Envelope, Event, Message, SPEC_VERSION};
use crate::error::{EventError, Result};
use crate::transport::StartFrom;

/// Publishes `json` (any JSON value) to `topic`, with an optional ordering key.
///
/// The text is checked to be JSON first; the error names the position.
pub async fn publish_json(
    bus: &EventBus,
    topic: &str,
    json: &str,
    key: Option<&str>,
) -> Result<Published> {
    let payload: Box<RawValue> =
        serde_json::from_str(json).map_err(|e| EventError::codec("payload argument", e))?;
    let mut message = Message::new(payload);
    if let Some(key) = key {
        message = message.key(key);
    }
    bus.publish(topic, message).await
}

/// Options of [`consume_json`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConsumeOptions {
    /// Consumer group (`--group`).
    pub group: String,
    /// Start at the oldest event when the group has no committed offset
    /// (`--from-beginning`); otherwise only new events are read.
    pub from_beginning: bool,
    /// Stop after this many events (`--max N`); `None` runs until `stop` is given.
    pub max: Option<u64>,
    /// Stops the consumer (wire Ctrl-C to it).
    pub stop: StopSignal,
}

impl ConsumeOptions {
    /// Options for `group`.
    pub fn new(group: impl Into<String>) -> Self {
        ConsumeOptions {
            group: group.into(),
            ..ConsumeOptions::default()
        }
    }

    /// Sets [`from_beginning`](Self::from_beginning).
    #[must_use]
    pub fn from_beginning(mut self, yes: bool) -> Self {
        self.from_beginning = yes;
        self
    }

    /// Sets [`max`](Self::max).
    #[must_use]
    pub fn max(mut self, max: Option<u64>) -> Self {
        self.max = max;
        self
    }

    /// Sets [`stop`](Self::stop).
    #[must_use]
    pub fn stop(mut self, stop: StopSignal) -> Self {
        self.stop = stop;
        self
    }
}

/// Consumes `topic` in a group and writes each event to `out` as one JSON envelope per line
/// (the event under `payload`, plus `partition` and `offset`); returns how many were written.
///
/// Offsets are committed after the line was written and flushed. With `max`, exactly `max`
/// events are written and committed (handlers run one at a time).
pub async fn consume_json<W>(
    bus: &EventBus,
    topic: &str,
    options: ConsumeOptions,
    out: W,
) -> Result<u64>
where
    W: Write + Send + 'static,
{
    if options.max == Some(0) {
        return Ok(0);
    }
    let out = Arc::new(Mutex::new(out));
    let written = Arc::new(AtomicU64::new(0));
    let failure: Arc<Mutex<Option<std::io::Error>>> = Arc::new(Mutex::new(None));
    let stop = options.stop.clone();
    let max = options.max;
    let handler = {
        let out = out.clone();
        let written = written.clone();
        let failure = failure.clone();
        let stop = stop.clone();
        move |event: Event<Box<RawValue>>| {
            let result = write_line(&out, &event);
            let outcome = match result {
                Ok(()) => {
                    let n = written.fetch_add(1, Ordering::SeqCst) + 1;
                    if max.is_some_and(|m| n >= m) {
                        stop.stop();
                    }
                    Ok(())
                }
                Err(e) => {
                    let message = e.to_string();
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    stop.stop();
                    Err(message)
                }
            };
            std::future::ready(outcome)
        }
    };
    let subscribe = SubscribeOptions::default()
        .start(if options.from_beginning {
            StartFrom::Earliest
        } else {
            StartFrom::Latest
        })
        .concurrency(Some(1))
        .stop(stop);
    let subscription = bus
        .subscribe_with(topic, &options.group, subscribe, handler)
        .await?;
    let mut subscription = subscription;
    subscription.wait().await?;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(EventError::Output(e));
    }
    Ok(written.load(Ordering::SeqCst))
}

fn write_line<W: Write>(out: &Mutex<W>, event: &Event<Box<RawValue>>) -> std::io::Result<()> {
    let envelope = Envelope {
        specversion: SPEC_VERSION.to_owned(),
        id: event.id,
        source: event.source.clone(),
        event_type: event.event_type.clone(),
        time: event.time,
        topic: event.topic.clone(),
        key: event.key.clone(),
        headers: event.headers.clone(),
        datacontenttype: "application/json".to_owned(),
        payload: event.payload.clone(),
        partition: Some(event.partition),
        offset: Some(event.offset),
    };
    let mut line = serde_json::to_vec(&envelope).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
    out.write_all(&line)?;
    out.flush()
}
