//! `kill -9` of the gateway binary under load, then a restart on the same database: no row
//! stays `pending`, what Umeng accepted is in history, and nothing is sent twice after the
//! restart. Slow (real processes): `#[ignore]`d, run by `reliability/run.sh`.
//!
//! Every push carries its out_biz_no in its notification text too, so the simulator's
//! records (which keep the body) tie each upstream receipt to its request, unicasts included.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umeng_push_gateway::simulator::{Fault, FaultKind};

use crate::app::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn sqlite_kill_9_under_load() {
    kill_9_under_load(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn postgres_kill_9_under_load() {
    kill_9_under_load(Backend::Postgres).await;
}

/// The smallest check-config accepts for these Umeng timeouts: 2 x (500 + 1500) ms for an
/// upload and a send, plus 30 s to record the outcome.
const PENDING_TIMEOUT_SECS: u64 = 35;
const UMENG_TIMEOUT_MS: u64 = 1500;
const WORKERS: u64 = 16;

fn config_toml(env: &TestEnv, port: u16) -> String {
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
base_url = "{sim}"
timeout_ms = {UMENG_TIMEOUT_MS}
connect_timeout_ms = 500

[history]
pending_timeout_secs = {PENDING_TIMEOUT_SECS}
sweep_interval_secs = 1

[log]
level = "debug"

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

[[clients]]
name = "sender"
token_sha256 = "{token}"
scopes = ["send", "read"]
"#,
        db = env.db.url(),
        sim = env.sim.base_url(),
        token = hash(TOKEN_SENDER),
    )
}

struct Gateway {
    child: Child,
    base: String,
}

fn log_dir() -> Option<PathBuf> {
    std::env::var_os("UMGW_RELIABILITY_LOG_DIR").map(PathBuf::from)
}

async fn start(config: &Path, port: u16, log: &Path) -> Gateway {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_umeng-push-gateway"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env_remove("RUST_LOG")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("the gateway binary starts");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut gw = Gateway { child, base };
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{}/readyz", gw.base)).send().await {
            if r.status() == 200 {
                return gw;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.child.kill().ok();
    let _ = gw.child.wait();
    panic!("the gateway did not become ready; see {}", log.display());
}

fn body(n: u64) -> Value {
    let key = format!("crash-{n}");
    let app = if n % 2 == 0 { ANDROID_APP } else { IOS_APP };
    // Test mode (no quota): unicast, listcast, groupcast, broadcast.
    let cast = ["unicast", "groupcast", "listcast", "broadcast"][(n % 4) as usize];
    let mut b = push_body(app, cast);
    b["out_biz_no"] = json!(key);
    b["notification"]["text"] = json!(format!("key={key};"));
    b
}

pub(super) fn key_of(sim_body: &str) -> Option<String> {
    let start = sim_body.find("key=")? + 4;
    let end = start + sim_body[start..].find(';')?;
    Some(sim_body[start..end].to_string())
}

async fn kill_9_under_load(backend: Backend) {
    if backend == Backend::Postgres && crate::helpers::skip_postgres() {
        return;
    }
    let env = TestEnv::new(backend).await;
    // Umeng takes a while, so many pushes are between admission and record at the kill.
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind: FaultKind::Latency { ms: 40 },
        times: None,
    });
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, config_toml(&env, port)).unwrap();
    let log = dir.path().join("gateway.log");

    let mut gw = start(&config, port, &log).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let base = gw.base.clone();
        let stop = Arc::clone(&stop);
        set.spawn(async move {
            let http = reqwest::Client::new();
            let mut out = Vec::new();
            for i in 0..100_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let n = w * 1_000_000 + i;
                let r = http
                    .post(format!("{base}/v1/pushes"))
                    .bearer_auth(TOKEN_SENDER)
                    .json(&body(n))
                    .send()
                    .await;
                match r {
                    Ok(r) => out.push((n, Some(r.status().as_u16()))),
                    Err(_) => {
                        out.push((n, None));
                        break; // the gateway is gone
                    }
                }
            }
            out
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.child.kill().expect("kill -9"); // SIGKILL
    let _ = gw.child.wait();
    let killed_at = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let before: Vec<(u64, Option<u16>)> = set.join_all().await.into_iter().flatten().collect();
    let pending_at_kill = env
        .db
        .query_i64("select count(*) from pushes where status = 'pending'")
        .await;
    let receipts_before = env.sends().len();

    // Restart on the same database; wait for the sweeper.
    let mut gw = start(&config, port, &log).await;
    let restarted_in = killed_at.elapsed();
    let mut pending = i64::MAX;
    for _ in 0..(PENDING_TIMEOUT_SECS * 10 + 100) {
        pending = env
            .db
            .query_i64("select count(*) from pushes where status = 'pending'")
            .await;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending, 0, "rows left pending after the sweep");

    // Clients retry whatever got no answer, plus everything once more (as a retrying
    // client would): task-class repeats go out with the same out_biz_no (Umeng dedupes);
    // unicast-class repeats are never re-sent: a stored answer replays (201), an unknown
    // outcome answers 409 outcome-unknown.
    let http = reqwest::Client::new();
    let mut after: BTreeMap<u16, usize> = BTreeMap::new();
    for (n, _) in &before {
        let r = http
            .post(format!("{}/v1/pushes", gw.base))
            .bearer_auth(TOKEN_SENDER)
            .json(&body(*n))
            .send()
            .await
            .expect("the restarted gateway answers");
        *after.entry(r.status().as_u16()).or_default() += 1;
    }
    gw.child.kill().ok();
    let _ = gw.child.wait();
    assert!(
        after.keys().all(|s| matches!(s, 201 | 409)),
        "after the restart: {after:?}"
    );

    // The books.
    let sends = env.sends();
    let mut receipts: HashMap<String, Vec<(u64, Option<String>, bool)>> = HashMap::new();
    for r in &sends {
        let key = key_of(&r.body).expect("every body carries its key");
        receipts.entry(key).or_default().push((
            r.seq,
            r.result_id.clone(),
            r.ret.as_deref() == Some("SUCCESS"),
        ));
    }
    let rows: Vec<(String, String, Option<String>, bool)> = {
        let store = env.db.connect_again().await;
        let mut all = Vec::new();
        let mut q = umeng_push_gateway::store::PushQuery {
            limit: 200,
            ..Default::default()
        };
        for _ in 0..1000 {
            let page = store.list_pushes(&q).await.unwrap();
            let Some(last) = page.last() else { break };
            q.before = Some(umeng_push_gateway::store::HistoryCursor::after(last));
            all.extend(page);
        }
        all.into_iter()
            .map(|p| {
                (
                    p.out_biz_no.clone().unwrap_or_default(),
                    p.status.to_string(),
                    p.msg_id.clone().or(p.task_id.clone()),
                    p.task_class,
                )
            })
            .collect()
    };
    let recorded_ids: HashSet<String> = rows.iter().filter_map(|r| r.2.clone()).collect();
    let mut accepted_ids = HashSet::new();
    let mut lost = Vec::new();
    let mut resent_unicast = 0;
    let mut duplicate_tasks = 0;
    for (key, rs) in &receipts {
        let ids: HashSet<String> = rs
            .iter()
            .filter(|r| r.2)
            .filter_map(|r| r.1.clone())
            .collect();
        let task_class = rows.iter().any(|r| &r.0 == key && r.3);
        if task_class {
            duplicate_tasks += ids.len().saturating_sub(1);
        } else if rs.len() > 1 {
            resent_unicast += 1;
        }
        for id in ids {
            accepted_ids.insert(id.clone());
            if !recorded_ids.contains(&id) {
                lost.push((key.clone(), id));
            }
        }
    }
    // A unicast accepted upstream whose record the kill cut off: its row must be there,
    // marked unknown by the sweeper.
    let mut lost_unaccounted = 0;
    for (key, _) in &lost {
        let row_unknown = rows.iter().any(|r| &r.0 == key && r.1 == "unknown");
        if !row_unknown {
            lost_unaccounted += 1;
        }
    }
    let sent_after_restart = sends
        .iter()
        .filter(|r| r.seq as usize > receipts_before)
        .count();
    let report = format!(
        "crash {backend:?}: {} requests before kill -9 ({} unanswered), {pending_at_kill} rows \
         pending at the kill, restart + sweep in {restarted_in:?}; {} requests repeated after \
         the restart, answers {after:?}; {} upstream receipts ({sent_after_restart} after the \
         restart), {} distinct ids accepted upstream, {} of them without their id in \
         history (each a unicast-class row the sweeper marked unknown: {}), {resent_unicast} \
         unicast-class pushes sent twice, {duplicate_tasks} duplicate tasks",
        before.len(),
        before.iter().filter(|b| b.1.is_none()).count(),
        before.len(),
        sends.len(),
        accepted_ids.len(),
        lost.len(),
        lost.len() - lost_unaccounted,
    );
    eprintln!("{report}");
    if let Some(dir) = log_dir() {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::copy(&log, dir.join(format!("crash-{backend:?}.log")));
        let _ = std::fs::write(dir.join(format!("crash-{backend:?}.txt")), &report);
    }
    assert_eq!(resent_unicast, 0, "a unicast-class push was sent twice");
    assert_eq!(
        duplicate_tasks, 0,
        "Umeng created two tasks for one out_biz_no"
    );
    assert_eq!(
        lost_unaccounted, 0,
        "an accepted push has no row in history"
    );
    for (key, _) in &lost {
        let task_class = rows.iter().any(|r| &r.0 == key && r.3);
        assert!(
            !task_class,
            "task {key}: its id must be recovered by the retry"
        );
    }
}
