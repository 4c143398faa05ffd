//! The seed's deploy options as a TOML spec, and the validation that runs before anything is
//! started or applied.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use trellis_core::{NameKind, validate_name};

use crate::error::{DeployError, FieldError};
use crate::image::ImageReference;
use crate::quantity::Quantity;

/// Where a service is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Processes started and supervised by Trellis on this machine; needs `command`.
    Local,
    /// A Deployment and a Service in a Kubernetes cluster; needs `image`.
    Kubernetes,
    /// Containers through the Docker Engine API; needs `image`.
    Docker,
    /// An AWS ECS task and service; needs `image`.
    Ecs,
}

impl Platform {
    /// Every platform.
    pub const ALL: [Platform; 4] = [
        Platform::Local,
        Platform::Kubernetes,
        Platform::Docker,
        Platform::Ecs,
    ];

    /// The lower-case name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Local => "local",
            Platform::Kubernetes => "kubernetes",
            Platform::Docker => "docker",
            Platform::Ecs => "ecs",
        }
    }

    /// Whether the platform runs container images (all but `local`).
    pub fn runs_images(self) -> bool {
        self != Platform::Local
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Platform {
    type Err = DeployError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| DeployError::UnknownPlatform(s.to_owned()))
    }
}

/// CPU and memory for each replica, as Kubernetes quantities. Rendered as both the request
/// and the limit, so the pod gets the Guaranteed class when both are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores: `"500m"` (half a core), `"2"`. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory in bytes: `"512Mi"`, `"1Gi"`; must be a whole number of bytes. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// The HTTP endpoint that tells whether a replica is healthy (the seed's `healthCheck`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path answered with 2xx when healthy: `"/health"`. Must start with `/`.
    pub path: String,
    /// Port the endpoint listens on, 1 to 65535. Signed so that a bad value reaches
    /// validation, which names the key.
    pub port: i32,
    /// Path for the liveness probe, when it differs from `path` (Trellis services answer
    /// `/health/live`). Defaults to `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_path: Option<String>,
    /// Path for the readiness probe, when it differs from `path` (Trellis services answer
    /// `/health/ready`). Defaults to `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_path: Option<String>,
}

impl HealthCheck {
    /// The liveness probe's path.
    pub fn liveness(&self) -> &str {
        self.liveness_path.as_deref().unwrap_or(&self.path)
    }

    /// The readiness probe's path.
    pub fn readiness(&self) -> &str {
        self.readiness_path.as_deref().unwrap_or(&self.path)
    }
}

fn one() -> i32 {
    1
}

/// What to deploy, mirroring the seed's `deployer.deploy(name, {...})` options; read from the
/// TOML file of `trellis deploy NAME --spec FILE`:
///
/// ```toml
/// image = "user-service:1.2.0"
/// replicas = 3
/// namespace = "production"
/// [resources]
/// cpu = "500m"
/// memory = "1Gi"
/// [environment]
/// NODE_ENV = "production"
/// [health_check]
/// path = "/health"
/// port = 3000
/// ```
///
/// Counts and ports are signed so that `replicas = -1` or `port = 70000` reach
/// [`validate`](Self::validate), whose error names the key, instead of failing as a type
/// mismatch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    /// Container image: `user-service:1.2.0`, `registry.example.com/team/app@sha256:…`.
    /// Required on kubernetes, docker and ecs; a deployer's registry is put in front of an
    /// image that names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Program and arguments. Required on `local` (the process Trellis starts); on other
    /// platforms it replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Number of replicas, 0 or more. Defaults to 1.
    #[serde(default = "one")]
    pub replicas: i32,
    /// CPU and memory per replica.
    #[serde(default)]
    pub resources: Resources,
    /// Environment variables of every replica.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// The health endpoint, used for probes and health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Port the service serves on, 1 to 65535. Defaults to `health_check.port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// Kubernetes namespace. Defaults to the deployer's namespace, then `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Default for DeploySpec {
    fn default() -> Self {
        DeploySpec {
            image: None,
            command: None,
            replicas: 1,
            resources: Resources::default(),
            environment: BTreeMap::new(),
            health_check: None,
            port: None,
            namespace: None,
        }
    }
}

