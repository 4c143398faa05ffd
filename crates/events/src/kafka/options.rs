//! [`KafkaOptions`]: how the transport connects and what it creates, and the
//! `kafka://` URL that says so.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::error::{EventError, Result};

/// How the Kafka transport connects and what it creates.
///
/// ```
/// use trellis_events::KafkaOptions;
/// let options = KafkaOptions::from_url("kafka://k1:9092,k2:9092?partitions=6&replication=2")?;
/// assert_eq!(options.brokers, ["k1:9092", "k2:9092"]);
/// assert_eq!((options.partitions, options.replication), (6, Some(2)));
/// # Ok::<(), trellis_events::EventError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct KafkaOptions {
    /// Bootstrap brokers, `host:port` each.
    pub brokers: Vec<String>,
    /// Partitions of the topics a bus made by [`EventBus::kafka`](crate::EventBus::kafka) creates. Defaults to 4.
    pub partitions: u32,
    /// Replication factor of the topics the transport creates; `None` (the default) takes the
    /// broker's `default.replication.factor`.
    pub replication: Option<u16>,
    /// Bound on one admin, metadata, offset or group request. Defaults to 10 s.
    pub request_timeout: Duration,
    /// How long the producer keeps retrying one record (through leader changes and broker
    /// restarts) before the publish fails (librdkafka `message.timeout.ms`). Defaults to
    /// 120 s.
    pub delivery_timeout: Duration,
    /// How long the producer waits for more records to fill a batch (`linger.ms`). Defaults
    /// to 0: a lone `publish` is not held back (one by one, 0 publishes several times more
    /// events per second than librdkafka's 5 ms), and batches still form while requests are
    /// in flight.
    pub linger: Duration,
    /// How long a rebalance waits for the worker of a revoked partition to commit and release
    /// it before giving the partition up anyway. Defaults to 30 s.
    pub revoke_timeout: Duration,
    /// Whether each record also carries the envelope's headers as Kafka headers and its time
    /// as the record timestamp, for Kafka-native tools (tracing agents, Connect, ksqlDB).
    /// Defaults to true. Without, records are smaller and publishing is faster (see the
    /// `kafka` bench); the envelope inside the value has them either way, and the record
    /// timestamp is the time the producer got it.
    pub record_headers: bool,
    /// Further librdkafka properties given to every client (`security.protocol`,
    /// `sasl.username`, `compression.type`, …); they override the transport's own.
    pub config: BTreeMap<String, String>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            brokers: vec!["127.0.0.1:9092".to_owned()],
            partitions: 4,
            replication: None,
            request_timeout: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(120),
            linger: Duration::ZERO,
            revoke_timeout: Duration::from_secs(30),
            record_headers: true,
            config: BTreeMap::new(),
        }
    }
}

impl KafkaOptions {
    /// Options for these bootstrap brokers (`host:port` each), defaults otherwise.
    pub fn new<I, S>(brokers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        KafkaOptions {
            brokers: brokers.into_iter().map(Into::into).collect(),
            ..KafkaOptions::default()
        }
    }

