//! Where the analysis of a blue-green deployment gets its figures: the gateway's per-version
//! upstream metrics, read the way Flagger reads Prometheus — scrape the text exposition,
//! keep the cumulative counters of one version, and judge the difference between two
//! scrapes.
//!
//! The two families read (the gateway's contract):
//!
//! - `trellis_gateway_upstream_requests_total{service,version,status}` (counter): attempts
//!   sent to an instance of that version; a `status` of `5xx` (or a code from 500 to 599),
//!   `error` (no answer) or `timeout` is an error.
//! - `trellis_gateway_upstream_request_duration_seconds{service,version}` (histogram): time
//!   to the upstream's response head; the p99 is interpolated inside its buckets as
//!   Prometheus' `histogram_quantile` does.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::error::DeployError;

/// The request counter family read from the exposition.
pub const REQUESTS_FAMILY: &str = "trellis_gateway_upstream_requests_total";
/// The latency histogram family read from the exposition.
pub const DURATION_FAMILY: &str = "trellis_gateway_upstream_request_duration_seconds";

/// A boxed future, as returned by [`MetricsSource::sample`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Cumulative figures of one version of one service at one moment (counters since the
/// gateway started). Two samples make [`Figures`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionSample {
    /// Requests forwarded to the version, all statuses.
    pub requests: u64,
    /// Of those, answered with a 5xx status.
    pub errors: u64,
    /// Latency histogram: (upper bound in seconds, cumulative count), ascending, the last
    /// one `+Inf`. Empty when the gateway exposes no histogram for the version.
    pub buckets: Vec<(f64, u64)>,
}

/// What happened between two samples: the basis of every analysis decision.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    /// Requests in the period.
    pub requests: u64,
    /// 5xx answers in the period.
    pub errors: u64,
    /// `errors / requests`; `None` without requests.
    pub error_rate: Option<f64>,
    /// 99th percentile latency; `None` without requests or histogram.
    pub p99: Option<Duration>,
}

impl VersionSample {
    /// The figures of the period from `earlier` to `self`. A counter that went down (the
    /// gateway restarted) counts from zero, as Prometheus' `increase` does.
    pub fn since(&self, earlier: &VersionSample) -> Figures {
        let delta = |now: u64, then: u64| if now >= then { now - then } else { now };
        let requests = delta(self.requests, earlier.requests);
        let errors = delta(self.errors, earlier.errors).min(requests);
        let reset = self.requests < earlier.requests;
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .map(|&(le, count)| {
                let then = if reset {
                    0
                } else {
                    earlier
                        .buckets
                        .iter()
                        .find(|(l, _)| l.total_cmp(&le).is_eq())
                        .map_or(0, |&(_, c)| c)
                };
                (le, delta(count, then))
            })
            .collect();
        Figures {
            requests,
            errors,
            error_rate: (requests > 0).then(|| errors as f64 / requests as f64),
            p99: if requests > 0 {
                histogram_quantile(0.99, &buckets).map(Duration::from_secs_f64)
            } else {
                None
            },
        }
    }
}

/// The `q` quantile of a cumulative histogram, interpolated linearly inside the bucket that
/// holds it (Prometheus' `histogram_quantile`): the lower bound of the first bucket is 0, and
/// a quantile in the `+Inf` bucket is the highest finite bound. `None` when empty.
pub fn histogram_quantile(q: f64, buckets: &[(f64, u64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for &(le, count) in buckets {
        if count as f64 >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            if count == below {
                return Some(le);
            }
            let fraction = (rank - below as f64) / (count - below) as f64;
            return Some(lower + (le - lower) * fraction);
        }
        lower = le;
        below = count;
    }
    Some(lower)
}

/// Where the analysis reads a version's figures from. [`PrometheusScrape`] is the real one;
/// tests feed their own.
pub trait MetricsSource: Send + Sync + fmt::Debug {
    /// The cumulative figures of `version` of `service` now.
    fn sample<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<VersionSample, DeployError>>;
}

/// Scrapes a Prometheus text exposition over HTTP — the gateway node's or the admin API's
/// `GET /metrics` — and reads the gateway's per-version upstream families from it.
#[derive(Debug, Clone)]
pub struct PrometheusScrape {
    url: String,
    client: reqwest::Client,
}

impl PrometheusScrape {
    /// Scrapes `url` (such as `http://127.0.0.1:9900/metrics`), each scrape limited to 5 s.
    pub fn new(url: impl Into<String>) -> Result<Self, DeployError> {
        let url = url.into();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(DeployError::Metrics {
                source_name: url,
                reason: "the metrics URL must start with http:// or https://".into(),
            });
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| DeployError::Metrics {
                source_name: url.clone(),
                reason: format!("HTTP client: {e}"),
            })?;
        Ok(PrometheusScrape { url, client })
    }

    /// The URL scraped.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl MetricsSource for PrometheusScrape {
    fn sample<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<VersionSample, DeployError>> {
        Box::pin(async move {
            let fail = |reason: String| DeployError::Metrics {
                source_name: self.url.clone(),
                reason,
            };
            let response = self
                .client
                .get(&self.url)
                .send()
                .await
                .map_err(|e| fail(format!("scrape failed: {e}")))?;
            let status = response.status();
            if !status.is_success() {
                return Err(fail(format!("scrape answered {status}")));
            }
            let text = response
                .text()
                .await
                .map_err(|e| fail(format!("reading the exposition: {e}")))?;
            parse_exposition(&text, service, version).map_err(fail)
        })
    }
}

