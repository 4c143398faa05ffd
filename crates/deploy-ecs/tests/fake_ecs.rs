#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `EcsDeployer` and `EcsBackend` through the real AWS SDK against a fake of the ECS JSON
//! API (awsJson1.1: `POST /` with `X-Amz-Target: AmazonEC2ContainerServiceV20141113.<Op>`)
//! on 127.0.0.1 — AWS is a third-party service we do not run. The fake records every
//! request and answers as ECS does.

use std::sync::{Arc, Mutex};

use aws_sdk_ecs::config::{BehaviorVersion, Credentials, Region};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use trellis_deploy::{
    DeployError, DeploySpec, EcsOptions, Platform, ReplicaPhase, ServiceDeployer,
};
use trellis_deploy_ecs::{EcsBackend, EcsDeployer};
use trellis_registry::{RegistryOptions, ServiceRegistry};

const TARGET_PREFIX: &str = "AmazonEC2ContainerServiceV20141113.";

#[derive(Debug, Clone)]
struct Call {
    operation: String,
    body: Value,
    authorized: bool,
}

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// No service exists until CreateService.
    Fresh,
    /// RegisterTaskDefinition is refused with a ClientException.
    RejectRegister,
    /// The service exists already (ACTIVE).
    Existing,
}

#[derive(Clone)]
struct Fake {
    calls: Arc<Mutex<Vec<Call>>>,
    mode: Mode,
}

async fn handle(
    axum::extract::State(fake): axum::extract::State<Fake>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let operation = target
        .strip_prefix(TARGET_PREFIX)
        .unwrap_or(&target)
        .to_owned();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTEST/"));
    fake.calls.lock().unwrap().push(Call {
        operation: operation.clone(),
        body: body.clone(),
        authorized,
    });
    let family = body["family"].as_str().unwrap_or_default().to_owned();
    let name = body["serviceName"]
        .as_str()
        .or_else(|| body["service"].as_str())
        .or_else(|| body["services"][0].as_str())
        .unwrap_or_default()
        .to_owned();
    let service = |desired: &Value, task: &Value| {
        json!({
            "serviceArn": format!("arn:aws:ecs:eu-west-1:123456789012:service/production/{name}"),
            "serviceName": name,
            "clusterArn": "arn:aws:ecs:eu-west-1:123456789012:cluster/production",
            "status": "ACTIVE",
            "desiredCount": desired,
            "runningCount": 1,
            "pendingCount": 0,
            "taskDefinition": task,
            "tags": [{"key": "trellis.version", "value": "1.4.0"}],
        })
    };
    let ok = |value: Value| {
        (
            StatusCode::OK,
            [("content-type", "application/x-amz-json-1.1")],
            value.to_string(),
        )
            .into_response()
    };
    match (operation.as_str(), fake.mode) {
        ("RegisterTaskDefinition", Mode::RejectRegister) => (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/x-amz-json-1.1")],
            json!({
                "__type": "ClientException",
                "message": "Fargate requires task definition to have execution role ARN to support ECR images.",
            })
            .to_string(),
        )
            .into_response(),
        ("RegisterTaskDefinition", _) => ok(json!({
            "taskDefinition": {
                "taskDefinitionArn": format!("arn:aws:ecs:eu-west-1:123456789012:task-definition/{family}:7"),
                "family": family,
                "revision": 7,
                "status": "ACTIVE",
            }
        })),
        ("DescribeServices", Mode::Existing) => ok(json!({
            "services": [service(&json!(2), &json!("arn:aws:ecs:eu-west-1:123456789012:task-definition/shop:6"))],
            "failures": [],
        })),
        ("DescribeServices", _) => {
            let created = fake
                .calls
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.operation == "CreateService");
            if created {
                ok(json!({
                    "services": [service(&json!(3), &json!("arn:aws:ecs:eu-west-1:123456789012:task-definition/shop:7"))],
                    "failures": [],
                }))
            } else {
                ok(json!({
                    "services": [],
                    "failures": [{"arn": format!("arn:aws:ecs:eu-west-1:123456789012:service/{name}"), "reason": "MISSING"}],
                }))
            }
        }
        ("CreateService" | "UpdateService" | "DeleteService", _) => ok(json!({
            "service": service(&body["desiredCount"], &body["taskDefinition"]),
        })),
        _ => (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/x-amz-json-1.1")],
            json!({"__type": "UnknownOperationException", "message": target}).to_string(),
        )
            .into_response(),
    }
}

