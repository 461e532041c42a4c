//! A batching span processor with a bounded queue whose depth and drops are counted.
//!
//! The SDK's `BatchSpanProcessor` does not expose its queue depth or drop count, so this one
//! replaces it: [`SpanProcessor::on_end`] pushes into a bounded queue without waiting (a full
//! queue drops the span and counts it), and a dedicated worker thread exports batches of up to
//! `max_export_batch_size` spans every `schedule_delay`, or as soon as a full batch is queued.
//! Every export is bounded by `export_timeout`. Memory is bounded by the queue capacity whatever
//! the collector does.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;

use super::config::BatchSettings;
use super::stats::{ExportSignal, ExportStats, ERROR_TIMEOUT};

/// Shortest wait of the worker between two scheduled exports (a `schedule_delay` of 0 means
/// "as soon as possible", not a busy loop).
const MIN_DELAY: Duration = Duration::from_millis(1);

/// The batching processor. Build it with [`BoundedBatchProcessor::new`] inside a tokio runtime
/// (or pass a handle): exporters whose futures need tokio (gRPC, hyper) run on it.
pub struct BoundedBatchProcessor<E: SpanExporter + 'static> {
    shared: Arc<Shared<E>>,
}

struct Shared<E> {
    state: Mutex<State>,
    /// Wakes the worker: a full batch, a flush or the shutdown.
    work: Condvar,
    /// Wakes `force_flush` / `shutdown` callers when the worker finished a request.
    done: Condvar,
    exporter: Mutex<E>,
    settings: BatchSettings,
    stats: Arc<ExportStats>,
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
struct State {
    queue: VecDeque<SpanData>,
    /// Flushes requested so far / completed so far.
    flush_requested: u64,
    flush_done: u64,
    /// Result of the last completed flush.
    flush_result: Option<Result<(), String>>,
    shutdown: bool,
    /// Dropped without a shutdown: stop without exporting (the runtime may be gone).
    discard: bool,
    stopped: bool,
}

impl<E> Shared<E> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<E: SpanExporter + 'static> fmt::Debug for BoundedBatchProcessor<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedBatchProcessor")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl<E: SpanExporter + 'static> BoundedBatchProcessor<E> {
    /// Starts the worker thread. `runtime` drives the exporter's futures (and the export
    /// timeout); `stats` receives the queue depth, the drops and the timed-out exports.
    pub fn new(
        exporter: E,
        settings: BatchSettings,
        stats: Arc<ExportStats>,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        let settings = BatchSettings {
            max_queue_size: settings.max_queue_size.max(1),
            max_export_batch_size: settings
                .max_export_batch_size
                .clamp(1, settings.max_queue_size.max(1)),
            ..settings
        };
        stats.set_queue_capacity(settings.max_queue_size);
        stats.set_queue_size(0);
        let shared = Arc::new(Shared {
            // Grows up to the capacity as spans queue up; nothing is reserved in advance.
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            exporter: Mutex::new(exporter),
            settings,
            stats,
            runtime,
        });
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("span-export".into())
            .spawn(move || worker.run())?;
        Ok(Self { shared })
    }

