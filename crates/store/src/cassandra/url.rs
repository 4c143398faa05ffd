//! `cassandra://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/KEYSPACE[?OPTIONS]`, parsed and
//! validated in one place.

use std::fmt;
use std::time::Duration;

use scylla::statement::{Consistency, SerialConsistency};

use crate::error::{Result, StoreError};

/// Port used for a host given without one.
pub(crate) const DEFAULT_PORT: u16 = 9042;

/// How the keyspace is replicated when the store creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Replication {
    /// `SimpleStrategy` with this factor: one datacenter (`replication=3`).
    Simple(u32),
    /// `NetworkTopologyStrategy` with a factor per datacenter (`replication=dc1:3,dc2:2`).
    NetworkTopology(Vec<(String, u32)>),
}

impl Replication {
    /// The CQL map of `CREATE KEYSPACE … WITH replication = {…}`.
    pub(crate) fn to_cql(&self) -> String {
        match self {
            Replication::Simple(factor) => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {factor}}}")
            }
            Replication::NetworkTopology(dcs) => {
                let mut map = String::from("{'class': 'NetworkTopologyStrategy'");
                for (dc, factor) in dcs {
                    map.push_str(&format!(", '{dc}': {factor}"));
                }
                map.push('}');
                map
            }
        }
    }
}

/// Which of the driver's retry policies to use (`retry=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryChoice {
    /// `DefaultRetryPolicy`: retries what is safe to retry (the driver's default).
    Default,
    /// `FallthroughRetryPolicy`: never retries; every error reaches the caller.
    Never,
    /// `DowngradingConsistencyRetryPolicy`: retries at a lower consistency when too few
    /// replicas answered. Trades consistency for availability: read its documentation first.
    Downgrading,
}

/// Every knob of the backend, with its default.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct CassandraUrl {
    /// `host:port` contact points.
    pub(crate) hosts: Vec<String>,
    /// Keyspace holding the tables.
    pub(crate) keyspace: String,
    /// Username and password for `PasswordAuthenticator`.
    pub(crate) credentials: Option<(String, String)>,
    /// Replication of a keyspace the store creates. Defaults to `SimpleStrategy` factor 1.
    pub(crate) replication: Replication,
    /// Create the keyspace when it is missing. Defaults to true.
    pub(crate) create_keyspace: bool,
    /// Consistency of reads. Defaults to QUORUM.
    pub(crate) read_consistency: Consistency,
    /// Consistency of writes (the commit of lightweight transactions). Defaults to QUORUM.
    pub(crate) write_consistency: Consistency,
    /// Serial consistency of lightweight transactions. Defaults to SERIAL.
    pub(crate) serial_consistency: SerialConsistency,
    /// Datacenter preferred by the load balancer.
    pub(crate) local_dc: Option<String>,
    /// Client-side timeout of one request. Defaults to 10 s.
    pub(crate) request_timeout: Duration,
    /// Timeout of opening one connection. Defaults to 5 s.
    pub(crate) connect_timeout: Duration,
    /// Retry policy. Defaults to the driver's default policy.
    pub(crate) retry: RetryChoice,
    /// Speculative execution of idempotent statements (reads): how many extra attempts,
    /// and after how long. Defaults to none.
    pub(crate) speculative: Option<(usize, Duration)>,
    /// Connect with TLS.
    pub(crate) tls: bool,
    /// PEM file of the certificate authorities that signed the nodes' certificates; the
    /// system's trusted authorities when absent.
    pub(crate) tls_ca: Option<String>,
    /// Check that a node's certificate names the address connected to. Defaults to true.
    pub(crate) tls_verify_hostname: bool,
}