/// Reads the figures of `version` of `service` from a Prometheus (or OpenMetrics) text
/// exposition. Lines of other families are skipped; a malformed line of the two families
/// read is an error naming its line number.
pub fn parse_exposition(text: &str, service: &str, version: &str) -> Result<VersionSample, String> {
    let mut sample = VersionSample::default();
    let bucket_family = format!("{DURATION_FAMILY}_bucket");
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = &line[..name_end];
        let counter = name == REQUESTS_FAMILY;
        let bucket = name == bucket_family;
        if !counter && !bucket {
            continue;
        }
        let (labels, rest) = parse_labels(&line[name_end..])
            .map_err(|e| format!("line {}: {e}: {line:?}", number + 1))?;
        let label = |key: &str| {
            labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if label("service") != Some(service) || label("version") != Some(version) {
            continue;
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("line {}: no valid sample value: {line:?}", number + 1))?;
        let value = value.round() as u64;
        if counter {
            sample.requests += value;
            if label("status").is_some_and(is_error_status) {
                sample.errors += value;
            }
        } else {
            let le = label("le").and_then(parse_bound).ok_or_else(|| {
                format!("line {}: bucket without a valid le: {line:?}", number + 1)
            })?;
            match sample
                .buckets
                .iter_mut()
                .find(|(l, _)| l.total_cmp(&le).is_eq())
            {
                Some((_, count)) => *count += value,
                None => sample.buckets.push((le, value)),
            }
        }
    }
    sample.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(sample)
}

/// A 5xx answer (`5xx` as the gateway labels classes, or a code such as `503`), or no
/// answer at all (`error`: connect error or reset; `timeout`).
fn is_error_status(status: &str) -> bool {
    match status {
        "5xx" | "error" | "timeout" => true,
        code => code.parse::<u16>().is_ok_and(|c| (500..600).contains(&c)),
    }
}

fn parse_bound(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        other => other.parse::<f64>().ok().filter(|v| !v.is_nan()),
    }
}

/// Label names and values of one sample line.
type Labels = Vec<(String, String)>;