impl DeploySpec {
    /// Reads a spec file. Only parses: call [`validate`](Self::validate) (the renderers
    /// and deployers do) before using it.
    pub fn from_toml(text: &str) -> Result<DeploySpec, DeployError> {
        toml::from_str(text).map_err(|e| DeployError::Parse(e.to_string().trim_end().to_owned()))
    }

    /// The port the service serves on: `port`, else `health_check.port`.
    pub fn service_port(&self) -> Option<i32> {
        self.port
            .or_else(|| self.health_check.as_ref().map(|h| h.port))
    }

    /// Checks everything for `platform` before anything changes: the name, replicas,
    /// quantities, ports, image reference, command, environment names and namespace. Every
    /// problem is reported, each naming its key.
    pub fn validate(&self, name: &str, platform: Platform) -> Result<(), DeployError> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, reason: String| {
            errors.push(FieldError {
                field: field.to_owned(),
                reason,
            })
        };
        if let Err(reason) = check_service_name(name) {
            fail("name", reason);
        }
        match (&self.image, platform.runs_images()) {
            (Some(image), _) => {
                if let Err(reason) = ImageReference::parse(image) {
                    fail("image", reason);
                }
            }
            (None, true) => fail(
                "image",
                format!(
                    "missing; the {platform} platform runs a container image, such as image = \"{name}:1.0.0\""
                ),
            ),
            (None, false) => {}
        }
        match &self.command {
            Some(command) if command.first().is_none_or(|c| c.trim().is_empty()) => fail(
                "command",
                "is empty; give the program and its arguments, such as [\"./bin/app\", \"--port\", \"8080\"]".to_owned(),
            ),
            Some(command) => {
                if let Some(i) = command.iter().position(|a| a.contains('\0')) {
                    fail(&format!("command[{i}]"), "contains a NUL byte".to_owned());
                }
            }
            None if !platform.runs_images() => fail(
                "command",
                "missing; the local platform starts a process, such as command = [\"./bin/app\"]"
                    .to_owned(),
            ),
            None => {}
        }
        if self.replicas < 0 {
            fail(
                "replicas",
                format!("{} is negative; use 0 or more", self.replicas),
            );
        }
        if let Some(cpu) = &self.resources.cpu
            && let Err(reason) = check_quantity(cpu, false)
        {
            fail("resources.cpu", reason);
        }
        if let Some(memory) = &self.resources.memory
            && let Err(reason) = check_quantity(memory, true)
        {
            fail("resources.memory", reason);
        }
        for (key, value) in &self.environment {
            if let Err(reason) = check_env_name(key) {
                fail(&format!("environment.{key}"), reason);
            }
            if value.contains('\0') {
                fail(
                    &format!("environment.{key}"),
                    "value contains a NUL byte".to_owned(),
                );
            }
        }
        if let Some(health) = &self.health_check {
            for (field, path) in [
                ("health_check.path", Some(health.path.as_str())),
                (
                    "health_check.liveness_path",
                    health.liveness_path.as_deref(),
                ),
                (
                    "health_check.readiness_path",
                    health.readiness_path.as_deref(),
                ),
            ] {
                if let Some(path) = path
                    && let Err(reason) = check_http_path(path)
                {
                    fail(field, reason);
                }
            }
            if let Err(reason) = check_port(health.port) {
                fail("health_check.port", reason);
            }
        }
        if let Some(port) = self.port
            && let Err(reason) = check_port(port)
        {
            fail("port", reason);
        }
        if let Some(namespace) = &self.namespace
            && let Err(reason) = check_dns_label(namespace)
        {
            fail("namespace", reason);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DeployError::Invalid {
                name: name.to_owned(),
                errors,
            })
        }
    }
}

