#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
#![cfg(feature = "ecs")]
//! ECS task and service definitions rendered from the seed's spec, and the credential check
//! that runs before anything would be sent.

use std::collections::HashMap;

use serde_json::json;
use trellis_deploy::{DeployError, DeploySpec, EcsCredentials, EcsOptions, LaunchType, render_ecs};

const SEED_SPEC: &str = r#"
image = "user-service:1.2.0"
replicas = 3
[resources]
cpu = "500m"
memory = "1024Mi"
[environment]
NODE_ENV = "production"
CASSANDRA_HOSTS = "cassandra-cluster"
[health_check]
path = "/health"
port = 3000
"#;

fn spec() -> DeploySpec {
    DeploySpec::from_toml(SEED_SPEC).unwrap()
}

#[test]
fn task_definition_carries_the_spec_in_ecs_units() {
    let options = EcsOptions::new()
        .registry("123456789012.dkr.ecr.eu-west-1.amazonaws.com/shop")
        .execution_role_arn("arn:aws:iam::123456789012:role/ecsTaskExecutionRole");
    let defs = render_ecs("user-service", &spec(), &options).unwrap();
    let task = &defs.task_definition;
    assert_eq!(task["family"], "user-service");
    assert_eq!(task["requiresCompatibilities"], json!(["FARGATE"]));
    assert_eq!(task["networkMode"], "awsvpc");
    // "500m" is half a vCPU: 512 of 1024 units; "1024Mi" is 1024 MiB. Task-level sizes are
    // strings, and 512/1024 is a Fargate size.
    assert_eq!(task["cpu"], "512");
    assert_eq!(task["memory"], "1024");
    assert_eq!(
        task["executionRoleArn"],
        "arn:aws:iam::123456789012:role/ecsTaskExecutionRole"
    );
    let containers = task["containerDefinitions"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["name"], "user-service");
    assert_eq!(
        c["image"],
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/shop/user-service:1.2.0"
    );
    assert_eq!(c["essential"], true);
    assert_eq!(c["cpu"], 512);
    assert_eq!(c["memory"], 1024);
    assert_eq!(
        c["environment"],
        json!([
            {"name": "CASSANDRA_HOSTS", "value": "cassandra-cluster"},
            {"name": "NODE_ENV", "value": "production"},
        ])
    );
    assert_eq!(
        c["portMappings"],
        json!([{
            "name": "http", "containerPort": 3000, "hostPort": 3000,
            "protocol": "tcp", "appProtocol": "http",
        }])
    );
    assert_eq!(
        c["healthCheck"]["command"],
        json!([
            "CMD-SHELL",
            "wget -q -O /dev/null http://127.0.0.1:3000/health || exit 1"
        ])
    );
    assert_eq!(c["healthCheck"]["retries"], 3);
    assert!(c.get("entryPoint").is_none());
    let tags: HashMap<_, _> = task["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["key"].as_str().unwrap(), t["value"].as_str().unwrap()))
        .collect();
    assert_eq!(tags["trellis.service"], "user-service");
    assert_eq!(tags["trellis.version"], "1.2.0");
}

#[test]
fn service_definition_runs_the_replicas() {
    let options = EcsOptions::new()
        .cluster("production")
        .version("1.2.0-rc1")
        .subnets(vec!["subnet-1".to_owned(), "subnet-2".to_owned()])
        .security_groups(vec!["sg-1".to_owned()]);
    let defs = render_ecs("user-service", &spec(), &options).unwrap();
    let service = &defs.service;
    assert_eq!(service["serviceName"], "user-service");
    assert_eq!(service["cluster"], "production");
    assert_eq!(service["taskDefinition"], "user-service");
    assert_eq!(service["desiredCount"], 3);
    assert_eq!(service["launchType"], "FARGATE");
    assert_eq!(
        service["networkConfiguration"]["awsvpcConfiguration"],
        json!({"subnets": ["subnet-1", "subnet-2"], "securityGroups": ["sg-1"], "assignPublicIp": "DISABLED"})
    );
    assert_eq!(
        service["deploymentConfiguration"]["deploymentCircuitBreaker"],
        json!({"enable": true, "rollback": true})
    );
    assert_eq!(
        service["tags"][1],
        json!({"key": "trellis.version", "value": "1.2.0-rc1"})
    );
    // Both as one JSON document for --dry-run, deterministic.
    let text = defs.to_json().unwrap();
    let again = render_ecs("user-service", &spec(), &options)
        .unwrap()
        .to_json()
        .unwrap();
    assert_eq!(text, again);
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed["taskDefinition"]["family"], "user-service");
    assert_eq!(parsed["service"]["serviceName"], "user-service");
}