async fn fake(mode: Mode) -> (EcsDeployer, Arc<Mutex<Vec<Call>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route("/", axum::routing::post(handle))
        .with_state(Fake {
            calls: calls.clone(),
            mode,
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = aws_sdk_ecs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-west-1"))
        .endpoint_url(format!("http://{addr}"))
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .build();
    (
        EcsDeployer::new(aws_sdk_ecs::Client::from_conf(config)),
        calls,
    )
}

fn spec() -> DeploySpec {
    DeploySpec::from_toml(
        r#"
        image = "user-service:1.2.0"
        replicas = 3
        [resources]
        cpu = "500m"
        memory = "1Gi"
        [environment]
        NODE_ENV = "production"
        [health_check]
        path = "/health"
        port = 3000
        "#,
    )
    .unwrap()
}

fn options() -> EcsOptions {
    EcsOptions::new()
        .cluster("production")
        .registry("123456789012.dkr.ecr.eu-west-1.amazonaws.com")
        .execution_role_arn("arn:aws:iam::123456789012:role/ecsTaskExecutionRole")
        .subnets(vec!["subnet-0abc".into()])
}

fn operations(calls: &Mutex<Vec<Call>>) -> Vec<String> {
    calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.operation.clone())
        .collect()
}

#[tokio::test]
async fn registers_the_task_definition_then_creates_the_service() {
    let (deployer, calls) = fake(Mode::Fresh).await;
    let deployed = deployer
        .deploy("user-service", &spec(), &options())
        .await
        .unwrap();
    assert_eq!(
        operations(&calls),
        [
            "RegisterTaskDefinition",
            "DescribeServices",
            "CreateService"
        ]
    );
    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.iter().all(|c| c.authorized),
        "unsigned request: {calls:?}"
    );

    // RegisterTaskDefinition: the rendered task definition, field by field.
    let task = &calls[0].body;
    assert_eq!(task["family"], "user-service");
    assert_eq!(task["cpu"], "512");
    assert_eq!(task["memory"], "1024");
    assert_eq!(task["networkMode"], "awsvpc");
    assert_eq!(task["requiresCompatibilities"], json!(["FARGATE"]));
    assert_eq!(
        task["executionRoleArn"],
        "arn:aws:iam::123456789012:role/ecsTaskExecutionRole"
    );
    let container = &task["containerDefinitions"][0];
    assert_eq!(container["name"], "user-service");
    assert_eq!(
        container["image"],
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/user-service:1.2.0"
    );
    assert_eq!(container["essential"], true);
    assert_eq!(container["cpu"], 512);
    assert_eq!(container["memory"], 1024);
    assert_eq!(
        container["environment"],
        json!([{"name": "NODE_ENV", "value": "production"}])
    );
    assert_eq!(container["portMappings"][0]["containerPort"], 3000);
    assert_eq!(container["portMappings"][0]["hostPort"], 3000);
    assert_eq!(container["portMappings"][0]["protocol"], "tcp");
    assert_eq!(container["portMappings"][0]["appProtocol"], "http");
    let check = &container["healthCheck"];
    assert_eq!(check["command"][0], "CMD-SHELL");
    assert!(
        check["command"][1]
            .as_str()
            .unwrap()
            .contains("http://127.0.0.1:3000/health"),
        "{check}"
    );
    assert_eq!(check["interval"], 10);
    assert_eq!(check["retries"], 3);
    assert!(
        task["tags"]
            .as_array()
            .unwrap()
            .contains(&json!({"key": "trellis.version", "value": "1.2.0"}))
    );

    // DescribeServices looks in the cluster first.
    assert_eq!(calls[1].body["cluster"], "production");
    assert_eq!(calls[1].body["services"], json!(["user-service"]));

    // CreateService: on the ARN from the first answer.
    let service = &calls[2].body;
    assert_eq!(service["serviceName"], "user-service");
    assert_eq!(service["cluster"], "production");
    assert_eq!(service["desiredCount"], 3);
    assert_eq!(
        service["taskDefinition"],
        "arn:aws:ecs:eu-west-1:123456789012:task-definition/user-service:7"
    );
    assert_eq!(service["launchType"], "FARGATE");
    assert_eq!(
        service["deploymentConfiguration"]["deploymentCircuitBreaker"],
        json!({"enable": true, "rollback": true})
    );
    assert_eq!(
        service["networkConfiguration"]["awsvpcConfiguration"]["subnets"],
        json!(["subnet-0abc"])
    );

    assert!(deployed.created);
    assert_eq!(deployed.revision, 7);
    assert_eq!(
        deployed.task_definition_arn,
        "arn:aws:ecs:eu-west-1:123456789012:task-definition/user-service:7"
    );
    assert_eq!(
        deployed.service_arn,
        "arn:aws:ecs:eu-west-1:123456789012:service/production/user-service"
    );
    assert_eq!(deployed.desired_count, 3);
}

