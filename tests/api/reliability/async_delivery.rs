//! Asynchronous delivery under failure (issue 10), on the gateway binary as child
//! processes: Umeng down for 30 s and then up, `kill -9` with a queue of 200, and two
//! replicas draining one queue of 1,000; and `kill -9` while pushes with parts (split lists,
//! app groups) are being sent. Every push carries its key in its notification
//! text, so each simulator receipt is tied to its request, unicasts included. Slow:
//! `#[ignore]`d, run by `reliability/run.sh`; RELIABILITY.md has the figures.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use time::OffsetDateTime;
use umeng_push_gateway::simulator::{Fault, FaultKind, RecordedRequest};
use umeng_push_gateway::store::PushRecord;

use super::crash::key_of;
use crate::app::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn sqlite_umeng_down_30_s_then_up() {
    umeng_down_then_up(Backend::Sqlite, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn sqlite_umeng_down_30_s_then_up_without_the_breaker() {
    umeng_down_then_up(Backend::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn postgres_umeng_down_30_s_then_up() {
    umeng_down_then_up(Backend::Postgres, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn postgres_umeng_down_30_s_then_up_without_the_breaker() {
    umeng_down_then_up(Backend::Postgres, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn sqlite_kill_9_with_a_queue_of_200() {
    kill_9_with_a_queue(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn postgres_kill_9_with_a_queue_of_200() {
    kill_9_with_a_queue(Backend::Postgres).await;
}

/// PostgreSQL only: SQLite is a single instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn postgres_two_replicas_drain_1000() {
    two_replicas_drain_1000().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn sqlite_kill_9_with_parents_in_flight() {
    kill_9_with_parents_in_flight(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn postgres_kill_9_with_parents_in_flight() {
    kill_9_with_parents_in_flight(Backend::Postgres).await;
}

/// The binary under test: `UMGW_GATEWAY_BIN`, or the one cargo built for this test run.
fn gateway_bin() -> PathBuf {
    std::env::var_os("UMGW_GATEWAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_umeng-push-gateway")))
}

/// The settings these cases turn.
struct Knobs {
    umeng_url: String,
    connect_timeout_ms: u64,
    timeout_ms: u64,
    pending_timeout_secs: u64,
    lease_secs: u64,
    concurrency: u64,
    per_app_concurrency: u64,
    breaker_cooldown_secs: u64,
    /// Transport failures in a row that open the breaker; 0 turns it off.
    breaker_failures: u64,
}

impl Knobs {
    /// The test suite's Umeng timeouts (W = 2 x (500 + 1500) ms = 4 s), so the least
    /// pending timeout (W + 30 s) and lease (2 W + 10 s) check-config accepts, and the
    /// default concurrency and breaker cool-down.
    fn new(umeng_url: String) -> Self {
        Knobs {
            umeng_url,
            connect_timeout_ms: 500,
            timeout_ms: 1500,
            pending_timeout_secs: 35,
            lease_secs: 19,
            concurrency: 32,
            per_app_concurrency: 16,
            breaker_cooldown_secs: 30,
            breaker_failures: 5,
        }
    }

    fn toml(&self, env: &TestEnv, port: u16) -> String {
        let hash = umeng_push_gateway::config::token_sha256_hex;
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_secs = 1

[database]
url = "{db}"
max_connections = 8
acquire_timeout_ms = 1000

[umeng]
base_url = "{umeng}"
timeout_ms = {timeout}
connect_timeout_ms = {connect}
breaker_cooldown_secs = {cooldown}
breaker_failures = {failures}

[history]
pending_timeout_secs = {pending}
sweep_interval_secs = 1

[delivery]
interval_ms = 200
concurrency = {concurrency}
per_app_concurrency = {per_app}
lease_secs = {lease}

[log]
level = "info"

[[apps]]
name = "{ANDROID_APP}"
platform = "android"
appkey = "{ANDROID_KEY}"
master_secret = "{ANDROID_SECRET}"

[[apps]]
name = "{IOS_APP}"
platform = "ios"
appkey = "{IOS_KEY}"
master_secret = "{IOS_SECRET}"

[[app_groups]]
name = "{GROUP}"
apps = ["{ANDROID_APP}", "{IOS_APP}"]

[[clients]]
name = "sender"
token_sha256 = "{token}"
scopes = ["send", "read"]
"#,
            db = env.db.url(),
            umeng = self.umeng_url,
            timeout = self.timeout_ms,
            connect = self.connect_timeout_ms,
            cooldown = self.breaker_cooldown_secs,
            failures = self.breaker_failures,
            pending = self.pending_timeout_secs,
            concurrency = self.concurrency,
            per_app = self.per_app_concurrency,
            lease = self.lease_secs,
            token = hash(TOKEN_SENDER),
        )
    }
}

/// A gateway process; killed (SIGKILL) when dropped, so a failed assertion leaves none.
struct Gateway {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Gateway {
    /// Write the config to `dir` (once) and start the binary on it; wait until ready.
    async fn start(env: &TestEnv, knobs: &Knobs, dir: &Path, name: &str) -> Gateway {
        let config = dir.join(format!("{name}.toml"));
        let log = dir.join(format!("{name}.log"));
        let port = match std::fs::read_to_string(&config) {
            Ok(text) => port_of(&text),
            Err(_) => {
                let port = free_port();
                std::fs::write(&config, knobs.toml(env, port)).unwrap();
                port
            }
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(gateway_bin())
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env_remove("RUST_LOG")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("the gateway binary starts");
        let gw = Gateway {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = http.get(format!("{}/readyz", gw.base)).send().await {
                if r.status() == 200 {
                    return gw;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the gateway did not become ready; see {}", gw.log.display());
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Lines of its log that contain `needle`.
    fn log_lines_with(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn port_of(toml: &str) -> u16 {
    let start = toml.find("127.0.0.1:").expect("a listen address") + "127.0.0.1:".len();
    let end = start + toml[start..].find('"').unwrap();
    toml[start..end].parse().unwrap()
}

/// A test-mode push of `cast` whose text carries `key`; `out_biz_no` = `key` when asked
/// (a task-class push without one goes upstream as `umgw-<push id>`).
fn body(key: &str, cast: &str, n: usize, with_out_biz_no: bool) -> Value {
    let app = if n % 2 == 0 { ANDROID_APP } else { IOS_APP };
    let mut b = push_body(app, cast);
    if with_out_biz_no {
        b["out_biz_no"] = json!(key);
    }
    b["notification"]["text"] = json!(format!("key={key};"));
    b
}

/// POST every body with `Prefer: respond-async`, `clients` at a time, spread over the
/// `bases` in turn; asserts each answer is 202 and returns (key, push id) in order.
async fn post_all(
    bases: &[String],
    bodies: Vec<(String, Value)>,
    clients: usize,
) -> Vec<(String, String)> {
    let http = reqwest::Client::new();
    let work = Arc::new(std::sync::Mutex::new(
        bodies.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let work = Arc::clone(&work);
        let http = http.clone();
        let bases = bases.to_vec();
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let Some((i, (key, body))) = work.lock().unwrap().pop() else {
                    return out;
                };
                let base = &bases[i % bases.len()];
                let r = http
                    .post(format!("{base}/v1/pushes"))
                    .bearer_auth(TOKEN_SENDER)
                    .header("prefer", "respond-async")
                    .json(&body)
                    .send()
                    .await
                    .expect("the gateway answers");
                let status = r.status().as_u16();
                let view: Value = r.json().await.unwrap_or(Value::Null);
                assert_eq!(status, 202, "{key}: {view}");
                let id = view["id"].as_str().expect("a push id").to_owned();
                out.push((i, key, id));
            }
        });
    }
    let mut all: Vec<(usize, String, String)> =
        set.join_all().await.into_iter().flatten().collect();
    all.sort();
    all.into_iter().map(|(_, key, id)| (key, id)).collect()
}

const NOT_FINAL: &str = "select count(*) from pushes \
     where status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota', 'pending')";

/// How many pushes are in each state now.
async fn status_counts(env: &TestEnv) -> BTreeMap<&'static str, i64> {
    let mut out = BTreeMap::new();
    for s in [
        "awaiting_send",
        "awaiting_quota",
        "pending",
        "accepted",
        "failed",
        "unknown",
    ] {
        let n = env
            .db
            .query_i64(&format!("select count(*) from pushes where status = '{s}'"))
            .await;
        if n > 0 {
            out.insert(s, n);
        }
    }
    out
}

/// Wait up to `limit` until no push waits or is being sent; returns how long it took.
async fn wait_until_final(env: &TestEnv, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let left = env.db.query_i64(NOT_FINAL).await;
        if left == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{left} pushes not final after {limit:?}: {:?}",
            status_counts(env).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn records(env: &TestEnv, pushes: &[(String, String)]) -> HashMap<String, PushRecord> {
    let store = env.db.connect_again().await;
    let mut out = HashMap::new();
    for (key, id) in pushes {
        let r = store
            .get_push(id)
            .await
            .unwrap()
            .expect("the push is stored");
        out.insert(key.clone(), r);
    }
    out
}

/// The simulator's send receipts per key (from the notification text).
fn receipts_by_key(sends: &[RecordedRequest]) -> HashMap<String, Vec<&RecordedRequest>> {
    let mut out: HashMap<String, Vec<&RecordedRequest>> = HashMap::new();
    for r in sends {
        let key = key_of(&r.body).expect("every body carries its key");
        out.entry(key).or_default().push(r);
    }
    out
}

const TASK_STATES: [&str; 8] = [
    "queued",
    "sending",
    "scheduled",
    "done",
    "send_failed",
    "cancelled",
    "expired",
    "no_match",
];

/// Umeng accepted it: `accepted`, or for a task a state the task poller has seen since.
fn accepted_upstream(row: &PushRecord) -> bool {
    let status = row.status.to_string();
    status == "accepted"
        || (row.task_class && row.task_id.is_some() && TASK_STATES.contains(&status.as_str()))
}

fn succeeded(r: &RecordedRequest) -> bool {
    r.ret.as_deref() == Some("SUCCESS")
}

fn save_report(name: &str, report: &str, logs: &[&Path]) {
    eprintln!("{report}");
    if let Some(dir) = std::env::var_os("UMGW_RELIABILITY_LOG_DIR").map(PathBuf::from) {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(format!("{name}.txt")), report);
        for (i, log) in logs.iter().enumerate() {
            let _ = std::fs::copy(log, dir.join(format!("{name}-{i}.log")));
        }
    }
}

const OUTAGE: Duration = Duration::from_secs(30);
const OUTAGE_UNICASTS: usize = 100;
const OUTAGE_GROUPCASTS: usize = 20;

/// Umeng refuses connections for 30 s (the proxy stops listening), then is back. Half of
/// the pushes are posted as the outage starts, half halfway through it; every one must be
/// accepted exactly once afterwards, and the calls made during the outage stay few: the
/// breaker (5 s cool-down here) holds the queue, and without it (`breaker = false`) each
/// push's backoff (default schedule: full jitter under 1 s, 2 s, 4 s, ...) does.
async fn umeng_down_then_up(backend: Backend, breaker: bool) {
    if backend == Backend::Postgres && crate::helpers::skip_postgres() {
        return;
    }
    let (env, proxy) = TestEnv::with_proxy(backend).await;
    let mut knobs = Knobs::new(proxy.url());
    knobs.breaker_cooldown_secs = 5;
    if !breaker {
        knobs.breaker_failures = 0;
    }
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&env, &knobs, dir.path(), "gateway").await;
    let bases = vec![gw.base.clone()];
    let mut bodies: Vec<(String, Value)> = Vec::new();
    for n in 0..OUTAGE_UNICASTS + OUTAGE_GROUPCASTS {
        let (key, cast) = if n % 6 == 5 {
            (format!("down-g{n}"), "groupcast")
        } else {
            (format!("down-u{n}"), "unicast")
        };
        bodies.push((key.clone(), body(&key, cast, n, n % 4 < 2)));
    }
    let second = bodies.split_off(bodies.len() / 2);

    // Arrange: Umeng is unreachable.
    proxy.refuse().await;
    let down_at = Instant::now();

    // Act: asynchronous pushes arrive during the outage.
    let mut pushes = post_all(&bases, bodies, 8).await;
    tokio::time::sleep_until((down_at + OUTAGE / 2).into()).await;
    pushes.extend(post_all(&bases, second, 8).await);
    tokio::time::sleep_until((down_at + OUTAGE).into()).await;
    let at_up = status_counts(&env).await;
    let up_utc = OffsetDateTime::now_utc();
    proxy.resume().await;
    let down_for = down_at.elapsed();
    // Without the breaker a push's next attempt may be as far away as the backoff's cap
    // (`delivery.backoff_cap_ms`, 300 s by default): a push that failed its ninth attempt
    // as the outage ended may wait up to 256 s. The wait is bounded by the cap, not less.
    let drained_in = wait_until_final(&env, Duration::from_secs(330)).await;
    drop(gw);

    // Assert: every push accepted, each by exactly one upstream receipt.
    let rows = records(&env, &pushes).await;
    let sends = env.sends();
    let receipts = receipts_by_key(&sends);
    let mut during = 0;
    let mut after = 0;
    let mut per_push: Vec<usize> = Vec::new();
    for (key, row) in &rows {
        assert!(accepted_upstream(row), "{key}: {row:?}");
        let calls_during = row
            .attempts
            .iter()
            .filter(|a| a.started_at < up_utc)
            .count();
        during += calls_during;
        after += row.attempts.len() - calls_during;
        per_push.push(row.attempts.len());
        let got = receipts.get(key).map_or(0, Vec::len);
        assert_eq!(got, 1, "{key}: {got} upstream receipts");
        let receipt = receipts[key][0];
        assert!(succeeded(receipt), "{key}");
        let id = row.msg_id.clone().or(row.task_id.clone());
        assert_eq!(receipt.result_id, id, "{key}: the id in history is Umeng's");
        for a in &row.attempts[..row.attempts.len() - 1] {
            assert_eq!(a.outcome, "not_sent", "{key}: {:?}", row.attempts);
        }
    }
    assert_eq!(rows.len(), OUTAGE_UNICASTS + OUTAGE_GROUPCASTS);
    assert_eq!(sends.len(), rows.len(), "no other send reached Umeng");
    // Everything the proxy let through is in the simulator's records (sends, and the task
    // poller's status calls for the groupcasts).
    assert_eq!(proxy.forwarded() as usize, env.sim.requests().len());
    per_push.sort_unstable();
    let max = per_push.last().copied().unwrap_or(0);
    let tried_during = rows
        .values()
        .filter(|r| r.attempts.iter().any(|a| a.started_at < up_utc))
        .count();
    let report = format!(
        "async outage {backend:?} breaker {}: Umeng refused connections for {down_for:.1?}; {} async \
         pushes ({OUTAGE_UNICASTS} unicasts, {OUTAGE_GROUPCASTS} groupcasts) answered 202 \
         during it; states when it came back {at_up:?}; {during} Umeng calls during the \
         outage (all not_sent) by {tried_during} pushes, {after} after; calls per push: \
         median {}, max {max}; all accepted {drained_in:.1?} after Umeng came back; {} \
         upstream receipts, one per push",
        if breaker { "on" } else { "off" },
        rows.len(),
        per_push[per_push.len() / 2],
        sends.len(),
    );
    save_report(
        &format!("async-outage-{backend:?}-breaker-{breaker}"),
        &report,
        &[],
    );
    // No hot loop: the breaker lets a probe through per cool-down; without it each push
    // backs off (at most 12 attempts of at most 2 calls, an immediate second try).
    let bound = if breaker { 3 } else { 2 * 12 };
    assert!(
        during <= bound * rows.len(),
        "{during} calls during a {down_for:?} outage"
    );
    assert!(max <= 2 * 12, "a push was tried {max} times");
}

/// A test env whose simulator answers each send after 400 ms, and knobs for it: Umeng
/// timeouts 250 + 1000 ms (W = 2.5 s), so the pending timeout can be 33 s (> W + 30 s) and
/// the lease 16 s (> 2 W + 10 s); 8 sends at a time, 4 per app.
async fn slow_umeng(backend: Backend) -> (TestEnv, Knobs) {
    let env = TestEnv::new(backend).await;
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind: FaultKind::Latency { ms: 400 },
        times: None,
    });
    let mut knobs = Knobs::new(env.sim.base_url());
    knobs.connect_timeout_ms = 250;
    knobs.timeout_ms = 1000;
    knobs.pending_timeout_secs = 33;
    knobs.lease_secs = 16;
    knobs.concurrency = 8;
    knobs.per_app_concurrency = 4;
    (env, knobs)
}

const QUEUED_UNICASTS: usize = 150;
const QUEUED_GROUPCASTS: usize = 50;

/// 200 asynchronous pushes queue behind a slow Umeng (400 ms a send, 8 at a time); the
/// gateway is killed with SIGKILL while most wait or are being sent, then started again on
/// the same database. Umeng timeouts 250 + 1000 ms, so the lease can be 16 s.
async fn kill_9_with_a_queue(backend: Backend) {
    if backend == Backend::Postgres && crate::helpers::skip_postgres() {
        return;
    }
    let (env, knobs) = slow_umeng(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&env, &knobs, dir.path(), "gateway").await;
    // Every fourth one a groupcast, so both kinds are being sent at the kill.
    let bodies: Vec<(String, Value)> = (0..QUEUED_UNICASTS + QUEUED_GROUPCASTS)
        .map(|n| {
            let (key, cast) = if n % 4 == 3 {
                (format!("q-g{n}"), "groupcast")
            } else {
                (format!("q-u{n}"), "unicast")
            };
            let b = body(&key, cast, n, n % 8 < 4);
            (key, b)
        })
        .collect();

    // Act: queue them all, let the worker get going, kill -9.
    let posted_at = Instant::now();
    let pushes = post_all(&[gw.base.clone()], bodies, 16).await;
    let intake = posted_at.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.kill();
    let killed_at = Instant::now();
    let at_kill = status_counts(&env).await;
    let receipts_at_kill = env.sends().len();
    let mut gw = Gateway::start(&env, &knobs, dir.path(), "gateway").await;
    let ready_in = killed_at.elapsed();
    wait_until_final(&env, Duration::from_secs(knobs.lease_secs + 120)).await;
    let final_in = killed_at.elapsed();
    gw.kill();
    let log = gw.log.clone();

    // Assert: the books.
    let rows = records(&env, &pushes).await;
    let sends = env.sends();
    let receipts = receipts_by_key(&sends);
    let mut states: BTreeMap<(String, bool), usize> = BTreeMap::new();
    let mut unknown_with_receipt = 0;
    let mut unknown_without_receipt = 0;
    let mut tasks_resent = 0;
    let mut task_receipts = 0;
    for (key, row) in &rows {
        *states
            .entry((row.status.to_string(), row.task_class))
            .or_default() += 1;
        let got: Vec<&RecordedRequest> = receipts.get(key).cloned().unwrap_or_default();
        if row.task_class {
            // Re-sends carry the same out_biz_no (the caller's, or umgw-<push id>), and
            // Umeng made one task of them: the one in history.
            assert!(accepted_upstream(row), "{key}: {row:?}");
            let biz = row
                .out_biz_no
                .clone()
                .unwrap_or_else(|| format!("umgw-{}", row.id));
            assert!(!got.is_empty(), "{key}: never sent");
            assert!(
                got.iter()
                    .all(|r| r.out_biz_no.as_deref() == Some(biz.as_str())),
                "{key}: sent without its out_biz_no {biz}"
            );
            let tasks: HashSet<Option<String>> = got
                .iter()
                .filter(|r| succeeded(r))
                .map(|r| r.result_id.clone())
                .collect();
            assert_eq!(tasks.len(), 1, "{key}: {tasks:?}");
            assert!(tasks.contains(&row.task_id), "{key}: {row:?}");
            task_receipts += got.len();
            tasks_resent += usize::from(got.len() > 1);
            continue;
        }
        // Unicasts: never sent twice.
        assert!(got.len() <= 1, "{key}: a unicast sent {} times", got.len());
        match row.status.to_string().as_str() {
            "accepted" => {
                assert_eq!(got.len(), 1, "{key}");
                assert_eq!(got[0].result_id, row.msg_id, "{key}");
            }
            "unknown" => {
                assert_eq!(row.error_code.as_deref(), Some("stale_pending"), "{key}");
                if got.is_empty() {
                    unknown_without_receipt += 1;
                } else {
                    unknown_with_receipt += 1;
                }
            }
            other => panic!("{key}: unicast ended {other}: {row:?}"),
        }
    }
    assert_eq!(rows.len(), QUEUED_UNICASTS + QUEUED_GROUPCASTS);
    assert!(
        receipts.keys().all(|k| rows.contains_key(k)),
        "a receipt for a push never posted"
    );
    let report = format!(
        "async kill-9 {backend:?}: {} async pushes ({QUEUED_UNICASTS} unicasts, \
         {QUEUED_GROUPCASTS} groupcasts, half without out_biz_no) answered 202 in \
         {intake:.1?}; kill -9 1.5 s later; states at the kill {at_kill:?}, {receipts_at_kill} \
         upstream receipts; restart ready in {ready_in:.1?}; every push final \
         {final_in:.1?} after the kill (lease {} s); final states (status, task-class) \
         {states:?}; unicasts: none sent twice, {unknown_with_receipt} unknown that Umeng \
         had accepted, {unknown_without_receipt} unknown never sent; groupcasts: \
         {task_receipts} receipts, {tasks_resent} re-sent after the restart with the same \
         out_biz_no, one task each; {} upstream receipts in all",
        rows.len(),
        knobs.lease_secs,
        sends.len(),
    );
    save_report(&format!("async-kill9-{backend:?}"), &report, &[&log]);
}

const REPLICA_PUSHES: usize = 1000;

/// Two gateway processes on one PostgreSQL database, both taking 202s (alternately, 16
/// clients) and both draining the queue: each push is sent exactly once.
async fn two_replicas_drain_1000() {
    if crate::helpers::skip_postgres() {
        return;
    }
    let env = TestEnv::new(Backend::Postgres).await;
    let knobs = Knobs::new(env.sim.base_url());
    let dir = tempfile::tempdir().unwrap();
    let a = Gateway::start(&env, &knobs, dir.path(), "replica-a").await;
    let b = Gateway::start(&env, &knobs, dir.path(), "replica-b").await;
    let bodies: Vec<(String, Value)> = (0..REPLICA_PUSHES)
        .map(|n| {
            let key = format!("r-u{n}");
            let b = body(&key, "unicast", n, n % 2 == 0);
            (key, b)
        })
        .collect();

    let started = Instant::now();
    let pushes = post_all(&[a.base.clone(), b.base.clone()], bodies, 16).await;
    let intake = started.elapsed();
    let after_intake = wait_until_final(&env, Duration::from_secs(300)).await;
    let drained = started.elapsed();
    // The replicas write their log lines from a buffer a few milliseconds behind.
    let mut sent_by = [0, 0];
    let logged_by = Instant::now() + Duration::from_secs(5);
    while sent_by[0] + sent_by[1] < REPLICA_PUSHES && Instant::now() < logged_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
        sent_by = [
            a.log_lines_with("umeng accepted the push"),
            b.log_lines_with("umeng accepted the push"),
        ];
    }
    let logs = [a.log.clone(), b.log.clone()];
    drop(a);
    drop(b);

    let rows = records(&env, &pushes).await;
    let sends = env.sends();
    let receipts = receipts_by_key(&sends);
    for (key, row) in &rows {
        assert_eq!(row.status.to_string(), "accepted", "{key}: {row:?}");
        let got = receipts.get(key).map_or(0, Vec::len);
        assert_eq!(got, 1, "{key}: sent {got} times");
        assert_eq!(receipts[key][0].result_id, row.msg_id, "{key}");
        assert_eq!(row.attempts.len(), 1, "{key}: {:?}", row.attempts);
    }
    assert_eq!(rows.len(), REPLICA_PUSHES);
    assert_eq!(sends.len(), REPLICA_PUSHES);
    let report = format!(
        "async replicas Postgres: {REPLICA_PUSHES} async unicasts posted to two replicas \
         (202 each) in {intake:.1?}; all accepted {drained:.1?} after the first post \
         ({after_intake:.1?} after the last 202, about {:.0} pushes/s); sent by replica A \
         {}, by B {}; {} upstream receipts, one per push, one attempt each",
        REPLICA_PUSHES as f64 / drained.as_secs_f64(),
        sent_by[0],
        sent_by[1],
        sends.len(),
    );
    save_report(
        "async-replicas-Postgres",
        &report,
        &[logs[0].as_path(), logs[1].as_path()],
    );
    assert_eq!(sent_by[0] + sent_by[1], REPLICA_PUSHES);
}

const PARENT_LISTS: usize = 6;
const PARENT_GROUPS: usize = 6;
const LIST_TOKENS: usize = 1200;

/// Pushes with parts are asynchronous pushes per part: killed with SIGKILL while split
/// listcasts (1,200 tokens: 3 parts) and group groupcasts (2 parts) are being sent behind a
/// slow Umeng, then started again. No token reaches Umeng twice, every group part is one
/// task, and every parent ends with the status its parts give it.
async fn kill_9_with_parents_in_flight(backend: Backend) {
    if backend == Backend::Postgres && crate::helpers::skip_postgres() {
        return;
    }
    let (env, knobs) = slow_umeng(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&env, &knobs, dir.path(), "gateway").await;
    let mut bodies = Vec::new();
    for n in 0..PARENT_LISTS {
        let key = format!("p-l{n}");
        let mut b = body(&key, "listcast", 0, n % 2 == 0);
        let tokens: Vec<String> = (0..LIST_TOKENS)
            .map(|i| format!("{n:02}{i:0>42}"))
            .collect();
        b["device_tokens"] = json!(tokens);
        bodies.push((key, b));
    }
    for n in 0..PARENT_GROUPS {
        let key = format!("p-g{n}");
        let mut b = body(&key, "groupcast", 0, n % 2 == 0);
        b["app"] = json!(GROUP);
        bodies.push((key, b));
    }

    // Act: queue them, let the worker get going, kill -9, start again.
    let pushes = post_all(&[gw.base.clone()], bodies, 4).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.kill();
    let killed_at = Instant::now();
    let at_kill = status_counts(&env).await;
    let receipts_at_kill = env.sends().len();
    let mut gw = Gateway::start(&env, &knobs, dir.path(), "gateway").await;
    wait_until_final(&env, Duration::from_secs(knobs.lease_secs + 120)).await;
    let final_in = killed_at.elapsed();
    gw.kill();
    let log = gw.log.clone();

    // Assert: the books, per parent.
    let rows = records(&env, &pushes).await;
    let sends = env.sends();
    let receipts = receipts_by_key(&sends);
    let mut parents: BTreeMap<String, usize> = BTreeMap::new();
    let mut parts: BTreeMap<String, usize> = BTreeMap::new();
    for (key, parent) in &rows {
        *parents.entry(parent.status.to_string()).or_default() += 1;
        let got: Vec<&RecordedRequest> = receipts.get(key).cloned().unwrap_or_default();
        let expected = if key.starts_with("p-l") { 3 } else { 2 };
        assert_eq!(parent.parts.len(), expected, "{key}: {parent:?}");
        let states: Vec<(umeng_push_gateway::store::PushStatus, Option<u16>)> = parent
            .parts
            .iter()
            .map(|p| (p.status, p.http_status))
            .collect();
        let derived = umeng_push_gateway::store::parts::derive(&states).expect("settled");
        assert_eq!(parent.status, derived.status, "{key}: {parent:?}");
        for part in &parent.parts {
            *parts.entry(part.status.to_string()).or_default() += 1;
        }
        if key.starts_with("p-l") {
            // Unicast-class parts: no token twice; an accepted part's call is the one in
            // history; an unknown one was sent at most once.
            let mut tokens: Vec<String> = got
                .iter()
                .filter_map(|r| serde_json::from_str::<Value>(&r.body).ok())
                .flat_map(|b| {
                    b["device_tokens"]
                        .as_str()
                        .unwrap_or_default()
                        .split(',')
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect();
            let sent = tokens.len();
            tokens.sort_unstable();
            tokens.dedup();
            assert_eq!(tokens.len(), sent, "{key}: a token reached Umeng twice");
            for part in &parent.parts {
                match part.status.to_string().as_str() {
                    "accepted" => assert!(
                        got.iter()
                            .any(|r| succeeded(r) && r.result_id == part.msg_id),
                        "{key} part {}: no receipt",
                        part.part
                    ),
                    "unknown" => assert_eq!(part.error_code.as_deref(), Some("stale_pending")),
                    other => panic!("{key} part {}: ended {other}", part.part),
                }
            }
        } else {
            // Task-class parts: re-sent after the lease with their own key; one task each.
            for part in &parent.parts {
                let biz = part.out_biz_no.clone().expect("a derived out_biz_no");
                let tasks: HashSet<Option<String>> = got
                    .iter()
                    .filter(|r| r.out_biz_no.as_deref() == Some(biz.as_str()) && succeeded(r))
                    .map(|r| r.result_id.clone())
                    .collect();
                assert_eq!(tasks.len(), 1, "{key} part {}: {tasks:?}", part.part);
                assert!(tasks.contains(&part.task_id), "{key}: {part:?}");
            }
        }
    }
    assert_eq!(rows.len(), PARENT_LISTS + PARENT_GROUPS);
    let report = format!(
        "parts kill-9 {backend:?}: {PARENT_LISTS} listcasts of {LIST_TOKENS} tokens (3 parts \
         each) and {PARENT_GROUPS} group groupcasts (2 parts each), answered 202; kill -9 \
         1.5 s later; states at the kill {at_kill:?}, {receipts_at_kill} upstream receipts; \
         every parent final {final_in:.1?} after the kill (lease {} s); parents {parents:?}; \
         parts {parts:?}; no token sent twice, one task per group part; {} upstream \
         receipts in all",
        knobs.lease_secs,
        sends.len(),
    );
    save_report(&format!("parts-kill9-{backend:?}"), &report, &[&log]);
}