impl fmt::Debug for CassandraUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("CassandraUrl")
            .field("hosts", &self.hosts)
            .field("keyspace", &self.keyspace)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .field("replication", &self.replication)
            .field("create_keyspace", &self.create_keyspace)
            .field("read_consistency", &self.read_consistency)
            .field("write_consistency", &self.write_consistency)
            .field("serial_consistency", &self.serial_consistency)
            .field("local_dc", &self.local_dc)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("retry", &self.retry)
            .field("speculative", &self.speculative)
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("tls_verify_hostname", &self.tls_verify_hostname)
            .finish()
    }
}

/// The query parameters [`parse`] knows, for error messages.
const KNOWN: &str = "replication, create_keyspace, consistency, read_consistency, \
     write_consistency, serial_consistency, local_dc, request_timeout, connect_timeout, retry, \
     speculative, tls, tls_ca, tls_verify_hostname";

impl CassandraUrl {
    /// Hosts joined by commas, for messages and [`Store::location`](crate::Store::location).
    pub(crate) fn hosts_label(&self) -> String {
        self.hosts.join(",")
    }
}

/// Parses a `cassandra://` URL.
pub(crate) fn parse(url: &str) -> Result<CassandraUrl> {
    let bad = |reason: String| StoreError::InvalidUrl {
        url: redact(url),
        reason,
    };
    let rest = url.strip_prefix("cassandra://").ok_or_else(|| {
        bad("expected cassandra://[USER:PASSWORD@]HOST[:PORT][,HOST…]/KEYSPACE".into())
    })?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, keyspace) = rest.split_once('/').ok_or_else(|| {
        bad("no keyspace: expected cassandra://HOST[:PORT]/KEYSPACE, for example cassandra://127.0.0.1:9042/trellis".into())
    })?;
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = userinfo
                .split_once(':')
                .ok_or_else(|| bad("credentials must be USER:PASSWORD before the '@'".into()))?;
            let user = percent_decode(user).map_err(|e| bad(format!("user name: {e}")))?;
            let password = percent_decode(password).map_err(|e| bad(format!("password: {e}")))?;
            if user.is_empty() {
                return Err(bad("the user name before ':' is empty".into()));
            }
            (Some((user, password)), hosts)
        }
        None => (None, authority),
    };
    let hosts = parse_hosts(hosts).map_err(bad)?;
    validate_keyspace(keyspace).map_err(bad)?;
    let mut parsed = CassandraUrl {
        hosts,
        keyspace: keyspace.to_owned(),
        credentials,
        replication: Replication::Simple(1),
        create_keyspace: true,
        read_consistency: Consistency::Quorum,
        write_consistency: Consistency::Quorum,
        serial_consistency: SerialConsistency::Serial,
        local_dc: None,
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        retry: RetryChoice::Default,
        speculative: None,
        tls: false,
        tls_ca: None,
        tls_verify_hostname: true,
    };
    // `tls=false` given explicitly, to reject `tls=false&tls_ca=…`.
    let mut tls_refused = false;
    // A TLS-only option was given (`tls_ca`, `tls_verify_hostname`): it turns TLS on.
    let mut tls_option = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("query parameter {pair:?} has no value")))?;
        let value = percent_decode(value).map_err(|e| bad(format!("{key}: {e}")))?;
        let value = value.as_str();
        let field = |e: String| bad(format!("{key}: {e}"));
        match key {
            "replication" => parsed.replication = parse_replication(value).map_err(field)?,
            "create_keyspace" => parsed.create_keyspace = parse_bool(value).map_err(field)?,
            "consistency" => {
                let c = parse_consistency(value).map_err(field)?;
                parsed.read_consistency = c;
                parsed.write_consistency = c;
            }
            "read_consistency" => {
                parsed.read_consistency = parse_consistency(value).map_err(field)?
            }
            "write_consistency" => {
                parsed.write_consistency = parse_consistency(value).map_err(field)?
            }
            "serial_consistency" => {
                parsed.serial_consistency = match value.to_ascii_lowercase().as_str() {
                    "serial" => SerialConsistency::Serial,
                    "local_serial" => SerialConsistency::LocalSerial,
                    other => {
                        return Err(field(format!(
                            "{other:?} is neither serial nor local_serial"
                        )));
                    }
                }
            }
            "local_dc" => {
                if value.is_empty() {
                    return Err(field("the datacenter name is empty".into()));
                }
                parsed.local_dc = Some(value.to_owned());
            }
            "request_timeout" => parsed.request_timeout = parse_duration(value).map_err(field)?,
            "connect_timeout" => parsed.connect_timeout = parse_duration(value).map_err(field)?,
            "retry" => {
                parsed.retry = match value {
                    "default" => RetryChoice::Default,
                    "never" => RetryChoice::Never,
                    "downgrading" => RetryChoice::Downgrading,
                    other => {
                        return Err(field(format!(
                            "{other:?}: use default, never or downgrading"
                        )));
                    }
                }
            }
            "speculative" => {
                parsed.speculative = if value == "none" {
                    None
                } else {
                    Some(parse_speculative(value).map_err(field)?)
                }
            }
            "tls" => {
                parsed.tls = parse_bool(value).map_err(field)?;
                tls_refused = !parsed.tls;
            }
            "tls_ca" => {
                if value.is_empty() {
                    return Err(field("the path of the CA file is empty".into()));
                }
                parsed.tls_ca = Some(value.to_owned());
                tls_option = Some("tls_ca");
            }
            "tls_verify_hostname" => {
                parsed.tls_verify_hostname = parse_bool(value).map_err(field)?;
                tls_option = Some("tls_verify_hostname");
            }
            other => {
                return Err(bad(format!("unknown parameter {other:?}; known: {KNOWN}")));
            }
        }
    }
    if parsed.request_timeout.is_zero() || parsed.connect_timeout.is_zero() {
        return Err(bad("timeouts must be greater than zero".into()));
    }
    if let Some(option) = tls_option {
        if tls_refused {
            return Err(bad(format!(
                "{option} is a TLS option but tls=false; drop one of them"
            )));
        }
        parsed.tls = true;
    }
    Ok(parsed)
}