#[test]
fn sizes_round_up_to_ecs_units_and_fargate_sizes() {
    let mut spec = spec();
    spec.resources.cpu = Some("300m".to_owned());
    spec.resources.memory = Some("1G".to_owned());
    let defs = render_ecs("shop", &spec, &EcsOptions::new()).unwrap();
    let c = &defs.task_definition["containerDefinitions"][0];
    assert_eq!(c["cpu"], 308); // 0.3 × 1024 = 307.2, rounded up
    assert_eq!(c["memory"], 954); // 10^9 bytes = 953.7 MiB, rounded up
    assert_eq!(defs.task_definition["cpu"], "512");
    assert_eq!(defs.task_definition["memory"], "1024");

    // EC2: container sizes only, bridge networking, ECS-chosen host ports, a command.
    spec.command = Some(vec!["./bin/shop".to_owned(), "--port=3000".to_owned()]);
    let defs = render_ecs(
        "shop",
        &spec,
        &EcsOptions::new().launch_type(LaunchType::Ec2),
    )
    .unwrap();
    let task = &defs.task_definition;
    assert!(task.get("cpu").is_none() && task.get("memory").is_none());
    assert_eq!(task["networkMode"], "bridge");
    assert_eq!(
        task["containerDefinitions"][0]["portMappings"][0]["hostPort"],
        0
    );
    assert_eq!(
        task["containerDefinitions"][0]["entryPoint"],
        json!(["./bin/shop", "--port=3000"])
    );
    assert!(defs.service.get("networkConfiguration").is_none());
}

#[test]
fn invalid_input_is_rejected_naming_each_key() {
    let mut bad = spec();
    bad.replicas = -1;
    bad.resources.memory = Some("1Gx".to_owned());
    let err = render_ecs("user-service", &bad, &EcsOptions::new()).unwrap_err();
    assert_eq!(err.fields(), ["replicas", "resources.memory"]);

    // Too big for any Fargate task.
    let mut huge = spec();
    huge.resources.memory = Some("200Gi".to_owned());
    let err = render_ecs("user-service", &huge, &EcsOptions::new()).unwrap_err();
    assert_eq!(err.fields(), ["resources.memory"]);
    assert!(
        err.to_string().contains("larger than any Fargate task"),
        "{err}"
    );

    // EC2 needs a memory size.
    let mut no_memory = spec();
    no_memory.resources.memory = None;
    let err = render_ecs(
        "user-service",
        &no_memory,
        &EcsOptions::new()
            .launch_type(LaunchType::Ec2)
            .version("bad version"),
    )
    .unwrap_err();
    assert_eq!(err.fields(), ["version", "resources.memory"]);
}

#[test]
fn no_credentials_is_a_clear_error_naming_where_it_looked() {
    let home = tempfile::tempdir().unwrap();
    let empty = |_: &str| None;
    let err = EcsCredentials::discover(empty, Some(home.path())).unwrap_err();
    assert!(matches!(err, DeployError::Ecs { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("ecs: find AWS credentials: none found, nothing was sent"),
        "{text}"
    );
    assert!(text.contains("AWS_ACCESS_KEY_ID"), "{text}");
    assert!(text.contains("profile \"default\""), "{text}");
    assert!(
        text.contains(&home.path().join(".aws/credentials").display().to_string()),
        "{text}"
    );

    // A key id without its secret is not credentials either.
    let half = |k: &str| (k == "AWS_ACCESS_KEY_ID").then(|| "AKIAEXAMPLE".to_owned());
    assert!(EcsCredentials::discover(half, Some(home.path())).is_err());
}

#[test]
fn credentials_are_found_where_the_sdks_look() {
    let home = tempfile::tempdir().unwrap();
    let env = |k: &str| match k {
        "AWS_ACCESS_KEY_ID" => Some("AKIAEXAMPLE".to_owned()),
        "AWS_SECRET_ACCESS_KEY" => Some("secret".to_owned()),
        _ => None,
    };
    assert_eq!(
        EcsCredentials::discover(env, Some(home.path())).unwrap(),
        EcsCredentials::Environment
    );

    std::fs::create_dir_all(home.path().join(".aws")).unwrap();
    let file = home.path().join(".aws/credentials");
    std::fs::write(
        &file,
        "[ci]\naws_access_key_id = AKIA\naws_secret_access_key = s\n",
    )
    .unwrap();
    let profile = |k: &str| (k == "AWS_PROFILE").then(|| "ci".to_owned());
    assert_eq!(
        EcsCredentials::discover(profile, Some(home.path())).unwrap(),
        EcsCredentials::SharedFile {
            path: file,
            profile: "ci".to_owned()
        }
    );
    // The default profile is not in that file.
    assert!(EcsCredentials::discover(|_| None, Some(home.path())).is_err());
}
