//! # trellis-deploy-ecs
//!
//! Deploys services to AWS ECS through the AWS SDK: [`EcsDeployer::deploy`] registers the
//! task definition that [`trellis_deploy::render_ecs`] renders (`RegisterTaskDefinition`),
//! then creates the service on that revision (`CreateService`), or, when the service already
//! exists, updates it to the new revision and replica count (`UpdateService`).
//! [`EcsBackend`] is the same as a [`PlatformBackend`] for
//! [`ServiceDeployer`](trellis_deploy::ServiceDeployer) on [`Platform::Ecs`].
//!
//! It is a crate of its own so that only those who deploy to ECS compile the AWS SDK: a cold
//! debug build of its dependencies compiled 72 crates in 114 s of CPU (4½ minutes on 2 cores
//! shared with other builds); this crate alone rebuilds in about 4 s. It does not wait for
//! tasks to run — ECS starts them after `CreateService` returns, and replicas are reported from the
//! service's running count — and it does not create clusters, roles, subnets or load
//! balancers: those are named in [`EcsOptions`].
//!
//! Credentials: [`EcsDeployer::from_environment`] first checks with
//! [`EcsCredentials::from_process_env`] that the AWS SDK will find some, and fails with the
//! [`DeployError::Ecs`] naming every place looked at when none is found — nothing is sent
//! then. Every failed call is a [`DeployError::Ecs`] naming the operation and the object,
//! with AWS's error code and message.
//!
//! ```no_run
//! # async fn run() -> Result<(), trellis_deploy::DeployError> {
//! use trellis_deploy::{DeploySpec, EcsOptions};
//! use trellis_deploy_ecs::EcsDeployer;
//!
//! let spec = DeploySpec::from_toml(r#"
//!     image = "user-service:1.2.0"
//!     replicas = 3
//!     [health_check]
//!     path = "/health"
//!     port = 3000
//! "#)?;
//! let deployer = EcsDeployer::from_environment().await?;
//! let options = EcsOptions::new().cluster("production").subnets(vec!["subnet-0abc".into()]);
//! let deployed = deployer.deploy("user-service", &spec, &options).await?;
//! println!("{} on {}", deployed.service_arn, deployed.task_definition_arn);
//! # Ok(()) }
//! ```
//!
//! Rendering alone needs no credentials and no network:
//!
//! ```
//! use trellis_deploy::{DeploySpec, EcsOptions, render_ecs};
//!
//! let spec = DeploySpec::from_toml("image = \"shop:1.0.0\"\nreplicas = 2")?;
//! let definitions = render_ecs("shop", &spec, &EcsOptions::new())?;
//! let input = trellis_deploy_ecs::task_definition_input(&definitions.task_definition)?;
//! assert_eq!(input.family, "shop");
//! # Ok::<(), trellis_deploy::DeployError>(())
//! ```

mod input;

use std::fmt;

use aws_sdk_ecs::Client;
use aws_sdk_ecs::config::BehaviorVersion;
use aws_sdk_ecs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use trellis_deploy::{
    BoxFuture, DeployError, DeploySpec, EcsCredentials, EcsOptions, Platform, PlatformBackend,
    ReplicaPhase, ReplicaStatus, render_ecs,
};

pub use input::{TaskDefinitionInput, task_definition_input};

/// What [`EcsDeployer::deploy`] registered and started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcsDeployment {
    /// The service.
    pub service: String,
    /// The ARN of the task definition revision registered.
    pub task_definition_arn: String,
    /// Its revision number.
    pub revision: i32,
    /// The service's ARN.
    pub service_arn: String,
    /// True when the service was created, false when an existing one was updated.
    pub created: bool,
    /// Tasks asked for.
    pub desired_count: i32,
    /// Tasks running when ECS answered (usually 0 right after a create).
    pub running_count: i32,
}

/// Registers task definitions and creates or updates services through one ECS client.
#[derive(Clone)]
pub struct EcsDeployer {
    client: Client,
}

impl fmt::Debug for EcsDeployer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EcsDeployer").finish_non_exhaustive()
    }
}

impl EcsDeployer {
    /// A deployer on an existing client (tests point it at another endpoint with
    /// `aws_sdk_ecs::Config::builder().endpoint_url(…)`).
    pub fn new(client: Client) -> Self {
        EcsDeployer { client }
    }