/// The URL with its password replaced by `***`, for error messages.
pub(crate) fn redact(url: &str) -> String {
    let Some(rest) = url.strip_prefix("cassandra://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("cassandra://{user}:***{}", &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

fn parse_hosts(hosts: &str) -> std::result::Result<Vec<String>, String> {
    if hosts.is_empty() {
        return Err("no host: expected at least one HOST[:PORT] before the keyspace".into());
    }
    hosts
        .split(',')
        .map(|host| {
            let host = host.trim();
            if host.is_empty() {
                return Err("empty host in the comma-separated host list".to_owned());
            }
            // [v6]:port, v6 alone, name:port, name.
            let (name, port) = if let Some(v6) = host.strip_prefix('[') {
                let (addr, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("host {host:?}: missing ']'"))?;
                let port = match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None if after.is_empty() => None,
                    None => return Err(format!("host {host:?}: unexpected {after:?} after ']'")),
                };
                (format!("[{addr}]"), port)
            } else {
                match host.rsplit_once(':') {
                    Some((name, port)) => (name.to_owned(), Some(port)),
                    None => (host.to_owned(), None),
                }
            };
            if name.is_empty() || name.contains(['/', '@', ' ']) {
                return Err(format!("host {host:?} is not a host name or address"));
            }
            let port = match port {
                Some(port) => port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("host {host:?}: port {port:?} is not 1-65535"))?,
                None => DEFAULT_PORT,
            };
            Ok(format!("{name}:{port}"))
        })
        .collect()
}

fn validate_keyspace(keyspace: &str) -> std::result::Result<(), String> {
    let ok = keyspace.len() <= 48
        && keyspace
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase())
        && keyspace
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else if keyspace.is_empty() {
        Err("the keyspace after '/' is empty".into())
    } else {
        Err(format!(
            "keyspace {keyspace:?}: use a lowercase letter then lowercase letters, digits or '_', at most 48 characters"
        ))
    }
}

