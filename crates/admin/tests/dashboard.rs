//! The dashboard as served by a real node on 127.0.0.1 with a SQLite file: every embedded
//! asset with its content type, the redirects, and the admin token on every API call the
//! pages make.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode, header};
use trellis_admin::{Node, Settings};

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
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    TestNode {
        node,
        base,
        http,
        _dir: dir,
    }
}

fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// Every file under `assets/`, as paths relative to it with `/` separators.
fn asset_files() -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                let parts: Vec<_> = rel.iter().map(|p| p.to_str().unwrap()).collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(&assets_dir(), &assets_dir(), &mut out);
    out.sort();
    out
}

fn content_type_for(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        other => panic!("no expected content type for {path} ({other:?})"),
    }
}

/// The quoted strings following each `marker` in `text` (`from '`, `src="`, …).
fn quoted_after(text: &str, marker: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(marker) {
        rest = &rest[at + marker.len()..];
        let quote = marker.chars().last().unwrap();
        if let Some(end) = rest.find(quote) {
            out.push(rest[..end].to_owned());
        }
    }
    out
}

/// Resolves `reference` (relative to the asset `from`) to an asset path.
fn resolve(from: &str, reference: &str) -> String {
    let mut parts: Vec<&str> = from.split('/').collect();
    parts.pop();
    for piece in reference.split('/') {
        match piece {
            "." | "" => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_every_asset_are_served_with_their_content_types() {
    let n = start_with(None).await;

    // `/` and `/dashboard` lead to `/dashboard/`.
    for (path, status) in [
        ("/", StatusCode::TEMPORARY_REDIRECT),
        ("/dashboard", StatusCode::PERMANENT_REDIRECT),
    ] {
        let response = n
            .http
            .get(format!("{}{path}", n.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(
            response.headers()[header::LOCATION],
            "/dashboard/",
            "{path}"
        );
    }

    let index = n
        .http
        .get(format!("{}/dashboard/", n.base))
        .send()
        .await
        .unwrap();
    assert_eq!(index.status(), StatusCode::OK);
    assert_eq!(
        index.headers()[header::CONTENT_TYPE],
        "text/html; charset=utf-8"
    );
    let csp = index.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(index.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(
        index.bytes().await.unwrap(),
        std::fs::read(assets_dir().join("index.html")).unwrap(),
        "/dashboard/ serves index.html"
    );

    // Every file on disk is embedded and served as itself, with its type.
    let files = asset_files();
    assert!(files.len() >= 10, "assets found: {files:?}");
    for file in &files {
        let response = n
            .http
            .get(format!("{}/dashboard/{file}", n.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{file}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            content_type_for(file),
            "{file}"
        );
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache");
        assert_eq!(
            response.bytes().await.unwrap(),
            std::fs::read(assets_dir().join(file)).unwrap(),
            "{file} differs from the file on disk"
        );
    }

    // Everything the pages reference exists: <script src>, <link href> and module imports.
    let known: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    let html = std::fs::read_to_string(assets_dir().join("index.html")).unwrap();
    let mut references: Vec<(String, String)> = quoted_after(&html, "src=\"")
        .into_iter()
        .chain(quoted_after(&html, "href=\""))
        .filter(|r| !r.starts_with('#'))
        .map(|r| ("index.html".to_owned(), r))
        .collect();
    for file in files.iter().filter(|f| f.ends_with(".js")) {
        let text = std::fs::read_to_string(assets_dir().join(file)).unwrap();
        for r in quoted_after(&text, "from '") {
            references.push((file.clone(), r));
        }
    }
    assert!(references.len() > 10, "{references:?}");
    for (from, reference) in &references {
        let target = resolve(from, reference);
        assert!(
            known.contains(target.as_str()),
            "{from} refers to {reference} ({target}), which is not an asset"
        );
    }

    // Unknown files are a JSON 404 naming the file.
    let missing = n
        .http
        .get(format!("{}/dashboard/js/nope.js", n.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("js/nope.js"),
        "{body}"
    );
    // The API around it is unchanged.
    let services = n
        .http
        .get(format!("{}/v1/services", n.base))
        .send()
        .await
        .unwrap();
    assert_eq!(services.status(), StatusCode::OK);
    n.node.shutdown().await.unwrap();
}

/// Every API call the dashboard's scripts make (static prefix, method, a concrete path).
const DASHBOARD_CALLS: &[(Method, &str)] = &[
    (Method::GET, "/v1/services"),
    (Method::GET, "/v1/services/user-service/instances"),
    (Method::GET, "/v1/services/user-service/instances/u1"),
    (Method::GET, "/v1/gateway/routes"),
    (Method::GET, "/v1/gateway/upstreams"),
    (Method::GET, "/v1/gateway/ratelimits"),
    (Method::GET, "/metrics"),
    (Method::GET, "/v1/config/user-service/history?env=test"),
    (Method::POST, "/v1/config/user-service/rollback?version=1"),
    (Method::GET, "/v1/traces?limit=50"),
    (Method::GET, "/v1/traces/0af7651916cd43dd8448eb211c80319c"),
    (Method::GET, "/v1/sagas?state=running"),
    (Method::GET, "/v1/sagas/s1"),
    (Method::GET, "/v1/events/topics"),
    (Method::GET, "/v1/deployments"),
];

/// The API paths named in the scripts: `/v1/…` and `/metrics` up to the first character
/// that is not part of a literal path.
fn api_paths_in_assets() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in asset_files().iter().filter(|f| f.ends_with(".js")) {
        let text = std::fs::read_to_string(assets_dir().join(file)).unwrap();
        for marker in ["'/v1/", "`/v1/", "'/metrics'"] {
            let mut rest = text.as_str();
            while let Some(at) = rest.find(marker) {
                rest = &rest[at + 1..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "/_-".contains(c)))
                    .unwrap_or(rest.len());
                out.insert(rest[..end].to_owned());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_pages_load_but_every_api_call_they_make_needs_it() {
    // The list above covers every path the scripts name, so a new page cannot slip by.
    let named = api_paths_in_assets();
    assert!(named.len() >= 8, "{named:?}");
    for path in &named {
        assert!(
            DASHBOARD_CALLS
                .iter()
                .any(|(_, p)| p.starts_with(path.as_str())),
            "the dashboard calls {path}, which this test does not check"
        );
    }

    let token = "dashboard-token-0123456789";
    let n = start_with(Some(token)).await;
    // The pages themselves hold no data: they load without the token, so they can ask for it.
    for path in ["/dashboard/", "/dashboard/js/api.js", "/dashboard/app.css"] {
        let response = n
            .http
            .get(format!("{}{path}", n.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    for (method, path) in DASHBOARD_CALLS {
        let url = format!("{}{path}", n.base);
        let none = n.http.request(method.clone(), &url).send().await.unwrap();
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        let wrong = n
            .http
            .request(method.clone(), &url)
            .bearer_auth("not-the-token")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        let right = n
            .http
            .request(method.clone(), &url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_ne!(right.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    n.node.shutdown().await.unwrap();
}