    /// A deployer configured as the AWS SDKs configure themselves (environment, shared
    /// files, web identity, container endpoint; region from `AWS_REGION` or the profile).
    /// Fails without sending anything when [`EcsCredentials::from_process_env`] finds no
    /// credentials, or when no region is configured.
    pub async fn from_environment() -> Result<Self, DeployError> {
        EcsCredentials::from_process_env()?;
        let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
        if config.region().is_none() {
            return Err(DeployError::Ecs {
                operation: "find the AWS region".to_owned(),
                reason: "none configured, nothing was sent: set AWS_REGION (or region in the \
                         profile's config)"
                    .to_owned(),
            });
        }
        Ok(Self::new(Client::new(&config)))
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Renders `name` with [`render_ecs`] (a bad spec or options send nothing), registers
    /// the task definition, then creates the service on the new revision — or, when the
    /// service exists and is active in the cluster, updates it to that revision and the
    /// spec's replica count. Returns as soon as ECS accepted the service; tasks start after.
    pub async fn deploy(
        &self,
        name: &str,
        spec: &DeploySpec,
        options: &EcsOptions,
    ) -> Result<EcsDeployment, DeployError> {
        let definitions = render_ecs(name, spec, options)?;
        let task = task_definition_input(&definitions.task_definition)?;
        let service = input::ServiceInput::from_json(&definitions.service)?;
        let registered = task
            .send(&self.client)
            .await
            .map_err(|e| sdk_error(format!("RegisterTaskDefinition {name}"), e))?;
        let described = registered.task_definition();
        let task_definition_arn = described
            .and_then(|t| t.task_definition_arn())
            .ok_or_else(|| DeployError::Ecs {
                operation: format!("RegisterTaskDefinition {name}"),
                reason: "the answer has no taskDefinitionArn".to_owned(),
            })?
            .to_owned();
        let revision = described.map(|t| t.revision()).unwrap_or_default();
        tracing::info!(service = %name, arn = %task_definition_arn, "task definition registered");

        let existing = self
            .active_service(name, service.cluster.as_deref())
            .await?;
        let (answer, created) = if existing.is_some() {
            let updated = self
                .client
                .update_service()
                .set_cluster(service.cluster.clone())
                .service(name)
                .task_definition(&task_definition_arn)
                .desired_count(service.desired_count)
                .send()
                .await
                .map_err(|e| sdk_error(format!("UpdateService {name}"), e))?;
            (updated.service().cloned(), false)
        } else {
            let created = service
                .create(&self.client, &task_definition_arn)
                .send()
                .await
                .map_err(|e| sdk_error(format!("CreateService {name}"), e))?;
            (created.service().cloned(), true)
        };
        let answer = answer.ok_or_else(|| DeployError::Ecs {
            operation: format!(
                "{} {name}",
                if created {
                    "CreateService"
                } else {
                    "UpdateService"
                }
            ),
            reason: "the answer has no service".to_owned(),
        })?;
        tracing::info!(service = %name, created, "ecs service accepted");
        Ok(EcsDeployment {
            service: name.to_owned(),
            task_definition_arn,
            revision,
            service_arn: answer.service_arn().unwrap_or_default().to_owned(),
            created,
            desired_count: answer.desired_count(),
            running_count: answer.running_count(),
        })
    }

    /// The service `name` in `cluster` (the default cluster when none) if it exists and is
    /// not being deleted.
    pub async fn active_service(
        &self,
        name: &str,
        cluster: Option<&str>,
    ) -> Result<Option<aws_sdk_ecs::types::Service>, DeployError> {
        let answer = self
            .client
            .describe_services()
            .set_cluster(cluster.map(str::to_owned))
            .services(name)
            .send()
            .await
            .map_err(|e| sdk_error(format!("DescribeServices {name}"), e))?;
        Ok(answer
            .services()
            .iter()
            .find(|s| s.service_name() == Some(name) && s.status() == Some("ACTIVE"))
            .cloned())
    }

    /// Scales the service `name` to 0 and deletes it. Returns the service as ECS last
    /// described it, or [`DeployError::NotDeployed`] when there is no active service.
    pub async fn delete(
        &self,
        name: &str,
        cluster: Option<&str>,
    ) -> Result<aws_sdk_ecs::types::Service, DeployError> {
        let Some(service) = self.active_service(name, cluster).await? else {
            return Err(DeployError::NotDeployed {
                name: name.to_owned(),
                version: None,
            });
        };
        self.client
            .update_service()
            .set_cluster(cluster.map(str::to_owned))
            .service(name)
            .desired_count(0)
            .send()
            .await
            .map_err(|e| sdk_error(format!("UpdateService {name} to 0 tasks"), e))?;
        self.client
            .delete_service()
            .set_cluster(cluster.map(str::to_owned))
            .service(name)
            .send()
            .await
            .map_err(|e| sdk_error(format!("DeleteService {name}"), e))?;
        Ok(service)
    }
}

/// A failed SDK call as [`DeployError::Ecs`]: AWS's error code and message when it
/// answered, else the transport or build error with its causes.
fn sdk_error<E, R>(operation: String, error: SdkError<E, R>) -> DeployError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    let reason = match &error {
        SdkError::ServiceError(context) => {
            let err = context.err();
            match (err.code(), err.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_owned(),
                _ => DisplayErrorContext(&error).to_string(),
            }
        }
        _ => DisplayErrorContext(&error).to_string(),
    };
    DeployError::Ecs { operation, reason }
}