    /// Parses `kafka://host1:9092,host2:9092[?key=value&…]`.
    ///
    /// A host without a port gets 9092. Keys: `partitions`, `replication`, `timeout`
    /// ([`request_timeout`](Self::request_timeout)), `delivery_timeout`, `linger`,
    /// `revoke_timeout` (durations like `10s` or `500ms`), `record_headers` (`true` or
    /// `false`); a key with a dot in it is a
    /// librdkafka property passed through ([`config`](Self::config)), for example
    /// `security.protocol=ssl`. Values may be percent-encoded.
    pub fn from_url(url: &str) -> Result<KafkaOptions> {
        let bad = |reason: String| EventError::InvalidOption {
            option: "kafka url",
            reason,
        };
        let rest = url
            .get(..8)
            .filter(|scheme| scheme.eq_ignore_ascii_case("kafka://"))
            .map(|_| &url[8..])
            .ok_or_else(|| bad(format!("{url:?} does not start with kafka://")))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
        let mut options = KafkaOptions {
            brokers: Vec::new(),
            ..KafkaOptions::default()
        };
        for host in hosts.split(',').map(str::trim) {
            if host.is_empty() {
                continue;
            }
            if host.contains('/') || host.contains('@') {
                return Err(bad(format!(
                    "broker {host:?} in {url:?}: expected host:port (no path or credentials; \
                     pass sasl.username and sasl.password as parameters)"
                )));
            }
            let has_port = match host.rsplit_once(':') {
                Some((_, port)) if !host.ends_with(']') => {
                    port.parse::<u16>().map_err(|_| {
                        bad(format!(
                            "broker {host:?} in {url:?}: port {port:?} is not a number"
                        ))
                    })?;
                    true
                }
                _ => false,
            };
            options.brokers.push(if has_port {
                host.to_owned()
            } else {
                format!("{host}:9092")
            });
        }
        if options.brokers.is_empty() {
            return Err(bad(format!("{url:?} names no broker")));
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key).map_err(|e| bad(format!("parameter {key:?}: {e}")))?;
            let value =
                percent_decode(value).map_err(|e| bad(format!("parameter {key:?}: {e}")))?;
            let duration = |value: &str| {
                humantime::parse_duration(value).map_err(|e| {
                    bad(format!(
                        "{key}={value:?} is not a duration like 10s or 500ms: {e}"
                    ))
                })
            };
            match key.as_str() {
                "partitions" => {
                    options.partitions = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=10_000).contains(n))
                        .ok_or_else(|| bad(format!("partitions={value:?}: expected 1 to 10000")))?;
                }
                "replication" => {
                    options.replication =
                        Some(value.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                            bad(format!("replication={value:?}: expected a number ≥ 1"))
                        })?);
                }
                "timeout" => options.request_timeout = duration(&value)?,
                "delivery_timeout" => options.delivery_timeout = duration(&value)?,
                "linger" => options.linger = duration(&value)?,
                "revoke_timeout" => options.revoke_timeout = duration(&value)?,
                "record_headers" => {
                    options.record_headers = match value.as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => {
                            return Err(bad(format!(
                                "record_headers={value:?}: expected true or false"
                            )));
                        }
                    };
                }
                _ if key.contains('.') => {
                    options.config.insert(key, value);
                }
                _ => {
                    return Err(bad(format!(
                        "unknown parameter {key:?}; known: partitions, replication, timeout, \
                         delivery_timeout, linger, revoke_timeout, record_headers, or a \
                         librdkafka property (a name with a dot)"
                    )));
                }
            }
        }
        options.validate()
    }

    /// Sets [`partitions`](Self::partitions).
    #[must_use]
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Sets [`replication`](Self::replication).
    #[must_use]
    pub fn replication(mut self, replication: Option<u16>) -> Self {
        self.replication = replication;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`delivery_timeout`](Self::delivery_timeout).
    #[must_use]
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// Sets [`linger`](Self::linger).
    #[must_use]
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets [`revoke_timeout`](Self::revoke_timeout).
    #[must_use]
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_timeout = timeout;
        self
    }

    /// Sets [`record_headers`](Self::record_headers).
    #[must_use]
    pub fn record_headers(mut self, yes: bool) -> Self {
        self.record_headers = yes;
        self
    }

    /// Adds a librdkafka property for every client (see [`config`](Self::config)).
    #[must_use]
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }

    pub(super) fn validate(self) -> Result<Self> {
        let bad = |option, reason: String| Err(EventError::InvalidOption { option, reason });
        if self.brokers.is_empty() {
            return bad("brokers", "name at least one broker".into());
        }
        if self.partitions == 0 {
            return bad("partitions", "must be at least 1".into());
        }
        if self.request_timeout < Duration::from_millis(100) {
            return bad(
                "request_timeout",
                format!("{:?} is too short; at least 100ms", self.request_timeout),
            );
        }
        if self.delivery_timeout < Duration::from_secs(1) {
            return bad(
                "delivery_timeout",
                format!("{:?} is too short; at least 1s", self.delivery_timeout),
            );
        }
        Ok(self)
    }

    /// The configuration every client starts from.
    pub(super) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.brokers.join(","))
            .set("allow.auto.create.topics", "false")
            .set("log_level", "6");
        for (key, value) in &self.config {
            config.set(key, value);
        }
        config
    }
}

/// Decodes `%XX` escapes (and `+` as a space).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad escape at byte {i} of {text:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let o = KafkaOptions::from_url("kafka://a:9093, b ,[::1]:9094/").unwrap();
        assert_eq!(o.brokers, ["a:9093", "b:9092", "[::1]:9094"]);
        assert_eq!(o.partitions, 4);
        assert_eq!(o.replication, None);
        let o = KafkaOptions::from_url(
            "KAFKA://h:1?partitions=12&replication=3&timeout=2s&delivery_timeout=1m&linger=0ms\
             &revoke_timeout=5s&record_headers=false&security.protocol=sasl_ssl\
             &sasl.password=p%40ss%2Bword",
        )
        .unwrap();
        assert_eq!(o.partitions, 12);
        assert_eq!(o.replication, Some(3));
        assert_eq!(o.request_timeout, Duration::from_secs(2));
        assert_eq!(o.delivery_timeout, Duration::from_secs(60));
        assert_eq!(o.linger, Duration::ZERO);
        assert_eq!(o.revoke_timeout, Duration::from_secs(5));
        assert!(!o.record_headers);
        assert_eq!(o.config["security.protocol"], "sasl_ssl");
        assert_eq!(o.config["sasl.password"], "p@ss+word");
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, needle) in [
            ("http://h:9092", "kafka://"),
            ("kafka://", "names no broker"),
            ("kafka://h:port", "not a number"),
            ("kafka://user:pw@h:9092", "credentials"),
            ("kafka://h:9092?partitions=0", "partitions"),
            ("kafka://h:9092?replication=x", "replication"),
            ("kafka://h:9092?timeout=soon", "duration"),
            ("kafka://h:9092?color=red", "unknown parameter \"color\""),
            ("kafka://h:9092?a.b=%zz", "bad escape"),
            ("kafka://h:9092?timeout=1ms", "too short"),
            ("kafka://h:9092?record_headers=maybe", "true or false"),
        ] {
            let err = KafkaOptions::from_url(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
