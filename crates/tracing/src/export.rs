//! Export of finished spans through a bounded queue and one export thread.
//!
//! Why not the SDK's `BatchSpanProcessor`: it drops spans when its queue is full but does
//! not let the caller count them, and the admin `/metrics` must show that number. This
//! processor is the same idea, with the counters public:
//!
//! - `on_end` (on the request's thread) only does a `try_send` into a bounded queue; when
//!   the queue is full the span is dropped and counted. A collector that is down or slow
//!   therefore never blocks, slows or fails a request.
//! - One thread owns the exporter: it builds batches of up to `max_batch` spans, or what
//!   arrived within `batch_interval`, and exports them one request at a time, each bounded
//!   by the exporter's own timeout. Failed batches are counted, not retried.
//! - The exporter is built on that thread too, so the blocking OTLP HTTP client never runs
//!   inside (or is dropped by) a Tokio runtime.

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::error::{Result, TracingError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Export counters, shared by every clone; register them with
/// [`register_metrics`](Self::register_metrics).
#[derive(Clone, Debug)]
pub struct ExportStats {
    exported: Counter,
    dropped: Family<ReasonLabels, Counter>,
    queue_full: Counter,
    export_failed: Counter,
}

impl Default for ExportStats {
    fn default() -> Self {
        let dropped = Family::<ReasonLabels, Counter>::default();
        let queue_full = dropped
            .get_or_create(&ReasonLabels {
                reason: "queue_full",
            })
            .clone();
        let export_failed = dropped
            .get_or_create(&ReasonLabels {
                reason: "export_failed",
            })
            .clone();
        ExportStats {
            exported: Counter::default(),
            dropped,
            queue_full,
            export_failed,
        }
    }
}

impl ExportStats {
    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.get()
    }

    /// Spans lost because the export queue was full (collector slow or down).
    pub fn dropped_queue_full(&self) -> u64 {
        self.queue_full.get()
    }

    /// Spans lost because their export request failed or timed out.
    pub fn dropped_export_failed(&self) -> u64 {
        self.export_failed.get()
    }

    /// All spans lost on the way to the collector.
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full() + self.dropped_export_failed()
    }

    /// Registers `trellis_tracing_spans_exported` and `trellis_tracing_spans_dropped`
    /// (label `reason`: `queue_full`, `export_failed`) in `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "trellis_tracing_spans_exported",
            "Spans accepted by the OTLP collector",
            self.exported.clone(),
        );
        registry.register(
            "trellis_tracing_spans_dropped",
            "Spans lost on the way to the OTLP collector, by reason (queue_full, export_failed)",
            self.dropped.clone(),
        );
    }
}

/// Export tuning; see [`TracingConfig`](crate::TracingConfig) for each knob.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchOptions {
    pub(crate) queue_size: usize,
    pub(crate) max_batch: usize,
    pub(crate) batch_interval: Duration,
    /// How long `force_flush` and `shutdown` wait for the export thread.
    pub(crate) flush_timeout: Duration,
}

enum Message {
    Span(Box<SpanData>),
    Flush(Sender<()>),
    Shutdown(Sender<()>),
}

/// The bounded batch processor (see the module docs).
#[derive(Debug)]
pub(crate) struct BoundedBatchProcessor {
    queue: Sender<Message>,
    stats: ExportStats,
    flush_timeout: Duration,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Message")
    }
}

impl BoundedBatchProcessor {
    /// Starts the export thread, which builds its exporter with `make_exporter` and gives
    /// it `resource`. Fails when the thread cannot start or the exporter cannot be built.
    pub(crate) fn start<E, F>(
        make_exporter: F,
        resource: Resource,
        options: BatchOptions,
        stats: ExportStats,
    ) -> Result<Self>
    where
        E: SpanExporter + 'static,
        F: FnOnce() -> Result<E> + Send + 'static,
    {
        let (queue, receiver) = crossbeam_channel::bounded(options.queue_size);
        let (built_tx, built_rx) = crossbeam_channel::bounded::<Result<()>>(1);
        let worker_stats = stats.clone();
        let worker = std::thread::Builder::new()
            .name("trellis-trace-export".into())
            .spawn(move || {
                // Nothing the exporter does (HTTP client spans, …) may become a span itself.
                let _suppressed = Context::enter_telemetry_suppressed_scope();
                let mut exporter = match make_exporter() {
                    Ok(exporter) => exporter,
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        return;
                    }
                };
                exporter.set_resource(&resource);
                let _ = built_tx.send(Ok(()));
                run(exporter, receiver, options, worker_stats);
            })
            .map_err(TracingError::Thread)?;
        match built_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(TracingError::Thread(std::io::Error::other(
                    "the export thread ended before building its exporter",
                )));
            }
        }
        Ok(BoundedBatchProcessor {
            queue,
            stats,
            flush_timeout: options.flush_timeout,
            worker: Mutex::new(Some(worker)),
        })
    }

    fn control(
        &self,
        make: impl FnOnce(Sender<()>) -> Message,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
        let started = Instant::now();
        self.queue
            .send_timeout(make(ack_tx), timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))?;
        let left = timeout.saturating_sub(started.elapsed());
        ack_rx
            .recv_timeout(left)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for BoundedBatchProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.queue.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.queue_full.inc();
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.control(Message::Flush, self.flush_timeout)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(worker) = worker else {
            return Ok(()); // already shut down
        };
        let result = self.control(Message::Shutdown, timeout.min(self.flush_timeout));
        if result.is_ok() {
            let _ = worker.join();
        }
        // On timeout the thread is left to finish its current export on its own.
        result
    }
}

fn run<E: SpanExporter>(
    exporter: E,
    receiver: Receiver<Message>,
    options: BatchOptions,
    stats: ExportStats,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(options.max_batch);
    let mut deadline = Instant::now() + options.batch_interval;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(wait) {
            Ok(Message::Span(span)) => {
                batch.push(*span);
                if batch.len() >= options.max_batch {
                    export(&exporter, &mut batch, &stats);
                    deadline = Instant::now() + options.batch_interval;
                }
            }
            Ok(Message::Flush(ack)) => {
                export(&exporter, &mut batch, &stats);
                let _ = exporter.force_flush();
                let _ = ack.send(());
            }
            Ok(Message::Shutdown(ack)) => {
                export(&exporter, &mut batch, &stats);
                let _ = exporter.shutdown();
                let _ = ack.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                export(&exporter, &mut batch, &stats);
                deadline = Instant::now() + options.batch_interval;
            }
            Err(RecvTimeoutError::Disconnected) => {
                export(&exporter, &mut batch, &stats);
                let _ = exporter.shutdown();
                return;
            }
        }
    }
}

fn export<E: SpanExporter>(exporter: &E, batch: &mut Vec<SpanData>, stats: &ExportStats) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let count = spans.len() as u64;
    match futures_executor::block_on(exporter.export(spans)) {
        Ok(()) => {
            stats.exported.inc_by(count);
        }
        Err(e) => {
            stats.export_failed.inc_by(count);
            tracing::debug!(target: "trellis_tracing::export", error = %e, spans = count, "span export failed");
        }
    }
}
