//! The admin dashboard: a few pages of plain HTML, CSS and JavaScript modules, compiled
//! into the binary (no CDN, no build step, works offline), served at `/dashboard/` (and
//! `/` redirects there). The pages read the same JSON API as every other client:
//!
//! | page | reads |
//! |---|---|
//! | services, instances | `GET /v1/services`, `/v1/services/{service}/instances[/{id}]` |
//! | routes | `GET /v1/gateway/routes`, `/upstreams`, `/ratelimits` |
//! | metrics | `GET /metrics` (Prometheus text, parsed and turned into rates in the page) |
//! | configuration | `GET /v1/config/{service}/history`, `POST …/rollback` |
//! | traces, sagas, topics, deployments | `/v1/traces`, `/v1/sagas`, `/v1/events/topics`, `/v1/deployments`, shown as "not available on this node" when the node has no such endpoint |
//!
//! What the dashboard is not: it holds no state of its own and has no privileges. The
//! assets are served without the admin token — they hold no data — and every API call the
//! page makes goes through the admin API's token check: on a 401 the page asks for the
//! token and sends it as `Authorization: Bearer`, keeping it in the tab's session storage.
//!
//! Each response carries a `Content-Security-Policy` allowing only this origin, so the
//! pages run no inline or third-party script.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::error::ApiError;

/// Where the dashboard lives.
pub const DASHBOARD_PATH: &str = "/dashboard/";

/// What the pages may load: their own assets, and the admin API on the same origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    /// Path under `/dashboard/`.
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

macro_rules! asset {
    ($path:literal, $content_type:expr) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!("../assets/", $path)),
        }
    };
}

/// Every file of `crates/admin/assets/` (the integration test checks that none is missing).
const ASSETS: &[Asset] = &[
    asset!("index.html", HTML),
    asset!("app.css", CSS),
    asset!("favicon.svg", SVG),
    asset!("js/app.js", JS),
    asset!("js/api.js", JS),
    asset!("js/dom.js", JS),
    asset!("js/charts.js", JS),
    asset!("js/prom.js", JS),
    asset!("js/diff.js", JS),
    asset!("js/format.js", JS),
    asset!("js/pages/services.js", JS),
    asset!("js/pages/routes.js", JS),
    asset!("js/pages/metrics.js", JS),
    asset!("js/pages/config.js", JS),
    asset!("js/pages/traces.js", JS),
    asset!("js/pages/sagas.js", JS),
    asset!("js/pages/events.js", JS),
    asset!("js/pages/deployments.js", JS),
];

/// The dashboard's routes: `GET /` (redirect), `/dashboard` (redirect), `/dashboard/` and
/// `/dashboard/{asset}`. Stateless; merge it beside the admin API (see [`router`](crate::router)).
pub fn dashboard_router() -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::temporary(DASHBOARD_PATH) }))
        .route(
            "/dashboard",
            get(|| async { Redirect::permanent(DASHBOARD_PATH) }),
        )
        .route("/dashboard/", get(|| async { serve("index.html") }))
        .route("/dashboard/{*asset}", get(asset_handler))
}

async fn asset_handler(Path(asset): Path<String>) -> Response {
    serve(&asset)
}

fn serve(path: &str) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return ApiError::not_found(format!("the dashboard has no file {path:?}")).into_response();
    };
    let mut response = asset.body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    // Assets change with the binary: revalidate rather than serve a stale page.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_paths_are_unique_and_typed_by_extension() {
        for (i, a) in ASSETS.iter().enumerate() {
            assert!(
                ASSETS[..i].iter().all(|b| b.path != a.path),
                "duplicate {}",
                a.path
            );
            let expected = match a.path.rsplit_once('.').map(|(_, ext)| ext) {
                Some("html") => HTML,
                Some("js") => JS,
                Some("css") => CSS,
                Some("svg") => SVG,
                other => panic!("unexpected extension {other:?} of {}", a.path),
            };
            assert_eq!(a.content_type, expected, "{}", a.path);
            assert!(!a.body.is_empty(), "{} is empty", a.path);
        }
    }
}
