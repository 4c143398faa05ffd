//! The `[tracing]` configuration table and the standard OpenTelemetry environment variables.
//!
//! ```toml
//! [tracing]
//! service_name = "user-service"
//! endpoint = "http://127.0.0.1:4318"   # OTLP base URL; leave out for in-memory only
//! sampling_rate = 0.1
//! protocol = "http/protobuf"
//! ```
//!
//! The seed's `jaegerEndpoint: 'http://jaeger:14268/api/traces'` is Jaeger's legacy Thrift
//! collector, which Jaeger v2 no longer has: Jaeger v2 takes OTLP, so the endpoint here is an
//! OTLP one (`http://jaeger:4318`). A Thrift URL is refused with a message that says so.
//!
//! Environment variables override the file, the way Kubernetes operators and the
//! OpenTelemetry SDKs expect: `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! (the full URL, used as is) over `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL), and
//! `OTEL_EXPORTER_OTLP_PROTOCOL`. See [`TracingConfig::with_env`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_core::HumanDuration;

use crate::error::{Result, TracingError};

/// OTLP transport, named as in `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// Protobuf over HTTP (`http/protobuf`, port 4318). The default.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP over gRPC (`grpc`, port 4317). Not built in yet: refused by
    /// [`TracerBuilder::build`](crate::TracerBuilder::build) with a clear error.
    #[serde(rename = "grpc")]
    Grpc,
}

impl Protocol {
    fn parse(text: &str) -> Option<Protocol> {
        match text.trim() {
            "http/protobuf" => Some(Protocol::HttpProtobuf),
            "grpc" => Some(Protocol::Grpc),
            _ => None,
        }
    }
}

/// Which B3 headers outgoing requests carry besides W3C `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum B3Encoding {
    /// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled` (what Envoy, Istio and most Zipkin
    /// libraries read). The default.
    #[default]
    Multi,
    /// One `b3` header: `{trace}-{span}-{sampled}`.
    Single,
    /// No B3 headers (W3C only).
    None,
}

/// The `[tracing]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Whether spans are created at all. Defaults to `true`; `false` makes every span a
    /// no-op that still passes incoming trace headers on.
    pub enabled: bool,
    /// The service name spans are reported under. Defaults to `trellis`.
    pub service_name: String,
    /// OTLP collector base URL such as `http://127.0.0.1:4318` (`/v1/traces` is appended
    /// when the URL has no path). Defaults to none: spans stay in the in-memory buffer.
    pub endpoint: Option<String>,
    /// OTLP transport. Defaults to `http/protobuf`.
    pub protocol: Protocol,
    /// Fraction of new traces recorded, 0.0 to 1.0; child spans follow their parent's
    /// decision. Defaults to 1.0.
    pub sampling_rate: f64,
    /// B3 headers on outgoing requests. Defaults to `multi`.
    pub b3: B3Encoding,
    /// Spans kept in the in-memory buffer behind the admin `/v1/traces`. Defaults to
    /// 10000.
    pub buffer_spans: usize,
    /// Finished spans waiting for export; when full, new spans are dropped and counted.
    /// Defaults to 2048.
    pub queue_size: usize,
    /// Most spans sent in one export request. Defaults to 512.
    pub max_batch: usize,
    /// How long spans wait to fill a batch. Defaults to `1s`.
    pub batch_interval: HumanDuration,
    /// How long one export request may take. Defaults to `5s`.
    pub export_timeout: HumanDuration,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            enabled: true,
            service_name: "trellis".to_owned(),
            endpoint: None,
            protocol: Protocol::HttpProtobuf,
            sampling_rate: 1.0,
            b3: B3Encoding::Multi,
            buffer_spans: 10_000,
            queue_size: 2048,
            max_batch: 512,
            batch_interval: HumanDuration(Duration::from_secs(1)),
            export_timeout: HumanDuration(Duration::from_secs(5)),
        }
    }
}

/// Largest accepted buffer, queue or batch size.
const MAX_SIZE: usize = 1_000_000;

impl TracingConfig {
    /// Applies the standard OpenTelemetry environment variables of this process (see the
    /// module docs); they override the file.
    #[must_use = "returns the updated config"]
    pub fn with_env(self) -> Result<Self> {
        self.with_env_from(|key| std::env::var(key).ok())
    }

    /// Same as [`with_env`](Self::with_env) with the variables read through `lookup`.
    pub fn with_env_from(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let set = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        if let Some(name) = set("OTEL_SERVICE_NAME") {
            self.service_name = name.trim().to_owned();
        }
        if let Some(url) = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            self.endpoint = Some(url.trim().to_owned());
        } else if let Some(url) = set("OTEL_EXPORTER_OTLP_ENDPOINT") {
            self.endpoint = Some(url.trim().to_owned());
        }
        if let Some(protocol) = set("OTEL_EXPORTER_OTLP_PROTOCOL") {
            self.protocol =
                Protocol::parse(&protocol).ok_or_else(|| TracingError::InvalidConfig {
                    field: "OTEL_EXPORTER_OTLP_PROTOCOL",
                    reason: format!(
                        "{protocol:?} is not supported; use \"http/protobuf\" or \"grpc\""
                    ),
                })?;
        }
        Ok(self)
    }

    /// Checks every field; the error names the first one that is wrong.
    pub fn validate(self) -> Result<Self> {
        let name = self.service_name.trim();
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            return Err(TracingError::InvalidConfig {
                field: "service_name",
                reason: format!(
                    "{:?} must be 1 to 255 characters without control characters",
                    self.service_name
                ),
            });
        }
        if !(0.0..=1.0).contains(&self.sampling_rate) {
            return Err(TracingError::InvalidConfig {
                field: "sampling_rate",
                reason: format!("{} is not between 0.0 and 1.0", self.sampling_rate),
            });
        }
        if let Some(endpoint) = &self.endpoint {
            check_endpoint(endpoint)?;
        }
        for (field, value) in [
            ("buffer_spans", self.buffer_spans),
            ("queue_size", self.queue_size),
            ("max_batch", self.max_batch),
        ] {
            if value == 0 || value > MAX_SIZE {
                return Err(TracingError::InvalidConfig {
                    field,
                    reason: format!("{value} is not between 1 and {MAX_SIZE}"),
                });
            }
        }
        for (field, value) in [
            ("batch_interval", self.batch_interval.get()),
            ("export_timeout", self.export_timeout.get()),
        ] {
            if value.is_zero() {
                return Err(TracingError::InvalidConfig {
                    field,
                    reason: "must be longer than 0".to_owned(),
                });
            }
        }
        Ok(self)
    }
}

