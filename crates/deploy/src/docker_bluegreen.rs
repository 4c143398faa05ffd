//! Blue-green on the docker platform: [`run_blue_green`] with containers instead of
//! processes. See [`DockerBackend`] for what each step does.

use std::sync::Mutex;
use std::time::Duration;

use trellis_registry::ServiceRegistry;

use crate::bluegreen::metrics::MetricsSource;
use crate::bluegreen::{
    BlueGreenOptions, BlueGreenReport, Decision, GreenPlatform, Started, missing_spec,
    run_blue_green,
};
use crate::docker::{DockerBackend, DockerContainer};
use crate::error::DeployError;
use crate::local::ReplicaStatus;
use crate::spec::{DeploySpec, Platform};

const WEIGHT: &str = "weight";

/// One version's containers: `(name, id)` pairs, sorted by name.
pub(crate) struct Containers {
    version: String,
    containers: Vec<(String, String)>,
}

/// One service on the docker backend with the registry it registers in, for one blue-green
/// deployment.
struct DockerService<'a> {
    backend: &'a DockerBackend,
    name: &'a str,
    registry: ServiceRegistry,
    /// Green's replicas as last inspected.
    latest: Mutex<Vec<ReplicaStatus>>,
}

impl DockerService<'_> {
    /// Sets each replica's registration, health and weight as the registry sees them.
    fn annotate(&self, replicas: &mut [ReplicaStatus]) {
        let found = self.registry.discover(self.name);
        for replica in replicas {
            let record = found.iter().find(|r| r.instance.id == replica.instance_id);
            replica.registered = record.is_some();
            replica.health = record.map(|r| r.status);
            replica.weight = record
                .and_then(|r| r.instance.metadata.get(WEIGHT))
                .and_then(|w| w.parse().ok());
        }
    }
}

impl GreenPlatform for DockerService<'_> {
    type Version = Containers;

    fn service(&self) -> &str {
        self.name
    }

    fn platform(&self) -> Platform {
        Platform::Docker
    }

    async fn version(&self, version: &str) -> Result<Option<Self::Version>, DeployError> {
        let deployer = &self.backend.deployer;
        let containers = deployer.containers(self.name, Some(version)).await?;
        Ok((!containers.is_empty()).then(|| Containers {
            version: version.to_owned(),
            containers,
        }))
    }

    async fn running_versions(&self) -> Result<Vec<String>, DeployError> {
        let replicas = self.backend.replicas(self.name).await?;
        let versions: std::collections::BTreeSet<String> =
            replicas.into_iter().map(|r| r.version).collect();
        Ok(versions.into_iter().collect())
    }

    fn spec_of<'v>(&self, _version: &'v Self::Version) -> Option<&'v DeploySpec> {
        None
    }

    fn replica_count(&self, version: &Self::Version) -> usize {
        version.containers.len()
    }

    async fn start(&self, version: &str, spec: &DeploySpec, weight: u32) -> Started<Containers> {
        let options = DockerBackend::weighted(&self.backend.options, version, weight);
        let deployed = self
            .backend
            .deployer
            .deploy(self.name, spec, &options)
            .await;
        Ok(deployed.map(|green| Containers {
            version: version.to_owned(),
            containers: green
                .containers
                .into_iter()
                .map(|c: DockerContainer| (c.name, c.id))
                .collect(),
        }))
    }

    fn started(&self, green: &Self::Version, after: Duration) -> String {
        let names: Vec<&str> = green.containers.iter().map(|(n, _)| n.as_str()).collect();
        format!(
            "{} green container(s) healthy and registered after {after:?}: {}",
            names.len(),
            names.join(", ")
        )
    }

    /// Re-registers every registered instance of the version with the rest of its
    /// registration unchanged.
    async fn set_weight(
        &self,
        version: &Containers,
        weight: Option<u32>,
    ) -> Result<(), DeployError> {
        let found = self.registry.discover(self.name);
        let instances = found
            .iter()
            .filter(|r| r.instance.version == version.version);
        for record in instances {
            let mut instance = record.instance.clone();
            match weight {
                Some(w) => {
                    instance.metadata.insert(WEIGHT.to_owned(), w.to_string());
                }
                None => {
                    instance.metadata.remove(WEIGHT);
                }
            }
            let id = instance.id.clone();
            let registered = self.registry.register(self.name, instance).await;
            registered.map_err(|e| DeployError::Registry {
                instance: id,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Inspects the version's containers.
    async fn refresh(&self, version: &Self::Version) -> Result<(), DeployError> {
        let mut replicas = self.backend.replicas(self.name).await?;
        replicas.retain(|r| r.version == version.version);
        self.annotate(&mut replicas);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = replicas;
        Ok(())
    }

    fn replicas_of(&self, _version: &Self::Version) -> Vec<ReplicaStatus> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Deregisters the version's containers (as listed now), waits the backend's drain,
    /// then stops and removes them.
    async fn retire(&self, version: &Self::Version) -> Result<(), DeployError> {
        let name = self.name;
        let deployer = &self.backend.deployer;
        let containers = deployer.containers(name, Some(&version.version)).await?;
        for (container, _) in &containers {
            let deregistered = self.registry.deregister(name, container).await;
            deregistered.map_err(|e| DeployError::Registry {
                instance: container.clone(),
                reason: e.to_string(),
            })?;
        }
        tokio::time::sleep(self.backend.options.drain).await;
        deployer.remove_listed(name, containers).await?;
        Ok(())
    }

    fn retired(&self) -> &'static str {
        "removed"
    }

    fn retired_count(&self, version: &Self::Version) -> String {
        format!(" ({} containers)", version.containers.len())
    }

    async fn report(&self, _only: Option<&Self::Version>) -> Vec<ReplicaStatus> {
        let mut replicas = self.backend.replicas(self.name).await.unwrap_or_default();
        self.annotate(&mut replicas);
        replicas
    }
}

/// Runs a blue-green deployment of `name` on the docker backend.
pub(crate) async fn run(
    backend: &DockerBackend,
    name: &str,
    options: &BlueGreenOptions,
    source: Option<&dyn MetricsSource>,
    sink: &(dyn Fn(&Decision) + Send + Sync),
) -> Result<BlueGreenReport, DeployError> {
    options.validate_for(name, Platform::Docker)?;
    if options.spec.is_none() {
        // Checked before anything else: the backend keeps no spec of blue.
        return Err(missing_spec(name, Platform::Docker));
    }
    let Some(registry) = backend.deployer.registry.clone() else {
        return Err(DeployError::PlatformUnavailable {
            platform: Platform::Docker.to_string(),
            reason: "blue-green needs a backend that registers its containers (the gateway \
                     splits traffic through the registry)"
                .to_owned(),
        });
    };
    let service = DockerService {
        backend,
        name,
        registry,
        latest: Mutex::new(Vec::new()),
    };
    run_blue_green(&service, source, options, sink).await
}
