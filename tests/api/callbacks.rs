//! Signed callbacks end to end: a small receiver on 127.0.0.1 records what the gateway's
//! callback worker POSTs; signatures are checked with an HMAC written out here (RFC 2104
//! over SHA-256), independent of the gateway's. Every case runs on SQLite and PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use umeng_push_gateway::config::Settings;
use umeng_push_gateway::secret::Secret;

use crate::app::*;

on_both_backends!(
    a_sync_push_gets_a_signed_accepted_event,
    a_url_outside_the_prefixes_is_refused_and_nothing_is_sent,
    a_groupcast_gets_accepted_then_done,
    a_failing_receiver_gets_the_event_once_with_the_failed_attempts_recorded,
    two_gateways_deliver_each_event_once,
    a_receiver_down_for_a_while_then_up_gets_every_event_signed,
    redirects_are_not_followed_and_the_last_attempt_gives_up,
    async_pushes_get_their_final_events_and_a_withdrawn_one_too,
    a_group_push_gets_one_event_for_the_parent_once_every_part_is_final,
);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: Vec<u8>,
    answered: u16,
}

/// A callback receiver on 127.0.0.1:0 that answers 500 to its first `fail_first` requests
/// and 200 afterwards, recording every request.
struct Receiver {
    base: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, fail_first)
    }

    fn start_on(listener: tokio::net::TcpListener, fail_first: usize) -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let seen = Arc::clone(&got);
        let handler = move |headers: HeaderMap, body: Bytes| {
            let seen = Arc::clone(&seen);
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let mut seen = seen.lock().unwrap();
                let status = if seen.len() < fail_first {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                };
                seen.push(Received {
                    id: header("webhook-id"),
                    timestamp: header("webhook-timestamp"),
                    signature: header("webhook-signature"),
                    content_type: header("content-type"),
                    body: body.to_vec(),
                    answered: status.as_u16(),
                });
                status
            }
        };
        let redirect = || async {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, "/hooks/umeng")],
            )
        };
        let router = axum::Router::new()
            .route("/hooks/umeng", post(handler))
            .route("/hooks/redirect", post(redirect));
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Receiver {
            base: format!("http://{addr}"),
            got,
        }
    }

    fn url(&self) -> String {
        format!("{}/hooks/umeng", self.base)
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Wait until `n` requests with a 2xx answer arrived (or 20 s passed).
    async fn wait_for_delivered(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.got();
            let ok = got.iter().filter(|r| r.answered == 200).count();
            if ok >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Test settings whose `sender` client may ask for callbacks to `receiver`, with a fast
/// worker and short retry waits. Returns the settings and the client's secret.
fn with_callbacks(env: &TestEnv, receiver: &Receiver) -> (Settings, String) {
    let mut s = env.settings();
    let secret = umeng_push_gateway::callbacks::generate_secret();
    let sender = s
        .clients
        .iter_mut()
        .find(|c| c.name == "sender")
        .expect("sender client");
    sender.callback_url_prefixes = vec![format!("{}/hooks/", receiver.base)];
    sender.callback_secret = Some(Secret::new(secret.clone()));
    s.callbacks.interval_ms = 50;
    s.callbacks.backoff_base_ms = 50;
    s.callbacks.backoff_cap_ms = 200;
    s.poller.interval_secs = 1;
    s.poller.backoff_secs = vec![1];
    (s, secret)
}

/// HMAC-SHA256 (RFC 2104), written out so the check does not share code with the gateway.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The receiver's side of Standard Webhooks: the signature over id.timestamp.body.
fn assert_signed(r: &Received, secret: &str) {
    let key = BASE64
        .decode(secret.strip_prefix("whsec_").expect("whsec_ secret"))
        .expect("base64 secret");
    let mut message = format!("{}.{}.", r.id, r.timestamp).into_bytes();
    message.extend_from_slice(&r.body);
    let expected = format!("v1,{}", BASE64.encode(hmac_sha256(&key, &message)));
    assert_eq!(r.signature, expected, "signature of {}", r.id);
    assert_eq!(r.content_type, "application/json");
    let ts: i64 = r.timestamp.parse().expect("unix seconds");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - ts).abs() < 60, "timestamp {ts} is now-ish");
}

fn body(r: &Received) -> Value {
    serde_json::from_slice(&r.body).expect("event body is JSON")
}

