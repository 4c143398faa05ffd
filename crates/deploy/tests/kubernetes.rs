#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Rendered Kubernetes manifests: structure read back from the YAML, mesh annotations,
//! determinism, and validation against the official schemas with `kubernetes-validate`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use trellis_deploy::{DeploySpec, KubernetesOptions, render_kubernetes};
use trellis_mesh::{MeshConfig, MeshProvider, ServiceMesh};

const SEED_SPEC: &str = r#"
image = "user-service:1.2.0"
replicas = 3
[resources]
cpu = "500m"
memory = "1Gi"
[environment]
NODE_ENV = "production"
CASSANDRA_HOSTS = "cassandra-cluster"
[health_check]
path = "/health"
port = 3000
"#;

fn parse(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn seed_spec() -> DeploySpec {
    DeploySpec::from_toml(SEED_SPEC).unwrap()
}

fn mesh(provider: MeshProvider) -> ServiceMesh {
    ServiceMesh::new(MeshConfig::new(provider)).unwrap()
}

#[test]
fn deployment_and_service_carry_the_spec() {
    let options = KubernetesOptions::new()
        .registry("docker.io/myorg")
        .namespace("production");
    let docs = parse(&render_kubernetes("user-service", &seed_spec(), &options).unwrap());
    let kinds: Vec<_> = docs
        .iter()
        .map(|d| {
            (
                d["apiVersion"].as_str().unwrap(),
                d["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(kinds, [("apps/v1", "Deployment"), ("v1", "Service")]);

    let deployment = &docs[0];
    assert_eq!(deployment["metadata"]["name"], "user-service");
    assert_eq!(deployment["metadata"]["namespace"], "production");
    assert_eq!(deployment["metadata"]["labels"]["app"], "user-service");
    assert_eq!(
        deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "trellis"
    );
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 3);
    // The selector selects the template's pods.
    let selector = spec["selector"]["matchLabels"].as_object().unwrap();
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(&pod_labels[k], v, "selector label {k}");
    }
    let containers = spec["template"]["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["name"], "user-service");
    assert_eq!(c["image"], "docker.io/myorg/user-service:1.2.0");
    assert_eq!(c["ports"][0]["containerPort"], 3000);
    assert_eq!(c["ports"][0]["name"], "http");
    // Environment sorted by name.
    assert_eq!(
        c["env"],
        serde_json::json!([
            {"name": "CASSANDRA_HOSTS", "value": "cassandra-cluster"},
            {"name": "NODE_ENV", "value": "production"},
        ])
    );
    let resources = serde_json::json!({"cpu": "500m", "memory": "1Gi"});
    assert_eq!(c["resources"]["requests"], resources);
    assert_eq!(c["resources"]["limits"], resources);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/health", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], 3000, "{probe}");
        assert!(c[probe]["periodSeconds"].as_i64().unwrap() > 0);
    }
    assert!(spec["template"]["metadata"].get("annotations").is_none());

    let service = &docs[1];
    assert_eq!(service["metadata"]["name"], "user-service");
    assert_eq!(service["metadata"]["namespace"], "production");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert_eq!(
        &service["spec"]["selector"],
        &spec["selector"]["matchLabels"]
    );
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["port"], 3000);
    assert_eq!(port["targetPort"], "http");
    assert_eq!(port["appProtocol"], "http");
}

#[test]
fn spec_namespace_wins_and_quantities_are_canonical() {
    let spec = DeploySpec::from_toml(
        r#"
image = "registry.local:5000/team/api@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
namespace = "team-a"
command = ["/api", "--port", "8080"]
port = 8080
[resources]
cpu = "0.25"
memory = "1536Mi"
[health_check]
path = "/health"
port = 9090
liveness_path = "/health/live"
readiness_path = "/health/ready"
"#,
    )
    .unwrap();
    let options = KubernetesOptions::new()
        .namespace("ignored")
        .registry("docker.io/other");
    let docs = parse(&render_kubernetes("api", &spec, &options).unwrap());
    assert_eq!(docs[0]["metadata"]["namespace"], "team-a");
    let c = &docs[0]["spec"]["template"]["spec"]["containers"][0];
    // An image that names its registry keeps it.
    assert!(
        c["image"]
            .as_str()
            .unwrap()
            .starts_with("registry.local:5000/team/api@sha256:")
    );
    assert_eq!(c["command"], serde_json::json!(["/api", "--port", "8080"]));
    assert_eq!(c["resources"]["requests"]["cpu"], "250m");
    assert_eq!(c["resources"]["limits"]["memory"], "1536Mi");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health/live");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health/ready");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 9090);
    assert_eq!(docs[1]["spec"]["ports"][0]["port"], 8080);
    assert!(c.get("env").is_none());
}

