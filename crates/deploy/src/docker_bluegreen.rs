//! Blue-green on the docker platform: the steps of [`bluegreen`](crate::bluegreen) with
//! containers instead of processes. See [`DockerBackend`] for what each step does.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use trellis_registry::ServiceRegistry;

use crate::bluegreen::metrics::{Figures, MetricsSource};
use crate::bluegreen::{
    Action, BlueGreenOptions, BlueGreenReport, Decision, Outcome, Recorder, analyse, green_health,
    split_weights,
};
use crate::docker::{DockerBackend, DockerContainer};
use crate::error::{DeployError, FieldError};
use crate::local::ReplicaStatus;
use crate::spec::Platform;

const WEIGHT: &str = "weight";

/// Sets (or with `None` removes) the `weight` metadata of every registered instance of
/// `version`, re-registering each with the rest of its registration unchanged.
async fn set_weight(
    registry: &ServiceRegistry,
    name: &str,
    version: &str,
    weight: Option<u32>,
) -> Result<usize, DeployError> {
    let found = registry.discover(name);
    let instances: Vec<_> = found
        .iter()
        .filter(|r| r.instance.version == version)
        .map(|r| r.instance.clone())
        .collect();
    for mut instance in instances.iter().cloned() {
        match weight {
            Some(w) => {
                instance.metadata.insert(WEIGHT.to_owned(), w.to_string());
            }
            None => {
                instance.metadata.remove(WEIGHT);
            }
        }
        let id = instance.id.clone();
        registry
            .register(name, instance)
            .await
            .map_err(|e| DeployError::Registry {
                instance: id,
                reason: e.to_string(),
            })?;
    }
    Ok(instances.len())
}

