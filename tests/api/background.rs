//! Background work end to end: the task-status poller against the simulator, with one and
//! with two gateway instances; every case runs on SQLite and on PostgreSQL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use umeng_push_gateway::config::Settings;
use umeng_push_gateway::simulator::{Fault, FaultKind};
use umeng_push_gateway::store::{Admission, Finish, NewPush, PushStatus, QuotaAction};

use crate::app::*;

on_both_backends!(
    poller_moves_a_task_to_done_without_any_caller_action,
    two_instances_poll_each_task_one_at_a_time,
    a_replica_without_the_app_leaves_its_tasks_to_one_that_has_it,
    a_task_umeng_does_not_know_ends_as_task_lost,
    a_scheduled_task_is_first_polled_at_its_start_time,
    refreshing_a_cancelled_task_keeps_who_cancelled_it,
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

/// Wait (up to `within`) until push `id` has `status`; the last record seen.
async fn wait_for_status(app: &TestApp, id: &str, status: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = app.get_json(&format!("/v1/pushes/{id}")).await;
        if v["status"] == status || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An accepted Android broadcast written straight into the store, with a task_id the
/// simulator never issued and the caller's request `request`.
async fn stored_task(env: &TestEnv, task_id: &str, request: Value) -> String {
    let store = env.db.connect_again().await;
    let push = NewPush {
        id: uuid::Uuid::now_v7().to_string(),
        app: ANDROID_APP.into(),
        appkey: ANDROID_KEY.into(),
        platform: "android".into(),
        cast_type: "broadcast".into(),
        task_class: true,
        production_mode: false,
        client: "sender".into(),
        out_biz_no: None,
        fingerprint: "fp".into(),
        request,
        description: None,
        send_at: None,
        delivery: None,
    };
    let id = match store.admit(push, None).await {
        Ok(Admission::Admitted { push_id, .. }) => push_id,
        other => panic!("admit: {other:?}"),
    };
    let finish = Finish {
        status: PushStatus::Accepted,
        umeng_request: None,
        umeng_response: Some(json!({"ret": "SUCCESS", "data": {"task_id": task_id}})),
        msg_id: None,
        task_id: Some(task_id.into()),
        file_id: None,
        error_code: None,
        error_msg: None,
        http_status: 201,
        latency_ms: Some(1),
        sent_at: None,
        quota: QuotaAction::Keep,
        attempts: Vec::new(),
        claim: None,
    };
    assert!(matches!(store.finish(&id, finish.into()).await, Ok(true)));
    id
}

async fn a_replica_without_the_app_leaves_its_tasks_to_one_that_has_it(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // The sender has both apps and does not poll; the old replica polls but lacks Android
    // (a rolling deploy that adds the app, or configuration drift).
    let mut quiet = env.settings();
    quiet.poller.enabled = false;
    let sender = env.spawn_app_with(quiet).await;
    let mut old = fast_poller(&env);
    old.apps.retain(|a| a.name == IOS_APP);
    old.clients.retain(|c| c.apps.is_none());
    let old = env.spawn_app_with(old).await;
    let (id, task_id) = send_broadcast(&sender, ANDROID_APP).await;

    // Several of the old replica's rounds pass: it neither asks about the task nor gives
    // it up.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        status_calls(&env).iter().all(|(_, t)| *t != task_id),
        "the replica without the app asked Umeng about its task"
    );
    let row = |sql: &str| sql.replace("{id}", &id);
    assert_eq!(
        env.db
            .query_i64(&row(
                "select cast(poll_count as bigint) from pushes where id = '{id}'"
            ))
            .await,
        0,
        "claimed by a replica that cannot poll it"
    );
    assert_eq!(
        env.db
            .query_i64(&row(
                "select count(*) from pushes where id = '{id}' and next_poll_at is null"
            ))
            .await,
        1,
        "next poll unchanged"
    );
    assert_eq!(
        sender.get_json(&format!("/v1/pushes/{id}")).await["status"],
        "accepted"
    );

    // A replica with the app (the new configuration) polls it to the end.
    let new = env.spawn_app_with(fast_poller(&env)).await;
    let v = wait_for_status(&new, &id, "done", Duration::from_secs(15)).await;
    assert_eq!(v["status"], "done", "{v}");
    assert!(status_calls(&env).iter().any(|(_, t)| *t == task_id));
    old.stop().await;
    new.stop().await;
    sender.stop().await;
}

async fn a_task_umeng_does_not_know_ends_as_task_lost(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // For instance a task of another Umeng account, or one Umeng has forgotten.
    let id = stored_task(&env, "us-never-issued", json!({"type": "broadcast"})).await;
    let app = env.spawn_app_with(fast_poller(&env)).await;

    let v = wait_for_status(&app, &id, "task_lost", Duration::from_secs(15)).await;
    assert_eq!(v["status"], "task_lost", "{v}");
    assert_eq!(v["task_status"]["error_code"], "1014", "{v}");
    assert!(v["task_checked_at"].is_string(), "{v}");
    let asked = |env: &TestEnv| {
        status_calls(env)
            .iter()
            .filter(|(_, t)| t == "us-never-issued")
            .count()
    };
    let calls = asked(&env);
    assert!(calls >= 1);

    // Polling stopped: several rounds later Umeng has not been asked again.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(asked(&env), calls, "a lost task is not polled again");
    app.stop().await;
}

async fn a_scheduled_task_is_first_polled_at_its_start_time(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let start = OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let request = json!({
        "type": "broadcast",
        "policy": {"start_time": start.format(&Rfc3339).unwrap()},
    });
    let id = stored_task(&env, "us-scheduled", request).await;
    let app = env.spawn_app_with(fast_poller(&env)).await;

    // Record when status calls for the task arrive.
    let mut first_call = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while first_call.is_none() && Instant::now() < deadline {
        if status_calls(&env).iter().any(|(_, t)| t == "us-scheduled") {
            first_call = Some(OffsetDateTime::now_utc());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_call = first_call.expect("the task was polled after its start");
    // With a 1 s backoff it would have been asked about a second after acceptance.
    assert!(
        first_call >= start,
        "first status call at {first_call}, before start_time {start}"
    );
    // The simulator never issued it, so the poll ends the task as lost.
    let v = wait_for_status(&app, &id, "task_lost", Duration::from_secs(10)).await;
    assert_eq!(v["status"], "task_lost", "{v}");
    app.stop().await;
}

async fn refreshing_a_cancelled_task_keeps_who_cancelled_it(backend: Backend) {
    // Tasks stay queued long enough to be cancelled; no poller, so only callers write.
    let env = TestEnv::with_task_step(backend, Duration::from_secs(30)).await;
    let mut settings = env.settings();
    settings.poller.enabled = false;
    let app = env.spawn_app_with(settings).await;
    let (id, _) = send_broadcast(&app, ANDROID_APP).await;

    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{id}/cancel"))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(v["task_status"]["cancelled_by"], "sender", "{v}");

    let r = app
        .post_as(TOKEN_READER, &format!("/v1/pushes/{id}/refresh"))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(v["task_status"]["cancelled_by"], "sender", "{v}");
    assert_eq!(
        v["task_status"]["status"], 4,
        "Umeng's answer is stored: {v}"
    );
    app.stop().await;
}
