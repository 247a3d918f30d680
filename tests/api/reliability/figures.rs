//! The figures of issue 8, measured on the gateway binary (use a release build:
//! `reliability/run.sh` builds one and points `UMGW_GATEWAY_BIN` at it): peak memory under
//! large hostile and legitimate bodies, the size of a history page after large filecasts,
//! slow and idle connections, and a push under a 1024-descriptor limit with 1,100 idle
//! connections open. Slow: `#[ignore]`d. Each prints its figure; RELIABILITY.md has them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::*;

/// The binary under test: `UMGW_GATEWAY_BIN`, or the one cargo built for this test run.
fn gateway_bin() -> PathBuf {
    std::env::var_os("UMGW_GATEWAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_umeng-push-gateway")))
}

struct Process {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Start the binary with `extra` TOML in `[server]`, under `prlimit` when
    /// `nofile` is given, and wait until it is ready.
    async fn start(env: &TestEnv, server_extra: &str, nofile: Option<u64>) -> Process {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        let hash = umeng_push_gateway::config::token_sha256_hex;
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_secs = 2
{server_extra}

[database]
url = "{db}"
max_connections = 8

[umeng]
base_url = "{sim}"
timeout_ms = 20000

[log]
level = "warn"

[[apps]]
name = "{ANDROID_APP}"
platform = "android"
appkey = "{ANDROID_KEY}"
master_secret = "{ANDROID_SECRET}"

[[clients]]
name = "sender"
token_sha256 = "{token}"
scopes = ["send", "read"]
"#,
                db = env.db.url(),
                sim = env.sim.base_url(),
                token = hash(TOKEN_SENDER),
            ),
        )
        .unwrap();
        let mut command = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(gateway_bin());
                c
            }
            None => Command::new(gateway_bin()),
        };
        let child = command
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env_remove("RUST_LOG")
            .env_remove("UMENG_GATEWAY_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the gateway binary starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut process = Process {
            child,
            base,
            _dir: dir,
        };
        for _ in 0..400 {
            if let Ok(r) = http.get(format!("{}/readyz", process.base)).send().await {
                if r.status() == 200 {
                    return process;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = process.child.kill();
        let _ = process.child.wait();
        panic!("the gateway did not become ready");
    }

    /// Peak resident memory of the process so far (VmHWM), in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib * 1024
    }

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_owned()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A filecast whose `file_lines` hold `n` distinct 44-character tokens (~47 bytes each in
/// JSON): 140,000 make a 6.7 MB body.
fn filecast(n: usize, seed: usize) -> Vec<u8> {
    let lines: Vec<String> = (0..n).map(|i| format!("{seed:04}{i:040}")).collect();
    let mut body = push_body(ANDROID_APP, "filecast");
    body["file_lines"] = json!(lines);
    serde_json::to_vec(&body).unwrap()
}

/// A ~11 MB body of 5.5 million zeros where device tokens belong.
fn junk() -> Vec<u8> {
    let mut body = br#"{"app":"test-android","type":"unicast","device_tokens":["#.to_vec();
    body.extend(std::iter::repeat_n(b"0,".as_slice(), 5_500_000).flatten());
    body.pop();
    body.extend_from_slice(b"]}");
    body
}

async fn post(http: &reqwest::Client, base: &str, body: Vec<u8>) -> u16 {
    match http
        .post(format!("{base}/v1/pushes"))
        .bearer_auth(TOKEN_SENDER)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        // The gateway may answer (413/503) and close before the whole body is written.
        Err(e) => panic!("no answer: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: reliability/run.sh"]
async fn peak_memory_under_large_bodies_stays_under_192_mib() {
    let env = TestEnv::without_sim_quotas(Backend::Sqlite).await;
    let gw = Process::start(&env, "", None).await;
    let http = reqwest::Client::new();
    let junk = junk();
    let mut calls = Vec::new();
    for i in 0..12 {
        let body = if i % 3 == 2 {
            filecast(140_000, i)
        } else {
            junk.clone()
        };
        let (http, base) = (http.clone(), gw.base.clone());
        calls.push(tokio::spawn(async move { post(&http, &base, body).await }));
    }
    drop(junk);
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }

    let peak = gw.peak_rss();
    println!(
        "figure: 8 x 11 MB junk + 4 x 6.7 MB filecasts: answers {statuses:?}, peak RSS {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(
        statuses
            .iter()
            .all(|s| (400..500).contains(s) || *s == 201 || *s == 503),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&201),
        "a filecast got through: {statuses:?}"
    );
    assert!(peak <= 192 * 1024 * 1024, "peak RSS {peak} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: reliability/run.sh"]
async fn a_history_page_after_large_filecasts_is_at_most_256_kib() {
    let env = TestEnv::without_sim_quotas(Backend::Sqlite).await;
    let gw = Process::start(&env, "", None).await;
    let http = reqwest::Client::new();
    for i in 0..20 {
        assert_eq!(post(&http, &gw.base, filecast(140_000, i)).await, 201);
    }

    let page = http
        .get(format!("{}/v1/pushes?limit=20", gw.base))
        .bearer_auth(TOKEN_SENDER)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&page).unwrap();
    let id = v["items"][0]["id"].as_str().unwrap();
    let record = http
        .get(format!("{}/v1/pushes/{id}", gw.base))
        .bearer_auth(TOKEN_SENDER)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let peak = gw.peak_rss();

    println!(
        "figure: after 20 x 6.7 MB filecasts a page of 20 is {} bytes, one record {} bytes, peak RSS {:.1} MiB",
        page.len(),
        record.len(),
        peak as f64 / 1048576.0
    );
    assert_eq!(v["items"].as_array().unwrap().len(), 20);
    assert!(page.len() <= 256 * 1024, "{} bytes", page.len());
    assert!(record.len() <= 256 * 1024, "{} bytes", record.len());
}

/// Read until the server closes the connection; the time it took, or `None` at `limit`.
async fn time_to_close(
    conn: &mut TcpStream,
    started: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    loop {
        let deadline = tokio::time::Instant::from_std(started + limit);
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn trickling_and_idle_connections_are_closed_within_30_s() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let gw = Process::start(&env, "", None).await;
    let addr = gw.addr();
    // One byte a second of a request head that never ends.
    let started = Instant::now();
    let trickle = tokio::spawn({
        let addr = addr.clone();
        async move {
            let mut conn = TcpStream::connect(&addr).await.unwrap();
            let head = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\nx-slow: ");
            for b in head.bytes().chain(std::iter::repeat(b'a')) {
                if conn.write_all(&[b]).await.is_err() {
                    return Some(started.elapsed());
                }
                let mut probe = [0u8; 64];
                let read =
                    tokio::time::timeout(Duration::from_secs(1), conn.read(&mut probe)).await;
                if let Ok(Ok(0) | Err(_)) = read {
                    return Some(started.elapsed());
                }
                if started.elapsed() > Duration::from_secs(60) {
                    return None;
                }
            }
            None
        }
    });
    // A keep-alive connection that asks once, then idles.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let _ = idle.read(&mut buf).await.unwrap();
    let answered = Instant::now();
    let idle_closed = time_to_close(&mut idle, answered, Duration::from_secs(60)).await;
    let trickle_closed = trickle.await.unwrap();

    println!(
        "figure: trickling client closed after {trickle_closed:?}, idle keep-alive after {idle_closed:?} (server.header_read_timeout_secs = 20)"
    );
    assert!(trickle_closed.is_some_and(|d| d <= Duration::from_secs(30)));
    assert!(
        idle_closed.is_some_and(|d| d >= Duration::from_secs(19) && d <= Duration::from_secs(30))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: reliability/run.sh"]
async fn a_push_succeeds_with_1100_idle_connections_under_1024_descriptors() {
    // This test process holds the 1,100 client ends itself.
    let _ = rlimit::increase_nofile_limit(4096);
    let env = TestEnv::new(Backend::Sqlite).await;
    let gw = Process::start(&env, "", Some(1024)).await;
    let addr = gw.addr();
    let mut idle = Vec::new();
    for _ in 0..1100 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await {
            Ok(Ok(c)) => idle.push(c),
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        reqwest::Client::new()
            .post(format!("{}/v1/pushes", gw.base))
            .bearer_auth(TOKEN_SENDER)
            .json(&push_body(ANDROID_APP, "unicast"))
            .send(),
    )
    .await;
    let took = started.elapsed();

    let status = r.map(|r| r.map(|r| r.status().as_u16()));
    println!(
        "figure: {} idle connections open, nofile 1024: push answered {status:?} in {took:?}",
        idle.len()
    );
    assert_eq!(idle.len(), 1100, "every idle connection was opened");
    assert!(matches!(status, Ok(Ok(201))), "{status:?}");
}
