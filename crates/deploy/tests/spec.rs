#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Bad specs are rejected before anything is rendered, each problem naming its key.

use trellis_deploy::{DeployError, DeploySpec, KubernetesOptions, Platform, render_kubernetes};

const GOOD: &str = r#"
image = "user-service:1.2.0"
replicas = 3
[resources]
cpu = "500m"
memory = "1Gi"
[health_check]
path = "/health"
port = 3000
"#;

/// `GOOD` with `from` replaced by `to`.
fn spec_with(from: &str, to: &str) -> DeploySpec {
    assert!(GOOD.contains(from), "{from}");
    DeploySpec::from_toml(&GOOD.replacen(from, to, 1)).unwrap()
}

fn rejected(spec: &DeploySpec, name: &str) -> DeployError {
    let err = spec.validate(name, Platform::Kubernetes).unwrap_err();
    // Rendering refuses the same spec with the same error: nothing comes out.
    let rendered = render_kubernetes(name, spec, &KubernetesOptions::new()).unwrap_err();
    assert_eq!(rendered, err);
    err
}

#[test]
fn the_good_spec_passes_everywhere_it_can() {
    let spec = DeploySpec::from_toml(GOOD).unwrap();
    for platform in [Platform::Kubernetes, Platform::Docker, Platform::Ecs] {
        spec.validate("user-service", platform).unwrap();
    }
    // Local needs a command, not an image.
    let err = spec.validate("user-service", Platform::Local).unwrap_err();
    assert_eq!(err.fields(), ["command"]);
    let local = DeploySpec::from_toml("command = [\"./bin/app\"]").unwrap();
    local.validate("user-service", Platform::Local).unwrap();
}

#[test]
fn each_bad_value_names_its_key() {
    let cases: [(&str, &str, &str, &str); 14] = [
        (
            "replicas = 3",
            "replicas = -1",
            "replicas",
            "-1 is negative",
        ),
        (
            "memory = \"1Gi\"",
            "memory = \"1Gx\"",
            "resources.memory",
            "unknown suffix \"Gx\"",
        ),
        (
            "memory = \"1Gi\"",
            "memory = \"500m\"",
            "resources.memory",
            "whole number of bytes",
        ),
        (
            "cpu = \"500m\"",
            "cpu = \"-1\"",
            "resources.cpu",
            "negative",
        ),
        (
            "cpu = \"500m\"",
            "cpu = \"0.0001\"",
            "resources.cpu",
            "finer than one thousandth",
        ),
        (
            "port = 3000",
            "port = 70000",
            "health_check.port",
            "70000 is not a port",
        ),
        (
            "port = 3000",
            "port = 0",
            "health_check.port",
            "0 is not a port",
        ),
        (
            "path = \"/health\"",
            "path = \"health\"",
            "health_check.path",
            "must start with '/'",
        ),
        (
            "image = \"user-service:1.2.0\"",
            "",
            "image",
            "missing; the kubernetes platform runs a container image",
        ),
        (
            "image = \"user-service:1.2.0\"",
            "image = \"User-Service:1.2.0\"",
            "image",
            "path component \"User-Service\"",
        ),
        (
            "image = \"user-service:1.2.0\"",
            "image = \"user-service:1.2.0@sha256:abc\"",
            "image",
            "64 lower-case hex digits",
        ),
        (
            "replicas = 3",
            "replicas = 3\nnamespace = \"Prod\"",
            "namespace",
            "contains 'P'",
        ),
        (
            "replicas = 3",
            "replicas = 3\nport = 65536",
            "port",
            "65536 is not a port",
        ),
        (
            "replicas = 3",
            "replicas = 3\ncommand = []",
            "command",
            "is empty",
        ),
    ];
    for (from, to, field, reason) in cases {
        let err = rejected(&spec_with(from, to), "user-service");
        assert_eq!(err.fields(), [field], "{to}: {err}");
        let message = err.to_string();
        assert!(message.contains(&format!("{field}: ")), "{message}");
        assert!(message.contains(reason), "{to}: {message}");
    }
}

#[test]
fn environment_names_are_checked() {
    let spec = spec_with(
        "replicas = 3",
        "replicas = 3\n[environment]\n\"1BAD\" = \"x\"\nGOOD = \"y\"",
    );
    let err = rejected(&spec, "user-service");
    assert_eq!(err.fields(), ["environment.1BAD"]);
}

#[test]
fn bad_names_are_rejected() {
    let spec = DeploySpec::from_toml(GOOD).unwrap();
    for name in ["User", "user_service", "9lives", "", "a.b", &"a".repeat(64)] {
        let err = rejected(&spec, name);
        assert_eq!(err.fields(), ["name"], "{name:?}: {err}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let spec = DeploySpec::from_toml(
        "replicas = -1\n[resources]\nmemory = \"1Gx\"\n[health_check]\npath = \"/h\"\nport = 70000",
    )
    .unwrap();
    let err = rejected(&spec, "user-service");
    assert_eq!(
        err.fields(),
        ["image", "replicas", "resources.memory", "health_check.port"]
    );
    assert!(
        err.to_string()
            .starts_with("deploy spec for \"user-service\" is invalid: image: missing")
    );
}

#[test]
fn deployer_options_are_checked_too() {
    let spec = DeploySpec::from_toml(GOOD).unwrap();
    let err = render_kubernetes(
        "user-service",
        &spec,
        &KubernetesOptions::new().registry("Docker Hub"),
    )
    .unwrap_err();
    assert_eq!(err.fields(), ["registry"]);
    let err = render_kubernetes(
        "user-service",
        &spec,
        &KubernetesOptions::new().namespace("prod_1"),
    )
    .unwrap_err();
    assert_eq!(err.fields(), ["namespace"]);
}

#[test]
fn unknown_keys_and_wrong_types_are_parse_errors_naming_the_key() {
    let err = DeploySpec::from_toml("image = \"a:1\"\nreplica = 3").unwrap_err();
    assert!(
        matches!(&err, DeployError::Parse(m) if m.contains("replica")),
        "{err}"
    );
    let err =
        DeploySpec::from_toml("image = \"a:1\"\n[health_check]\npath = \"/h\"\nport = \"http\"")
            .unwrap_err();
    assert!(
        matches!(&err, DeployError::Parse(m) if m.contains("port")),
        "{err}"
    );
    let err = DeploySpec::from_toml("[resources]\ngpu = \"1\"").unwrap_err();
    assert!(err.to_string().contains("gpu"), "{err}");
}
