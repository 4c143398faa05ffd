//! What a mesh-aware client needs: the service's mesh DNS name, the headers to pass on, and
//! which mesh (if any) this process runs in.
//!
//! A client talking through a mesh sends to the Kubernetes Service name and lets the sidecar
//! pick the endpoint, retry and break circuits. Its own retries and breaker must be off, or
//! the mesh's policy is multiplied (3 client retries × 3 mesh retries = 16 tries).

use std::collections::BTreeMap;

use http::HeaderMap;

use crate::error::{MeshError, invalid};
use crate::options::MeshProvider;

/// Headers a service must copy from the request it is serving onto the requests it makes,
/// so that the mesh joins the spans into one trace: the request id, W3C trace context and B3
/// (single and multi header). Lower case, as HTTP/2 sends them.
pub const PROPAGATED_HEADERS: [&str; 9] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Copies every [`PROPAGATED_HEADERS`] entry present in `incoming` onto `outgoing`,
/// replacing what `outgoing` had for that name. Returns how many headers were copied.
pub fn propagate_headers(incoming: &HeaderMap, outgoing: &mut HeaderMap) -> usize {
    let mut copied = 0;
    for name in PROPAGATED_HEADERS {
        let mut values = incoming.get_all(name).iter().peekable();
        if values.peek().is_none() {
            continue;
        }
        outgoing.remove(name);
        for value in values {
            outgoing.append(name, value.clone());
            copied += 1;
        }
    }
    copied
}

/// Where a mesh-aware client sends requests for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshTarget {
    /// The service name (`user-service`).
    pub service: String,
    /// Its namespace (`default`).
    pub namespace: String,
    /// The fully qualified name the sidecar routes on:
    /// `user-service.default.svc.cluster.local`.
    pub host: String,
}

impl MeshTarget {
    /// `http://{host}:{port}/`, the base URL for a client of the service's port `port`.
    /// Plain HTTP on purpose: the sidecars add mutual TLS between pods.
    pub fn base_url(&self, port: u16) -> String {
        format!("http://{}:{port}/", self.host)
    }
}

/// How a mesh was detected, for logs and `trellis mesh` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshDetection {
    /// The mesh.
    pub provider: MeshProvider,
    /// The environment variable that gave it away (`ISTIO_META_MESH_ID`).
    pub evidence: String,
}

/// The explicit override: `TRELLIS_MESH=istio|linkerd|consul|none`.
pub const MESH_ENV: &str = "TRELLIS_MESH";

/// Detects the mesh from environment variables, given as a map so tests need not touch the
/// process environment (see [`detect_mesh_from_process`]):
///
/// 1. [`MESH_ENV`] wins: a provider name, or `none` for no mesh; anything else is an error
///    naming the variable.
/// 2. Otherwise the first variable, by name order, that a sidecar or injector sets:
///    `ISTIO_META_*` (Istio's proxy metadata), `LINKERD2_PROXY_*` (Linkerd's proxy),
///    `CONSUL_HTTP_ADDR`, `CONNECT_SIDECAR` or `CONSUL_CONNECT_*` (Consul's injector).
///    When variables of several meshes are present, Istio is preferred, then Linkerd, then
///    Consul, as in [`MeshProvider::ALL`].
/// 3. Otherwise no mesh.
pub fn detect_mesh(env: &BTreeMap<String, String>) -> Result<Option<MeshDetection>, MeshError> {
    if let Some(value) = env.get(MESH_ENV) {
        let value = value.trim();
        if value.eq_ignore_ascii_case("none") || value.is_empty() {
            return Ok(None);
        }
        let provider = value.parse::<MeshProvider>().map_err(|_| {
            invalid(
                MESH_ENV,
                format!("{value:?} is not a mesh; use istio, linkerd, consul or none"),
            )
        })?;
        return Ok(Some(MeshDetection {
            provider,
            evidence: MESH_ENV.to_owned(),
        }));
    }
    for provider in MeshProvider::ALL {
        let found = env.keys().find(|name| match provider {
            MeshProvider::Istio => name.starts_with("ISTIO_META_"),
            MeshProvider::Linkerd => name.starts_with("LINKERD2_PROXY_"),
            MeshProvider::Consul => {
                name.as_str() == "CONSUL_HTTP_ADDR"
                    || name.as_str() == "CONNECT_SIDECAR"
                    || name.starts_with("CONSUL_CONNECT_")
            }
        });
        if let Some(name) = found {
            return Ok(Some(MeshDetection {
                provider,
                evidence: name.clone(),
            }));
        }
    }
    Ok(None)
}

