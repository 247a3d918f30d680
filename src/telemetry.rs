//! Logging: human-readable text locally, JSON lines in production. `RUST_LOG` overrides the
//! configured level. The server writes its lines from a thread of its own, so a request
//! task never waits on a write to stderr (a slow pipe or log collector included).
//!
//! The lines wait in one shared buffer. The first line into an empty buffer wakes the
//! writer thread, which writes out what gathered [`WRITE_EVERY`] later, or as soon as
//! [`WRITE_AT_BYTES`] wait. Logging a line is a copy under a lock: no channel message, and
//! at most one wake-up of the writer thread per interval (a channel woke it for every second
//! line under load), none while the server is idle.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

mod json;

/// How long a line waits for the writer thread at most (unless the output blocks). Short,
/// because the lines still waiting when the process is killed are lost.
const WRITE_EVERY: Duration = Duration::from_millis(10);
/// Waiting lines that wake the writer thread before its interval.
const WRITE_AT_BYTES: usize = 256 * 1024;
/// Waiting lines at most. When the buffer is full (stderr is slower than the logging), the
/// logging task waits for room rather than lose a line. A line longer than this is taken
/// alone.
const BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Keeps the writer thread of [`init`] alive. Dropping it writes out every waiting line and
/// stops the thread: hold it until the process ends.
#[must_use = "dropping the guard stops the log writer; hold it until the process ends"]
pub struct LogGuard {
    writer: Option<(LineBuffer, JoinHandle<()>)>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((buffer, thread)) = self.writer.take() {
            buffer.close();
            let _ = thread.join();
        }
    }
}

/// Install the global subscriber, writing to stderr from a background thread (once; later
/// calls are ignored). The returned guard writes out the waiting lines when dropped.
pub fn init(settings: &LogSettings) -> LogGuard {
    let buffer = LineBuffer::new(BUFFER_BYTES, WRITE_AT_BYTES);
    if !install(settings, buffer.clone()) {
        // A subscriber was already installed: this buffer is unused.
        return LogGuard { writer: None };
    }
    let thread = buffer.spawn_writer("umgw-log", std::io::stderr(), WRITE_EVERY);
    LogGuard {
        writer: thread.map(|thread| (buffer, thread)),
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
            .fmt_fields(json::JsonMembers)
            .event_format(json::JsonLines)
            .try_init()
            .is_ok(),
        LogFormat::Text => builder.try_init().is_ok(),
    }
}

/// Log lines waiting for the writer thread. Cloning shares the buffer.
#[derive(Clone)]
struct LineBuffer {
    shared: Arc<Shared>,
    limit: usize,
    write_at: usize,
}

struct Shared {
    state: Mutex<State>,
    /// The writer thread waits here for lines (or its interval).
    lines: Condvar,
    /// Loggers wait here for room in a full buffer.
    room: Condvar,
}

#[derive(Default)]
struct State {
    waiting: Vec<u8>,
    /// No writer thread runs (not yet started, or stopped): lines go straight to stderr.
    closed: bool,
}

