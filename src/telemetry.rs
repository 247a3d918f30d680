//! Logging: human-readable text locally, JSON lines in production. `RUST_LOG` overrides the
//! configured level. The server writes its lines from a thread of its own, so a request
//! task never waits on a write to stderr (a slow pipe or log collector included).

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Lines queued for the writer thread. When the queue is full, the logging task waits for
/// room rather than lose a line; at a few hundred bytes a line this bounds the queue to a
/// few MiB.
const QUEUED_LINES: usize = 8192;

/// Keeps the writer thread of [`init`] alive. Dropping it writes out every queued line and
/// stops the thread: hold it until the process ends.
#[must_use = "dropping the guard stops the log writer; hold it until the process ends"]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

/// Install the global subscriber, writing to stderr from a background thread (once; later
/// calls are ignored). The returned guard flushes the queued lines when dropped.
pub fn init(settings: &LogSettings) -> LogGuard {
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("umgw-log")
        .finish(std::io::stderr());
    let installed = install(settings, writer);
    LogGuard {
        // When a subscriber was already installed, the writer is unused: let it go.
        _worker: installed.then_some(worker),
    }
}

/// Install the global subscriber, writing to stderr on the logging thread itself (once;
/// later calls are ignored). For tests, whose output must be complete whenever they end.
pub fn init_sync(settings: &LogSettings) {
    install(settings, std::io::stderr);
}

/// Whether the subscriber was installed (false: one already was).
fn install<W>(settings: &LogSettings, writer: W) -> bool
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
            .is_ok(),
        LogFormat::Text => builder.try_init().is_ok(),
    }
}