fn parse_replication(value: &str) -> std::result::Result<Replication, String> {
    let factor = |text: &str| -> std::result::Result<u32, String> {
        text.parse::<u32>()
            .ok()
            .filter(|f| *f >= 1)
            .ok_or_else(|| format!("replication factor {text:?} is not a whole number ≥ 1"))
    };
    if !value.contains(':') {
        return Ok(Replication::Simple(factor(value)?));
    }
    let mut dcs = Vec::new();
    for part in value.split(',') {
        let (dc, f) = part.split_once(':').ok_or_else(|| {
            format!("{part:?}: expected DATACENTER:FACTOR, for example dc1:3,dc2:2")
        })?;
        if dc.is_empty()
            || !dc
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(format!("datacenter name {dc:?} is not valid"));
        }
        if dcs.iter().any(|(seen, _)| seen == dc) {
            return Err(format!("datacenter {dc:?} given twice"));
        }
        dcs.push((dc.to_owned(), factor(f)?));
    }
    Ok(Replication::NetworkTopology(dcs))
}

fn parse_consistency(value: &str) -> std::result::Result<Consistency, String> {
    Ok(match value.to_ascii_lowercase().as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        other => {
            return Err(format!(
                "{other:?}: use one, two, three, quorum, all, local_quorum, each_quorum, local_one or any"
            ));
        }
    })
}

fn parse_bool(value: &str) -> std::result::Result<bool, String> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(format!("{other:?} is neither true nor false")),
    }
}

/// `N:DELAY`, for example `2:50ms`.
fn parse_speculative(value: &str) -> std::result::Result<(usize, Duration), String> {
    let (count, delay) = value
        .split_once(':')
        .ok_or_else(|| format!("{value:?}: expected COUNT:DELAY, for example 2:50ms, or none"))?;
    let count = count
        .parse::<usize>()
        .ok()
        .filter(|c| (1..=8).contains(c))
        .ok_or_else(|| format!("{count:?}: the count of extra attempts must be 1 to 8"))?;
    Ok((count, parse_duration(delay)?))
}

/// `250ms`, `5s`, `1m` or a number of milliseconds.
pub(crate) fn parse_duration(value: &str) -> std::result::Result<Duration, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{value:?} is not a duration such as 500ms, 5s or 1m"))?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        _ => return Err(format!("{value:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Ok(Duration::from_millis(ms))
}