/// Parses `{a="x",b="y"} rest` into the labels and `rest`; no braces means no labels.
fn parse_labels(text: &str) -> Result<(Labels, &str), String> {
    let Some(body) = text.strip_prefix('{') else {
        return Ok((Vec::new(), text));
    };
    let mut labels = Vec::new();
    let mut chars = body.char_indices().peekable();
    loop {
        // Skip separators.
        while let Some(&(_, c)) = chars.peek() {
            if c == ',' || c == ' ' {
                chars.next();
            } else {
                break;
            }
        }
        match chars.peek() {
            Some(&(i, '}')) => return Ok((labels, &body[i + 1..])),
            None => return Err("unterminated label set".into()),
            _ => {}
        }
        let mut key = String::new();
        for (_, c) in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {key:?} has no quoted value"));
        }
        let mut value = String::new();
        let mut closed = false;
        while let Some((_, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => {
                    closed = true;
                    break;
                }
                other => value.push(other),
            }
        }
        if !closed {
            return Err(format!("label {key:?} has an unterminated value"));
        }
        labels.push((key.trim().to_owned(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP trellis_gateway_upstream_requests Requests forwarded.
# TYPE trellis_gateway_upstream_requests counter
trellis_gateway_upstream_requests_total{service="users",version="1.2.0",status="2xx"} 88
trellis_gateway_upstream_requests_total{service="users",version="1.2.0",status="4xx"} 2
trellis_gateway_upstream_requests_total{service="users",version="1.2.0",status="5xx"} 7
trellis_gateway_upstream_requests_total{service="users",version="1.2.0",status="error"} 2
trellis_gateway_upstream_requests_total{service="users",version="1.2.0",status="timeout"} 1
trellis_gateway_upstream_requests_total{service="users",version="1.1.0",status="500"} 7
trellis_gateway_upstream_requests_total{service="orders",version="1.2.0",status="500"} 3
trellis_gateway_upstream_request_duration_seconds_bucket{service="users",version="1.2.0",le="0.01"} 50
trellis_gateway_upstream_request_duration_seconds_bucket{service="users",version="1.2.0",le="0.1"} 98
trellis_gateway_upstream_request_duration_seconds_bucket{service="users",version="1.2.0",le="+Inf"} 100
trellis_gateway_upstream_request_duration_seconds_sum{service="users",version="1.2.0"} 1.5
trellis_gateway_upstream_request_duration_seconds_count{service="users",version="1.2.0"} 100
trellis_gateway_requests_total{route="/api/*",service="users",status="200"} 1000
# EOF
"#;

    #[test]
    fn reads_one_version_of_one_service() {
        let sample = parse_exposition(TEXT, "users", "1.2.0").unwrap();
        assert_eq!(sample.requests, 100);
        assert_eq!(sample.errors, 10);
        assert_eq!(
            sample.buckets,
            vec![(0.01, 50), (0.1, 98), (f64::INFINITY, 100)]
        );
        let old = parse_exposition(TEXT, "users", "1.1.0").unwrap();
        assert_eq!((old.requests, old.errors), (7, 7));
        assert!(old.buckets.is_empty());
        let none = parse_exposition(TEXT, "users", "9.9.9").unwrap();
        assert_eq!(none, VersionSample::default());
    }

    #[test]
    fn malformed_lines_of_the_families_are_errors_naming_the_line() {
        let bad = "trellis_gateway_upstream_requests_total{service=\"users\",version=\"1\" 5\n";
        assert!(
            parse_exposition(bad, "users", "1")
                .unwrap_err()
                .contains("line 1")
        );
        let bad =
            "x 1\ntrellis_gateway_upstream_requests_total{service=\"users\",version=\"1\"} abc\n";
        let err = parse_exposition(bad, "users", "1").unwrap_err();
        assert!(err.contains("line 2") && err.contains("value"), "{err}");
        // Other families may be anything.
        assert!(parse_exposition("other{{{ nonsense\n", "users", "1").is_ok());
    }

    #[test]
    fn escaped_label_values() {
        let text =
            r#"trellis_gateway_upstream_requests_total{service="a\"b",version="1",status="200"} 4"#;
        assert_eq!(parse_exposition(text, "a\"b", "1").unwrap().requests, 4);
    }

    #[test]
    fn quantile_interpolates_like_prometheus() {
        let buckets = [(0.1, 50), (0.2, 100), (f64::INFINITY, 100)];
        // rank 99 of 100 lies in (0.1, 0.2]: 0.1 + 0.1 * 49/50
        let p99 = histogram_quantile(0.99, &buckets).unwrap();
        assert!((p99 - 0.198).abs() < 1e-9, "{p99}");
        assert_eq!(histogram_quantile(0.5, &buckets), Some(0.1));
        // In the +Inf bucket: the highest finite bound.
        assert_eq!(
            histogram_quantile(0.99, &[(0.1, 1), (f64::INFINITY, 100)]),
            Some(0.1)
        );
        assert_eq!(histogram_quantile(0.99, &[]), None);
        assert_eq!(histogram_quantile(0.99, &[(f64::INFINITY, 0)]), None);
    }

    #[test]
    fn figures_are_differences_between_scrapes() {
        let before = VersionSample {
            requests: 100,
            errors: 1,
            buckets: vec![(0.01, 90), (0.1, 100), (f64::INFINITY, 100)],
        };
        let after = VersionSample {
            requests: 300,
            errors: 21,
            buckets: vec![(0.01, 90), (0.1, 110), (f64::INFINITY, 300)],
        };
        let figures = after.since(&before);
        assert_eq!(figures.requests, 200);
        assert_eq!(figures.errors, 20);
        assert_eq!(figures.error_rate, Some(0.1));
        // 190 of the 200 new requests took more than 100 ms: the p99 is the highest bound.
        assert_eq!(figures.p99, Some(Duration::from_millis(100)));
        assert_eq!(before.since(&before).error_rate, None);
        // A restarted gateway counts from zero.
        let restarted = VersionSample {
            requests: 5,
            errors: 0,
            buckets: vec![(0.01, 5), (f64::INFINITY, 5)],
        };
        assert_eq!(restarted.since(&after).requests, 5);
        let p99 = restarted.since(&after).p99.unwrap().as_secs_f64();
        assert!((p99 - 0.0099).abs() < 1e-6, "{p99}");
    }
}
