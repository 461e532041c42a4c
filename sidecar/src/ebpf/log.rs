//! Bridges the log lines of the eBPF programs (aya-log records in the `AYA_LOGS` ring buffer)
//! into `tracing`, under the target `sidecar::ebpf::kernel`, so they obey `RUST_LOG` and the
//! chosen log format like every other line of the agent.

use std::os::fd::AsRawFd;

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

/// The `tracing` target of every bridged kernel log line.
pub const KERNEL_LOG_TARGET: &str = "sidecar::ebpf::kernel";

/// A `log::Log` that re-emits each record as a `tracing` event (the eBPF module that logged
/// it goes into the `ebpf_module` field).
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let module = record.target();
        let message = record.args();
        match record.level() {
            log::Level::Error => {
                error!(target: KERNEL_LOG_TARGET, ebpf_module = module, "{message}")
            }
            log::Level::Warn => warn!(target: KERNEL_LOG_TARGET, ebpf_module = module, "{message}"),
            log::Level::Info => info!(target: KERNEL_LOG_TARGET, ebpf_module = module, "{message}"),
            log::Level::Debug => {
                debug!(target: KERNEL_LOG_TARGET, ebpf_module = module, "{message}")
            }
            log::Level::Trace => {
                trace!(target: KERNEL_LOG_TARGET, ebpf_module = module, "{message}")
            }
        }
    }

    fn flush(&self) {}
}

/// The reader of the programs' log ring buffer; [`KernelLog::run`] forwards records as they
/// arrive.
pub struct KernelLog {
    logger: EbpfLogger<TracingLog>,
}

impl std::fmt::Debug for KernelLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLog")
            .field("fd", &self.logger.as_raw_fd())
            .finish()
    }
}

impl KernelLog {
    /// Takes the `AYA_LOGS` map out of a loaded object. `None` (with a warning) when the object
    /// has no such map or it cannot be opened: the programs then log into nothing.
    pub(crate) fn take(bpf: &mut Ebpf) -> Option<Self> {
        match EbpfLogger::init_with_logger(bpf, TracingLog) {
            Ok(logger) => Some(Self { logger }),
            Err(e) => {
                warn!("eBPF program logs are not forwarded: {e}");
                None
            }
        }
    }

    /// Forwards every record queued so far.
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// Forwards records as they arrive until `shutdown`, then forwards what is left.
    pub async fn run(self, shutdown: CancellationToken) {
        // SAFETY: the logger owns its ring buffer's map descriptor, which stays open and is the
        // one `as_raw_fd` returns for as long as the `AsyncFd` owns it.
        let registered =
            unsafe { AsyncFd::register_with_interest(self.logger, tokio::io::Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!("eBPF program logs are not forwarded: cannot poll their ring buffer: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                ready = fd.readable_mut() => match ready {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        warn!("eBPF program logs: polling failed, no longer forwarded: {e}");
                        return;
                    }
                },
            }
        }
        fd.get_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use log::Log as _;

    use super::*;

    /// A `MakeWriter` collecting everything written into one buffer.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn records_become_tracing_events_with_level_target_and_module() {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for (level, text) in [
                (log::Level::Warn, "map insert failed (-7)"),
                (log::Level::Error, "unexpected state 3"),
                (log::Level::Debug, "filtered out by the subscriber"),
            ] {
                TracingLog.log(
                    &log::Record::builder()
                        .level(level)
                        .target("sidecar_ebpf::observe")
                        .args(format_args!("{text}"))
                        .build(),
                );
            }
        });
        let out = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].contains("WARN"), "{out}");
        assert!(lines[0].contains(KERNEL_LOG_TARGET), "{out}");
        assert!(lines[0].contains("map insert failed (-7)"), "{out}");
        assert!(
            lines[0].contains("ebpf_module=\"sidecar_ebpf::observe\""),
            "{out}"
        );
        assert!(lines[1].contains("ERROR"), "{out}");
        assert!(lines[1].contains("unexpected state 3"), "{out}");
    }
}
