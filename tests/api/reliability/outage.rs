//! PostgreSQL made unreachable under load (this test's own database: connections refused
//! with `ALLOW_CONNECTIONS false` and every session terminated; the server keeps serving
//! the other tests): 503 while it lasts, nothing sent that is not recorded, recovery
//! without a restart, no session left idle in a transaction. And clients that give up
//! mid-request do not poison the pool.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umeng_push_gateway::simulator::{Fault, FaultKind};

use super::Answer;
use crate::app::*;
use crate::helpers::TestDb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_under_load() {
    if crate::helpers::skip_postgres() {
        return;
    }
    outage_under_load(Duration::from_millis(2000), 8).await;
}

/// The same with an outage longer than the gateway's retry budget for recording an
/// outcome (0.1 + 0.5 + 2 s): slow, run by `reliability/run.sh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: reliability/run.sh"]
async fn postgres_long_outage_under_load() {
    outage_under_load(Duration::from_secs(8), 16).await;
}

/// Cut (true) or restore (false) this test database.
async fn cut(env: &TestEnv, down: bool) {
    let TestDb::Postgres(db) = &env.db else {
        unreachable!()
    };
    let admin = std::env::var("UMGW_TEST_PG_URL")
        .unwrap_or_else(|_| crate::helpers::DEFAULT_PG_URL.to_string());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap();
    let name = db.name();
    sqlx::query(&format!(
        "alter database {name} allow_connections {}",
        !down
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    if down {
        sqlx::query(
            "select pg_terminate_backend(pid) from pg_stat_activity
              where datname = $1 and pid <> pg_backend_pid()",
        )
        .bind(name)
        .execute(&mut conn)
        .await
        .unwrap();
    }
}

fn unicast(n: u64) -> Value {
    let mut b = push_body(if n % 2 == 0 { ANDROID_APP } else { IOS_APP }, "unicast");
    b["out_biz_no"] = json!(format!("o-{n}"));
    b
}

async fn outage_under_load(outage: Duration, workers: u64) {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut s = env.settings();
    s.database.acquire_timeout_ms = 500;
    // Outcomes are re-recorded in the background for 3/4 of this after a long outage.
    s.history.pending_timeout_secs = 60;
    let app = env.spawn_app_with(s).await;
    // Umeng takes a little while, so some pushes are mid-call when the database goes.
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind: FaultKind::Latency { ms: 30 },
        times: None,
    });

    let stop = Arc::new(AtomicBool::new(false));
    let down = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (http, base) = (app.http.clone(), app.base.clone());
        let (stop, down) = (Arc::clone(&stop), Arc::clone(&down));
        set.spawn(async move {
            let mut out: Vec<(bool, Answer)> = Vec::new();
            for i in 0..100_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let during = down.load(Ordering::SeqCst);
                let a = super::send(&http, &base, &unicast(w * 1_000_000 + i)).await;
                out.push((during && down.load(Ordering::SeqCst), a));
            }
            out
        });
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    down.store(true, Ordering::SeqCst);
    cut(&env, true).await;
    // Fresh requests while the database is away: answered 503 quickly, nothing sent.
    let cut_at = Instant::now();
    let sends_before = env.sends().len();
    let mut probes: Vec<(Duration, Answer)> = Vec::new();
    for n in 0..1000u64 {
        if cut_at.elapsed() + Duration::from_millis(700) > outage {
            break;
        }
        let t = Instant::now();
        let a = app.send(&unicast(800_000_000 + n)).await;
        probes.push((t.elapsed(), a));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(outage.saturating_sub(cut_at.elapsed())).await;
    cut(&env, false).await;
    down.store(false, Ordering::SeqCst);
    let recovered_at = Instant::now();
    // Recovery without a restart: the same instance answers 201 again.
    let mut recovered = None;
    for n in 0..200u64 {
        if app.send(&unicast(900_000_000 + n)).await.status == 201 {
            recovered = Some(recovered_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = recovered.expect("the gateway recovers without a restart");
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let answers: Vec<(bool, Answer)> = set.join_all().await.into_iter().flatten().collect();

    let mut tally: BTreeMap<(bool, u16), usize> = BTreeMap::new();
    for (during, a) in &answers {
        *tally.entry((*during, a.status)).or_default() += 1;
        assert!(
            matches!(a.status, 201 | 503),
            "only 201 or 503 expected: {a:?}"
        );
        if a.status == 503 {
            assert_eq!(a.content_type, "application/problem+json");
        }
    }
    assert!(!probes.is_empty());
    let slowest_probe = probes.iter().map(|(d, _)| *d).max().unwrap_or_default();
    for (d, a) in &probes {
        assert_eq!(a.status, 503, "a request during the outage: {a:?}");
        assert_eq!(a.content_type, "application/problem+json");
        assert!(*d < Duration::from_secs(2), "503 took {d:?}");
    }
    let probe_keys: HashSet<String> = (0..probes.len() as u64)
        .map(|n| format!("o-{}", 800_000_000 + n))
        .collect();
    let _ = sends_before;

    // Let any outcome still being recorded (retries back off to 5 s) land.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for _ in 0..40 {
        let pending = env
            .db
            .query_i64("select count(*) from pushes where status = 'pending'")
            .await;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let sends = env.sends();
    let accepted: HashSet<String> = sends
        .iter()
        .filter(|r| r.ret.as_deref() == Some("SUCCESS"))
        .filter_map(|r| r.result_id.clone())
        .collect();
    let recorded = env
        .db
        .query_i64("select count(*) from pushes where status = 'accepted'")
        .await as usize;
    let mut missing = 0;
    for id in &accepted {
        let n = env
            .db
            .query_i64(&format!(
                "select count(*) from pushes where msg_id = '{id}' and status = 'accepted'"
            ))
            .await;
        if n != 1 {
            missing += 1;
        }
    }
    let pending = env
        .db
        .query_i64("select count(*) from pushes where status = 'pending'")
        .await;
    // The probes never reached Umeng (unicast bodies carry no out_biz_no upstream, so
    // count: every send is accounted for by a recorded push).
    let probe_rows = env
        .db
        .query_i64(&format!(
            "select count(*) from pushes where out_biz_no in ({})",
            probe_keys
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await;
    assert_eq!(probe_rows, 0, "a request answered 503 left a row");
    eprintln!(
        "outage {outage:?}, {workers} workers: {} load requests, answers (during outage, \
         status) {tally:?}; {} probes during the outage all 503 (slowest {slowest_probe:?}); \
         recovered {recovered:?} after the database came back; {} accepted upstream, \
         {recorded} recorded accepted, {missing} missing, {pending} pending",
        answers.len(),
        probes.len(),
        accepted.len()
    );
    assert_eq!(missing, 0, "every push Umeng accepted is in history");
    assert_eq!(recorded, accepted.len());
    assert_eq!(pending, 0);
    assert_eq!(env.db.idle_in_transaction().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dropped_clients_do_not_poison_the_pool() {
    if crate::helpers::skip_postgres() {
        return;
    }
    dropped_clients(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dropped_clients_do_not_poison_the_pool() {
    dropped_clients(Backend::Sqlite).await;
}

async fn dropped_clients(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut s = env.settings();
    s.database.max_connections = 2; // a small pool: one poisoned connection shows
    let app = env.spawn_app_with(s).await;
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/send".into()),
        kind: FaultKind::Latency { ms: 5 },
        times: None,
    });
    // 300 clients that give up after 0-15 ms: mid-admission, mid-call, mid-answer.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..300u64 {
        let base = app.base.clone();
        let mut body = push_body(
            ANDROID_APP,
            if i % 3 == 0 { "groupcast" } else { "unicast" },
        );
        body["out_biz_no"] = json!(format!("drop-{}", i % 150));
        set.spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_millis(i % 16))
                .build()
                .unwrap();
            http.post(format!("{base}/v1/pushes"))
                .bearer_auth(TOKEN_SENDER)
                .json(&body)
                .send()
                .await
                .is_err()
        });
    }
    let aborted = set.join_all().await.into_iter().filter(|e| *e).count();
    // Give detached work time to finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..100u64 {
        let mut body = push_body(IOS_APP, "unicast");
        body["out_biz_no"] = json!(format!("after-{i}"));
        let a = app.send(&body).await;
        assert_eq!(a.status, 201, "request {i} after the aborts: {a:?}");
    }
    assert_eq!(env.db.idle_in_transaction().await, 0);
    assert_eq!(
        env.db
            .query_i64("select count(*) from pushes where status = 'pending'")
            .await,
        0
    );
    eprintln!("dropped clients {backend:?}: {aborted} of 300 aborted mid-request; then 100 of 100 succeeded");
}
