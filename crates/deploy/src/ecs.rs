//! AWS ECS definitions rendered from a spec (feature `ecs`): the `RegisterTaskDefinition`
//! and `CreateService` request bodies, as `trellis deploy --platform ecs --dry-run` prints
//! them, plus the credential check that runs before anything is sent.
//!
//! Sizes: Kubernetes quantities become ECS units — CPU in units of 1/1024 vCPU (`"500m"` →
//! 512, rounded up), memory in MiB (rounded up). With the Fargate launch type (the default)
//! the task-level size is the smallest Fargate size that holds the container; a spec larger
//! than Fargate's biggest task is rejected, naming the key.
//!
//! The health check is the container's `healthCheck` (`CMD-SHELL wget … || exit 1`, which
//! busybox- and alpine-based images can run), from `health_check`.
//!
//! Sending the requests needs AWS credentials; [`EcsCredentials::discover`] looks where the
//! AWS SDKs look (environment, shared files, web identity, container endpoint) and fails
//! with [`DeployError::Ecs`] naming each place when there are none — nothing is sent then.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::error::{DeployError, FieldError};
use crate::image::{ImageReference, Registry};
use crate::quantity::Quantity;
use crate::spec::{DeploySpec, Platform, check_label_value};

/// How ECS runs the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LaunchType {
    /// Serverless: `awsvpc` networking, task-level cpu and memory from Fargate's sizes.
    #[default]
    Fargate,
    /// On the cluster's EC2 instances: `bridge` networking, container-level sizes only.
    Ec2,
}

impl LaunchType {
    fn as_str(self) -> &'static str {
        match self {
            LaunchType::Fargate => "FARGATE",
            LaunchType::Ec2 => "EC2",
        }
    }
}

/// Deployer-level settings, built with the methods below.
#[derive(Debug, Clone, Default)]
pub struct EcsOptions {
    registry: Option<String>,
    version: Option<String>,
    cluster: Option<String>,
    launch_type: LaunchType,
    execution_role_arn: Option<String>,
    subnets: Vec<String>,
    security_groups: Vec<String>,
}

impl EcsOptions {
    /// Options with every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registry put in front of images that name none (an ECR repository:
    /// `123456789012.dkr.ecr.eu-west-1.amazonaws.com`). Defaults to none.
    #[must_use]
    pub fn registry(mut self, registry: impl Into<String>) -> Self {
        self.registry = Some(registry.into());
        self
    }

    /// Version of this release: the `trellis.version` tag. Defaults to the image's tag,
    /// else `latest`.
    #[must_use]
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// The cluster the service runs in. Defaults to none (the account's `default` cluster).
    #[must_use]
    pub fn cluster(mut self, cluster: impl Into<String>) -> Self {
        self.cluster = Some(cluster.into());
        self
    }

    /// Fargate or EC2. Defaults to Fargate.
    #[must_use]
    pub fn launch_type(mut self, launch_type: LaunchType) -> Self {
        self.launch_type = launch_type;
        self
    }

    /// The task execution role (pulls from ECR, writes logs). Defaults to none.
    #[must_use]
    pub fn execution_role_arn(mut self, arn: impl Into<String>) -> Self {
        self.execution_role_arn = Some(arn.into());
        self
    }

    /// Subnets for `awsvpc` networking (Fargate needs at least one to create the
    /// service; rendering works without). Defaults to none.
    #[must_use]
    pub fn subnets(mut self, subnets: Vec<String>) -> Self {
        self.subnets = subnets;
        self
    }

    /// Security groups for `awsvpc` networking. Defaults to none (the VPC's default).
    #[must_use]
    pub fn security_groups(mut self, groups: Vec<String>) -> Self {
        self.security_groups = groups;
        self
    }
}

/// The two request bodies.
#[derive(Debug, Clone, PartialEq)]
pub struct EcsDefinitions {
    /// `RegisterTaskDefinition` input.
    pub task_definition: Value,
    /// `CreateService` input (its `taskDefinition` names the family; ECS takes the latest
    /// revision).
    pub service: Value,
}

impl EcsDefinitions {
    /// Both as one pretty-printed JSON object `{"taskDefinition": …, "service": …}`.
    pub fn to_json(&self) -> Result<String, DeployError> {
        serde_json::to_string_pretty(&json!({
            "taskDefinition": self.task_definition,
            "service": self.service,
        }))
        .map_err(|e| DeployError::Emit(e.to_string()))
    }
}