/// [`detect_mesh`] over this process's environment (variables that are not valid UTF-8 are
/// skipped).
pub fn detect_mesh_from_process() -> Result<Option<MeshDetection>, MeshError> {
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    detect_mesh(&env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn detection() {
        assert_eq!(detect_mesh(&env(&[("PATH", "/bin")])), Ok(None));
        let cases = [
            (
                vec![("ISTIO_META_MESH_ID", "m")],
                MeshProvider::Istio,
                "ISTIO_META_MESH_ID",
            ),
            (
                vec![("LINKERD2_PROXY_IDENTITY_DIR", "/x")],
                MeshProvider::Linkerd,
                "LINKERD2_PROXY_IDENTITY_DIR",
            ),
            (
                vec![("CONSUL_HTTP_ADDR", "127.0.0.1:8500")],
                MeshProvider::Consul,
                "CONSUL_HTTP_ADDR",
            ),
            (
                vec![("CONNECT_SIDECAR", "1")],
                MeshProvider::Consul,
                "CONNECT_SIDECAR",
            ),
            (
                vec![("CONSUL_HTTP_ADDR", "x"), ("LINKERD2_PROXY_LOG", "info")],
                MeshProvider::Linkerd,
                "LINKERD2_PROXY_LOG",
            ),
            (
                vec![("ISTIO_META_X", "x"), ("TRELLIS_MESH", "consul")],
                MeshProvider::Consul,
                "TRELLIS_MESH",
            ),
        ];
        for (vars, provider, evidence) in cases {
            let found = detect_mesh(&env(&vars)).unwrap().unwrap();
            assert_eq!(found.provider, provider, "{vars:?}");
            assert_eq!(found.evidence, evidence, "{vars:?}");
        }
        assert_eq!(
            detect_mesh(&env(&[("ISTIO_META_X", "x"), ("TRELLIS_MESH", "none")])),
            Ok(None)
        );
        let err = detect_mesh(&env(&[("TRELLIS_MESH", "kuma")])).unwrap_err();
        assert_eq!(err.field(), Some("TRELLIS_MESH"));
        // Not a prefix match on the bare word.
        assert_eq!(detect_mesh(&env(&[("ISTIO_METAX", "x")])), Ok(None));
    }

    #[test]
    fn propagation_copies_only_the_trace_headers() {
        let mut incoming = HeaderMap::new();
        incoming.insert("x-request-id", HeaderValue::from_static("r1"));
        incoming.insert("x-b3-traceid", HeaderValue::from_static("t1"));
        incoming.append("tracestate", HeaderValue::from_static("a=1"));
        incoming.append("tracestate", HeaderValue::from_static("b=2"));
        incoming.insert("authorization", HeaderValue::from_static("secret"));
        let mut outgoing = HeaderMap::new();
        outgoing.insert("x-request-id", HeaderValue::from_static("stale"));
        outgoing.insert("accept", HeaderValue::from_static("*/*"));
        assert_eq!(propagate_headers(&incoming, &mut outgoing), 4);
        assert_eq!(outgoing["x-request-id"], "r1");
        assert_eq!(outgoing["x-b3-traceid"], "t1");
        assert_eq!(outgoing.get_all("tracestate").iter().count(), 2);
        assert!(outgoing.get("authorization").is_none());
        assert_eq!(outgoing["accept"], "*/*");
    }
}