/// The ECS platform behind [`ServiceDeployer`](trellis_deploy::ServiceDeployer): deploy is
/// [`EcsDeployer::deploy`] with the version deployed (the `trellis.version` tag), undeploy
/// is [`EcsDeployer::delete`], status describes the service.
///
/// ECS places tasks itself: replicas are reported from the service's counts — replica `i`
/// is [`Running`](ReplicaPhase::Running) when `i` is below the running count, else
/// [`Starting`](ReplicaPhase::Starting); `instance_id` is `{service}-{revision}-{i}`,
/// `port` the spec's service port at deploy (0 in status, which has no spec) and `pid`
/// none. The deployer's namespace is not used: the cluster is [`EcsOptions::cluster`].
/// Instances are not put in a Trellis registry (ECS service discovery or a load balancer
/// is the discovery there).
#[derive(Debug, Clone)]
pub struct EcsBackend {
    deployer: EcsDeployer,
    options: EcsOptions,
    cluster: Option<String>,
}

impl EcsBackend {
    /// A backend deploying through `deployer` with `options` (whose version is replaced by
    /// the version deployed). `cluster` must be the cluster named in `options`, for
    /// status and undeploy.
    pub fn new(deployer: EcsDeployer, options: EcsOptions, cluster: Option<String>) -> Self {
        EcsBackend {
            deployer,
            options,
            cluster,
        }
    }

    /// The deployer.
    pub fn deployer(&self) -> &EcsDeployer {
        &self.deployer
    }
}

fn replicas(
    name: &str,
    version: &str,
    revision: i32,
    port: u16,
    desired: i32,
    running: i32,
    phase: Option<ReplicaPhase>,
) -> Vec<ReplicaStatus> {
    (0..u32::try_from(desired.max(0)).unwrap_or_default())
        .map(|index| ReplicaStatus {
            service: name.to_owned(),
            version: version.to_owned(),
            index,
            instance_id: format!("{name}-{revision}-{index}"),
            port,
            pid: None,
            phase: phase.unwrap_or(if i64::from(index) < i64::from(running) {
                ReplicaPhase::Running
            } else {
                ReplicaPhase::Starting
            }),
            restarts: 0,
            last_exit: None,
            registered: false,
            health: None,
            weight: None,
            started_at: None,
        })
        .collect()
}

/// The version tag, revision and counts of a service as ECS describes it.
fn described(service: &aws_sdk_ecs::types::Service) -> (String, i32, i32, i32) {
    let version = service
        .tags()
        .iter()
        .find(|t| t.key() == Some("trellis.version"))
        .and_then(|t| t.value())
        .unwrap_or("unversioned")
        .to_owned();
    let revision = service
        .task_definition()
        .and_then(|arn| arn.rsplit(':').next()?.parse().ok())
        .unwrap_or_default();
    (
        version,
        revision,
        service.desired_count(),
        service.running_count(),
    )
}

impl PlatformBackend for EcsBackend {
    fn platform(&self) -> Platform {
        Platform::Ecs
    }

    fn deploy<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
        _namespace: &'a str,
        spec: &'a DeploySpec,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>> {
        Box::pin(async move {
            let options = self.options.clone().version(version);
            let deployed = self.deployer.deploy(name, spec, &options).await?;
            let port = spec
                .service_port()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_default();
            Ok(replicas(
                name,
                version,
                deployed.revision,
                port,
                deployed.desired_count,
                deployed.running_count,
                None,
            ))
        })
    }

    fn undeploy<'a>(
        &'a self,
        name: &'a str,
        _namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>> {
        Box::pin(async move {
            let service = self.deployer.delete(name, self.cluster.as_deref()).await?;
            let (version, revision, desired, running) = described(&service);
            Ok(replicas(
                name,
                &version,
                revision,
                0,
                desired,
                running,
                Some(ReplicaPhase::Stopped),
            ))
        })
    }

    fn status<'a>(
        &'a self,
        name: &'a str,
        _namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaStatus>, DeployError>> {
        Box::pin(async move {
            let Some(service) = self
                .deployer
                .active_service(name, self.cluster.as_deref())
                .await?
            else {
                return Ok(Vec::new());
            };
            let (version, revision, desired, running) = described(&service);
            Ok(replicas(
                name, &version, revision, 0, desired, running, None,
            ))
        })
    }
}
