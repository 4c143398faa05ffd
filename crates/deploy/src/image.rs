//! Container image references: `[registry[:port]/]path[:tag][@digest]`, the grammar of the
//! OCI distribution reference that Docker, podman and the kubelet use.

use std::fmt;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// The registry host and port (`docker.io`, `localhost:5000`), when written.
    pub domain: Option<String>,
    /// The repository path (`myorg/user-service`).
    pub path: String,
    /// The tag (`1.2.0`), when written.
    pub tag: Option<String>,
    /// The digest (`sha256:…`), when written.
    pub digest: Option<String>,
}

const MAX_NAME: usize = 255;

impl ImageReference {
    /// Parses and checks every part; the error says which part is wrong and why.
    pub fn parse(text: &str) -> Result<ImageReference, String> {
        if text.is_empty() {
            return Err("is empty".to_owned());
        }
        if let Some(c) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{text:?} contains {c:?}"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                check_digest(digest).map_err(|e| format!("{text:?}: digest {digest:?} {e}"))?;
                (rest, Some(digest.to_owned()))
            }
            None => (text, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                check_tag(tag).map_err(|e| format!("{text:?}: tag {tag:?} {e}"))?;
                (&rest[..last_slash + i], Some(tag.to_owned()))
            }
            None => (rest, None),
        };
        if name.len() > MAX_NAME {
            return Err(format!(
                "{text:?}: the name is {} characters long; at most {MAX_NAME}",
                name.len()
            ));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                check_domain(first).map_err(|e| format!("{text:?}: registry {first:?} {e}"))?;
                (Some(first.to_owned()), path)
            }
            _ => (None, name),
        };
        check_path(path).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(ImageReference {
            domain,
            path: path.to_owned(),
            tag,
            digest,
        })
    }

    /// This reference with `registry` (`docker.io/myorg`) in front, unless it names its own
    /// registry already.
    pub fn with_registry(&self, registry: &Registry) -> ImageReference {
        if self.domain.is_some() {
            return self.clone();
        }
        let path = match &registry.path {
            Some(prefix) => format!("{prefix}/{}", self.path),
            None => self.path.clone(),
        };
        ImageReference {
            domain: Some(registry.domain.clone()),
            path,
            tag: self.tag.clone(),
            digest: self.digest.clone(),
        }
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(domain) = &self.domain {
            write!(f, "{domain}/")?;
        }
        f.write_str(&self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// A registry prefix for images written without one: `docker.io/myorg`, `localhost:5000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// Host and port.
    pub domain: String,
    /// Repository path prefix (`myorg`), if any.
    pub path: Option<String>,
}

impl Registry {
    /// Parses `host[:port][/path]`.
    pub fn parse(text: &str) -> Result<Registry, String> {
        let text = text.trim_end_matches('/');
        let (domain, path) = match text.split_once('/') {
            Some((domain, path)) => (domain, Some(path)),
            None => (text, None),
        };
        check_domain(domain).map_err(|e| format!("{text:?}: registry {domain:?} {e}"))?;
        if let Some(path) = path {
            check_path(path).map_err(|e| format!("{text:?}: {e}"))?;
        }
        Ok(Registry {
            domain: domain.to_owned(),
            path: path.map(str::to_owned),
        })
    }
}

fn check_domain(domain: &str) -> Result<(), String> {
    let (host, port) = if let Some(v6) = domain.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or("has an unclosed '[' around an IPv6 address")?;
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err("has a malformed IPv6 address".to_owned());
        }
        match after {
            "" => (None, None),
            p => (
                None,
                Some(
                    p.strip_prefix(':')
                        .ok_or("has text after the IPv6 address")?,
                ),
            ),
        }
    } else {
        match domain.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        for component in host.split('.') {
            let ok = !component.is_empty()
                && component
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !component.starts_with('-')
                && !component.ends_with('-');
            if !ok {
                return Err(format!(
                    "has the invalid host part {component:?}; use letters, digits and inner '-'"
                ));
            }
        }
    }
    if let Some(port) = port
        && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) || port.len() > 5)
    {
        return Err(format!("has the invalid port {port:?}"));
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), String> {
    for component in path.split('/') {
        if !path_component_ok(component) {
            return Err(format!(
                "repository path component {component:?} must be lower-case letters and \
                 digits, joined by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*`
fn path_component_ok(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    let first_ok = chars.next().is_some_and(word);
    if !first_ok || tag.len() > 128 || !chars.all(|c| word(c) || c == '.' || c == '-') {
        return Err(
            "must be 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
                .to_owned(),
        );
    }
    Ok(())
}

/// `algorithm:hex`, with sha256 and sha512 held to their exact lengths.
fn check_digest(digest: &str) -> Result<(), String> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or("must be ALGORITHM:HEX, such as sha256:<64 hex digits>")?;
    let algorithm_ok = !algorithm.is_empty()
        && algorithm.split(['+', '.', '_', '-']).all(|part| {
            part.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && part.chars().all(|c| c.is_ascii_alphanumeric())
        });
    if !algorithm_ok {
        return Err(format!("has the invalid algorithm {algorithm:?}"));
    }
    let want = match algorithm {
        "sha256" => Some(64),
        "sha512" => Some(128),
        _ => None,
    };
    let hex_ok = hex.chars().all(|c| c.is_ascii_hexdigit())
        && match want {
            Some(n) => hex.len() == n && !hex.chars().any(|c| c.is_ascii_uppercase()),
            None => hex.len() >= 32,
        };
    if !hex_ok {
        return Err(match want {
            Some(n) => format!("must have {n} lower-case hex digits after {algorithm}:"),
            None => "must have at least 32 hex digits after the algorithm".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_the_forms() {
        let r = ImageReference::parse("user-service:1.2.0").unwrap();
        assert_eq!(
            (r.domain.as_deref(), r.path.as_str(), r.tag.as_deref()),
            (None, "user-service", Some("1.2.0"))
        );
        let r = ImageReference::parse("localhost:5000/team/app").unwrap();
        assert_eq!(r.domain.as_deref(), Some("localhost:5000"));
        assert_eq!((r.path.as_str(), r.tag.as_deref()), ("team/app", None));
        let full = format!("registry.example.com:443/a/b.c__d-e:v1_2@{SHA}");
        let r = ImageReference::parse(&full).unwrap();
        assert_eq!(r.to_string(), full);
        assert_eq!(r.digest.as_deref(), Some(SHA));
        assert!(ImageReference::parse(&format!("app@{SHA}")).is_ok());
        assert!(ImageReference::parse("[::1]:5000/app:1").is_ok());
        assert!(
            ImageReference::parse("library/nginx")
                .unwrap()
                .domain
                .is_none()
        );
    }

    #[test]
    fn rejects_with_the_part() {
        let cases = [
            ("", "empty"),
            ("User", "path component \"User\""),
            ("a_-b/app", "path component \"a_-b\""),
            ("-h.io/app", "registry"),
            ("user/App", "path component \"App\""),
            ("app:", "tag \"\""),
            ("app:-x", "tag"),
            ("app@sha256:abc", "64 lower-case hex"),
            ("app@md5", "ALGORITHM:HEX"),
            ("a//b", "path component \"\""),
            ("a b", "' '"),
            ("host:port/app", "port"),
            ("app-", "path component"),
            ("a...b", "path component"),
        ];
        for (text, want) in cases {
            let err = ImageReference::parse(text).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
        assert!(ImageReference::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn registry_prefix() {
        let registry = Registry::parse("docker.io/myorg").unwrap();
        let image = ImageReference::parse("user-service:1.2.0").unwrap();
        assert_eq!(
            image.with_registry(&registry).to_string(),
            "docker.io/myorg/user-service:1.2.0"
        );
        let own = ImageReference::parse("quay.io/x/y:1").unwrap();
        assert_eq!(own.with_registry(&registry).to_string(), "quay.io/x/y:1");
        let bare = Registry::parse("localhost:5000").unwrap();
        assert_eq!(
            image.with_registry(&bare).to_string(),
            "localhost:5000/user-service:1.2.0"
        );
        assert!(Registry::parse("-bad/x").is_err());
        assert!(Registry::parse("docker.io/MyOrg").is_err());
    }
}
