//! The admin API end to end: a node on 127.0.0.1 with a real SQLite file, driven over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use trellis_admin::{Node, NodeError, Settings};

struct TestNode {
    node: Node,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start_with(token: Option<&str>) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.store.url = format!("sqlite://{}/admin.db", dir.path().display());
    settings.admin.listen = "127.0.0.1:0".into();
    settings.admin.token = token.map(str::to_owned);
    settings.config.environment = Some("test".into());
    settings.config.refresh_interval = Duration::from_millis(50).into();
    let node = Node::start(settings).await.unwrap();
    let base = format!("http://{}", node.admin_addr());
    TestNode {
        node,
        base,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

async fn start() -> TestNode {
    start_with(None).await
}

impl TestNode {
    async fn call(&self, method: Method, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_over_http() {
    let n = start().await;
    let body = r#"{"host":"127.0.0.1","port":3001,"version":"1.2.0","metadata":{"region":"us-east-1"},"ttl":"1m"}"#;
    let (status, record) = n
        .call(
            Method::PUT,
            "/v1/services/user-service/instances/u1",
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{record}");
    assert_eq!(record["id"], "u1");
    assert_eq!(record["status"], "unknown");
    assert_eq!(record["metadata"]["region"], "us-east-1");

    let (status, list) = n.call(Method::GET, "/v1/services", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list["services"],
        json!([{"name": "user-service", "instances": 1}])
    );

    let (_, heartbeat) = n
        .call(
            Method::PUT,
            "/v1/services/user-service/instances/u1/heartbeat",
            None,
        )
        .await;
    assert_eq!(heartbeat["heartbeat"], "recorded");
    // The heartbeat makes a TTL-checked instance healthy.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, instances) = n
            .call(Method::GET, "/v1/services/user-service/instances", None)
            .await;
        if instances["instances"][0]["status"] == "healthy" {
            assert_eq!(instances["stale"], false);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never healthy: {instances}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = n
        .call(Method::GET, "/v1/services/user-service/instances/u1", None)
        .await;
    assert_eq!(status, StatusCode::OK);

    let (status, gone) = n
        .call(
            Method::DELETE,
            "/v1/services/user-service/instances/u1",
            None,
        )
        .await;
    assert_eq!(
        (status, &gone["deregistered"]),
        (StatusCode::OK, &json!(true))
    );
    let (status, err) = n
        .call(
            Method::DELETE,
            "/v1/services/user-service/instances/u1",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert_eq!(err["error"], "not_found");
    let (status, err) = n
        .call(
            Method::PUT,
            "/v1/services/user-service/instances/u1/heartbeat",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    n.node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_over_http() {
    let n = start().await;
    let (status, _) = n.call(Method::GET, "/v1/config/user-service", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v1) = n
        .call(
            Method::PUT,
            "/v1/config/user-service",
            Some(r#"{"features":{"socialLogin":false}}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v1}");
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["environment"], "test");
    let (_, v2) = n
        .call(
            Method::PUT,
            "/v1/config/user-service",
            Some(r#"{"features":{"socialLogin":true}}"#),
        )
        .await;
    assert_eq!(v2["version"], 2);
    let (_, current) = n
        .call(Method::GET, "/v1/config/user-service?env=test", None)
        .await;
    assert_eq!(current["version"], 2);
    assert_eq!(current["config"]["features"]["socialLogin"], true);
    let (_, other_env) = n
        .call(
            Method::PUT,
            "/v1/config/user-service?env=production",
            Some("{}"),
        )
        .await;
    assert_eq!(other_env["version"], 1, "environments are versioned apart");

    let (status, conflict) = n
        .call(
            Method::PUT,
            "/v1/config/user-service?expected_version=1",
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    assert_eq!(conflict["error"], "conflict");

    let (status, rolled) = n
        .call(
            Method::POST,
            "/v1/config/user-service/rollback?version=1",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rolled}");
    assert_eq!(rolled["version"], 3);
    assert_eq!(rolled["rolled_back_from"], 1);
    assert_eq!(rolled["config"]["features"]["socialLogin"], false);
    let (_, history) = n
        .call(Method::GET, "/v1/config/user-service/history", None)
        .await;
    let versions: Vec<u64> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    let (status, _) = n
        .call(
            Method::POST,
            "/v1/config/user-service/rollback?version=9",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Long poll: a watcher after version 3 gets version 4 once it is written.
    let watcher = {
        let (http, base) = (n.http.clone(), n.base.clone());
        tokio::spawn(async move {
            http.get(format!(
                "{base}/v1/config/user-service/watch?after=3&timeout=10s"
            ))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
        })
    };
    n.call(Method::PUT, "/v1/config/user-service", Some(r#"{"x":4}"#))
        .await;
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen["versions"][0]["version"], 4, "{seen}");
    let (_, empty) = n
        .call(
            Method::GET,
            "/v1/config/user-service/watch?after=4&timeout=100ms",
            None,
        )
        .await;
    assert_eq!(empty["versions"], json!([]));
    n.node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_problem_and_changes_nothing() {
    let n = start().await;
    // Baseline state that must survive every bad request untouched.
    let ok = r#"{"host":"127.0.0.1","port":3001}"#;
    assert_eq!(
        n.call(Method::PUT, "/v1/services/svc/instances/i1", Some(ok))
            .await
            .0,
        StatusCode::CREATED
    );
    assert_eq!(
        n.call(Method::PUT, "/v1/config/svc", Some(r#"{"a":1}"#))
            .await
            .0,
        StatusCode::OK
    );

    let mega = "n".repeat(1 << 20);
    let long = "n".repeat(60_000);
    let body_with_mega_id = format!(r#"{{"id":"{mega}","host":"h","port":1}}"#);
    let long_path = format!("/v1/services/{long}/instances/i2");
    let cases: Vec<(Method, String, Option<&str>, &str)> = vec![
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"#),
            "body: host: EOF while parsing",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some("not json"),
            "body: expected",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(""),
            "body: empty",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":"80"}"#),
            "body: port: invalid type: string",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":70000}"#),
            "body: port: invalid value: integer `70000`",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":0}"#),
            "port: 0 is not a usable port",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":-1}"#),
            "body: port: invalid value: integer `-1`",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":1,"ttl":"-1s"}"#),
            "body: ttl: \"-1s\" is negative",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":1,"ttl":-5}"#),
            "body: ttl: \"-5\" is negative",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":1,"ttl":"soon"}"#),
            "body: ttl: \"soon\" is not a duration",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":1,"health_check":{"endpoint":"/h","interval":"fast"}}"#),
            "body: health_check.interval: \"fast\" is not a duration",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":1,"health_check":{"endpoint":"h","interval":"2m"}}"#),
            "health_check.endpoint",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"host":"h","port":1,"colour":"red"}"#),
            "body: colour: unknown field `colour`",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"port":1}"#),
            "body: missing field `host`",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(&body_with_mega_id),
            "body: ",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2".into(),
            Some(r#"{"id":"other","host":"h","port":1}"#),
            "differs from the id in the path",
        ),
        (
            Method::PUT,
            "/v1/services/a%2Fb/instances/i2".into(),
            Some(ok),
            "service name \"a/b\" contains '/'",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/a%2Fb".into(),
            Some(ok),
            "instance id \"a/b\" contains '/'",
        ),
        (
            Method::PUT,
            "/v1/services//instances/i2".into(),
            Some(ok),
            "empty",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/%20".into(),
            Some(ok),
            "contains ' '",
        ),
        (
            Method::PUT,
            long_path.clone(),
            Some(ok),
            "service name is 60000 bytes long; at most 63 allowed",
        ),
        (
            Method::PUT,
            "/v1/services/svc/instances/i2/heartbeat".replace("i2", "bad%2Fid"),
            None,
            "instance id",
        ),
        (
            Method::DELETE,
            "/v1/services/svc/instances/a%2Fb".into(),
            None,
            "contains '/'",
        ),
        (
            Method::GET,
            "/v1/services/a%2Fb/instances".into(),
            None,
            "contains '/'",
        ),
        (
            Method::PUT,
            "/v1/config/svc".into(),
            Some(r#"{"a":"#),
            "EOF while parsing",
        ),
        (
            Method::PUT,
            "/v1/config/svc".into(),
            Some("[1,2]"),
            "must be a JSON object",
        ),
        (
            Method::PUT,
            "/v1/config/svc".into(),
            Some(""),
            "body: empty",
        ),
        (
            Method::PUT,
            "/v1/config/svc?env=a%2Fb".into(),
            Some("{}"),
            "environment \"a/b\" contains '/'",
        ),
        (
            Method::PUT,
            "/v1/config/svc?expected_version=minus".into(),
            Some("{}"),
            "query: ",
        ),
        (
            Method::PUT,
            "/v1/config/a%2Fb".into(),
            Some("{}"),
            "contains '/'",
        ),
        (
            Method::GET,
            "/v1/config/svc?env=".into(),
            None,
            "environment is empty",
        ),
        (
            Method::POST,
            "/v1/config/svc/rollback?version=abc".into(),
            None,
            "query: ",
        ),
        (
            Method::POST,
            "/v1/config/svc/rollback".into(),
            None,
            "missing field `version`",
        ),
        (
            Method::POST,
            "/v1/config/svc/rollback?version=-1".into(),
            None,
            "query: ",
        ),
        (
            Method::GET,
            "/v1/config/svc/watch?timeout=-1s".into(),
            None,
            "negative",
        ),
        (
            Method::GET,
            "/v1/config/svc/watch?timeout=2h".into(),
            None,
            "longer than the limit",
        ),
        (
            Method::GET,
            "/v1/config/svc/history?env=%20".into(),
            None,
            "environment",
        ),
    ];
    for (method, path, body, needle) in &cases {
        let (status, err) = n.call(method.clone(), path, *body).await;
        let shown: String = path.chars().take(80).collect();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {shown}: {err}");
        assert_eq!(err["error"], "invalid_request", "{method} {shown}: {err}");
        let detail = err["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "{method} {shown}: {detail:.300}");
    }
    // A 1 MB name in the path: no HTTP client library will even send it, so a raw TCP
    // client does; the HTTP layer refuses the oversized request head before routing (431).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(n.node.admin_addr())
            .await
            .unwrap();
        let request = format!(
            "PUT /v1/services/{mega}/instances/i2 HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{ok}",
            ok.len()
        );
        // The server may answer and close before reading everything.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut head = vec![0u8; 64];
        let read = stream.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..read]).into_owned();
        assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    }
    // Oversized bodies are refused too. The server may answer before reading the whole
    // body and close, so a raw client that ignores write errors reads the answer.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let huge = format!(r#"{{"host":"{}","port":1}}"#, "h".repeat(3 << 20));
        let mut stream = tokio::net::TcpStream::connect(n.node.admin_addr())
            .await
            .unwrap();
        let head = format!(
            "PUT /v1/services/svc/instances/i2 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            huge.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(huge.as_bytes()).await;
        let mut answer = vec![0u8; 64];
        let read = stream.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    // Nothing stored changed.
    let (_, list) = n.call(Method::GET, "/v1/services", None).await;
    assert_eq!(list["services"], json!([{"name": "svc", "instances": 1}]));
    let (_, instances) = n
        .call(Method::GET, "/v1/services/svc/instances", None)
        .await;
    assert_eq!(instances["instances"][0]["id"], "i1");
    assert_eq!(instances["instances"][0]["port"], 3001);
    let (_, history) = n.call(Method::GET, "/v1/config/svc/history", None).await;
    assert_eq!(history["versions"].as_array().unwrap().len(), 1);
    let (_, config) = n.call(Method::GET, "/v1/config/svc", None).await;
    assert_eq!(config["config"], json!({"a": 1}));
    n.node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_unknown_routes() {
    let n = start().await;
    let (status, health) = n.call(Method::GET, "/health", None).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["checks"][0]["name"], "store");
    assert!(health["checks"][0]["duration_ms"].is_number());
    assert_eq!(
        n.call(Method::GET, "/health/live", None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        n.call(Method::GET, "/health/ready", None).await.0,
        StatusCode::OK
    );
    n.call(
        Method::PUT,
        "/v1/services/svc/instances/i1",
        Some(r#"{"host":"127.0.0.1","port":1}"#),
    )
    .await;

    let (status, text) = n.call(Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap().to_owned();
    for needle in [
        "trellis_admin_requests_total{route=\"/v1/services/{service}/instances/{id}\",method=\"PUT\",status=\"201\"} 1",
        "trellis_store_operations_total{backend=\"sqlite\",operation=\"put\",outcome=\"ok\"}",
        "trellis_store_operation_duration_seconds_bucket",
        "trellis_registry_instances{service=\"svc\",status=\"unknown\"} 1",
        "trellis_registry_stale 0",
        "# EOF",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let (status, err) = n.call(Method::GET, "/v2/nothing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["error"], "not_found");
    let (status, err) = n.call(Method::PATCH, "/v1/services", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{err}");
    n.node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_api() {
    let token = "0123456789abcdef-token";
    let n = start_with(Some(token)).await;
    let (status, err) = n.call(Method::GET, "/v1/services", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    let wrong = n
        .http
        .get(format!("{}/v1/services", n.base))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = n
        .http
        .get(format!("{}/v1/services", n.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::OK);
    assert_eq!(
        n.call(Method::GET, "/health/live", None).await.0,
        StatusCode::OK,
        "probes stay open"
    );
    n.node.shutdown().await.unwrap();

    let mut settings = Settings::default();
    settings.admin.listen = "0.0.0.0:0".into();
    match Node::start(settings).await {
        Err(NodeError::Insecure(addr)) => assert_eq!(addr.port(), 0),
        other => panic!("a node beyond loopback without a token must refuse to start: {other:?}"),
    }
}