/// Fargate's task sizes: CPU units and, for each, the memory choices in MiB.
fn fargate_memory_choices(cpu: u64) -> Vec<u64> {
    let gib = |from: u64, to: u64, step: u64| (from..=to).step_by(step as usize).map(|g| g * 1024);
    match cpu {
        256 => vec![512, 1024, 2048],
        512 => gib(1, 4, 1).collect(),
        1024 => gib(2, 8, 1).collect(),
        2048 => gib(4, 16, 1).collect(),
        4096 => gib(8, 30, 1).collect(),
        8192 => gib(16, 60, 4).collect(),
        16384 => gib(32, 120, 8).collect(),
        _ => Vec::new(),
    }
}

const FARGATE_CPU: [u64; 7] = [256, 512, 1024, 2048, 4096, 8192, 16384];

/// The smallest Fargate size with at least `cpu` units and `memory` MiB.
fn fargate_size(cpu: u64, memory: u64) -> Option<(u64, u64)> {
    FARGATE_CPU.iter().filter(|c| **c >= cpu).find_map(|c| {
        fargate_memory_choices(*c)
            .into_iter()
            .find(|m| *m >= memory)
            .map(|m| (*c, m))
    })
}

/// CPU units (1/1024 vCPU) for a quantity of cores, rounded up.
fn cpu_units(q: &Quantity) -> u64 {
    let milli = u128::try_from(q.milli_value()).unwrap_or_default();
    u64::try_from((milli * 1024).div_ceil(1000)).unwrap_or(u64::MAX)
}

/// MiB for a quantity of bytes, rounded up.
fn mebibytes(q: &Quantity) -> u64 {
    let bytes = u128::try_from(q.milli_value() / 1000).unwrap_or_default();
    u64::try_from(bytes.div_ceil(1024 * 1024)).unwrap_or(u64::MAX)
}