impl LineBuffer {
    fn new(limit: usize, write_at: usize) -> Self {
        LineBuffer {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                lines: Condvar::new(),
                room: Condvar::new(),
            }),
            limit,
            write_at,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Add one line (whole: the subscriber hands each formatted line over in one write).
    /// Returns the line when no writer thread runs, for the caller to write itself.
    fn push<'a>(&self, line: &'a [u8]) -> Option<&'a [u8]> {
        let mut state = self.lock();
        while !state.closed
            && !state.waiting.is_empty()
            && state.waiting.len() + line.len() > self.limit
        {
            state = self
                .shared
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return Some(line);
        }
        let was_empty = state.waiting.is_empty();
        let was_below = state.waiting.len() < self.write_at;
        state.waiting.extend_from_slice(line);
        // The writer sleeps while nothing waits, and starts its interval at the first line.
        if was_empty || (was_below && state.waiting.len() >= self.write_at) {
            self.shared.lines.notify_one();
        }
        None
    }

    /// Start the thread that writes the waiting lines to `out`, every `every` or sooner
    /// when many wait. None if the thread could not be started: each line then goes to
    /// stderr from the task that logs it.
    fn spawn_writer<W: Write + Send + 'static>(
        &self,
        name: &str,
        out: W,
        every: Duration,
    ) -> Option<JoinHandle<()>> {
        let buffer = self.clone();
        match std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || buffer.write_until_closed(out, every))
        {
            Ok(thread) => Some(thread),
            Err(e) => {
                eprintln!("could not start the log writer thread ({e}); writing logs directly");
                self.close();
                None
            }
        }
    }

    fn write_until_closed<W: Write>(&self, mut out: W, every: Duration) {
        let mut batch = Vec::new();
        loop {
            let closed = {
                let mut state = self.lock();
                // Asleep while nothing waits (an idle server does not wake this thread)...
                while state.waiting.is_empty() && !state.closed {
                    state = self
                        .shared
                        .lines
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                // ...then the lines of one interval go out together.
                if state.waiting.len() < self.write_at && !state.closed {
                    state = self
                        .shared
                        .lines
                        .wait_timeout(state, every)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                std::mem::swap(&mut state.waiting, &mut batch);
                state.closed
            };
            self.shared.room.notify_all();
            if !batch.is_empty() {
                // Nowhere else to report a failed write to stderr: the lines are dropped.
                let _ = out.write_all(&batch).and_then(|()| out.flush());
                batch.clear();
                // A burst's buffer is not kept for ever.
                if batch.capacity() > 2 * self.write_at {
                    batch = Vec::new();
                }
            }
            if closed {
                return;
            }
        }
    }

    /// Stop the writer thread once it has written everything waiting; later lines go
    /// straight to stderr.
    fn close(&self) {
        self.lock().closed = true;
        self.shared.lines.notify_one();
        self.shared.room.notify_all();
    }
}

impl Write for LineBuffer {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if let Some(line) = self.push(line) {
            std::io::stderr().write_all(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for LineBuffer {
    type Writer = LineBuffer;

    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read while the writer thread holds it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        /// Start `buffer`'s writer thread, writing here.
        fn start(&self, buffer: &LineBuffer, every: Duration) -> JoinHandle<()> {
            buffer
                .spawn_writer("test-log", self.clone(), every)
                .unwrap()
        }

        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_writer_stops() {
        let buffer = LineBuffer::new(1024, 256);
        let sink = Sink::default();
        // An interval far longer than the test: only the size trigger and the close write.
        let thread = sink.start(&buffer, Duration::from_secs(3600));
        let loggers: Vec<_> = (0..4)
            .map(|t| {
                let mut b = buffer.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        b.write_all(format!("{t} {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for l in loggers {
            l.join().unwrap();
        }
        buffer.close();
        thread.join().unwrap();
        let text = sink.text();
        assert_eq!(text.lines().count(), 2000);
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|i| i.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>(), "logger {t}'s lines");
        }
        // After the writer stopped, a line is handed back to be written directly.
        assert_eq!(buffer.push(b"after close\n"), Some(&b"after close\n"[..]));
        assert!(buffer.lock().waiting.is_empty());
    }

    #[test]
    fn lines_are_written_within_the_interval_without_a_size_trigger() {
        let buffer = LineBuffer::new(1024, 512);
        let sink = Sink::default();
        let thread = sink.start(&buffer, Duration::from_millis(10));
        buffer.clone().write_all(b"one short line\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.text().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.text(), "one short line\n");
        buffer.close();
        thread.join().unwrap();
    }

    #[test]
    fn a_full_buffer_makes_the_logger_wait_and_a_long_line_passes_alone() {
        // A writer that is slow to start: the buffer fills and the logger waits for room.
        let buffer = LineBuffer::new(64, 32);
        let sink = Sink::default();
        let mut logger = buffer.clone();
        let writing = std::thread::spawn(move || {
            for i in 0..100 {
                logger
                    .write_all(format!("line {i:03}\n").as_bytes())
                    .unwrap();
            }
            // Longer than the whole buffer: taken alone once the buffer is empty.
            logger.write_all(&[b'x'; 200]).unwrap();
            logger.write_all(b"\n").unwrap();
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            buffer.lock().waiting.len() <= 64,
            "the buffer kept its bound"
        );
        let thread = sink.start(&buffer, Duration::from_millis(5));
        writing.join().unwrap();
        buffer.close();
        thread.join().unwrap();
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 101);
        assert_eq!(lines[0], "line 000");
        assert_eq!(lines[99], "line 099");
        assert_eq!(lines[100], "x".repeat(200));
    }
}