/// Decodes `%XX` escapes (for passwords holding `@`, `:` or `/`).
fn percent_decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a '%' is not followed by two hex digits".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-escapes do not decode to UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url() {
        let url = parse(
            "cassandra://app:p%40ss@10.0.0.1,10.0.0.2:9043,[::1]/shop?replication=dc1:3,dc2:2\
             &consistency=local_quorum&serial_consistency=local_serial&local_dc=dc1\
             &request_timeout=2s&retry=never&speculative=2:50ms&create_keyspace=false",
        )
        .expect("valid");
        assert_eq!(url.hosts, ["10.0.0.1:9042", "10.0.0.2:9043", "[::1]:9042"]);
        assert_eq!(url.keyspace, "shop");
        assert_eq!(url.credentials, Some(("app".into(), "p@ss".into())));
        assert_eq!(
            url.replication,
            Replication::NetworkTopology(vec![("dc1".into(), 3), ("dc2".into(), 2)])
        );
        assert_eq!(
            url.replication.to_cql(),
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"
        );
        assert_eq!(url.read_consistency, Consistency::LocalQuorum);
        assert_eq!(url.write_consistency, Consistency::LocalQuorum);
        assert_eq!(url.serial_consistency, SerialConsistency::LocalSerial);
        assert_eq!(url.local_dc.as_deref(), Some("dc1"));
        assert_eq!(url.request_timeout, Duration::from_secs(2));
        assert_eq!(url.retry, RetryChoice::Never);
        assert_eq!(url.speculative, Some((2, Duration::from_millis(50))));
        assert!(!url.create_keyspace);
        assert!(!format!("{url:?}").contains("p@ss"), "password in Debug");
    }

    #[test]
    fn defaults() {
        let url = parse("cassandra://127.0.0.1/trellis").expect("valid");
        assert_eq!(url.hosts, ["127.0.0.1:9042"]);
        assert_eq!(url.replication, Replication::Simple(1));
        assert_eq!(
            url.replication.to_cql(),
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
        assert!(url.create_keyspace && !url.tls && url.credentials.is_none());
        assert_eq!(url.read_consistency, Consistency::Quorum);
        assert_eq!(url.serial_consistency, SerialConsistency::Serial);
    }

    #[test]
    fn errors_name_the_problem() {
        for (url, needle) in [
            ("cassandra://127.0.0.1", "no keyspace"),
            ("cassandra:///ks", "no host"),
            ("cassandra://h:0/ks", "port \"0\""),
            ("cassandra://h:99999/ks", "port \"99999\""),
            ("cassandra://h,,g/ks", "empty host"),
            ("cassandra://h/", "keyspace after '/' is empty"),
            ("cassandra://h/Shop", "keyspace \"Shop\""),
            ("cassandra://h/ks?replication=0", "replication factor \"0\""),
            ("cassandra://h/ks?replication=dc1:3,dc1:2", "given twice"),
            ("cassandra://h/ks?consistency=most", "consistency: \"most\""),
            (
                "cassandra://h/ks?serial_consistency=quorum",
                "neither serial",
            ),
            ("cassandra://h/ks?request_timeout=soon", "request_timeout"),
            ("cassandra://h/ks?request_timeout=0s", "greater than zero"),
            ("cassandra://h/ks?retry=always", "retry"),
            ("cassandra://h/ks?speculative=9:1ms", "1 to 8"),
            (
                "cassandra://h/ks?colour=blue",
                "unknown parameter \"colour\"",
            ),
            ("cassandra://h/ks?tls", "has no value"),
            ("cassandra://user@h/ks", "USER:PASSWORD"),
        ] {
            let err = parse(url).expect_err(url).to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn tls_options() {
        let url = parse("cassandra://h/ks?tls=true").expect("valid");
        assert!(url.tls && url.tls_ca.is_none() && url.tls_verify_hostname);
        let url = parse("cassandra://h/ks?tls_ca=/etc/trellis/ca%20file.pem").expect("valid");
        assert!(url.tls, "tls_ca turns TLS on");
        assert_eq!(url.tls_ca.as_deref(), Some("/etc/trellis/ca file.pem"));
        let url = parse("cassandra://h/ks?tls=1&tls_ca=/ca.pem&tls_verify_hostname=false")
            .expect("valid");
        assert!(url.tls && !url.tls_verify_hostname);
        let url = parse("cassandra://h/ks?tls_verify_hostname=no").expect("valid");
        assert!(url.tls && !url.tls_verify_hostname);
        let url = parse("cassandra://h/ks?tls=false").expect("valid");
        assert!(!url.tls);
        for (url, needle) in [
            ("cassandra://h/ks?tls=maybe", "tls: \"maybe\""),
            ("cassandra://h/ks?tls_ca=", "CA file is empty"),
            (
                "cassandra://h/ks?tls_verify_hostname=off",
                "tls_verify_hostname",
            ),
            (
                "cassandra://h/ks?tls=false&tls_ca=/ca.pem",
                "tls_ca is a TLS option but tls=false",
            ),
            (
                "cassandra://h/ks?tls_verify_hostname=true&tls=false",
                "tls_verify_hostname is a TLS option but tls=false",
            ),
        ] {
            let err = parse(url).expect_err(url).to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn passwords_never_reach_messages() {
        let err = parse("cassandra://app:secret@h/ks?colour=blue")
            .expect_err("unknown parameter")
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(err.contains("app:***@h"), "{err}");
    }
}
