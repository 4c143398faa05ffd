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
//! It does not (yet) start, apply or supervise anything: the local supervisor, Kubernetes
//! server-side apply, the Docker Engine and ECS clients and blue-green switching build on
//! these types.
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