    /// Spans waiting in the queue now.
    pub fn queue_len(&self) -> usize {
        self.shared.lock().queue.len()
    }
}

impl<E: SpanExporter + 'static> Shared<E> {
    fn run(&self) {
        let delay = self.settings.schedule_delay.max(MIN_DELAY);
        let mut next = Instant::now() + delay;
        loop {
            let mut st = self.lock();
            // Wait for a full batch, a flush, the shutdown or the schedule.
            loop {
                if st.shutdown
                    || st.flush_requested > st.flush_done
                    || st.queue.len() >= self.settings.max_export_batch_size
                {
                    break;
                }
                let now = Instant::now();
                if now >= next {
                    break;
                }
                st = self
                    .work
                    .wait_timeout(st, next - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if st.discard {
                st.stopped = true;
                st.queue.clear();
                self.stats.set_queue_size(0);
                return;
            }
            let flush = st.flush_requested;
            let drain = st.shutdown || flush > st.flush_done;
            let shutdown = st.shutdown;
            if drain {
                // Export what is queued now (not what arrives meanwhile), batch by batch.
                let mut left = st.queue.len();
                drop(st);
                let mut result = Ok(());
                while left > 0 {
                    let batch = self.take(left);
                    left -= batch.len().min(left);
                    if batch.is_empty() {
                        break;
                    }
                    if let Err(e) = self.export(batch) {
                        result = Err(e);
                    }
                }
                if shutdown {
                    let e = self
                        .exporter
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .shutdown_with_timeout(self.settings.export_timeout);
                    let mut st = self.lock();
                    st.flush_done = st.flush_requested;
                    st.flush_result = Some(match (result, e) {
                        (Ok(()), Ok(())) => Ok(()),
                        (Err(e), _) => Err(e),
                        (Ok(()), Err(e)) => Err(e.to_string()),
                    });
                    st.stopped = true;
                    drop(st);
                    self.done.notify_all();
                    return;
                }
                let mut st = self.lock();
                st.flush_done = flush;
                st.flush_result = Some(result);
                drop(st);
                self.done.notify_all();
            } else {
                let n = st.queue.len().min(self.settings.max_export_batch_size);
                drop(st);
                if n > 0 {
                    let batch = self.take(n);
                    // The result is counted in the stats; there is no caller to report it to.
                    let _ = self.export(batch);
                }
            }
            if Instant::now() >= next {
                next = Instant::now() + delay;
            }
        }
    }

    /// Up to `max` spans (and at most one batch) from the head of the queue.
    fn take(&self, max: usize) -> Vec<SpanData> {
        let mut st = self.lock();
        let n = st
            .queue
            .len()
            .min(max)
            .min(self.settings.max_export_batch_size);
        let batch: Vec<SpanData> = st.queue.drain(..n).collect();
        self.stats.set_queue_size(st.queue.len());
        batch
    }

    /// Exports one batch, bounded by the export timeout. The exporter (wrapped by
    /// `export::otlp::Counted`) counts finished exports; a timed-out one is counted here.
    fn export(&self, batch: Vec<SpanData>) -> Result<(), String> {
        let n = batch.len() as u64;
        let timeout = self.settings.export_timeout;
        let exporter = self.exporter.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let result = self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, exporter.export(batch)).await });
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => {
                self.stats.record_export(
                    ExportSignal::Spans,
                    n,
                    Some(ERROR_TIMEOUT),
                    started.elapsed(),
                );
                Err(format!("span export timed out after {timeout:?}"))
            }
        }
    }

    /// Asks the worker to flush (or shut down) and waits up to `timeout` for it.
    fn request(&self, shutdown: bool, timeout: Duration) -> OTelSdkResult {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        if st.stopped || (st.shutdown && !shutdown) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        if shutdown {
            if st.shutdown {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            st.shutdown = true;
        } else {
            st.flush_requested += 1;
        }
        let ticket = st.flush_requested;
        self.work.notify_all();
        loop {
            let finished = if shutdown {
                st.stopped
            } else {
                st.flush_done >= ticket || st.stopped
            };
            if finished {
                return match &st.flush_result {
                    Some(Err(e)) => Err(OTelSdkError::InternalFailure(e.clone())),
                    _ => Ok(()),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(OTelSdkError::Timeout(timeout));
            }
            st = self
                .done
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl<E: SpanExporter + 'static> SpanProcessor for BoundedBatchProcessor<E> {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    /// Never waits for the exporter: a full queue drops the span and counts it.
    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let mut st = self.shared.lock();
        if st.shutdown {
            return;
        }
        if st.queue.len() >= self.shared.settings.max_queue_size {
            drop(st);
            self.shared.stats.span_dropped();
            return;
        }
        st.queue.push_back(span);
        let len = st.queue.len();
        self.shared.stats.set_queue_size(len);
        drop(st);
        if len >= self.shared.settings.max_export_batch_size {
            self.shared.work.notify_one();
        }
    }

    /// Exports everything queued now; waits at most the export timeout per batch queued (plus
    /// one for an export already under way).
    fn force_flush(&self) -> OTelSdkResult {
        let batches = self
            .shared
            .lock()
            .queue
            .len()
            .div_ceil(self.shared.settings.max_export_batch_size)
            // One more: the worker may be in the middle of an export.
            .saturating_add(1);
        let timeout = self
            .shared
            .settings
            .export_timeout
            .saturating_mul(u32::try_from(batches).unwrap_or(u32::MAX));
        self.shared.request(false, timeout)
    }

    /// Exports what is queued, shuts the exporter down and stops the worker, waiting at most
    /// `timeout`.
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.shared.request(true, timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.shared
            .exporter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_resource(resource);
    }
}

impl<E: SpanExporter + 'static> Drop for BoundedBatchProcessor<E> {
    fn drop(&mut self) {
        // Stop the worker without waiting and without exporting: the provider shuts processors
        // down explicitly before dropping them; a processor dropped otherwise must not leave
        // its thread behind, nor export on a runtime that may be gone.
        let mut st = self.shared.lock();
        st.discard = true;
        drop(st);
        self.shared.work.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId};
    use opentelemetry::InstrumentationScope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};

    fn span(i: u64, sampled: bool) -> SpanData {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(u128::from(i) + 1),
                SpanId::from(i + 1),
                flags,
                false,
                Default::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: "GET".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("test").build(),
        }
    }

    /// Counts exported spans; blocks every export while `blocked` is set.
    #[derive(Debug, Clone, Default)]
    struct Gate {
        blocked: Arc<AtomicBool>,
        exported: Arc<AtomicUsize>,
        batches: Arc<Mutex<Vec<usize>>>,
        shut: Arc<AtomicBool>,
    }

    impl SpanExporter for Gate {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            while self.blocked.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            self.batches.lock().unwrap().push(batch.len());
            self.exported.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
        fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
            self.shut.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    fn settings(queue: usize, batch: usize, delay: Duration, timeout: Duration) -> BatchSettings {
        BatchSettings {
            max_queue_size: queue,
            schedule_delay: delay,
            export_timeout: timeout,
            max_export_batch_size: batch,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_exporter_drops_exactly_the_overflow() {
        let gate = Gate::default();
        gate.blocked.store(true, Ordering::SeqCst);
        let stats = ExportStats::new();
        // One batch of 10 leaves the queue and blocks in the exporter; the queue then fills.
        let cap = 100;
        let p = BoundedBatchProcessor::new(
            gate.clone(),
            settings(cap, 10, Duration::from_secs(3600), Duration::from_secs(30)),
            Arc::clone(&stats),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        for i in 0..10 {
            p.on_end(span(i, true));
        }
        // Wait (bounded) until the worker took the first batch into the blocked export.
        let started = Instant::now();
        while p.queue_len() > 0 && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(p.queue_len(), 0, "the worker did not take the first batch");
        let pushed = 10 * cap as u64;
        for i in 0..pushed {
            p.on_end(span(10 + i, true));
        }
        // Not sampled: never queued, never counted.
        p.on_end(span(99_999, false));
        assert_eq!(p.queue_len(), cap);
        let s = stats.snapshot();
        assert_eq!(s.queue_size, cap as u64);
        assert_eq!(s.queue_capacity, cap as u64);
        assert_eq!(s.spans_dropped, pushed - cap as u64);
        assert_eq!(gate.exported.load(Ordering::SeqCst), 0);

        // Unblock: everything queued is exported by a flush, in batches of at most 10.
        gate.blocked.store(false, Ordering::SeqCst);
        let p = Arc::new(p);
        let p2 = Arc::clone(&p);
        tokio::task::spawn_blocking(move || p2.force_flush())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gate.exported.load(Ordering::SeqCst), 10 + cap);
        assert!(gate.batches.lock().unwrap().iter().all(|&n| n <= 10));
        assert_eq!(stats.snapshot().queue_size, 0);
        let p2 = Arc::clone(&p);
        tokio::task::spawn_blocking(move || p2.shutdown())
            .await
            .unwrap()
            .unwrap();
        assert!(gate.shut.load(Ordering::SeqCst));
        let p2 = Arc::clone(&p);
        let again = tokio::task::spawn_blocking(move || p2.shutdown())
            .await
            .unwrap();
        assert!(matches!(again, Err(OTelSdkError::AlreadyShutdown)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_end_of_many_spans_returns_and_counts_add_up() {
        let gate = Gate::default();
        gate.blocked.store(true, Ordering::SeqCst);
        let stats = ExportStats::new();
        let cap = 1000;
        let p = BoundedBatchProcessor::new(
            gate.clone(),
            settings(cap, 100, Duration::from_millis(1), Duration::from_secs(30)),
            Arc::clone(&stats),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        let n = 100_000u64;
        for i in 0..n {
            p.on_end(span(i, true));
        }
        let s = stats.snapshot();
        // Every span is queued, in the one blocked export (at most a batch), or dropped.
        assert_eq!(s.queue_size, p.queue_len() as u64);
        assert!(s.queue_size <= cap as u64, "{s:?}");
        let in_export = n - s.spans_dropped - s.queue_size;
        assert!(in_export <= 100, "{s:?}");
        assert!(s.spans_dropped >= n - cap as u64 - 100, "{s:?}");
        gate.blocked.store(false, Ordering::SeqCst);
        shutdown(p).await;
        assert_eq!(
            gate.exported.load(Ordering::SeqCst) as u64 + stats.spans_dropped(),
            n
        );
    }

    async fn shutdown<E: SpanExporter + 'static>(p: BoundedBatchProcessor<E>) {
        tokio::task::spawn_blocking(move || p.shutdown_with_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scheduled_and_full_batches_export_without_a_flush() {
        let gate = Gate::default();
        let stats = ExportStats::new();
        let p = BoundedBatchProcessor::new(
            gate.clone(),
            settings(100, 5, Duration::from_millis(50), Duration::from_secs(5)),
            Arc::clone(&stats),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        // 3 spans: exported by the schedule; 5 more: a full batch.
        for i in 0..8 {
            p.on_end(span(i, true));
        }
        let started = Instant::now();
        while gate.exported.load(Ordering::SeqCst) < 8
            && started.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(gate.exported.load(Ordering::SeqCst), 8);
        shutdown(p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_export_is_cut_at_the_timeout_and_counted() {
        let gate = Gate::default();
        gate.blocked.store(true, Ordering::SeqCst);
        let stats = ExportStats::new();
        let p = BoundedBatchProcessor::new(
            gate.clone(),
            settings(
                100,
                10,
                Duration::from_secs(3600),
                Duration::from_millis(200),
            ),
            Arc::clone(&stats),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        for i in 0..3 {
            p.on_end(span(i, true));
        }
        let p = Arc::new(p);
        let p2 = Arc::clone(&p);
        let r = tokio::task::spawn_blocking(move || p2.force_flush())
            .await
            .unwrap();
        assert!(
            matches!(&r, Err(OTelSdkError::InternalFailure(e)) if e.contains("timed out")),
            "{r:?}"
        );
        assert_eq!(stats.spans_failed(), 3);
        assert_eq!(stats.span_exports(), 1);
        gate.blocked.store(false, Ordering::SeqCst);
        let p = Arc::into_inner(p).unwrap();
        shutdown(p).await;
    }
}