/// Renders the task and service definitions for `name`, validating the spec (for the ecs
/// platform) and the options first; nothing is rendered from invalid input.
///
/// ```
/// use trellis_deploy::{DeploySpec, EcsOptions, render_ecs};
///
/// let spec = DeploySpec::from_toml(r#"
///     image = "user-service:1.2.0"
///     replicas = 3
///     [resources]
///     cpu = "500m"
///     memory = "1Gi"
/// "#)?;
/// let defs = render_ecs("user-service", &spec, &EcsOptions::new().cluster("production"))?;
/// assert_eq!(defs.task_definition["containerDefinitions"][0]["cpu"], 512);
/// assert_eq!(defs.task_definition["memory"], "1024");
/// assert_eq!(defs.service["desiredCount"], 3);
/// # Ok::<(), trellis_deploy::DeployError>(())
/// ```
pub fn render_ecs(
    name: &str,
    spec: &DeploySpec,
    options: &EcsOptions,
) -> Result<EcsDefinitions, DeployError> {
    spec.validate(name, Platform::Ecs)?;
    let mut errors = Vec::new();
    let mut fail = |field: &str, reason: String| {
        errors.push(FieldError {
            field: field.to_owned(),
            reason,
        })
    };
    let registry = match options.registry.as_deref().map(Registry::parse) {
        Some(Err(reason)) => {
            fail("registry", reason);
            None
        }
        Some(Ok(registry)) => Some(registry),
        None => None,
    };
    if let Some(version) = &options.version
        && let Err(reason) = check_label_value(version)
    {
        fail("version", reason);
    }
    let image = match ImageReference::parse(spec.image.as_deref().unwrap_or_default()) {
        Ok(image) => Some(image),
        Err(reason) => {
            fail("image", reason);
            None
        }
    };
    let cpu = match spec.resources.cpu.as_deref().map(Quantity::parse) {
        Some(Ok(q)) => Some(cpu_units(&q)),
        Some(Err(reason)) => {
            fail("resources.cpu", reason);
            None
        }
        None => None,
    };
    let memory = match spec.resources.memory.as_deref().map(Quantity::parse) {
        Some(Ok(q)) => Some(mebibytes(&q)),
        Some(Err(reason)) => {
            fail("resources.memory", reason);
            None
        }
        None => None,
    };
    if options.launch_type == LaunchType::Ec2 && memory.is_none() {
        fail(
            "resources.memory",
            "missing; ECS on EC2 needs a memory size per container, such as memory = \"512Mi\""
                .to_owned(),
        );
    }
    let task_size = match options.launch_type {
        LaunchType::Fargate => {
            let (want_cpu, want_memory) = (cpu.unwrap_or(256), memory.unwrap_or(512));
            match fargate_size(want_cpu, want_memory) {
                Some(size) => Some(size),
                None => {
                    fail(
                        if want_cpu > 16384 {
                            "resources.cpu"
                        } else {
                            "resources.memory"
                        },
                        format!(
                            "{want_cpu} CPU units with {want_memory} MiB is larger than any Fargate task (at most 16 vCPU and 120 GiB)"
                        ),
                    );
                    None
                }
            }
        }
        LaunchType::Ec2 => None,
    };
    let Some(image) = image else {
        return Err(DeployError::Invalid {
            name: name.to_owned(),
            errors,
        });
    };
    if !errors.is_empty() {
        return Err(DeployError::Invalid {
            name: name.to_owned(),
            errors,
        });
    }
    let image = match &registry {
        Some(registry) => image.with_registry(registry),
        None => image,
    };
    let version = options
        .version
        .clone()
        .or_else(|| image.tag.clone())
        .unwrap_or_else(|| "latest".to_owned());

    let mut container = json!({
        "name": name,
        "image": image.to_string(),
        "essential": true,
        "environment": spec.environment.iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect::<Vec<_>>(),
    });
    if let Some(cpu) = cpu {
        container["cpu"] = json!(cpu);
    }
    if let Some(memory) = memory {
        container["memory"] = json!(memory);
    }
    if let Some(command) = &spec.command {
        container["entryPoint"] = json!(command);
    }
    if let Some(port) = spec.service_port() {
        let host_port = match options.launch_type {
            // awsvpc: the host port must equal the container port.
            LaunchType::Fargate => port,
            // bridge: 0 lets ECS pick a free host port per task.
            LaunchType::Ec2 => 0,
        };
        container["portMappings"] = json!([{
            "name": "http",
            "containerPort": port,
            "hostPort": host_port,
            "protocol": "tcp",
            "appProtocol": "http",
        }]);
    }
    if let Some(check) = &spec.health_check {
        container["healthCheck"] = json!({
            "command": [
                "CMD-SHELL",
                format!("wget -q -O /dev/null http://127.0.0.1:{}{} || exit 1", check.port, check.readiness()),
            ],
            "interval": 10,
            "timeout": 2,
            "retries": 3,
            "startPeriod": 10,
        });
    }
    let tags = json!([
        {"key": "trellis.service", "value": name},
        {"key": "trellis.version", "value": version},
    ]);
    let mut task = json!({
        "family": name,
        "requiresCompatibilities": [options.launch_type.as_str()],
        "networkMode": match options.launch_type {
            LaunchType::Fargate => "awsvpc",
            LaunchType::Ec2 => "bridge",
        },
        "containerDefinitions": [container],
        "tags": tags,
    });
    if let Some((cpu, memory)) = task_size {
        // Task-level sizes are strings in the API.
        task["cpu"] = json!(cpu.to_string());
        task["memory"] = json!(memory.to_string());
    }
    if let Some(arn) = &options.execution_role_arn {
        task["executionRoleArn"] = json!(arn);
    }
    let mut service = json!({
        "serviceName": name,
        "taskDefinition": name,
        "desiredCount": spec.replicas,
        "launchType": options.launch_type.as_str(),
        "deploymentConfiguration": {
            "minimumHealthyPercent": 100,
            "maximumPercent": 200,
            "deploymentCircuitBreaker": {"enable": true, "rollback": true},
        },
        "propagateTags": "SERVICE",
        "enableECSManagedTags": true,
        "tags": tags,
    });
    if let Some(cluster) = &options.cluster {
        service["cluster"] = json!(cluster);
    }
    if options.launch_type == LaunchType::Fargate {
        service["networkConfiguration"] = json!({
            "awsvpcConfiguration": {
                "subnets": options.subnets,
                "securityGroups": options.security_groups,
                "assignPublicIp": "DISABLED",
            }
        });
    }
    Ok(EcsDefinitions {
        task_definition: task,
        service,
    })
}

/// Where AWS credentials were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EcsCredentials {
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` in the environment.
    Environment,
    /// A profile in the shared credentials or config file.
    SharedFile {
        /// The file.
        path: PathBuf,
        /// The profile (`AWS_PROFILE`, else `default`).
        profile: String,
    },
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN` (EKS service accounts).
    WebIdentity,
    /// The ECS/EKS container credentials endpoint
    /// (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or `_FULL_URI`).
    ContainerEndpoint,
}