/// `memory` must also be whole bytes.
fn check_quantity(text: &str, bytes: bool) -> Result<Quantity, String> {
    let q = Quantity::parse(text)?;
    if q.milli_value() < 0 {
        return Err(format!("{text:?} is negative"));
    }
    if bytes && q.milli_value() % 1000 != 0 {
        return Err(format!(
            "{text:?} is not a whole number of bytes (\"m\" means thousandths); did you mean \"{}Mi\"?",
            text.trim_end_matches('m')
        ));
    }
    Ok(q)
}

pub(crate) fn check_port(port: i32) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("{port} is not a port; use 1 to 65535"))
    }
}

fn check_http_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("{path:?} contains {c:?}; percent-encode it"));
    }
    Ok(())
}

/// Kubernetes' rule for environment variable names (1.33): `[-._a-zA-Z][-._a-zA-Z0-9]*`.
fn check_env_name(name: &str) -> Result<(), String> {
    let ok_first = |c: char| c.is_ascii_alphabetic() || matches!(c, '-' | '.' | '_');
    let mut chars = name.chars();
    match chars.next() {
        None => Err("the name is empty".to_owned()),
        Some(c) if !ok_first(c) => Err(format!(
            "the name {name:?} must start with a letter, '_', '-' or '.'"
        )),
        _ => match chars.find(|c| !(ok_first(*c) || c.is_ascii_digit())) {
            Some(c) => Err(format!(
                "the name {name:?} contains {c:?}; use letters, digits, '_', '-' and '.'"
            )),
            None => Ok(()),
        },
    }
}

/// RFC 1123 label: namespaces and most object names.
pub(crate) fn check_dns_label(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 63 {
        return Err(format!(
            "{value:?} must be 1 to 63 characters (a DNS label)"
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{value:?} contains {c:?}; a DNS label has only lower-case letters, digits and '-'"
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(format!(
            "{value:?} must start and end with a letter or digit (a DNS label)"
        ));
    }
    Ok(())
}

/// A service name: Trellis' name rule, and a Kubernetes Service name (an RFC 1035 label:
/// a DNS label that starts with a letter).
pub(crate) fn check_service_name(name: &str) -> Result<(), String> {
    validate_name(NameKind::Service, name).map_err(|e| e.to_string())?;
    check_dns_label(name)?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!(
            "{name:?} must start with a letter (a Kubernetes Service name)"
        ));
    }
    Ok(())
}

/// A label value: at most 63 characters, letters, digits, '-', '_' and '.', starting and
/// ending with a letter or digit.
pub(crate) fn check_label_value(value: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if value.is_empty() || value.len() > 63 {
        return Err(format!(
            "{value:?} must be 1 to 63 characters (a label value)"
        ));
    }
    if !value.starts_with(alnum) || !value.ends_with(alnum) {
        return Err(format!(
            "{value:?} must start and end with a letter or digit (a label value)"
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(alnum(*c) || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{value:?} contains {c:?}; a label value has letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        for ok in ["A", "NODE_ENV", "a.b-c", "_x", "x1"] {
            assert_eq!(check_env_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1A", "A B", "A=B", "É"] {
            assert!(check_env_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(check_service_name("user-service").is_ok());
        assert!(
            check_service_name("9lives")
                .unwrap_err()
                .contains("start with a letter")
        );
        assert!(check_service_name("User").is_err());
        assert!(check_service_name("a.b").is_err());
        assert!(check_label_value("1.2.0").is_ok());
        assert!(check_label_value("v1+x").is_err());
        assert!(check_label_value(".x").is_err());
    }

    #[test]
    fn platforms() {
        for p in Platform::ALL {
            assert_eq!(p.as_str().parse::<Platform>().unwrap(), p);
        }
        assert!(matches!(
            "nomad".parse::<Platform>(),
            Err(DeployError::UnknownPlatform(_))
        ));
    }
}