#[test]
fn no_port_means_no_service() {
    let spec = DeploySpec::from_toml("image = \"worker:1\"\nreplicas = 0").unwrap();
    let docs = parse(&render_kubernetes("worker", &spec, &KubernetesOptions::new()).unwrap());
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0]["kind"], "Deployment");
    assert_eq!(docs[0]["spec"]["replicas"], 0);
    assert_eq!(docs[0]["metadata"]["namespace"], "default");
    let c = &docs[0]["spec"]["template"]["spec"]["containers"][0];
    assert!(c.get("resources").is_none());
    assert!(c.get("livenessProbe").is_none());
    assert!(c.get("ports").is_none());
}

#[test]
fn mesh_injection_goes_on_the_pod_template() {
    let cases = [
        (MeshProvider::Istio, "sidecar.istio.io/inject", "true"),
        (MeshProvider::Linkerd, "linkerd.io/inject", "enabled"),
        (
            MeshProvider::Consul,
            "consul.hashicorp.com/connect-inject",
            "true",
        ),
    ];
    for (provider, key, value) in cases {
        let options = KubernetesOptions::new().mesh(mesh(provider));
        let docs = parse(&render_kubernetes("user-service", &seed_spec(), &options).unwrap());
        let template = &docs[0]["spec"]["template"]["metadata"];
        assert_eq!(template["annotations"][key], value, "{provider}");
        // Injection is on the pods only, not on the Deployment object.
        assert!(
            docs[0]["metadata"].get("annotations").is_none(),
            "{provider}"
        );
        let service_annotations = docs[1]["metadata"].get("annotations");
        match provider {
            MeshProvider::Linkerd => {
                let a = service_annotations.unwrap();
                assert_eq!(a["balancer.linkerd.io/failure-accrual"], "consecutive");
                assert_eq!(
                    a["balancer.linkerd.io/failure-accrual-consecutive-max-failures"],
                    "5"
                );
            }
            _ => assert!(service_annotations.is_none(), "{provider}"),
        }
        if provider == MeshProvider::Istio {
            assert_eq!(template["labels"]["sidecar.istio.io/inject"], "true");
            // The mesh label does not leak into the selector.
            let selector = docs[0]["spec"]["selector"]["matchLabels"]
                .as_object()
                .unwrap();
            assert!(!selector.contains_key("sidecar.istio.io/inject"));
        }
        // The Telemetry resource of the mesh selects these pods by `app`.
        assert_eq!(template["labels"]["app"], "user-service");
    }
}

#[test]
fn version_makes_side_by_side_deployments() {
    let options = KubernetesOptions::new().version("1.2.0");
    let docs = parse(&render_kubernetes("user-service", &seed_spec(), &options).unwrap());
    assert_eq!(docs[0]["metadata"]["name"], "user-service-1-2-0");
    assert_eq!(
        docs[0]["spec"]["selector"]["matchLabels"]["version"],
        "1.2.0"
    );
    assert_eq!(
        docs[0]["spec"]["template"]["metadata"]["labels"]["version"],
        "1.2.0"
    );
    assert_eq!(docs[1]["metadata"]["name"], "user-service");
    assert_eq!(docs[1]["spec"]["selector"]["version"], "1.2.0");
    assert!(docs[1]["metadata"]["labels"].get("version").is_none());

    let err = render_kubernetes(
        "user-service",
        &seed_spec(),
        &KubernetesOptions::new().version("1.2.0+build"),
    )
    .unwrap_err();
    assert_eq!(err.fields(), ["version"]);
    let long = "a".repeat(60);
    let err = render_kubernetes(
        "user-service",
        &seed_spec(),
        &KubernetesOptions::new().version(long),
    )
    .unwrap_err();
    assert_eq!(err.fields(), ["version"]);
}

