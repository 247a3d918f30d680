//! A small in-process TCP proxy for fault injection between the gateway and the simulator
//! (the Toxiproxy toxics of reliability.md §4.3, built in).
//!
//! The proxy reads each HTTP/1.1 request in full (head + `content-length` body), decides
//! what to do with it from the current [`Mode`] (optionally only for requests whose body
//! contains a marker such as an appkey), and forwards it upstream on a fresh connection
//! with `connection: close`, so every request is one connection and a mode change applies
//! to the very next request even though the gateway pools its connections.

#![allow(dead_code)] // each area uses a different subset

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Upper bound on anything the proxy waits for, so no test can hang on it.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Largest request the proxy buffers.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// What the proxy does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Forward and relay the answer.
    Pass,
    /// Wait, then forward and relay the answer.
    Delay(Duration),
    /// Read the request, never forward it, never answer (until the client gives up).
    Hang,
    /// Read the request, do not forward it, reset the connection (RST).
    Reset,
    /// Forward the request, wait for the whole answer, then reset the client connection
    /// instead of relaying it: upstream acted, the client cannot know.
    ResetAfterForward,
    /// Forward, relay only the first N bytes of the answer, then close.
    CloseAfter(usize),
    /// Forward, relay the answer except its last N bytes, then close (a cut body).
    CloseBeforeEnd(usize),
}

struct Rule {
    /// Only requests whose body contains this; `None` = every request.
    marker: Option<String>,
    mode: Mode,
}

struct Shared {
    upstream: SocketAddr,
    rules: Mutex<Vec<Rule>>,
    /// Requests read in full from the client.
    seen: AtomicU64,
    /// Requests forwarded upstream.
    forwarded: AtomicU64,
}

impl Shared {
    fn mode_for(&self, body: &[u8]) -> Mode {
        let rules = self.rules.lock().unwrap();
        for r in rules.iter() {
            match &r.marker {
                None => return r.mode.clone(),
                Some(m) if contains(body, m.as_bytes()) => return r.mode.clone(),
                _ => {}
            }
        }
        Mode::Pass
    }
}

/// A running proxy. Dropping it stops accepting.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Proxy {
    /// Bind on a free loopback port; forward to `upstream` once [`Proxy::start`] is called.
    pub async fn bind() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    /// Serve `listener`, forwarding to `upstream`.
    pub fn start(listener: TcpListener, upstream: SocketAddr) -> Proxy {
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            rules: Mutex::new(Vec::new()),
            seen: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Proxy {
            addr,
            shared,
            accept: Mutex::new(Some(accept)),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request gets `mode` (replaces all rules).
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.rules.lock().unwrap() = vec![Rule { marker: None, mode }];
    }

    /// Requests whose body contains `marker` get `mode`; others keep the earlier rules.
    pub fn set_mode_for(&self, marker: &str, mode: Mode) {
        self.shared.rules.lock().unwrap().insert(
            0,
            Rule {
                marker: Some(marker.to_string()),
                mode,
            },
        );
    }

    /// Back to passing everything.
    pub fn clear(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// Stop listening: new connections are refused (existing ones finish).
    pub async fn refuse(&self) {
        let handle = self.accept.lock().unwrap().take();
        if let Some(h) = handle {
            h.abort();
            let _ = h.await;
        }
    }

    /// Listen again on the same port after [`Proxy::refuse`].
    pub async fn resume(&self) {
        if self.accept.lock().unwrap().is_some() {
            return;
        }
        let mut listener = None;
        for _ in 0..50 {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            if socket.bind(self.addr).is_ok() {
                if let Ok(l) = socket.listen(128) {
                    listener = Some(l);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listener = listener.expect("the proxy port can be bound again");
        *self.accept.lock().unwrap() = Some(tokio::spawn(accept_loop(
            listener,
            Arc::clone(&self.shared),
        )));
    }

    pub fn seen(&self) -> u64 {
        self.shared.seen.load(Ordering::SeqCst)
    }

    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(h) = self.accept.lock().unwrap().take() {
            h.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(handle(stream, Arc::clone(&shared)));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Read one request: (head without the final blank line, body).
async fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
        let n = tokio::time::timeout(MAX_WAIT, stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = tokio::time::timeout(MAX_WAIT, stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// The request re-serialised with `connection: close`.
fn rewrite(head: &str, body: &[u8]) -> Vec<u8> {
    let mut out = String::new();
    for line in head.split("\r\n") {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Wait until the client closes (or MAX_WAIT).
async fn wait_for_close(stream: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(MAX_WAIT, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

async fn handle(mut client: TcpStream, shared: Arc<Shared>) {
    let Some((head, body)) = read_request(&mut client).await else {
        return;
    };
    shared.seen.fetch_add(1, Ordering::SeqCst);
    let mode = shared.mode_for(&body);
    match mode {
        Mode::Hang => {
            wait_for_close(&mut client).await;
            return;
        }
        Mode::Reset => {
            reset(client);
            return;
        }
        Mode::Delay(d) => tokio::time::sleep(d.min(MAX_WAIT)).await,
        _ => {}
    }
    let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else {
        reset(client);
        return;
    };
    if upstream.write_all(&rewrite(&head, &body)).await.is_err() {
        reset(client);
        return;
    }
    shared.forwarded.fetch_add(1, Ordering::SeqCst);
    // The simulator closes after answering (connection: close): read the whole answer.
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(MAX_WAIT, upstream.read_to_end(&mut answer)).await;
    match mode {
        Mode::ResetAfterForward => reset(client),
        Mode::CloseBeforeEnd(n) => {
            let _ = client
                .write_all(&answer[..answer.len().saturating_sub(n)])
                .await;
            let _ = client.shutdown().await;
        }
        Mode::CloseAfter(n) => {
            let _ = client.write_all(&answer[..n.min(answer.len())]).await;
            let _ = client.shutdown().await;
        }
        _ => {
            let _ = client.write_all(&answer).await;
            let _ = client.shutdown().await;
        }
    }
}
