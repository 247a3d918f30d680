//! The connection layer under the router: HTTP/1.1 on hyper with a header read timeout
//! (which is also the keep-alive idle timeout), a cap on open connections, and graceful
//! shutdown.
//!
//! At the cap the oldest idle connection (no request in progress) is asked to close, so a
//! crowd of idle or trickling connections cannot lock legitimate clients out; when every
//! connection is busy, accepting waits for one to end. The cap is kept below the process's
//! descriptor limit, leaving descriptors for the database pool and the Umeng client.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// How the connection layer behaves.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// A connection whose next request head has not fully arrived within this long is
    /// closed: a new connection that sends nothing, a client trickling its headers, and an
    /// idle keep-alive connection (the clock restarts after each answer).
    pub header_read_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

/// Descriptors kept free for everything that is not an API connection: the database pool
/// (its size is added), the Umeng client, the demo simulator, logs, the listener.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// Raise the soft descriptor limit to the hard limit (a no-op where there is none), and
/// return the soft limit now in force (`None` when it cannot be read).
pub fn raise_descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => Some(limit),
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the open-file limit");
                rlimit::getrlimit(rlimit::Resource::NOFILE)
                    .ok()
                    .map(|(soft, _)| soft)
            }
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The connection cap: `configured`, lowered so that `reserved` descriptors stay free
/// under a soft limit of `nofile` (at least 1).
pub fn connection_cap(configured: usize, nofile: Option<u64>, reserved: u64) -> usize {
    match nofile {
        Some(limit) => {
            let room = usize::try_from(limit.saturating_sub(reserved)).unwrap_or(usize::MAX);
            configured.min(room).max(1)
        }
        None => configured.max(1),
    }
}

/// One open connection, as the cap sees it.
struct Tracked {
    /// Requests in progress on it.
    busy: Arc<AtomicUsize>,
    /// Milliseconds since the server started when it last began or ended a request.
    last_active: Arc<AtomicU64>,
    /// Asks the connection to close once its current request (if any) is answered.
    close: Arc<Notify>,
    /// Already asked to close.
    closing: bool,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    conns: HashMap<u64, Tracked>,
}

impl Registry {
    /// Ask the connection idle for the longest to close. False when every one is busy.
    fn evict_idle(&mut self) -> bool {
        let victim = self
            .conns
            .iter_mut()
            .filter(|(_, c)| !c.closing && c.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, c)| c.last_active.load(Ordering::Relaxed));
        match victim {
            Some((_, c)) => {
                c.closing = true;
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serve `app` on `listener` until `shutdown` resolves; then stop accepting, let every
/// connection finish the request it is on, and return once all are closed (the caller
/// bounds how long that may take).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let registry = Arc::new(Mutex::new(Registry::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .keep_alive(true);
    let mut accept_errors_logged = Instant::now() - Duration::from_secs(60);
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: make room by closing the connection idle for the longest, then wait
                // for a slot (at once if one was idle, else until a busy one ends).
                let evicted = registry.lock().map(|mut r| r.evict_idle()).unwrap_or(false);
                if !evicted {
                    tracing::debug!(
                        max_connections = options.max_connections,
                        "every connection is busy: waiting for one to end"
                    );
                }
                tokio::select! {
                    p = Arc::clone(&slots).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning; the
                    // connections in the backlog wait.
                    if accept_errors_logged.elapsed() > Duration::from_secs(10) {
                        tracing::warn!(error = %e, "accept failed");
                        accept_errors_logged = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let tracked = Tracked {
            busy: Arc::new(AtomicUsize::new(0)),
            last_active: Arc::new(AtomicU64::new(millis_since(started))),
            close: Arc::new(Notify::new()),
            closing: false,
        };
        let busy = Arc::clone(&tracked.busy);
        let last_active = Arc::clone(&tracked.last_active);
        let close = Arc::clone(&tracked.close);
        let id = match registry.lock() {
            Ok(mut r) => {
                let id = r.next_id;
                r.next_id += 1;
                r.conns.insert(id, tracked);
                id
            }
            Err(_) => continue,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            busy.fetch_add(1, Ordering::AcqRel);
            last_active.store(millis_since(started), Ordering::Relaxed);
            let guard = BusyGuard {
                busy: Arc::clone(&busy),
                last_active: Arc::clone(&last_active),
                started,
            };
            let call = app.clone().oneshot(req.map(Body::new));
            async move {
                let response = call.await;
                drop(guard);
                response
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let registry = Arc::clone(&registry);
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(e) = res {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    () = close.notified(), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = stop.changed(), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
            if let Ok(mut r) = registry.lock() {
                r.conns.remove(&id);
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Marks a request as ended however its future ends (answered or dropped).
struct BusyGuard {
    busy: Arc<AtomicUsize>,
    last_active: Arc<AtomicU64>,
    started: Instant,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.last_active
            .store(millis_since(self.started), Ordering::Relaxed);
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

fn millis_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_free() {
        assert_eq!(connection_cap(4096, Some(1024), 80), 944);
        assert_eq!(connection_cap(500, Some(1024), 80), 500);
        assert_eq!(connection_cap(500, None, 80), 500);
        assert_eq!(connection_cap(500, Some(10), 80), 1);
    }

    #[test]
    fn eviction_picks_the_longest_idle_connection_and_never_a_busy_one() {
        let mut r = Registry::default();
        for (id, busy, last) in [(0, 1, 0), (1, 0, 50), (2, 0, 20), (3, 0, 90)] {
            r.conns.insert(
                id,
                Tracked {
                    busy: Arc::new(AtomicUsize::new(busy)),
                    last_active: Arc::new(AtomicU64::new(last)),
                    close: Arc::new(Notify::new()),
                    closing: false,
                },
            );
        }
        assert!(r.evict_idle());
        assert!(r.conns[&2].closing, "idle since 20: the longest idle");
        assert!(r.evict_idle());
        assert!(r.conns[&1].closing);
        assert!(r.evict_idle());
        assert!(r.conns[&3].closing);
        assert!(!r.evict_idle(), "only a busy connection is left");
        assert!(!r.conns[&0].closing);
    }
}
