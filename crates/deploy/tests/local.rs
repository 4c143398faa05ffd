//! The local platform with real processes (this test binary run again as the service), a real
//! registry on a SQLite file and a real gateway.

#![cfg(feature = "local")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use support::{Harness, SERVICE, alive, child_spec, eventually, fast_options, marked_pids};
use trellis_deploy::{DeployError, DeploySpec, Platform, ReplicaPhase, ServiceDeployer};
use trellis_registry::InstanceStatus;

/// Not a test: the child service when run by the deployer (see support::child_main).
#[test]
fn child_service() {
    support::child_main();
}

fn kill9(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_run_register_restart_and_stop() {
    let h = Harness::start(fast_options()).await;
    let marker = format!("local-{}", std::process::id());
    let spec = child_spec("child_service", "1.0.0", 2, false, &marker);

    // Deploy: both replicas ready and registered when deploy returns.
    let deployment = h
        .deployer
        .deploy_version(SERVICE, "1.0.0", &spec)
        .await
        .unwrap();
    println!("deploy of 2 replicas took {:?}", deployment.took);
    assert_eq!(deployment.replicas.len(), 2);
    let status = h.deployer.status(SERVICE).await.unwrap();
    for r in &status {
        assert_eq!(r.phase, ReplicaPhase::Running, "{r:?}");
        assert!(r.registered && r.pid.is_some(), "{r:?}");
    }
    let ports: BTreeSet<u16> = status.iter().map(|r| r.port).collect();
    assert_eq!(ports.len(), 2);
    let base = u16::try_from(spec.health_check.as_ref().unwrap().port).unwrap();
    assert!(
        ports.contains(&base),
        "replica 0 on the spec's port {base}: {ports:?}"
    );

    // Registered with version, health check and metadata, and healthy as the gateway's own
    // registry (another snapshot of the same file) sees it.
    eventually(
        "both replicas healthy in the gateway's registry",
        Duration::from_secs(10),
        async || {
            let found = h.gateway_registry.discover(SERVICE);
            (found
                .iter()
                .filter(|r| r.status == InstanceStatus::Healthy)
                .count()
                == 2)
                .then_some(())
        },
    )
    .await;
    for record in h.gateway_registry.discover(SERVICE).iter() {
        let i = &record.instance;
        assert_eq!(i.version, "1.0.0");
        assert_eq!(i.health_check.as_ref().unwrap().endpoint, "/health");
        assert_eq!(i.metadata["platform"], "local");
        assert_eq!(i.metadata["namespace"], "test");
        let pid: u32 = i.metadata["pid"].parse().unwrap();
        assert!(status.iter().any(|r| r.pid == Some(pid)));
    }
    // Both serve through the gateway.
    let seen = eventually(
        "both replicas answering through the gateway",
        Duration::from_secs(10),
        async || {
            let mut ids = BTreeSet::new();
            for _ in 0..20 {
                let (code, body) = h.get("/hello").await;
                assert_eq!(code, 200, "{body}");
                ids.insert(body.split(' ').nth(1).unwrap_or_default().to_owned());
            }
            (ids.len() == 2).then_some(ids)
        },
    )
    .await;
    assert!(seen.contains(&format!("{SERVICE}-1.0.0-0")), "{seen:?}");

    // SIGKILL replica 0: deregistered, restarted after the initial backoff, re-registered.
    let victim = status.iter().find(|r| r.index == 0).unwrap().clone();
    let old_pid = victim.pid.unwrap();
    let killed_at = SystemTime::now();
    kill9(old_pid);
    let restarted = eventually(
        "replica 0 restarted and registered",
        Duration::from_secs(15),
        async || {
            let s = h.deployer.status(SERVICE).await.unwrap();
            let r = s.into_iter().find(|r| r.index == 0).unwrap();
            (r.restarts == 1
                && r.phase == ReplicaPhase::Running
                && r.registered
                && r.pid != Some(old_pid))
            .then_some(r)
        },
    )
    .await;
    assert!(!alive(old_pid));
    assert!(
        restarted
            .last_exit
            .as_deref()
            .unwrap()
            .contains("signal: 9"),
        "{restarted:?}"
    );
    let waited = restarted
        .started_at
        .unwrap()
        .duration_since(killed_at)
        .unwrap();
    println!("first restart {waited:?} after SIGKILL (backoff 300ms)");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert_eq!(restarted.port, victim.port, "same port after a restart");
    let new_pid = restarted.pid.unwrap();
    eventually(
        "the new pid registered",
        Duration::from_secs(10),
        async || {
            let found = h.gateway_registry.discover(SERVICE);
            found
                .iter()
                .any(|r| {
                    r.instance.metadata.get("pid") == Some(&new_pid.to_string())
                        && r.status == InstanceStatus::Healthy
                })
                .then_some(())
        },
    )
    .await;

    // Killed again soon after: the backoff doubled (it did not stay up for the reset time).
    let killed_at = SystemTime::now();
    kill9(new_pid);
    let again = eventually(
        "replica 0 restarted a second time",
        Duration::from_secs(15),
        async || {
            let s = h.deployer.status(SERVICE).await.unwrap();
            let r = s.into_iter().find(|r| r.index == 0).unwrap();
            (r.restarts == 2 && r.phase == ReplicaPhase::Running && r.registered).then_some(r)
        },
    )
    .await;
    let waited = again.started_at.unwrap().duration_since(killed_at).unwrap();
    println!("second restart {waited:?} after SIGKILL (backoff 600ms)");
    assert!(waited >= Duration::from_millis(600), "{waited:?}");
    // The other replica was never touched.
    let other = h
        .deployer
        .status(SERVICE)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.index == 1)
        .unwrap();
    assert_eq!(other.restarts, 0);
    assert_eq!(other.pid, status.iter().find(|r| r.index == 1).unwrap().pid);

    // Undeploy: deregistered, processes gone.
    let pids = marked_pids(&marker);
    assert_eq!(pids.len(), 2, "{pids:?}");
    let started = Instant::now();
    let last = h.deployer.undeploy(SERVICE).await.unwrap();
    println!("undeploy took {:?}", started.elapsed());
    assert!(
        last.iter()
            .all(|r| r.phase == ReplicaPhase::Stopped && r.pid.is_none() && !r.registered),
        "{last:?}"
    );
    for pid in pids {
        assert!(!alive(pid), "pid {pid} still alive");
    }
    assert!(marked_pids(&marker).is_empty());
    assert!(h.registry.discover(SERVICE).is_empty());
    eventually(
        "the gateway's registry empty",
        Duration::from_secs(5),
        async || {
            h.gateway_registry
                .discover(SERVICE)
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert!(matches!(
        h.deployer.status(SERVICE).await,
        Err(DeployError::NotDeployed { .. })
    ));
    let (code, _) = h.get("/hello").await;
    assert_eq!(code, 503, "no instance left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_start_nothing_and_name_the_field() {
    let h = Harness::start(fast_options()).await;
    let marker = format!("bad-{}", std::process::id());
    let good = child_spec("child_service", "1.0.0", 1, false, &marker);

    // replicas -1, memory "1Gx", no command, port 70000: every key named.
    let mut bad = DeploySpec::from_toml(
        "replicas = -1\nport = 70000\n[resources]\nmemory = \"1Gx\"\n[health_check]\npath = \"/health\"\nport = 3000\n",
    )
    .unwrap();
    let err = h
        .deployer
        .deploy_version(SERVICE, "1.0.0", &bad)
        .await
        .unwrap_err();
    assert_eq!(
        err.fields(),
        ["command", "replicas", "resources.memory", "port"]
    );
    let message = err.to_string();
    for needle in [
        "command: missing",
        "replicas: -1 is negative",
        "resources.memory",
        "\"1Gx\"",
        "port: 70000 is not a port",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }

    // A runnable command with one bad value still starts nothing.
    bad = DeploySpec {
        port: Some(70000),
        ..good.clone()
    };
    let err = h
        .deployer
        .deploy_version(SERVICE, "1.0.0", &bad)
        .await
        .unwrap_err();
    assert_eq!(err.fields(), ["port"]);
    bad = DeploySpec {
        replicas: -1,
        ..good.clone()
    };
    assert_eq!(
        h.deployer
            .deploy_version(SERVICE, "1.0.0", &bad)
            .await
            .unwrap_err()
            .fields(),
        ["replicas"]
    );
    let err = h
        .deployer
        .deploy_version(SERVICE, "1/0", &good)
        .await
        .unwrap_err();
    assert_eq!(err.fields(), ["version"]);

    // A program that does not exist: a spawn error naming it, nothing left behind.
    let missing = DeploySpec {
        command: Some(vec!["/nonexistent/trellis-app".into()]),
        ..good.clone()
    };
    let err = h
        .deployer
        .deploy_version(SERVICE, "1.0.0", &missing)
        .await
        .unwrap_err();
    assert!(matches!(err, DeployError::Spawn { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/trellis-app"),
        "{err}"
    );

    assert!(marked_pids(&marker).is_empty(), "nothing started");
    assert!(matches!(
        h.deployer.status(SERVICE).await,
        Err(DeployError::NotDeployed { .. })
    ));
    assert!(h.registry.discover(SERVICE).is_empty());

    // Missing image on an image platform.
    let docker = ServiceDeployer::builder(Platform::Docker, h.registry.clone())
        .build()
        .unwrap();
    let err = docker
        .deploy(SERVICE, &DeploySpec::default())
        .await
        .unwrap_err();
    assert_eq!(err.fields(), ["image"]);
    // A valid spec on a platform without a backend: a clear error, nothing done.
    let spec = DeploySpec {
        image: Some("echo:1.0.0".into()),
        ..DeploySpec::default()
    };
    let err = docker.deploy(SERVICE, &spec).await.unwrap_err();
    assert!(
        matches!(err, DeployError::PlatformUnavailable { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("docker"), "{err}");

    // And the good spec does deploy, so the failures above were about the values.
    let deployment = h
        .deployer
        .deploy_version(SERVICE, "1.0.0", &good)
        .await
        .unwrap();
    assert_eq!(deployment.replicas.len(), 1);
    assert_eq!(marked_pids(&marker).len(), 1);
    let err = h
        .deployer
        .deploy_version(SERVICE, "1.0.0", &good)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeployError::AlreadyDeployed { .. }),
        "{err:?}"
    );
    h.deployer.undeploy(SERVICE).await.unwrap();
    assert!(marked_pids(&marker).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_ignoring_sigterm_is_killed_after_the_grace_period() {
    let options = trellis_deploy::LocalOptions {
        stop_grace: Duration::from_millis(700),
        ..fast_options()
    };
    let h = Harness::start(options).await;
    let marker = format!("stubborn-{}", std::process::id());
    let mut spec = child_spec("child_service", "1.0.0", 1, false, &marker);
    spec.environment.insert("IGNORE_TERM".into(), "1".into());
    h.deployer
        .deploy_version(SERVICE, "1.0.0", &spec)
        .await
        .unwrap();
    let pid = marked_pids(&marker)[0];
    let started = Instant::now();
    let last = h.deployer.undeploy(SERVICE).await.unwrap();
    let took = started.elapsed();
    println!("undeploy of a replica ignoring SIGTERM took {took:?} (drain 600ms, grace 700ms)");
    assert!(took >= Duration::from_millis(1300), "{took:?}");
    let exit = last[0].last_exit.as_deref().unwrap();
    assert!(
        exit.contains("signal: 9") && exit.contains("killed after"),
        "{exit}"
    );
    assert!(!alive(pid));
    assert!(h.registry.discover(SERVICE).is_empty());
}
