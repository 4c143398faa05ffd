//! Shared parts of the Kubernetes integration tests: the kubeconfig `scripts/services up
//! kube` writes, and the applier (or a skip notice when no API server answers and none is
//! required). Included by each kube test binary with `#[path]`.

#![allow(dead_code, unreachable_pub)]

use std::io::Write;
use std::path::PathBuf;

use trellis_deploy::KubernetesApplier;

/// `TRELLIS_KUBECONFIG`, else the kubeconfig under the services home.
pub fn kubeconfig() -> PathBuf {
    if let Some(path) = std::env::var_os("TRELLIS_KUBECONFIG") {
        return PathBuf::from(path);
    }
    std::env::var_os("TRELLIS_SERVICES_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.services"))
        .join("kube/kubeconfig")
}

/// `TRELLIS_REQUIRE_ENGINES=1`: a missing API server fails the test.
pub fn required() -> bool {
    std::env::var("TRELLIS_REQUIRE_ENGINES").is_ok_and(|v| v == "1")
}

/// The applier, or `None` (with a notice) when no API server answers and none is required.
pub async fn applier() -> Option<KubernetesApplier> {
    let path = kubeconfig();
    let why = match KubernetesApplier::from_kubeconfig(&path).await {
        Ok(applier) => match applier.client().apiserver_version().await {
            Ok(_) => return Some(applier),
            Err(e) => format!("the API server of {} does not answer: {e}", path.display()),
        },
        Err(e) => e.to_string(),
    };
    assert!(
        !required(),
        "kube-apiserver is required (TRELLIS_REQUIRE_ENGINES=1) but {why}; \
         start it with scripts/services up kube"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {why}; start it with scripts/services up kube"
    );
    None
}

/// A name unique to this test process.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}