#[test]
fn output_is_deterministic() {
    let options = KubernetesOptions::new().mesh(mesh(MeshProvider::Consul));
    let a = render_kubernetes("user-service", &seed_spec(), &options).unwrap();
    let b = render_kubernetes("user-service", &seed_spec().clone(), &options.clone()).unwrap();
    assert_eq!(a, b);
    // Same environment written in another order: same bytes.
    let reordered = DeploySpec::from_toml(&SEED_SPEC.replace(
        "NODE_ENV = \"production\"\nCASSANDRA_HOSTS = \"cassandra-cluster\"",
        "CASSANDRA_HOSTS = \"cassandra-cluster\"\nNODE_ENV = \"production\"",
    ))
    .unwrap();
    assert_eq!(
        render_kubernetes("user-service", &reordered, &options).unwrap(),
        a
    );
    let other = DeploySpec {
        replicas: 4,
        ..seed_spec()
    };
    assert_ne!(
        render_kubernetes("user-service", &other, &options).unwrap(),
        a
    );
}

// ---------------------------------------------------------------------------------------
// Offline schema validation with PyPI `kubernetes-validate` (official schemas, strict).

fn validator() -> Option<&'static str> {
    let found = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("kubernetes-validate");
    }
    let required = std::env::var("TRELLIS_REQUIRE_ENGINES").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "kubernetes-validate is not installed (pip install kubernetes-validate) and TRELLIS_REQUIRE_ENGINES=1"
    );
    eprintln!(
        "SKIPPED: kubernetes-validate not installed; `pip install kubernetes-validate` to run"
    );
    None
}

/// Runs the validator on `paths` in one process (it starts slowly); returns whether it
/// accepted them all, and its output.
fn validate(tool: &str, paths: &[PathBuf]) -> (bool, String) {
    let out = Command::new(tool)
        .args(["-k", "1.33", "--strict"])
        .args(paths)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("ERROR"), text)
}

#[test]
fn manifests_validate_against_the_official_schemas() {
    let Some(tool) = validator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let with_everything = DeploySpec::from_toml(
        r#"
image = "localhost:5000/api:2"
command = ["/api"]
port = 8080
[resources]
cpu = "1.5"
memory = "300Mi"
[environment]
A = "1"
[health_check]
path = "/health"
port = 8081
readiness_path = "/health/ready"
"#,
    )
    .unwrap();
    let worker = DeploySpec::from_toml("image = \"worker:1\"").unwrap();
    let mut cases = vec![
        (
            "seed",
            seed_spec(),
            KubernetesOptions::new().registry("docker.io/myorg"),
        ),
        (
            "everything",
            with_everything,
            KubernetesOptions::new().version("2.0.0"),
        ),
        ("worker", worker, KubernetesOptions::new()),
    ];
    for provider in MeshProvider::ALL {
        cases.push((
            provider.as_str(),
            seed_spec(),
            KubernetesOptions::new().mesh(mesh(provider)),
        ));
    }
    let mut files = Vec::new();
    for (label, spec, options) in cases {
        let yaml = render_kubernetes("user-service", &spec, &options).unwrap();
        let path = dir.path().join(format!("{label}.yaml"));
        std::fs::write(&path, &yaml).unwrap();
        let documents = yaml.matches("\nkind: ").count() + usize::from(yaml.starts_with("kind: "));
        files.push((path, documents));
    }
    assert_eq!(files.len(), 6);
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let (ok, output) = validate(tool, &paths);
    assert!(ok, "rejected:\n{output}");
    for (path, documents) in &files {
        // One "passed" line per document: nothing was skipped for want of a schema.
        let passed = output
            .lines()
            .filter(|l| l.contains(path.to_str().unwrap()) && l.contains(" passed for resource "))
            .count();
        assert_eq!(passed, *documents, "{}: {output}", path.display());
    }
    assert!(
        output.contains("passed for resource deployment/user-service-2-0-0"),
        "{output}"
    );

    // The validator is strict: the same manifest with one unknown field is refused, so the
    // passes above mean something.
    let yaml = render_kubernetes("user-service", &seed_spec(), &KubernetesOptions::new())
        .unwrap()
        .replace("  replicas: 3\n", "  replicas: 3\n  replicaz: 3\n");
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (ok, output) = validate(tool, &[path]);
    assert!(!ok, "a manifest with an unknown field passed:\n{output}");
    assert!(output.contains("replicaz"), "{output}");
}