impl EcsCredentials {
    /// Looks where the AWS SDKs look, reading the environment through `env` (so tests can
    /// pass their own) and the shared files under `home`. Fails with [`DeployError::Ecs`]
    /// naming every place looked at when none has credentials. (Instance metadata, the
    /// SDKs' last resort, is not probed: it is a network call.)
    pub fn discover(
        env: impl Fn(&str) -> Option<String>,
        home: Option<&Path>,
    ) -> Result<EcsCredentials, DeployError> {
        let set = |key: &str| env(key).is_some_and(|v| !v.trim().is_empty());
        if set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY") {
            return Ok(EcsCredentials::Environment);
        }
        if set("AWS_WEB_IDENTITY_TOKEN_FILE") && set("AWS_ROLE_ARN") {
            return Ok(EcsCredentials::WebIdentity);
        }
        if set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
            || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        {
            return Ok(EcsCredentials::ContainerEndpoint);
        }
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_owned());
        let files: Vec<PathBuf> = [
            env("AWS_SHARED_CREDENTIALS_FILE")
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".aws/credentials"))),
            env("AWS_CONFIG_FILE")
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".aws/config"))),
        ]
        .into_iter()
        .flatten()
        .collect();
        for path in &files {
            if let Ok(text) = std::fs::read_to_string(path)
                && profile_has_credentials(&text, &profile)
            {
                return Ok(EcsCredentials::SharedFile {
                    path: path.clone(),
                    profile,
                });
            }
        }
        Err(DeployError::Ecs {
            operation: "find AWS credentials".to_owned(),
            reason: format!(
                "none found, nothing was sent: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not set, \
                 nor AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, nor \
                 AWS_CONTAINER_CREDENTIALS_RELATIVE_URI/_FULL_URI, and profile {profile:?} has no \
                 keys in {}",
                if files.is_empty() {
                    "any shared file (no home directory)".to_owned()
                } else {
                    files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                }
            ),
        })
    }

    /// [`discover`](Self::discover) with the process environment and `$HOME`.
    pub fn from_process_env() -> Result<EcsCredentials, DeployError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Self::discover(|k| std::env::var(k).ok(), home.as_deref())
    }
}

/// Whether `[profile]` (credentials file) or `[profile name]` (config file) has an access
/// key, a credential process, SSO or a role to assume.
fn profile_has_credentials(text: &str, profile: &str) -> bool {
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            let section = section.strip_prefix("profile ").unwrap_or(section).trim();
            inside = section == profile;
            continue;
        }
        if inside
            && let Some((key, value)) = line.split_once('=')
            && !value.trim().is_empty()
            && matches!(
                key.trim(),
                "aws_access_key_id"
                    | "credential_process"
                    | "sso_session"
                    | "sso_start_url"
                    | "role_arn"
            )
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fargate_sizes() {
        assert_eq!(fargate_size(512, 1024), Some((512, 1024)));
        assert_eq!(fargate_size(300, 100), Some((512, 1024)));
        assert_eq!(fargate_size(256, 3000), Some((512, 3072)));
        assert_eq!(fargate_size(1024, 512), Some((1024, 2048)));
        assert_eq!(fargate_size(8192, 17000), Some((8192, 20480)));
        assert_eq!(fargate_size(20000, 1024), None);
        assert_eq!(fargate_size(256, 200 * 1024), None);
    }

    #[test]
    fn units() {
        let q = |t: &str| Quantity::parse(t).unwrap();
        assert_eq!(cpu_units(&q("500m")), 512);
        assert_eq!(cpu_units(&q("1")), 1024);
        assert_eq!(cpu_units(&q("250m")), 256);
        assert_eq!(cpu_units(&q("100m")), 103);
        assert_eq!(mebibytes(&q("1Gi")), 1024);
        assert_eq!(mebibytes(&q("1G")), 954);
        assert_eq!(mebibytes(&q("512Mi")), 512);
    }

    #[test]
    fn profiles() {
        let creds = "[default]\naws_access_key_id = AKIA\n[other]\nregion = x\n";
        assert!(profile_has_credentials(creds, "default"));
        assert!(!profile_has_credentials(creds, "other"));
        assert!(!profile_has_credentials(creds, "missing"));
        let config = "[profile dev]\nrole_arn = arn:aws:iam::1:role/x\n";
        assert!(profile_has_credentials(config, "dev"));
    }
}