/// `GET /v1/pushes/{id}` until its callbacks are all delivered (or 20 s passed).
async fn push_with_callbacks(app: &TestApp, id: &str, events: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = app.get_json(&format!("/v1/pushes/{id}")).await;
        let done = v["callbacks"]
            .as_array()
            .is_some_and(|c| c.len() >= events && c.iter().all(|e| e["state"] == "delivered"));
        if done || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs a `cast` push on `app_name` whose callbacks go to `url`; it must be accepted (201).
/// Returns the answer's body.
async fn send_with_callback_to(app: &TestApp, app_name: &str, cast: &str, url: String) -> Value {
    let mut push = push_body(app_name, cast);
    push["callback_url"] = Value::from(url);
    let r = app.post_push(&push).await;
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

/// The `id` of a push answer.
fn id_of(answer: &Value) -> String {
    answer["id"].as_str().unwrap().to_owned()
}

async fn a_sync_push_gets_a_signed_accepted_event(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let receiver = Receiver::start(0).await;
    let (settings, secret) = with_callbacks(&env, &receiver);
    let app = env.spawn_app_with(settings).await;

    let created = send_with_callback_to(&app, ANDROID_APP, "unicast", receiver.url()).await;
    let id = id_of(&created);

    let got = receiver.wait_for_delivered(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_signed(&got[0], &secret);
    let event = body(&got[0]);
    assert_eq!(event["type"], "push.accepted");
    assert_eq!(event["data"]["id"], id.as_str());
    assert_eq!(event["data"]["status"], "accepted");
    assert_eq!(event["data"]["msg_id"], created["msg_id"]);
    assert!(event["data"].get("request").is_none(), "{event}");
    assert!(event["timestamp"].is_string(), "{event}");
    assert_eq!(got[0].id, format!("evt_{id}_accepted"));

    let record = push_with_callbacks(&app, &id, 1).await;
    assert_eq!(record["callback_url"], receiver.url().as_str());
    let callbacks = record["callbacks"].as_array().expect("callbacks");
    assert_eq!(callbacks.len(), 1, "{record}");
    assert_eq!(callbacks[0]["type"], "push.accepted");
    assert_eq!(callbacks[0]["state"], "delivered");
    assert_eq!(callbacks[0]["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(callbacks[0]["attempts"][0]["http_status"], 200);
    assert_eq!(callbacks[0]["attempts"][0]["number"], 1);

    // The history list does not carry the callbacks.
    let list = app.get_json("/v1/pushes").await;
    assert!(list["items"][0].get("callbacks").is_none(), "{list}");
    app.stop().await;
}

async fn a_url_outside_the_prefixes_is_refused_and_nothing_is_sent(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let receiver = Receiver::start(0).await;
    let (settings, _) = with_callbacks(&env, &receiver);
    let app = env.spawn_app_with(settings).await;

    let outside = [
        "http://127.0.0.1:9/hooks/umeng".to_owned(),
        format!("{}/other", receiver.base),
        format!("{}/hooks", receiver.base),
        format!("{}/hooks/{}", receiver.base, "a".repeat(2100)),
    ];
    for url in outside {
        let mut push = push_body(ANDROID_APP, "unicast");
        push["callback_url"] = Value::from(url.clone());
        let r = app.post_push(&push).await;
        assert_eq!(r.status(), 422, "{url}");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], "callback_url", "{problem}");
    }
    // A client without prefixes cannot ask for callbacks at all.
    let mut push = push_body(ANDROID_APP, "unicast");
    push["callback_url"] = Value::from(receiver.url());
    let r = app.post_push_as(TOKEN_ANDROID_ONLY, &push).await;
    assert_eq!(r.status(), 422);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "callback_url", "{problem}");

    assert!(env.sends().is_empty(), "nothing went to Umeng");
    let list = app.get_json("/v1/pushes").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "nothing stored");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.got().is_empty(), "nothing was POSTed");
    app.stop().await;
}

