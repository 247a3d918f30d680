//! Background work end to end: the task-status poller against the simulator, with one and
//! with two gateway instances; every case runs on SQLite and on PostgreSQL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use umeng_push_gateway::config::Settings;
use umeng_push_gateway::simulator::{Fault, FaultKind};

use crate::app::*;

on_both_backends!(
    poller_moves_a_task_to_done_without_any_caller_action,
    two_instances_poll_each_task_one_at_a_time,
);

/// Test settings with a poller that looks every second and checks a task every second.
fn fast_poller(env: &TestEnv) -> Settings {
    let mut s = env.settings();
    s.poller.interval_secs = 1;
    s.poller.backoff_secs = vec![1];
    s
}

/// `/api/status` requests the simulator received, as (seq, task_id).
fn status_calls(env: &TestEnv) -> Vec<(u64, String)> {
    env.sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/status")
        .filter_map(|r| {
            let body: Value = serde_json::from_str(&r.body).ok()?;
            Some((r.seq, body["task_id"].as_str()?.to_owned()))
        })
        .collect()
}

async fn send_broadcast(app: &TestApp, name: &str) -> (String, String) {
    let r = app.post_push(&push_body(name, "broadcast")).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["task_id"].as_str().unwrap().to_owned(),
    )
}

async fn poller_moves_a_task_to_done_without_any_caller_action(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(fast_poller(&env)).await;
    let (id, task_id) = send_broadcast(&app, ANDROID_APP).await;

    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    let record = loop {
        let v = app.get_json(&format!("/v1/pushes/{id}")).await;
        let status = v["status"].as_str().unwrap_or_default().to_owned();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "done" || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(record["status"], "done", "statuses seen: {seen:?}");
    let code = record["task_status"]
        .pointer("/data/status")
        .or_else(|| record["task_status"].pointer("/status"));
    assert_eq!(code, Some(&Value::from(2)), "{record}");
    assert!(!record["task_checked_at"].is_null(), "{record}");
    assert!(record["finished_at"].is_string(), "{record}");
    assert!(
        env.sim.requests().iter().all(|r| r.path != "/api/cancel"),
        "nobody touched the task"
    );
    let polls = |calls: Vec<(u64, String)>| calls.iter().filter(|(_, t)| *t == task_id).count();
    let at_done = polls(status_calls(&env));
    assert!(at_done >= 1);

    // A finished task is not asked about again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        polls(status_calls(&env)),
        at_done,
        "polling stopped at done"
    );
    app.stop().await;
}

async fn two_instances_poll_each_task_one_at_a_time(backend: Backend) {
    // Tasks stay unfinished for about six seconds; every status call takes 300 ms.
    let env = TestEnv::with_task_step(backend, Duration::from_secs(3)).await;
    env.sim.add_fault(Fault {
        appkey: None,
        path: Some("/api/status".into()),
        kind: FaultKind::Latency { ms: 300 },
        times: None,
    });
    let a = env.spawn_app_with(fast_poller(&env)).await;
    let b = env.spawn_app_with(fast_poller(&env)).await;
    let mut tasks = Vec::new();
    for (app, name) in [
        (&a, ANDROID_APP),
        (&b, IOS_APP),
        (&a, IOS_APP),
        (&b, ANDROID_APP),
    ] {
        tasks.push(send_broadcast(app, name).await);
    }

    // Watch status calls arrive (sampled every 20 ms) while the tasks run.
    let start = Instant::now();
    let mut arrivals: HashMap<u64, (String, Duration)> = HashMap::new();
    while start.elapsed() < Duration::from_secs(8) {
        for (seq, task_id) in status_calls(&env) {
            arrivals
                .entry(seq)
                .or_insert_with(|| (task_id, start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut per_task: HashMap<String, Vec<Duration>> = HashMap::new();
    for (task_id, at) in arrivals.into_values() {
        per_task.entry(task_id).or_default().push(at);
    }
    for (_, task_id) in &tasks {
        let mut times = per_task.remove(task_id).unwrap_or_default();
        times.sort();
        assert!(
            times.len() >= 2,
            "task {task_id} polled {} times",
            times.len()
        );
        // One replica at a time, each waiting out the lease and the 1 s backoff: two calls
        // for one task never overlap or follow each other closely. Two replicas polling
        // the same task independently would show calls a few milliseconds apart.
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(1000),
                "task {task_id} polled twice within {gap:?}: {times:?}"
            );
        }
        // At most one call per second of the run (plus the first).
        assert!(times.len() <= 9, "task {task_id}: {times:?}");
    }

    // And the poller did its job: every task reached done.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (id, _) in &tasks {
        loop {
            let v = a.get_json(&format!("/v1/pushes/{id}")).await;
            if v["status"] == "done" {
                break;
            }
            assert!(Instant::now() < deadline, "{id} not done: {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    a.stop().await;
    b.stop().await;
}
