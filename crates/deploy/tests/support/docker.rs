//! Shared parts of the docker integration tests: the podman API service (`scripts/services
//! up podman`) and the busybox httpd image built here with nothing pulled — a rootfs tarball
//! holding Debian's static busybox (`sh`, `wget`, `httpd`) and a `/health` file, `podman
//! import`ed. A test binary includes it as `support::docker` or on its own (`#[path]`) when
//! it runs without the `local` feature.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use trellis_deploy::DockerDeployer;

/// Where `scripts/services` keeps the engines' state.
pub fn services_home() -> PathBuf {
    std::env::var_os("TRELLIS_SERVICES_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.services"))
}

/// The Engine API socket: `TRELLIS_DOCKER_SOCKET`, else podman's under the services home.
pub fn socket() -> String {
    std::env::var_os("TRELLIS_DOCKER_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| services_home().join("podman/podman.sock"))
        .to_string_lossy()
        .into_owned()
}

/// Whether the engine must be there (`TRELLIS_REQUIRE_ENGINES=1`).
pub fn required() -> bool {
    std::env::var("TRELLIS_REQUIRE_ENGINES").is_ok_and(|v| v == "1")
}

/// A deployer on the engine, or `None` (with a notice) when no engine answers and none is
/// required; a failure when one is.
pub async fn engine() -> Option<DockerDeployer> {
    let why = match DockerDeployer::connect_unix(&socket()) {
        Ok(deployer) => match deployer.ping().await {
            Ok(()) => return Some(deployer),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    assert!(
        !required(),
        "the podman API service is required (TRELLIS_REQUIRE_ENGINES=1) but: {why}; \
         start it with scripts/services up podman"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: no Docker Engine API ({why}); start it with scripts/services up podman"
    );
    None
}

static IMAGES_BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Imports the busybox httpd image as `image` once per test binary (podman import replaces
/// an image of the same name, so a re-run is harmless).
pub fn build_image(image: &str) {
    let mut built = IMAGES_BUILT.lock().unwrap();
    if built.contains(image) {
        return;
    }
    let busybox = PathBuf::from("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: scripts/services up podman installs busybox-static"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "wget", "httpd"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("www/health"), "ok\n").unwrap();
    let tar = dir.path().join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar failed");
    let output = Command::new("podman")
        .env(
            "CONTAINERS_CONF",
            services_home().join("podman/containers.conf"),
        )
        .arg("import")
        .arg("--change")
        .arg("ENV PATH=/bin")
        .arg(&tar)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "podman import failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    built.insert(image.to_owned());
}