async fn a_groupcast_gets_accepted_then_done(backend: Backend) {
    let env = TestEnv::with_task_step(backend, Duration::from_millis(200)).await;
    let receiver = Receiver::start(0).await;
    let (settings, secret) = with_callbacks(&env, &receiver);
    let app = env.spawn_app_with(settings).await;

    let created = send_with_callback_to(&app, ANDROID_APP, "groupcast", receiver.url()).await;
    let id = id_of(&created);

    let got = receiver.wait_for_delivered(2).await;
    let types: Vec<String> = got
        .iter()
        .map(|r| body(r)["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(types, ["push.accepted", "push.done"], "{got:?}");
    for r in &got {
        assert_signed(r, &secret);
        assert_eq!(body(r)["data"]["id"], id.as_str());
        assert_eq!(body(r)["data"]["task_id"], created["task_id"]);
    }
    assert_eq!(body(&got[1])["data"]["status"], "done");

    let record = push_with_callbacks(&app, &id, 2).await;
    let states: Vec<(&str, &str)> = record["callbacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [("push.accepted", "delivered"), ("push.done", "delivered")]
    );
    app.stop().await;
}

async fn a_failing_receiver_gets_the_event_once_with_the_failed_attempts_recorded(
    backend: Backend,
) {
    let env = TestEnv::new(backend).await;
    let receiver = Receiver::start(3).await;
    let (settings, secret) = with_callbacks(&env, &receiver);
    let app = env.spawn_app_with(settings).await;

    let created = send_with_callback_to(&app, IOS_APP, "unicast", receiver.url()).await;
    let id = id_of(&created);

    let got = receiver.wait_for_delivered(1).await;
    let answers: Vec<u16> = got.iter().map(|r| r.answered).collect();
    assert_eq!(answers, [500, 500, 500, 200]);
    for r in &got {
        assert_eq!(r.id, got[0].id, "one event, one webhook-id");
        assert_eq!(r.body, got[0].body, "the same body every time");
        assert_signed(r, &secret);
    }
    let record = push_with_callbacks(&app, &id, 1).await;
    let event = &record["callbacks"][0];
    assert_eq!(event["state"], "delivered", "{record}");
    let attempts: Vec<(u64, u64)> = event["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["number"].as_u64().unwrap(),
                a["http_status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(attempts, [(1, 500), (2, 500), (3, 500), (4, 200)]);

    // Delivered means done: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.got().len(), 4);
    app.stop().await;
}

async fn two_gateways_deliver_each_event_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let receiver = Receiver::start(0).await;
    let (settings, secret) = with_callbacks(&env, &receiver);
    let a = env.spawn_app_with(settings.clone()).await;
    let b = env.spawn_app_with(settings).await;

    let mut ids = Vec::new();
    for i in 0..12 {
        let app = if i % 2 == 0 { &a } else { &b };
        ids.push(id_of(
            &send_with_callback_to(app, ANDROID_APP, "unicast", receiver.url()).await,
        ));
    }
    receiver.wait_for_delivered(12).await;
    // Give a duplicate time to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.got();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &got {
        assert_signed(r, &secret);
        *per_id.entry(r.id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 12, "{per_id:?}");
    assert!(per_id.values().all(|n| *n == 1), "{per_id:?}");
    for id in &ids {
        assert_eq!(per_id.get(&format!("evt_{id}_accepted")), Some(&1));
    }
    a.stop().await;
    b.stop().await;
}

/// The reliability case: the receiver is down (connection refused) while events are made,
/// then comes up on the same address: every event arrives once, signed, after a bounded
/// number of attempts (backoff, no hot loop), and the failed attempts say why.
async fn a_receiver_down_for_a_while_then_up_gets_every_event_signed(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // Take a free port, then close it: until the receiver starts, connections are refused.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = reserved.local_addr().unwrap();
    drop(reserved);
    let down = Receiver {
        base: format!("http://{addr}"),
        got: Arc::default(),
    };
    let (mut settings, secret) = with_callbacks(&env, &down);
    settings.callbacks.backoff_base_ms = 100;
    settings.callbacks.backoff_cap_ms = 400;
    let app = env.spawn_app_with(settings).await;

    let outage = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(id_of(
            &send_with_callback_to(&app, ANDROID_APP, "unicast", down.url()).await,
        ));
    }
    // Stay down for 2 s, and until every event has failed at least twice.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut failed = 0;
        for id in &ids {
            let v = app.get_json(&format!("/v1/pushes/{id}")).await;
            let n = v["callbacks"][0]["attempts"].as_array().map_or(0, Vec::len);
            failed += usize::from(n >= 2);
        }
        let long_enough = outage.elapsed() >= Duration::from_secs(2);
        if (failed == ids.len() && long_enough) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let receiver = Receiver::start_on(listener, 0);
    let down_for = outage.elapsed();
    receiver.wait_for_delivered(5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = receiver.got();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &got {
        assert_signed(r, &secret);
        *per_id.entry(r.id.clone()).or_default() += 1;
    }
    let mut counts = Vec::new();
    for id in &ids {
        assert_eq!(
            per_id.get(&format!("evt_{id}_accepted")),
            Some(&1),
            "{per_id:?}"
        );
        let record = push_with_callbacks(&app, id, 1).await;
        let event = &record["callbacks"][0];
        assert_eq!(event["state"], "delivered", "{record}");
        let attempts = event["attempts"].as_array().unwrap();
        assert!(attempts.len() >= 3, "{event}");
        assert!(attempts.len() <= 40, "backoff, not a hot loop: {event}");
        counts.push(attempts.len());
        let (last, failed) = attempts.split_last().unwrap();
        assert_eq!(last["http_status"], 200);
        for a in failed {
            assert!(a["http_status"].is_null(), "{a}");
            assert!(
                a["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("connection")),
                "{a}"
            );
        }
    }
    eprintln!("receiver down for {down_for:?}, then up: attempts per event {counts:?}");
    // The outcome series exist (the recorder is shared by the tests of this process, so
    // only their presence is checked here).
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for outcome in ["delivered", "failed_attempt", "gave_up"] {
        assert!(
            metrics.contains(&format!(
                "callback_deliveries_total{{outcome=\"{outcome}\"}}"
            )),
            "{outcome} missing"
        );
    }
    app.stop().await;
}

async fn redirects_are_not_followed_and_the_last_attempt_gives_up(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let receiver = Receiver::start(0).await;
    let (mut settings, _) = with_callbacks(&env, &receiver);
    settings.callbacks.max_attempts = 2;
    let app = env.spawn_app_with(settings).await;

    let created = send_with_callback_to(
        &app,
        ANDROID_APP,
        "unicast",
        format!("{}/hooks/redirect", receiver.base),
    )
    .await;
    let id = id_of(&created);

    let deadline = Instant::now() + Duration::from_secs(20);
    let record = loop {
        let v = app.get_json(&format!("/v1/pushes/{id}")).await;
        if v["callbacks"][0]["state"] == "gave_up" || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let event = &record["callbacks"][0];
    assert_eq!(event["state"], "gave_up", "{record}");
    assert!(event["finished_at"].is_string(), "{event}");
    let statuses: Vec<&Value> = event["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["http_status"])
        .collect();
    assert_eq!(statuses, [&Value::from(307), &Value::from(307)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.got().is_empty(), "the redirect was not followed");
    app.stop().await;
}

async fn async_pushes_get_their_final_events_and_a_withdrawn_one_too(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let receiver = Receiver::start(0).await;
    let (mut settings, secret) = with_callbacks(&env, &receiver);
    settings.delivery.interval_ms = 50;
    let app = env.spawn_app_with(settings).await;

    let mut now = push_body(ANDROID_APP, "unicast");
    now["callback_url"] = Value::from(receiver.url());
    let r = app
        .http
        .post(format!("{}/v1/pushes", app.base))
        .bearer_auth(TOKEN_SENDER)
        .header("prefer", "respond-async")
        .json(&now)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let sent = id_of(&r.json().await.unwrap());

    let mut held = now.clone();
    held["send_at"] = Value::from(
        (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap(),
    );
    let r = app.post_push(&held).await;
    assert_eq!(r.status(), 202);
    let withdrawn = id_of(&r.json().await.unwrap());
    let r = app
        .post_as(TOKEN_SENDER, &format!("/v1/pushes/{withdrawn}/cancel"))
        .await;
    assert_eq!(r.status(), 200);

    let got = receiver.wait_for_delivered(2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let mut events: Vec<(String, String)> = got
        .iter()
        .map(|g| {
            assert_signed(g, &secret);
            let e = body(g);
            (
                e["type"].as_str().unwrap().to_owned(),
                e["data"]["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    events.sort();
    let mut want = vec![
        ("push.accepted".to_owned(), sent),
        ("push.withdrawn".to_owned(), withdrawn),
    ];
    want.sort();
    assert_eq!(
        events, want,
        "no event for the waiting states, one per final state"
    );
    app.stop().await;
}

async fn a_group_push_gets_one_event_for_the_parent_once_every_part_is_final(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let receiver = Receiver::start(0).await;
    let (mut settings, secret) = with_callbacks(&env, &receiver);
    settings.app_groups = env.settings_with_group().app_groups;
    settings.delivery.interval_ms = 50;
    let app = env.spawn_app_with(settings).await;
    // The iOS part is rejected: the parent is partial.
    env.sim.add_fault(umeng_push_gateway::simulator::Fault {
        appkey: Some(IOS_KEY.into()),
        path: Some("/api/send".into()),
        kind: umeng_push_gateway::simulator::FaultKind::ErrorCode {
            code: "2003".into(),
            message: None,
        },
        times: Some(1),
    });
    let push = serde_json::json!({
        "app": GROUP,
        "type": "unicast",
        "device_tokens": {"android": [ANDROID_TOKEN], "ios": [IOS_TOKEN]},
        "notification": {"title": "t", "text": "x"},
        "production_mode": false,
        "callback_url": receiver.url(),
    });
    let r = app.post_push(&push).await;
    assert_eq!(r.status(), 207);
    let id = id_of(&r.json().await.unwrap());

    let got = receiver.wait_for_delivered(1).await;
    // Give a stray per-part event the time to show up, were there one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_all = receiver.got();
    assert_eq!(
        got_all.len(),
        1,
        "one event for the parent, none per part: {got:?}"
    );
    assert_signed(&got_all[0], &secret);
    let event = body(&got_all[0]);
    assert_eq!(event["type"], "push.partial");
    assert_eq!(event["data"]["id"], id.as_str());
    assert_eq!(event["data"]["app"], GROUP);
    app.stop().await;
}