/// Checks an OTLP endpoint: `http(s)://host[:port][/path]`, not Jaeger's Thrift collector.
pub(crate) fn check_endpoint(endpoint: &str) -> Result<()> {
    let invalid = |reason: String| TracingError::InvalidConfig {
        field: "endpoint",
        reason,
    };
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| invalid(format!("{endpoint:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(invalid(format!(
                "{endpoint:?} must start with http:// or https://, for example http://127.0.0.1:4318"
            )));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(format!("{endpoint:?} has no host")));
    }
    if uri.path().contains("/api/traces") || uri.port_u16() == Some(14268) {
        return Err(invalid(format!(
            "{endpoint:?} is Jaeger's legacy Thrift collector; Jaeger v2 takes OTLP: use http://HOST:4318"
        )));
    }
    Ok(())
}

/// The URL spans are POSTed to: `/v1/traces` appended to a base URL without a path.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
pub(crate) fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let has_path = trimmed
        .split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'));
    if has_path {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn defaults_validate_and_parse_from_toml() {
        let config: TracingConfig = toml::from_str(
            "service_name = \"user-service\"\nendpoint = \"http://127.0.0.1:4318\"\nsampling_rate = 0.1\nexport_timeout = \"2s\"\n",
        )
        .unwrap();
        let config = config.validate().unwrap();
        assert_eq!(config.service_name, "user-service");
        assert_eq!(config.sampling_rate, 0.1);
        assert_eq!(config.export_timeout.get(), Duration::from_secs(2));
        assert_eq!(config.protocol, Protocol::HttpProtobuf);
        TracingConfig::default().validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let err = toml::from_str::<TracingConfig>("sample_rate = 0.1\n").unwrap_err();
        assert!(err.to_string().contains("sample_rate"), "{err}");
        for (config, field) in [
            (
                TracingConfig {
                    sampling_rate: 1.5,
                    ..TracingConfig::default()
                },
                "sampling_rate",
            ),
            (
                TracingConfig {
                    sampling_rate: f64::NAN,
                    ..TracingConfig::default()
                },
                "sampling_rate",
            ),
            (
                TracingConfig {
                    service_name: " ".into(),
                    ..TracingConfig::default()
                },
                "service_name",
            ),
            (
                TracingConfig {
                    endpoint: Some("http://jaeger:14268/api/traces".into()),
                    ..TracingConfig::default()
                },
                "endpoint",
            ),
            (
                TracingConfig {
                    endpoint: Some("127.0.0.1:4318".into()),
                    ..TracingConfig::default()
                },
                "endpoint",
            ),
            (
                TracingConfig {
                    queue_size: 0,
                    ..TracingConfig::default()
                },
                "queue_size",
            ),
        ] {
            let err = config.validate().unwrap_err();
            assert!(
                matches!(err, TracingError::InvalidConfig { field: f, .. } if f == field),
                "{err}"
            );
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let env: HashMap<&str, &str> = [
            ("OTEL_SERVICE_NAME", "orders"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]
        .into();
        let config = TracingConfig::default()
            .with_env_from(|k| env.get(k).map(|v| (*v).to_owned()))
            .unwrap();
        assert_eq!(config.service_name, "orders");
        assert_eq!(config.endpoint.as_deref(), Some("http://collector:4318"));
        assert_eq!(config.protocol, Protocol::Grpc);

        let env: HashMap<&str, &str> = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://other:4318/v1/traces",
            ),
        ]
        .into();
        let config = TracingConfig::default()
            .with_env_from(|k| env.get(k).map(|v| (*v).to_owned()))
            .unwrap();
        assert_eq!(
            config.endpoint.as_deref(),
            Some("http://other:4318/v1/traces")
        );

        let err = TracingConfig::default()
            .with_env_from(|k| (k == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "http/xml".to_owned()))
            .unwrap_err();
        assert!(err.to_string().contains("http/xml"), "{err}");
    }

    #[test]
    fn traces_url_appends_the_signal_path_only_to_base_urls() {
        assert_eq!(traces_url("http://h:4318"), "http://h:4318/v1/traces");
        assert_eq!(traces_url("http://h:4318/"), "http://h:4318/v1/traces");
        assert_eq!(
            traces_url("http://h:4318/custom/path"),
            "http://h:4318/custom/path"
        );
    }
}
