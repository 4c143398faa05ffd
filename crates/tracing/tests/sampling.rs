#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Parent-based ratio sampling: 0.1 over 10,000 new traces keeps about 1,000, and no child
//! is ever sampled without its parent — local or remote.

use std::collections::HashSet;

use axum::http::{HeaderMap, HeaderValue, Method};
use trellis_tracing::{DistributedTracer, TraceBuffer};

#[test]
fn ratio_0_1_over_10000_roots_keeps_1000_plus_minus_100_and_children_follow() {
    let buffer = TraceBuffer::new(100_000);
    let tracer = DistributedTracer::builder("sampled")
        .sampling_rate(0.1)
        .buffer(buffer.clone())
        .build()
        .unwrap();
    let mut kept = HashSet::new();
    for _ in 0..10_000 {
        let root = tracer.start_span("root");
        let child = tracer.start_child("child", &root);
        let grandchild = tracer.start_child("grandchild", &child);
        assert_eq!(child.is_sampled(), root.is_sampled());
        assert_eq!(grandchild.is_sampled(), root.is_sampled());
        assert_eq!(child.trace_id(), root.trace_id());
        if root.is_sampled() {
            kept.insert(root.trace_id());
        }
    }
    let n = kept.len();
    assert!((900..=1100).contains(&n), "kept {n} of 10000 traces at 0.1");
    // Exactly the sampled traces reached the buffer, each complete.
    assert_eq!(buffer.trace_count(), n);
    assert_eq!(buffer.span_count(), 3 * n);
    for summary in buffer.recent(None, 100_000) {
        assert!(kept.contains(&summary.trace_id));
        assert_eq!(summary.span_count, 3);
        assert_eq!(summary.root_name, "root");
    }
}

#[test]
fn remote_parents_decide_for_their_children() {
    let buffer = TraceBuffer::new(1000);
    let always = DistributedTracer::builder("always")
        .sampling_rate(1.0)
        .buffer(buffer.clone())
        .build()
        .unwrap();
    let never = DistributedTracer::builder("never")
        .sampling_rate(0.0)
        .buffer(buffer.clone())
        .build()
        .unwrap();
    let headers = |flags: &str| {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_str(&format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"
            ))
            .unwrap(),
        );
        h
    };
    // An unsampled upstream is not overridden by a rate of 1.0 …
    let span = always.http_server_span(&Method::GET, "/", &headers("00"));
    assert!(!span.is_sampled());
    assert!(!always.start_child("child", &span).is_sampled());
    drop(span);
    // … and a sampled one is kept even at rate 0.0.
    let span = never.http_server_span(&Method::GET, "/", &headers("01"));
    assert!(span.is_sampled());
    assert!(never.start_child("child", &span).is_sampled());
    drop(span);
    assert!(!never.start_span("new root").is_sampled());
    assert_eq!(buffer.span_count(), 2);
}

#[test]
fn sampling_rate_out_of_range_is_refused() {
    for rate in [-0.1, 1.01, f64::NAN] {
        let err = DistributedTracer::builder("x")
            .sampling_rate(rate)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("sampling_rate"), "{err}");
    }
}
