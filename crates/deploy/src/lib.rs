//! # trellis-deploy
//!
//! The seed's deploy options as a validated [`DeploySpec`], and the Kubernetes manifests
//! rendered from it.
//!
//! - [`DeploySpec`]: image or command, replicas, resources {cpu, memory}, environment,
//!   health_check {path, port}, namespace — read from TOML with unknown keys rejected, and
//!   [validated](DeploySpec::validate) for a [`Platform`] before anything is started or
//!   applied: replicas ≥ 0, cpu and memory as Kubernetes [quantities](Quantity), ports 1 to
//!   65535, names as DNS labels, [image references](ImageReference). Every problem is
//!   reported at once, each naming its key.
//! - [`render_kubernetes`]: a `Deployment` (labels, replicas, image, environment, resources
//!   as requests and limits, liveness and readiness probes, service mesh injection from
//!   [`trellis_mesh`]) and a `Service`, as multi-document YAML — what
//!   `trellis deploy NAME --platform kubernetes --dry-run` prints.
//!
//! With the `local` feature (on by default) it also runs them: [`ServiceDeployer`] deploys,
//! reports on and undeploys services — on the local platform as child processes it
//! supervises (restart with backoff, SIGTERM then SIGKILL) and registers in the
//! [`ServiceRegistry`](trellis_registry::ServiceRegistry) once ready — and
//! [`blue_green_deploy`](ServiceDeployer::blue_green_deploy) starts a new version beside the
//! old, splits traffic through the instances' `weight` metadata (the gateway's `weighted`
//! balancer), judges it from the gateway's per-version metrics, and promotes or rolls back,
//! recording every [`Decision`] with its figures (see [`bluegreen`]). Given a store, the
//! deployer keeps a [`DeploymentRecord`] per service there at every state change, which
//! [`admin_router`] serves as `GET /v1/deployments` (see [`records`]).
//!
//! The other platforms plug into the same [`ServiceDeployer`] as a [`PlatformBackend`],
//! each behind its feature:
//!
//! - `kubernetes`: `KubernetesApplier` server-side applies the rendered manifests and
//!   follows the rollout; `KubernetesBackend` is its [`PlatformBackend`]. With `local` too,
//!   `KubernetesBlueGreen` runs blue-green on a cluster: a Service selector switch, or
//!   VirtualService weights between DestinationRule subsets when the mesh is Istio.
//! - `docker`: `DockerDeployer` runs one container per replica through the Docker Engine
//!   API (Docker or podman), waits until healthy and registers them; `DockerBackend` is
//!   its [`PlatformBackend`], blue-green included (green containers beside blue, the
//!   gateway's weighted routing, the same analysis as local).
//! - `ecs`: `render_ecs` renders the ECS task and service definitions and
//!   `EcsCredentials` finds AWS credentials. Sending them to AWS is the
//!   `trellis-deploy-ecs` crate, so that the AWS SDK is compiled only by those who use it.
//!
//! It is not a cluster scheduler: the local platform supervises processes on this machine
//! only, does not enforce cpu or memory, and blue-green runs on the local platform, docker
//! and Kubernetes only (not on ECS).
//!
//! ```
//! use trellis_deploy::{DeploySpec, KubernetesOptions, Platform, render_kubernetes};
//!
//! let spec = DeploySpec::from_toml(r#"
//!     image = "user-service:1.2.0"
//!     replicas = 3
//!     [resources]
//!     cpu = "500m"
//!     memory = "1024Mi"
//!     [environment]
//!     NODE_ENV = "production"
//!     [health_check]
//!     path = "/health"
//!     port = 3000
//! "#)?;
//! let options = KubernetesOptions::new().registry("docker.io/myorg").namespace("production");
//! let yaml = render_kubernetes("user-service", &spec, &options)?;
//! assert!(yaml.contains("image: docker.io/myorg/user-service:1.2.0"));
//! assert!(yaml.contains("memory: 1Gi")); // canonical, as the API server stores it
//! assert!(yaml.contains("kind: Service"));
//!
//! // A bad spec is rejected before anything is rendered, naming each key.
//! let bad = DeploySpec::from_toml("replicas = -1\n[resources]\nmemory = \"1Gx\"")?;
//! let err = bad.validate("user-service", Platform::Kubernetes).unwrap_err();
//! assert_eq!(err.fields(), ["image", "replicas", "resources.memory"]);
//! # Ok::<(), trellis_deploy::DeployError>(())
//! ```

mod error;
mod image;
mod kubernetes;
mod quantity;
mod spec;

pub use error::{DeployError, FieldError};
pub use image::{ImageReference, Registry};
pub use kubernetes::{KubernetesOptions, render_kubernetes};
pub use quantity::{Quantity, QuantityFormat};
pub use spec::{DeploySpec, HealthCheck, Platform, Resources};

#[cfg(feature = "kubernetes")]
pub mod kube_apply;
#[cfg(all(feature = "kubernetes", feature = "local"))]
pub use kube_apply::KubernetesBackend;
#[cfg(feature = "kubernetes")]
pub use kube_apply::{
    AppliedManifests, KubernetesApplier, KubernetesManifests, RolloutStatus, kubernetes_manifests,
};
#[cfg(all(feature = "kubernetes", feature = "local"))]
pub mod kube_bluegreen;
#[cfg(all(feature = "kubernetes", feature = "local"))]
pub use kube_bluegreen::{DeploymentAvailable, KubernetesBlueGreen, RolloutReadiness};
#[cfg(feature = "docker")]
pub mod docker;
#[cfg(all(feature = "docker", feature = "local"))]
pub use docker::DockerBackend;
#[cfg(all(feature = "docker", feature = "local"))]
mod docker_bluegreen;
#[cfg(feature = "docker")]
pub use docker::{
    DockerCall, DockerContainer, DockerDeployer, DockerDeployment, DockerOptions, render_docker,
    render_docker_json,
};
#[cfg(feature = "ecs")]
pub mod ecs;
#[cfg(feature = "ecs")]
pub use ecs::{EcsCredentials, EcsDefinitions, EcsOptions, LaunchType, render_ecs};

#[cfg(feature = "local")]
mod admin;
#[cfg(feature = "local")]
pub mod bluegreen;
#[cfg(feature = "local")]
mod deployer;
#[cfg(feature = "local")]
mod local;
#[cfg(feature = "local")]
pub mod records;
#[cfg(feature = "local")]
pub use admin::admin_router;
#[cfg(feature = "local")]
pub use bluegreen::metrics::{
    BoxFuture, Figures, MetricsSource, PrometheusScrape, VersionSample, parse_exposition,
};
#[cfg(feature = "local")]
pub use bluegreen::{
    Action, AnalysisOptions, BlueGreenOptions, BlueGreenReport, Decision, Outcome, TrafficSplit,
};
#[cfg(feature = "local")]
pub use deployer::{Deployment, PlatformBackend, ServiceDeployer, ServiceDeployerBuilder};
#[cfg(feature = "local")]
pub use local::{LocalOptions, LocalProcess, ReplicaPhase, ReplicaStatus, render_local};
#[cfg(feature = "local")]
pub use records::{
    DEPLOYMENTS_TABLE, DecisionRecord, DeploymentRecord, DeploymentRecords, DeploymentState,
    Strategy, TrafficShare,
};