#[tokio::test]
async fn an_existing_service_is_updated_to_the_new_revision() {
    let (deployer, calls) = fake(Mode::Existing).await;
    let deployed = deployer.deploy("shop", &spec(), &options()).await.unwrap();
    assert_eq!(
        operations(&calls),
        [
            "RegisterTaskDefinition",
            "DescribeServices",
            "UpdateService"
        ]
    );
    let update = calls.lock().unwrap()[2].body.clone();
    assert_eq!(update["service"], "shop");
    assert_eq!(update["cluster"], "production");
    assert_eq!(update["desiredCount"], 3);
    assert_eq!(
        update["taskDefinition"],
        "arn:aws:ecs:eu-west-1:123456789012:task-definition/shop:7"
    );
    assert!(!deployed.created);
}

#[tokio::test]
async fn an_error_answer_is_a_clear_deploy_error_and_nothing_more_is_sent() {
    let (deployer, calls) = fake(Mode::RejectRegister).await;
    let err = deployer
        .deploy("user-service", &spec(), &options())
        .await
        .unwrap_err();
    let DeployError::Ecs { operation, reason } = &err else {
        panic!("not an ECS error: {err}");
    };
    assert_eq!(operation, "RegisterTaskDefinition user-service");
    assert_eq!(
        reason,
        "ClientException: Fargate requires task definition to have execution role ARN to support ECR images."
    );
    assert!(
        err.to_string()
            .starts_with("ecs: RegisterTaskDefinition user-service: ClientException")
    );
    // No service was created on a task definition that does not exist.
    assert_eq!(operations(&calls), ["RegisterTaskDefinition"]);
}

#[tokio::test]
async fn a_bad_spec_sends_nothing() {
    let (deployer, calls) = fake(Mode::Fresh).await;
    let bad =
        DeploySpec::from_toml("image = \"shop:1\"\nreplicas = -2\n[resources]\ncpu = \"lots\"")
            .unwrap();
    let err = deployer.deploy("shop", &bad, &options()).await.unwrap_err();
    assert_eq!(err.fields(), ["replicas", "resources.cpu"]);
    assert!(operations(&calls).is_empty());
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_clear_deploy_error() {
    // A port that was free a moment ago: nothing listens.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = aws_sdk_ecs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-west-1"))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .retry_config(aws_sdk_ecs::config::retry::RetryConfig::disabled())
        .build();
    let deployer = EcsDeployer::new(aws_sdk_ecs::Client::from_conf(config));
    let err = deployer
        .deploy("shop", &spec(), &options())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("ecs: RegisterTaskDefinition shop: "),
        "{text}"
    );
    assert!(
        text.contains("connect") || text.contains("dispatch"),
        "{text}"
    );
}

#[tokio::test]
async fn the_backend_deploys_reports_and_undeploys_through_the_service_deployer() {
    let (deployer, calls) = fake(Mode::Fresh).await;
    let dir = tempfile::tempdir().unwrap();
    let store = trellis_store::Store::open(&format!("sqlite://{}/r.db", dir.path().display()))
        .await
        .unwrap();
    let registry = ServiceRegistry::start(&store, RegistryOptions::default())
        .await
        .unwrap();
    let backend = EcsBackend::new(deployer, options(), Some("production".into()));
    let facade = ServiceDeployer::builder(Platform::Ecs, registry.clone())
        .backend(Arc::new(backend))
        .build()
        .unwrap();

    let deployment = facade
        .deploy_version("shop", "1.4.0", &spec())
        .await
        .unwrap();
    assert_eq!(deployment.platform, Platform::Ecs);
    assert_eq!(deployment.replicas.len(), 3);
    assert_eq!(deployment.replicas[0].instance_id, "shop-7-0");
    assert_eq!(deployment.replicas[0].port, 3000);
    // The fake says one task runs.
    assert_eq!(deployment.replicas[0].phase, ReplicaPhase::Running);
    assert_eq!(deployment.replicas[1].phase, ReplicaPhase::Starting);
    let register = calls.lock().unwrap()[0].body.clone();
    assert!(
        register["tags"]
            .as_array()
            .unwrap()
            .contains(&json!({"key": "trellis.version", "value": "1.4.0"}))
    );

    let status = facade.status("shop").await.unwrap();
    assert_eq!(status.len(), 3);
    assert_eq!(status[0].version, "1.4.0");

    let stopped = facade.undeploy("shop").await.unwrap();
    assert_eq!(stopped.len(), 3);
    assert!(stopped.iter().all(|r| r.phase == ReplicaPhase::Stopped));
    let ops = operations(&calls);
    assert_eq!(
        &ops[ops.len() - 3..],
        ["DescribeServices", "UpdateService", "DeleteService"]
    );
    let scale = calls.lock().unwrap()[ops.len() - 2].body.clone();
    assert_eq!(scale["desiredCount"], 0);
    registry.shutdown().await.unwrap();
}
