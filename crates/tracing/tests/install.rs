#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `install` sets the global subscriber so plain `tracing` spans are recorded, and refuses
//! a second install. Its own test binary: the global subscriber is per process.

use trellis_tracing::{TraceBuffer, TracingConfig, TracingError, install};

#[test]
fn install_records_plain_tracing_spans_and_refuses_a_second_install() {
    let buffer = TraceBuffer::new(100);
    let config = TracingConfig {
        service_name: "installed".into(),
        ..TracingConfig::default()
    };
    let guard = install(&config, Some(buffer.clone())).unwrap();
    assert_eq!(guard.tracer().service_name(), "installed");
    {
        let outer = tracing::info_span!("outer");
        let _entered = outer.enter();
        tracing::info_span!("inner").in_scope(|| {});
    }
    let traces = buffer.recent(Some("installed"), 10);
    assert_eq!(traces.len(), 1, "{traces:?}");
    assert_eq!(traces[0].root_name, "outer");
    assert_eq!(traces[0].span_count, 2);

    let err = install(&config, None).unwrap_err();
    assert!(matches!(err, TracingError::AlreadyInstalled(_)), "{err}");
    let bad = TracingConfig {
        sampling_rate: 2.0,
        ..TracingConfig::default()
    };
    assert!(
        install(&bad, None)
            .unwrap_err()
            .to_string()
            .contains("sampling_rate")
    );
    drop(guard);
}
