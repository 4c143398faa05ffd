//! Span creation cost: `cargo bench -p trellis-tracing --bench spans`.
//!
//! Each case runs at most 200,000 iterations or 2 seconds, whichever comes first, after a
//! short warm-up, and prints nanoseconds per iteration. One iteration = start a span, set
//! one tag, finish it (or, for the `http` cases, a gateway request's server + client span
//! with the headers written).
//!
//! Cases marked "SDK path" run the tracer with `sdk_only(true)`: every span an SDK span and
//! the generic propagators, as before unsampled spans got their fast path — the before
//! and after of that change in one run.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use trellis_tracing::{DistributedTracer, TraceBuffer};

const MAX_ITERATIONS: u64 = 200_000;
const MAX_TIME: Duration = Duration::from_secs(2);

/// An exporter that discards everything (measures our queue, not the network).
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

fn bench(name: &str, mut f: impl FnMut(u64)) {
    for i in 0..10_000 {
        f(i);
    }
    let started = Instant::now();
    let mut n = 0;
    while n < MAX_ITERATIONS && started.elapsed() < MAX_TIME {
        for _ in 0..1000 {
            f(n);
            n += 1;
        }
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<48} {ns:>8.0} ns/iter  ({n} iterations)");
}

fn span_case(name: &str, tracer: &DistributedTracer) {
    bench(name, |i| {
        let span = tracer.start_span("operation");
        span.set_tag("iteration", i as i64);
        span.finish();
    });
}

fn main() {
    let disabled = DistributedTracer::disabled();
    let unsampled = DistributedTracer::builder("bench")
        .sampling_rate(0.0)
        .buffer(TraceBuffer::new(10_000))
        .exporter(Discard)
        .build()
        .unwrap();
    let unsampled_sdk = DistributedTracer::builder("bench")
        .sampling_rate(0.0)
        .buffer(TraceBuffer::new(10_000))
        .exporter(Discard)
        .sdk_only(true)
        .build()
        .unwrap();
    let tenth = DistributedTracer::builder("bench")
        .sampling_rate(0.1)
        .buffer(TraceBuffer::new(10_000))
        .build()
        .unwrap();
    let tenth_sdk = DistributedTracer::builder("bench")
        .sampling_rate(0.1)
        .buffer(TraceBuffer::new(10_000))
        .sdk_only(true)
        .build()
        .unwrap();
    let sampled_buffer = DistributedTracer::builder("bench")
        .buffer(TraceBuffer::new(10_000))
        .build()
        .unwrap();
    let sampled_export = DistributedTracer::builder("bench")
        .exporter(Discard)
        .queue_size(100_000)
        .build()
        .unwrap();
    let sampled_both = DistributedTracer::builder("bench")
        .buffer(TraceBuffer::new(10_000))
        .exporter(Discard)
        .queue_size(100_000)
        .build()
        .unwrap();

    span_case("span: tracing off (disabled tracer)", &disabled);
    span_case("span: unsampled (rate 0.0), SDK path", &unsampled_sdk);
    span_case("span: unsampled (rate 0.0)", &unsampled);
    span_case("span: sampled, in-memory buffer", &sampled_buffer);
    span_case("span: sampled, export queue (discarding)", &sampled_export);
    span_case("span: sampled, buffer + export queue", &sampled_both);

    let mut incoming = HeaderMap::new();
    incoming.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    // The upstream's decision wins (parent-based sampling): an unsampled caller.
    let mut unsampled_incoming = HeaderMap::new();
    unsampled_incoming.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
    );
    let none = HeaderMap::new();
    for (name, tracer, headers) in [
        ("http server+client span: tracing off", &disabled, &incoming),
        (
            "http server+client span: unsampled caller, SDK path",
            &unsampled_sdk,
            &unsampled_incoming,
        ),
        (
            "http server+client span: unsampled caller",
            &unsampled,
            &unsampled_incoming,
        ),
        (
            "http server+client span: no headers, rate 0, SDK path",
            &unsampled_sdk,
            &none,
        ),
        (
            "http server+client span: no headers, rate 0",
            &unsampled,
            &none,
        ),
        (
            "http server+client span: no headers, rate 0.1, SDK path",
            &tenth_sdk,
            &none,
        ),
        (
            "http server+client span: no headers, rate 0.1",
            &tenth,
            &none,
        ),
        (
            "http server+client span: sampled, buffer+export",
            &sampled_both,
            &incoming,
        ),
    ] {
        let sdk_path = name.ends_with("SDK path");
        bench(name, |_| {
            let server = tracer.http_server_span(&Method::GET, "/users/u1", headers);
            server.set_route("/users/{id}");
            server.set_upstream("10.0.0.1:8080");
            let mut out = HeaderMap::new();
            // What the gateway called before, and what it calls now.
            let client = if sdk_path {
                tracer.http_client_span_with_parent(
                    server.context(),
                    &Method::GET,
                    "http://users/u1",
                    &mut out,
                )
            } else {
                tracer.http_client_span_child_of(&server, &Method::GET, "http://users/u1", &mut out)
            };
            client.finish(200);
            server.finish(200);
            black_box(out);
        });
    }
    println!(
        "export queue drops during the bench: {} (exported {})",
        sampled_both.stats().dropped(),
        sampled_both.stats().exported()
    );
}
