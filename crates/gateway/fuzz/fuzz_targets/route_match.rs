//! Route matching and prefix stripping on arbitrary request targets: never panics, and a
//! forwarded path never escapes with `.`/`..` segments or loses its leading `/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let (method, path) = target.split_once(' ').unwrap_or(("GET", target));
    if let Some(forwarded) = trellis_gateway::fuzzing::route_and_strip(method, path) {
        assert!(forwarded.starts_with('/'), "{path:?} -> {forwarded:?}");
        for segment in forwarded.split('/') {
            assert!(segment != ".." && segment != ".", "{path:?} -> {forwarded:?}");
        }
    }
});