/// Deregisters every instance of `name` at `version` (before its containers are removed).
async fn deregister(
    registry: &ServiceRegistry,
    name: &str,
    containers: &[(String, String)],
) -> Result<(), DeployError> {
    for (container, _) in containers {
        registry
            .deregister(name, container)
            .await
            .map_err(|e| DeployError::Registry {
                instance: container.clone(),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// The replicas of `version` with their registration and health as `registry` sees them.
async fn version_status(
    backend: &DockerBackend,
    registry: &ServiceRegistry,
    name: &str,
    version: &str,
) -> Result<Vec<ReplicaStatus>, DeployError> {
    let found = registry.discover(name);
    let mut replicas: Vec<ReplicaStatus> = backend
        .replicas(name)
        .await?
        .into_iter()
        .filter(|r| r.version == version)
        .collect();
    for replica in &mut replicas {
        let record = found.iter().find(|r| r.instance.id == replica.instance_id);
        replica.registered = record.is_some();
        replica.health = record.map(|r| r.status);
        replica.weight = record
            .and_then(|r| r.instance.metadata.get(WEIGHT))
            .and_then(|w| w.parse().ok());
    }
    Ok(replicas)
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
    let invalid = |field: &str, reason: &str| DeployError::Invalid {
        name: name.to_owned(),
        errors: vec![FieldError {
            field: field.to_owned(),
            reason: reason.to_owned(),
        }],
    };
    let Some(spec) = &options.spec else {
        return Err(invalid(
            "spec",
            "missing; blue-green on docker needs green's spec",
        ));
    };
    let Some(registry) = backend.deployer.registry.clone() else {
        return Err(DeployError::PlatformUnavailable {
            platform: Platform::Docker.to_string(),
            reason: "blue-green needs a backend that registers its containers (the gateway \
                     splits traffic through the registry)"
                .to_owned(),
        });
    };
    let current = options.current_version.as_str();
    let new = options.new_version.as_str();
    let deployer = &backend.deployer;
    let blue = deployer.containers(name, Some(current)).await?;
    if blue.is_empty() {
        let running: Vec<String> = backend
            .replicas(name)
            .await?
            .into_iter()
            .map(|r| r.version)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if running.is_empty() {
            return Err(DeployError::NotDeployed {
                name: name.to_owned(),
                version: Some(current.to_owned()),
            });
        }
        return Err(DeployError::VersionMismatch {
            name: name.to_owned(),
            expected: current.to_owned(),
            running,
        });
    }
    if !deployer.containers(name, Some(new)).await?.is_empty() {
        return Err(DeployError::AlreadyDeployed {
            name: name.to_owned(),
            version: new.to_owned(),
        });
    }
    let green_count = usize::try_from(spec.replicas).unwrap_or(0);
    let (blue_weight, green_weight) = split_weights(options.traffic_split, blue.len(), green_count);
    let mut recorder = Recorder::new(name, sink);
    let started = Instant::now();

    // 1. Blue's share first, so green never takes more than its own.
    set_weight(&registry, name, current, Some(blue_weight)).await?;
    // 2. Green, registered with its share from the start.
    let green_options = DockerBackend::weighted(&backend.options, new, green_weight);
    let green = match deployer.deploy(name, spec, &green_options).await {
        Ok(green) => green,
        Err(e) => {
            set_weight(&registry, name, current, None).await?;
            recorder.record(
                Action::Rollback,
                new,
                Figures::default(),
                format!("green did not start: {e}; blue keeps all of the traffic"),
            );
            return Ok(BlueGreenReport {
                service: name.to_owned(),
                current_version: current.to_owned(),
                new_version: new.to_owned(),
                outcome: Outcome::RolledBack,
                decisions: recorder.decisions,
                green_ready_after: None,
                analysis_took: Duration::ZERO,
                switch_took: None,
                replicas: backend.replicas(name).await.unwrap_or_default(),
            });
        }
    };
    let green_ready_after = started.elapsed();
    recorder.record(
        Action::Start,
        new,
        Figures::default(),
        format!(
            "{} green container(s) healthy and registered after {green_ready_after:?}: {}",
            green.containers.len(),
            green
                .containers
                .iter()
                .map(|c: &DockerContainer| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    recorder.record(
        Action::Split,
        new,
        Figures::default(),
        format!(
            "blue {current} {}% (weight {blue_weight} on each of {}), green {new} {}% (weight {green_weight} on each of {})",
            options.traffic_split.blue,
            blue.len(),
            options.traffic_split.green,
            green.containers.len()
        ),
    );

    // 3. Analysis: green's containers are inspected every interval (at most every 500 ms)
    //    while the analysis waits; the probe reads the latest inspection.
    let analysis_started = Instant::now();
    let latest: Mutex<Vec<ReplicaStatus>> =
        Mutex::new(version_status(backend, &registry, name, new).await?);
    let probe = || {
        let replicas = latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
        green_health(&replicas)
    };
    let verdict = {
        let analysis = analyse(source, name, new, &options.analysis, &probe, &mut recorder);
        tokio::pin!(analysis);
        let period = options.analysis.interval.min(Duration::from_millis(500));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                verdict = &mut analysis => break verdict,
                _ = tick.tick() => {
                    match version_status(backend, &registry, name, new).await {
                        Ok(replicas) => {
                            *latest.lock().unwrap_or_else(|p| p.into_inner()) = replicas;
                        }
                        Err(e) => tracing::warn!(service = %name, version = %new, error = %e, "cannot inspect green"),
                    }
                }
            }
        }
    };
    let analysis_took = analysis_started.elapsed();

    // 4. Verdict. The losing version is deregistered before its containers are removed.
    let switch_started = Instant::now();
    let drain = backend.options.drain;
    let outcome = if verdict.passed {
        set_weight(&registry, name, current, Some(0)).await?;
        set_weight(&registry, name, new, None).await?;
        deregister(&registry, name, &blue).await?;
        tokio::time::sleep(drain).await;
        remove(backend, name, &blue).await?;
        recorder.record(
            Action::Promote,
            new,
            verdict.figures,
            format!(
                "{}; blue {current} deregistered, drained and removed ({} containers)",
                verdict.reason,
                blue.len()
            ),
        );
        Outcome::Promoted
    } else if options.rollback_on_failure {
        let green_containers = deployer.containers(name, Some(new)).await?;
        set_weight(&registry, name, new, Some(0)).await?;
        deregister(&registry, name, &green_containers).await?;
        tokio::time::sleep(drain).await;
        remove(backend, name, &green_containers).await?;
        set_weight(&registry, name, current, None).await?;
        recorder.record(
            Action::Rollback,
            new,
            verdict.figures,
            format!(
                "{}; green deregistered and removed, blue {current} has all of the traffic",
                verdict.reason
            ),
        );
        Outcome::RolledBack
    } else {
        recorder.record(
            Action::Hold,
            new,
            verdict.figures,
            format!(
                "{}; rollback_on_failure is off: both versions keep the split",
                verdict.reason
            ),
        );
        Outcome::Held
    };
    let switch_took = (outcome != Outcome::Held).then(|| switch_started.elapsed());
    let mut replicas = backend.replicas(name).await.unwrap_or_default();
    let found = registry.discover(name);
    for replica in &mut replicas {
        let record = found.iter().find(|r| r.instance.id == replica.instance_id);
        replica.registered = record.is_some();
        replica.health = record.map(|r| r.status);
        replica.weight = record
            .and_then(|r| r.instance.metadata.get(WEIGHT))
            .and_then(|w| w.parse().ok());
    }
    Ok(BlueGreenReport {
        service: name.to_owned(),
        current_version: current.to_owned(),
        new_version: new.to_owned(),
        outcome,
        decisions: recorder.decisions,
        green_ready_after: Some(green_ready_after),
        analysis_took,
        switch_took,
        replicas,
    })
}

async fn remove(
    backend: &DockerBackend,
    name: &str,
    containers: &[(String, String)],
) -> Result<usize, DeployError> {
    let containers: Vec<DockerContainer> = containers
        .iter()
        .map(|(container, id)| DockerContainer {
            name: container.clone(),
            id: id.clone(),
            host_port: None,
        })
        .collect();
    backend.deployer.remove_containers(name, &containers).await
}
